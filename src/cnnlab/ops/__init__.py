"""The convolution toolkit: shape arithmetic, convolution from scratch, and the conv layer switch."""

from cnnlab.ops.arithmetic import conv_output_size, conv_transpose_output_size, pool_output_size
from cnnlab.ops.correlation import conv2d_true, corr2d, corr2d_multi_in, corr2d_multi_in_out
from cnnlab.ops.layers import CONV_IMPLS, make_conv2d
from cnnlab.ops.unfold_conv import UnfoldConv2d

__all__ = [
    "CONV_IMPLS",
    "UnfoldConv2d",
    "conv2d_true",
    "conv_output_size",
    "conv_transpose_output_size",
    "corr2d",
    "corr2d_multi_in",
    "corr2d_multi_in_out",
    "make_conv2d",
    "pool_output_size",
]
