"""The convolution toolkit agrees with PyTorch: output sizes, the loop reference, UnfoldConv2d, and resampling."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from cnnlab.ops import (
    UnfoldConv2d,
    conv2d_true,
    conv_output_size,
    conv_transpose_output_size,
    corr2d,
    corr2d_multi_in_out,
    make_conv2d,
    pool_output_size,
)

SWEEP = settings(max_examples=60, deadline=None)
# In float64 the two implementations differ only by summation order, about 1e-15 on these sizes; 1e-10 leaves room
# for that and still fails on any real indexing or grouping mistake.
TOL64 = {"rtol": 1e-10, "atol": 1e-10}


@st.composite
def window_axis(draw, max_padding: int | None = 3, max_dilation: int = 3) -> tuple[int, int, int, int, int]:
    """(size, kernel, stride, padding, dilation) along one axis, with the dilated kernel fitting the padded size."""
    k = draw(st.integers(1, 5))
    s = draw(st.integers(1, 3))
    d = draw(st.integers(1, max_dilation))
    # None: the pooling rule, padding at most half the kernel.
    p = draw(st.integers(0, k // 2 if max_padding is None else max_padding))
    smallest = max(1, d * (k - 1) + 1 - 2 * p)
    n = draw(st.integers(smallest, smallest + 12))
    return n, k, s, p, d


@st.composite
def window_args(draw, max_padding: int | None = 3, max_dilation: int = 3) -> dict:
    """Window arguments as (h, w) tuples, each axis drawn independently."""
    h, w = draw(window_axis(max_padding, max_dilation)), draw(window_axis(max_padding, max_dilation))
    names = ("size", "kernel", "stride", "padding", "dilation")
    return {name: (a, b) for name, a, b in zip(names, h, w, strict=True)}


# --- output-size arithmetic -------------------------------------------------------------------------------------


@SWEEP
@given(a=window_args())
def test_conv_output_size_matches_nn_conv2d(a: dict) -> None:
    conv = nn.Conv2d(1, 1, a["kernel"], a["stride"], a["padding"], a["dilation"], bias=False)
    out = conv(torch.zeros(1, 1, *a["size"]))
    assert conv_output_size(a["size"], a["kernel"], a["stride"], a["padding"], a["dilation"]) == out.shape[-2:]


@SWEEP
@given(a=window_args(max_padding=None), ceil_mode=st.booleans())
def test_pool_output_size_matches_max_pool2d(a: dict, ceil_mode: bool) -> None:
    pool = nn.MaxPool2d(a["kernel"], a["stride"], a["padding"], a["dilation"], ceil_mode=ceil_mode)
    out = pool(torch.zeros(1, 1, *a["size"]))
    expected = pool_output_size(a["size"], a["kernel"], a["stride"], a["padding"], a["dilation"], ceil_mode)
    assert expected == out.shape[-2:]


@SWEEP
@given(a=window_args(max_padding=None, max_dilation=1), ceil_mode=st.booleans())
def test_pool_output_size_matches_avg_pool2d(a: dict, ceil_mode: bool) -> None:
    pool = nn.AvgPool2d(a["kernel"], a["stride"], a["padding"], ceil_mode=ceil_mode)
    out = pool(torch.zeros(1, 1, *a["size"]))
    assert pool_output_size(a["size"], a["kernel"], a["stride"], a["padding"], ceil_mode=ceil_mode) == out.shape[-2:]


@st.composite
def transpose_axis(draw) -> tuple[int, int, int, int, int, int]:
    """(size, kernel, stride, padding, output_padding, dilation) along one axis; output_padding < stride or dilation."""
    n = draw(st.integers(1, 8))
    k = draw(st.integers(1, 5))
    s = draw(st.integers(1, 3))
    p = draw(st.integers(0, 3))
    d = draw(st.integers(1, 3))
    op = draw(st.integers(0, max(s, d) - 1))
    return n, k, s, p, op, d


@SWEEP
@given(h=transpose_axis(), w=transpose_axis())
def test_conv_transpose_output_size_matches_nn_conv_transpose2d(h: tuple, w: tuple) -> None:
    size, kernel, stride, padding, output_padding, dilation = zip(h, w, strict=True)
    expected = conv_transpose_output_size(size, kernel, stride, padding, output_padding, dilation)
    assume(min(expected) >= 1)
    conv = nn.ConvTranspose2d(1, 1, kernel, stride, padding, output_padding, dilation=dilation, bias=False)
    assert expected == conv(torch.zeros(1, 1, *size)).shape[-2:]


def test_output_sizes_follow_lenet_with_int_arguments() -> None:
    # LeNet-5 on a 32x32 image: 5x5 conv -> 28, 2x2 pool -> 14; a stride-2 transposed conv undoes the pool.
    assert conv_output_size(32, 5) == 28
    assert pool_output_size(28, 2) == 14
    assert conv_transpose_output_size(14, 2, stride=2) == 28


def test_pool_ceil_mode_keeps_the_partial_last_window() -> None:
    assert pool_output_size(7, 2) == 3
    assert pool_output_size(7, 2, ceil_mode=True) == 4


def test_conv_output_size_rejects_kernel_larger_than_padded_input() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        conv_output_size(4, 7, padding=1)


# --- the loop reference: cross-correlation and true convolution --------------------------------------------------


@st.composite
def image_and_kernel(draw) -> tuple[torch.Tensor, torch.Tensor]:
    """A random float64 image up to 7x7 and a kernel that fits inside it."""
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    kh, kw = draw(st.integers(1, h)), draw(st.integers(1, w))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.randn(h, w, generator=gen, dtype=torch.float64)
    return x, torch.randn(kh, kw, generator=gen, dtype=torch.float64)


@settings(max_examples=30, deadline=None)
@given(xk=image_and_kernel())
def test_corr2d_matches_f_conv2d(xk: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, k = xk
    torch.testing.assert_close(corr2d(x, k), F.conv2d(x[None, None], k[None, None])[0, 0], **TOL64)


@settings(max_examples=30, deadline=None)
@given(xk=image_and_kernel())
def test_conv2d_true_is_corr2d_with_the_kernel_flipped_in_both_axes(xk: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, k = xk
    flipped = k.flip(0, 1)
    torch.testing.assert_close(conv2d_true(x, k), corr2d(x, flipped), **TOL64)
    torch.testing.assert_close(conv2d_true(x, k), F.conv2d(x[None, None], flipped[None, None])[0, 0], **TOL64)


def test_corr2d_and_conv2d_true_give_hand_computed_values() -> None:
    x = torch.arange(9.0).view(3, 3)  # [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    k = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # Top-left window: 0*1 + 1*2 + 3*3 + 4*4 = 27; with the kernel flipped to [[4, 3], [2, 1]]: 0*4 + 1*3 + 3*2 + 4*1.
    assert corr2d(x, k).tolist() == [[27.0, 37.0], [57.0, 67.0]]
    assert conv2d_true(x, k).tolist() == [[13.0, 23.0], [43.0, 53.0]]


def test_corr2d_and_conv2d_true_differ_in_sign_for_the_edge_kernel() -> None:
    x = torch.ones(6, 8)
    x[:, 2:6] = 0
    k = torch.tensor([[1.0, -1.0]])
    assert corr2d(x, k)[0].tolist() == [0, 1, 0, 0, 0, -1, 0]
    assert torch.equal(conv2d_true(x, k), -corr2d(x, k))


def test_corr2d_multi_in_out_matches_f_conv2d() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64)
    k = torch.randn(4, 3, 2, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(corr2d_multi_in_out(x, k), F.conv2d(x[None], k)[0], **TOL64)


def test_corr2d_rejects_kernel_larger_than_input() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        corr2d(torch.ones(2, 5), torch.ones(3, 1))


# --- UnfoldConv2d ------------------------------------------------------------------------------------------------


@st.composite
def conv_configs(draw) -> tuple[dict, tuple[int, int, int, int]]:
    """nn.Conv2d keyword arguments over stride, padding (ints, 'same', 'valid'), dilation, groups and bias, and a
    (B, C, H, W) input shape the kernel fits."""
    groups = draw(st.integers(1, 3))
    kernel = draw(st.tuples(st.integers(1, 4), st.integers(1, 4)))
    dilation = draw(st.tuples(st.integers(1, 2), st.integers(1, 2)))
    padding = draw(st.one_of(st.tuples(st.integers(0, 2), st.integers(0, 2)), st.sampled_from(["same", "valid"])))
    stride = (1, 1) if padding == "same" else draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    kwargs = {
        "in_channels": groups * draw(st.integers(1, 2)),
        "out_channels": groups * draw(st.integers(1, 2)),
        "kernel_size": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "bias": draw(st.booleans()),
    }
    pad = (0, 0) if isinstance(padding, str) else padding
    smallest = [max(1, d * (k - 1) + 1 - 2 * p) for k, p, d in zip(kernel, pad, dilation, strict=True)]
    h, w = (draw(st.integers(n, 9)) for n in smallest)
    return kwargs, (draw(st.integers(1, 2)), kwargs["in_channels"], h, w)


def twin_convs(dtype: torch.dtype = torch.float64, **kwargs) -> tuple[nn.Conv2d, UnfoldConv2d]:
    """An nn.Conv2d and an UnfoldConv2d with identical parameters."""
    ref = nn.Conv2d(**kwargs, dtype=dtype)
    ours = UnfoldConv2d(**kwargs, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def assert_same_output_and_gradients(ref: nn.Module, ours: nn.Module, x: torch.Tensor, **tol) -> None:
    """Forward the same input through both, backpropagate the same random output gradient, and compare."""
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_ours = ref(x_ref), ours(x_ours)
    torch.testing.assert_close(out_ours, out_ref, **tol)
    grad_out = torch.randn(out_ref.shape, dtype=out_ref.dtype, generator=torch.Generator().manual_seed(1))
    out_ref.backward(grad_out)
    out_ours.backward(grad_out)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **tol)
    for name, param in ref.named_parameters():
        torch.testing.assert_close(getattr(ours, name).grad, param.grad, **tol, msg=f"gradient of {name}")


# nn.Conv2d warns that 'same' padding with an even kernel copies the input; that is its cost, not a failure.
@pytest.mark.filterwarnings("ignore:Using padding='same'")
@SWEEP
@given(config=conv_configs(), seed=st.integers(0, 2**31))
def test_unfold_conv_matches_conv2d_output_and_gradients(config: tuple[dict, tuple], seed: int) -> None:
    kwargs, shape = config
    torch.manual_seed(seed)
    ref, ours = twin_convs(**kwargs)
    assert_same_output_and_gradients(ref, ours, torch.randn(shape, dtype=torch.float64), **TOL64)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": (5, 3), "stride": 2, "dilation": (1, 2), "groups": 4},
        {"kernel_size": 2, "padding": "same", "bias": False},
    ],
)
def test_unfold_conv_matches_conv2d_in_float32_at_resnet_widths(kwargs: dict) -> None:
    # 16 -> 32 channels sums up to 144 products per output; float32 then agrees to about 1e-6 at outputs of order 1.
    torch.manual_seed(0)
    ref, ours = twin_convs(torch.float32, in_channels=16, out_channels=32, **kwargs)
    assert_same_output_and_gradients(ref, ours, torch.randn(2, 16, 12, 11), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_unfold_conv_loads_conv2d_state_dict_strictly_and_gives_its_output(bias: bool) -> None:
    ref = nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, groups=2, bias=bias)
    ours = UnfoldConv2d(4, 6, (3, 2), stride=2, padding=1, groups=2, bias=bias)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    x = torch.randn(3, 4, 9, 8)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_unfold_conv_default_init_equals_conv2d_under_the_same_seed() -> None:
    torch.manual_seed(7)
    ref = nn.Conv2d(6, 9, (3, 5), groups=3)
    torch.manual_seed(7)
    ours = UnfoldConv2d(6, 9, (3, 5), groups=3)
    assert torch.equal(ours.weight, ref.weight)
    assert torch.equal(ours.bias, ref.bias)


def test_unfold_conv_keeps_channels_last_layout_and_values() -> None:
    ref, ours = twin_convs(in_channels=4, out_channels=6, kernel_size=3, padding=1)
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    out = ours(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref(x), **TOL64)
    # Moving the module to channels_last makes its 4-D weight non-contiguous in (O, C, kh, kw) order.
    ours.to(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x), ref(x), **TOL64)


def test_unfold_conv_accepts_an_unbatched_input_like_conv2d() -> None:
    ref, ours = twin_convs(in_channels=3, out_channels=5, kernel_size=3)
    x = torch.randn(3, 8, 6, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), **TOL64)


def test_unfold_conv_follows_cpu_autocast_to_bfloat16_like_conv2d() -> None:
    torch.manual_seed(0)
    ref, ours = twin_convs(torch.float32, in_channels=8, out_channels=8, kernel_size=3, padding=1)
    x = torch.randn(2, 8, 10, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref, out_ours = ref(x), ours(x)
    assert out_ours.dtype == out_ref.dtype == torch.bfloat16
    # bfloat16 keeps 8 significant bits (relative step 2**-8 = 0.004); 72-term sums of order-1 outputs stay in 3e-2.
    torch.testing.assert_close(out_ours.float(), ref(x), rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_unfold_conv_follows_cuda_autocast_to_float16_like_conv2d() -> None:
    torch.manual_seed(0)
    ref, ours = twin_convs(torch.float32, in_channels=8, out_channels=8, kernel_size=3, padding=1)
    ref, ours, x = ref.cuda(), ours.cuda(), torch.randn(2, 8, 10, 10, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out_ref, out_ours = ref(x), ours(x)
    assert out_ours.dtype == out_ref.dtype == torch.float16
    torch.testing.assert_close(out_ours.float(), ref(x), rtol=1e-2, atol=1e-2)


def test_make_conv2d_unfold_builds_unfold_conv2d_and_torch_builds_conv2d() -> None:
    assert isinstance(make_conv2d("unfold", 3, 8, 3, padding=1), UnfoldConv2d)
    assert type(make_conv2d("torch", 3, 8, 3, padding=1)) is nn.Conv2d


def test_make_conv2d_rejects_an_unknown_impl() -> None:
    with pytest.raises(ValueError, match="conv_impl='fft' is not known"):
        make_conv2d("fft", 3, 8, 3)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_unfold_conv_rejects_padding_modes_other_than_zeros(padding_mode: str) -> None:
    with pytest.raises(ValueError, match="padding_mode='zeros' only"):
        UnfoldConv2d(3, 8, 3, padding=1, padding_mode=padding_mode)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"groups": 2}, "must be a positive divisor"),
        ({"padding": "full"}, "padding='full' is not known"),
        ({"padding": "same", "stride": 2}, "padding='same' needs stride 1"),
    ],
)
def test_unfold_conv_rejects_arguments_conv2d_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UnfoldConv2d(3, 8, 3, **kwargs)


def test_fold_with_a_1x1_kernel_is_the_last_step_of_unfold_conv() -> None:
    conv = UnfoldConv2d(3, 6, (3, 2), stride=(2, 1), padding=1).double()
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    h_out, w_out = conv_output_size((9, 7), (3, 2), (2, 1), 1)
    columns = F.unfold(x, (3, 2), padding=1, stride=(2, 1))  # (B, C*kh*kw, L)
    out_columns = conv.weight.view(6, -1) @ columns + conv.bias.view(1, 6, 1)  # (B, O, L)
    # The layer's last step, the reshape of (B, O, L) to (B, O, H_out, W_out), is F.fold with a 1x1 kernel.
    expected = F.fold(out_columns, output_size=(h_out, w_out), kernel_size=1)
    torch.testing.assert_close(conv(x), expected, **TOL64)


def test_fold_of_unfold_counts_the_windows_conv_output_size_says_cover_each_pixel() -> None:
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64)
    window = {"kernel_size": 3, "padding": 1, "stride": 2}
    counts = F.fold(F.unfold(torch.ones_like(x), **window), x.shape[-2:], **window)
    torch.testing.assert_close(F.fold(F.unfold(x, **window), x.shape[-2:], **window), x * counts, **TOL64)
    # Along each axis, window j of the conv_output_size(n, 3, 2, 1) windows covers input positions 2j - 1 .. 2j + 1.
    per_axis = []
    for n in x.shape[-2:]:
        covering = torch.zeros(n, dtype=torch.float64)
        for j in range(conv_output_size(n, 3, 2, 1)):
            covering[max(2 * j - 1, 0) : 2 * j + 2] += 1
        per_axis.append(covering)
    torch.testing.assert_close(counts[0, 0], per_axis[0][:, None] * per_axis[1][None, :], **TOL64)
    assert counts.max() == 4  # a pixel at odd row and column is shared by 2 windows in each direction


# --- down- and up-sampling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(7, 7), (8, 8), (15, 16), (9, 12)])
def test_stride2_conv_then_transposed_conv_with_output_size_restores_the_input_size(size: tuple[int, int]) -> None:
    down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1)
    x = torch.randn(1, 3, *size)
    y = down(x)
    assert y.shape[-2:] == conv_output_size(size, 3, 2, 1)
    # output_size= picks the output_padding that conv_transpose_output_size needs to give the input size back.
    padding = tuple(n - conv_transpose_output_size(m, 3, 2, 1) for n, m in zip(size, y.shape[-2:]))
    assert set(padding) <= {0, 1} and conv_transpose_output_size(tuple(y.shape[-2:]), 3, 2, 1, padding) == size
    assert up(y, output_size=x.shape[-2:]).shape == x.shape


def test_transposed_conv_without_output_size_cannot_tell_odd_from_even_sizes() -> None:
    # 7 and 8 both become 4 after the stride-2 conv, so the transposed conv alone maps both back to 7.
    assert conv_output_size(7, 3, 2, 1) == conv_output_size(8, 3, 2, 1) == 4
    assert conv_transpose_output_size(4, 3, 2, 1) == 7
    up = nn.ConvTranspose2d(1, 1, 3, stride=2, padding=1)
    assert up(torch.zeros(1, 1, 4, 4)).shape[-2:] == (7, 7)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_interpolate_with_scale_factor_2_doubles_the_size_as_a_2x2_stride_2_transposed_conv_does(mode: str) -> None:
    x = torch.randn(2, 3, 7, 8)
    up = F.interpolate(x, scale_factor=2, mode=mode)
    assert up.shape == (2, 3, *conv_transpose_output_size((7, 8), 2, 2)) == (2, 3, 14, 16)
    if mode == "nearest":  # nearest upsampling copies each pixel into a 2x2 block: a transposed conv of ones
        ones = torch.ones(3, 1, 2, 2)
        torch.testing.assert_close(up, F.conv_transpose2d(x, ones, stride=2, groups=3))
