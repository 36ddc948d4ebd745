"""What docs/convolution.md says about BatchNorm, pooling, upsampling and in-place ReLU, checked against PyTorch."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.ops import conv_output_size, conv_transpose_output_size, pool_output_size
from tests.test_classifier import setup_run

TOL64 = {"rtol": 1e-12, "atol": 1e-12}


def batch(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3 + 1


# --- BatchNorm --------------------------------------------------------------------------------------------------


def bn_with_affine(channels: int, **kwargs) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, dtype=torch.float64, **kwargs)
    with torch.no_grad():  # weight and bias away from 1 and 0, so the test sees them applied
        bn.weight.copy_(torch.linspace(0.5, 2.0, channels, dtype=torch.float64))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, channels, dtype=torch.float64))
    return bn


def normalized(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias, each per channel."""

    def c(v: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, 1, 1)

    return (x - c(mean)) / c(var + bn.eps).sqrt() * c(bn.weight) + c(bn.bias)


def test_batchnorm_in_training_normalizes_each_channel_by_its_batch_mean_and_biased_variance():
    bn, x = bn_with_affine(3), batch(4, 3, 5, 6)
    mean = x.mean(dim=(0, 2, 3))  # one statistic per channel, over batch, height and width
    var = x.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(bn(x), normalized(x, mean, var, bn), **TOL64)


def test_batchnorm_running_statistics_follow_the_momentum_update_with_the_unbiased_variance():
    bn, momentum = bn_with_affine(3, momentum=0.3), 0.3
    running_mean, running_var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for step in range(3):
        x = batch(4, 3, 5, 6, seed=step)
        bn(x)
        n = x.numel() // x.shape[1]  # values per channel: 4 * 5 * 6
        # new = (1 - momentum) * old + momentum * batch value; the variance term is unbiased (divides by n - 1)
        running_mean = (1 - momentum) * running_mean + momentum * x.mean(dim=(0, 2, 3))
        running_var = (1 - momentum) * running_var + momentum * x.var(dim=(0, 2, 3), unbiased=False) * n / (n - 1)
        torch.testing.assert_close(bn.running_mean, running_mean, **TOL64)
        torch.testing.assert_close(bn.running_var, running_var, **TOL64)
    assert bn.num_batches_tracked == 3


def test_batchnorm_with_momentum_none_keeps_the_plain_average_of_all_batches():
    bn = bn_with_affine(2, momentum=None)
    batches = [batch(8, 2, 3, 3, seed=s) for s in range(4)]
    for x in batches:
        bn(x)
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(dim=(0, 2, 3)) for x in batches]).mean(0), **TOL64)


def test_batchnorm_in_eval_mode_uses_the_running_statistics_and_leaves_them_alone():
    bn = bn_with_affine(3)
    bn(batch(4, 3, 5, 6, seed=1))  # one training step moves the running statistics
    bn.eval()
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    x = batch(4, 3, 5, 6, seed=2)
    torch.testing.assert_close(bn(x), normalized(x, mean, var, bn), **TOL64)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    # So an image's output no longer depends on the other images of its batch, as it does in training.
    torch.testing.assert_close(bn(x[:1]), bn(x)[:1], **TOL64)
    bn.train()
    assert not torch.allclose(bn(x[:1]), bn(x)[:1])


