"""A drop-in nn.Conv2d computed as im2col: F.unfold the input into columns, then one matrix multiply per group."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab.ops.arithmetic import IntOrPair, _pair, conv_output_size

PADDING_MODES = ("zeros",)


class UnfoldConv2d(nn.Module):
    """nn.Conv2d's arguments, parameters and output, computed with F.unfold and matmul instead of a conv kernel.

    Only padding_mode='zeros' is supported, because F.unfold pads with zeros.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair | str = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if padding_mode not in PADDING_MODES:
            raise ValueError(
                f"UnfoldConv2d supports padding_mode='zeros' only, but got padding_mode={padding_mode!r}. "
                "Use conv_impl='torch' (nn.Conv2d) for 'reflect', 'replicate' or 'circular' padding."
            )
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must be a positive divisor of both in_channels={in_channels} "
                f"and out_channels={out_channels}."
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self._unfold_padding, self._extra_padding = self._split_padding(padding)

        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            # Registered as None, as nn.Conv2d does, so the state_dict has no "bias" key and loads strictly.
            self.register_parameter("bias", None)
        self.reset_parameters()

    def _split_padding(self, padding: IntOrPair | str) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """The symmetric padding F.unfold applies, and the F.pad (left, right, top, bottom) remainder for 'same'."""
        if padding == "valid":
            return (0, 0), (0, 0, 0, 0)
        if padding == "same":
            if self.stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, as in nn.Conv2d; got stride={self.stride}.")
            total_h, total_w = (d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True))
            # An odd total cannot be split evenly; nn.Conv2d puts the extra row and column at the bottom and right.
            return (total_h // 2, total_w // 2), (0, total_w % 2, 0, total_h % 2)
        if isinstance(padding, str):
            raise ValueError(f"padding={padding!r} is not known; give an int, an (h, w) pair, 'same' or 'valid'.")
        return _pair(padding), (0, 0, 0, 0)

    def reset_parameters(self) -> None:
        """nn.Conv2d's default initialisation: weight and bias uniform in +-1/sqrt(fan_in)."""
        # kaiming_uniform_ with a=sqrt(5) is how nn.Conv2d draws that bound; the same calls in the same order give
        # bit-identical weights to nn.Conv2d under the same seed.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            # An unbatched (C, H, W) input, which nn.Conv2d also accepts.
            return self.forward(x.unsqueeze(0)).squeeze(0)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        if any(self._extra_padding):
            x = F.pad(x, self._extra_padding)  # (B, C, H, W) -> (B, C, H + extra_h, W + extra_w)
        b, _, h, w = x.shape
        h_out, w_out = conv_output_size((h, w), self.kernel_size, self.stride, self._unfold_padding, self.dilation)
        g = self.groups

        cols = F.unfold(x, self.kernel_size, self.dilation, self._unfold_padding, self.stride)  # (B, C*kh*kw, L)
        cols = cols.view(b, g, -1, h_out * w_out)  # (B, G, C/G*kh*kw, L)
        # reshape, not view: a module moved to channels_last has a weight that is not contiguous in this order.
        weight = self.weight.reshape(g, self.out_channels // g, -1)  # (G, O/G, C/G*kh*kw)
        out = weight @ cols  # (B, G, O/G, L)
        out = out.reshape(b, self.out_channels, h_out * w_out)  # (B, O, L)
        if self.bias is not None:
            # Under autocast the product is float16/bfloat16; cast the bias so the sum stays in that dtype.
            out = out + self.bias.to(out.dtype).unsqueeze(1)
        out = out.view(b, self.out_channels, h_out, w_out)  # (B, O, H_out, W_out)
        if channels_last:
            # nn.Conv2d keeps a channels_last input's layout, so the layers after it keep their fast path.
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s
