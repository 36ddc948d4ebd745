"""Cross-correlation and true convolution written as plain Python loops: the readable reference for the fast layers.

Deep-learning "convolution" layers (nn.Conv2d, F.conv2d, UnfoldConv2d) compute cross-correlation; true convolution
is the same sum with the kernel flipped in both axes. All functions here use valid padding and stride 1.
"""

import torch
from torch import Tensor


def corr2d(x: Tensor, k: Tensor) -> Tensor:
    """Slide the 2-D kernel k over the 2-D input x and sum the elementwise products at each position."""
    if x.dim() != 2 or k.dim() != 2:
        raise ValueError(f"corr2d takes 2-D tensors; got x of shape {tuple(x.shape)} and k of shape {tuple(k.shape)}.")
    kh, kw = k.shape
    h_out, w_out = x.shape[0] - kh + 1, x.shape[1] - kw + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(f"a {kh}x{kw} kernel does not fit a {x.shape[0]}x{x.shape[1]} input without padding.")
    out = x.new_zeros((h_out, w_out), dtype=torch.result_type(x, k))
    for i in range(h_out):
        for j in range(w_out):
            out[i, j] = (x[i : i + kh, j : j + kw] * k).sum()
    return out


def conv2d_true(x: Tensor, k: Tensor) -> Tensor:
    """True 2-D convolution: cross-correlation with the kernel flipped top-to-bottom and left-to-right."""
    return corr2d(x, k.flip(0, 1))


def corr2d_multi_in(x: Tensor, k: Tensor) -> Tensor:
    """Cross-correlate a (C, H, W) input with a (C, kh, kw) kernel, summing over the channels."""
    if x.dim() != 3 or k.dim() != 3 or x.shape[0] != k.shape[0]:
        raise ValueError(
            f"corr2d_multi_in takes x of shape (C, H, W) and k of shape (C, kh, kw) with the same C; "
            f"got {tuple(x.shape)} and {tuple(k.shape)}."
        )
    return sum(corr2d(x_c, k_c) for x_c, k_c in zip(x, k, strict=True))


def corr2d_multi_in_out(x: Tensor, k: Tensor) -> Tensor:
    """Cross-correlate a (C, H, W) input with an (O, C, kh, kw) kernel, giving (O, H_out, W_out) as F.conv2d does."""
    if k.dim() != 4:
        raise ValueError(f"corr2d_multi_in_out takes k of shape (O, C, kh, kw); got {tuple(k.shape)}.")
    return torch.stack([corr2d_multi_in(x, k_o) for k_o in k])
