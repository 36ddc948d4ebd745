"""The one switch between PyTorch's convolution and the project's Unfold + matmul convolution."""

from torch import nn

CONV_IMPLS = ("torch", "unfold")


def make_conv2d(conv_impl: str, *args, **kwargs) -> nn.Module:
    """Build nn.Conv2d (``torch``) or UnfoldConv2d (``unfold``) with nn.Conv2d's arguments."""
    if conv_impl == "torch":
        return nn.Conv2d(*args, **kwargs)
    if conv_impl == "unfold":
        from cnnlab.ops.unfold_conv import UnfoldConv2d

        return UnfoldConv2d(*args, **kwargs)
    raise ValueError(f"conv_impl={conv_impl!r} is not known; choose one of {', '.join(CONV_IMPLS)}.")