class GradModeRecorder(L.Callback):
    """Records, per stage, whether autograd was on and whether inference mode was at each batch."""

    def __init__(self):
        self.modes: dict[str, set[tuple[bool, bool]]] = {}

    def _record(self, stage):
        self.modes.setdefault(stage, set()).add((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record("train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record("val")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record("test")

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record("predict")


def test_lightning_evaluates_without_autograd_and_tests_and_predicts_in_inference_mode(tiny_data, tmp_path):
    classifier, dm, trainer = setup_run(tiny_data, tmp_path)
    recorder = GradModeRecorder()
    trainer.callbacks.append(recorder)
    trainer.fit(classifier, datamodule=dm)
    trainer.test(classifier, datamodule=dm)
    trainer.predict(classifier, datamodule=dm)
    # (autograd on, inference mode on). Validation inside fit runs under no_grad only: inference tensors could not
    # be used by the training that follows.
    no_grad, inference = {(False, False)}, {(False, True)}
    assert recorder.modes == {"train": {(True, False)}, "val": no_grad, "test": inference, "predict": inference}


# --- pooling ----------------------------------------------------------------------------------------------------


def test_max_pool_gradient_goes_only_to_the_maximum_of_each_window():
    x = batch(1, 2, 6, 6).requires_grad_()
    y, indices = F.max_pool2d(x, 2, return_indices=True)
    y.sum().backward()
    routed = torch.zeros(1, 2, 36, dtype=torch.float64).scatter_(2, indices.flatten(2), 1.0).view_as(x)
    assert torch.equal(x.grad, routed)  # 1 at each window's maximum, 0 at the other three values
    assert x.grad.sum() == y.numel()


def test_overlapping_max_pool_windows_add_up_their_gradients_at_a_shared_maximum():
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    x[0, 0, 1, 1] = 5.0  # inside all four 3x3 windows of a stride-1 pool
    x.requires_grad_()
    F.max_pool2d(x, 3, stride=1).sum().backward()
    assert x.grad[0, 0, 1, 1] == 4 and x.grad.sum() == 4


def test_avg_pool_gradient_spreads_evenly_over_each_window():
    x = batch(1, 1, 5, 5).requires_grad_()
    F.avg_pool2d(x, 3, stride=1).sum().backward()
    # Each value gets 1/9 from every window that covers it; fold(unfold(ones)) counts those windows.
    covering = F.fold(F.unfold(torch.ones_like(x), 3), (5, 5), 3)
    torch.testing.assert_close(x.grad, covering / 9, **TOL64)
    assert covering[0, 0, 2, 2] == 9 and covering[0, 0, 0, 0] == 1


def test_ceil_mode_pools_the_partial_last_window_over_the_values_it_holds():
    x = torch.arange(5, dtype=torch.float64).view(1, 1, 1, 5)  # [0, 1, 2, 3, 4]
    assert pool_output_size((1, 5), (1, 2), ceil_mode=True) == (1, 3)
    assert pool_output_size((1, 5), (1, 2)) == (1, 2)  # floor: the 4 is never seen
    assert F.max_pool2d(x, (1, 2), ceil_mode=True).flatten().tolist() == [1.0, 3.0, 4.0]
    assert F.avg_pool2d(x, (1, 2), ceil_mode=True).flatten().tolist() == [0.5, 2.5, 4.0]  # the last divides by 1


# --- upsampling -------------------------------------------------------------------------------------------------


def test_nearest_upsampling_repeats_each_pixel_into_a_block():
    x = batch(2, 3, 4, 5)
    blocks = x.repeat_interleave(2, dim=2).repeat_interleave(3, dim=3)
    assert torch.equal(F.interpolate(x, scale_factor=(2, 3), mode="nearest"), blocks)


RAMP = torch.arange(4, dtype=torch.float64).view(1, 1, 1, 4)  # one row: 0 1 2 3


def test_bilinear_with_align_corners_samples_from_corner_to_corner():
    # Output position i reads input coordinate i * (4 - 1) / (7 - 1): both ends land on the end pixels.
    y = F.interpolate(RAMP, size=(1, 7), mode="bilinear", align_corners=True)
    assert y.flatten().tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]


def test_bilinear_without_align_corners_samples_at_pixel_centers_and_clamps_at_the_border():
    # Output position i reads input coordinate (i + 0.5) * 4 / 8 - 0.5, clamped into [0, 3].
    y = F.interpolate(RAMP, scale_factor=(1, 2), mode="bilinear", align_corners=False)
    coordinates = ((torch.arange(8, dtype=torch.float64) + 0.5) / 2 - 0.5).clamp(0, 3)
    torch.testing.assert_close(y.flatten(), coordinates, **TOL64)  # on a ramp the value is the coordinate
    assert y.flatten().tolist() == [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0]


@pytest.mark.parametrize("size", [7, 8])
def test_interpolate_round_trip_restores_an_odd_size_only_when_given_the_size(size):
    x = batch(1, 1, size, size)
    down = F.interpolate(x, scale_factor=0.5, mode="bilinear")
    assert down.shape[-1] == size // 2  # 7 -> 3: the output size is floored
    assert F.interpolate(down, scale_factor=2, mode="bilinear").shape[-1] == 2 * (size // 2)  # 6 for 7
    assert F.interpolate(down, size=x.shape[-2:], mode="bilinear").shape == x.shape


@pytest.mark.parametrize("n", range(5, 21))
def test_output_padding_from_the_size_formulas_restores_every_size_after_a_stride2_conv(n):
    m = conv_output_size(n, 3, 2, 1)  # odd n and n + 1 give the same m
    output_padding = n - conv_transpose_output_size(m, 3, 2, 1)
    assert output_padding in (0, 1) and conv_transpose_output_size(m, 3, 2, 1, output_padding) == n
    up = nn.ConvTranspose2d(1, 1, 3, stride=2, padding=1, output_padding=output_padding)
    assert up(torch.zeros(1, 1, m, m)).shape[-1] == n


def test_avg_pool_and_nearest_upsampling_round_trip_is_a_projection_onto_block_means():
    x = batch(2, 3, 8, 6)

    def round_trip(t):
        return F.interpolate(F.avg_pool2d(t, 2), scale_factor=2, mode="nearest")

    y = round_trip(x)
    torch.testing.assert_close(y[..., :2, :2].mean(dim=(-2, -1)), x[..., :2, :2].mean(dim=(-2, -1)), **TOL64)
    torch.testing.assert_close(y[..., 0, 0], y[..., 1, 1], **TOL64)  # one value per 2x2 block
    torch.testing.assert_close(round_trip(y), y, **TOL64)  # a second round trip changes nothing


# --- in-place ReLU ----------------------------------------------------------------------------------------------


def test_inplace_relu_after_sigmoid_breaks_backward_because_sigmoid_kept_its_output():
    x = batch(2, 3).requires_grad_()
    y = torch.sigmoid(x)  # sigmoid's gradient is y * (1 - y): autograd keeps y for backward
    F.relu(y, inplace=True)  # and this overwrites y
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_inplace_relu_on_a_leaf_that_requires_grad_is_refused_at_once():
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        nn.ReLU(inplace=True)(batch(2, 3).requires_grad_())


def test_inplace_relu_after_batchnorm_gives_the_gradients_of_the_out_of_place_one():
    # BatchNorm's backward needs its input, not its output, so ReLU may overwrite the output: ResBlk does this.
    grads = []
    for inplace in (False, True):
        torch.manual_seed(0)
        block = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=inplace)).double()
        x = batch(3, 2, 6, 6).requires_grad_()
        block(x).square().sum().backward()
        grads.append([x.grad, *(p.grad for p in block.parameters())])
    for out_of_place, in_place in zip(*grads):
        torch.testing.assert_close(in_place, out_of_place, **TOL64)
