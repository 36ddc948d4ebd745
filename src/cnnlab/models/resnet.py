"""ResNets built from one residual block (He et al., 2016, "Deep residual learning for image recognition").

Shaped for small images (28x28, 32x32): a 3x3 stem without max-pool, as the paper's CIFAR-10 networks, then stages of
`ResBlk`, global average pooling and one linear layer, so any channel count, class count or image size works.
The paper's ResNet-20 reached 91.25% on CIFAR-10 (Table 6); ResNet-18 with this stem is the common ~95% baseline.
"""

from torch import Tensor, nn

from cnnlab.ops import make_conv2d


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, conv_impl: str = "torch") -> nn.Module:
    """3x3 convolution with padding 1 and no bias (a BatchNorm follows)."""
    return make_conv2d(conv_impl, in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1, conv_impl: str = "torch") -> nn.Module:
    """1x1 convolution without bias, for projection shortcuts."""
    return make_conv2d(conv_impl, in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class ResBlk(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, ReLU after the sum.

    The shortcut is the identity when shape is kept, and conv1x1(stride)+BN when channels or stride change.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, conv_impl: str = "torch") -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride, conv_impl)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_channels, out_channels, 1, conv_impl)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                conv1x1(in_channels, out_channels, stride, conv_impl), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = self.shortcut(x)  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))  # -> (B, C_out, H/s, W/s)
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A stem, stages of ResBlk (widths, depths, strides per stage), global average pooling, a linear classifier."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        widths: list[int] = (64, 128, 256, 512),
        depths: list[int] = (2, 2, 2, 2),
        strides: list[int] = (1, 2, 2, 2),
        stem_width: int | None = None,
        conv_impl: str = "torch",
    ) -> None:
        super().__init__()
        if not (len(widths) == len(depths) == len(strides)):
            raise ValueError(
                f"widths {list(widths)}, depths {list(depths)} and strides {list(strides)} need one entry per stage."
            )
        stem_width = stem_width or widths[0]
        self.conv1 = conv3x3(in_channels, stem_width, 1, conv_impl)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        channels = stem_width
        for i, (width, depth, stride) in enumerate(zip(widths, depths, strides), start=1):
            blocks = [ResBlk(channels, width, stride, conv_impl)]
            blocks += [ResBlk(width, width, 1, conv_impl) for _ in range(depth - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            channels = width
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, C, H, W) -> (B, stem_width, H, W)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)  # each stage divides H, W by its stride
        x = self.avgpool(x)  # -> (B, widths[-1], 1, 1)
        x = self.flatten(x)  # -> (B, widths[-1])
        return self.fc(x)  # -> (B, num_classes)
