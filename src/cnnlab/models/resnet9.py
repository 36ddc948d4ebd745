"""ResNet-9, the fast CIFAR-10 layout of Page (2018, "How to train your ResNet"), with the project's ResBlk.

prep conv(64) -> conv(128) + pool + ResBlk(128) -> conv(256) + pool -> conv(512) + pool + ResBlk(512) -> global max
pool -> linear. Page reported 94% CIFAR-10 test accuracy in 24 epochs (79 s on one V100); the ResBlks here add a
ReLU after the sum, as every ResBlk of this project does.
"""

from torch import Tensor, nn

from cnnlab.models.resnet import ResBlk, conv3x3


class ConvBNPool(nn.Sequential):
    """conv3x3 - BN - ReLU, then 2x2 max-pooling when pool is set."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool, conv_impl: str = "torch") -> None:
        layers = [conv3x3(in_channels, out_channels, 1, conv_impl), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


class GlobalMaxPool2d(nn.AdaptiveMaxPool2d):
    """AdaptiveMaxPool2d(1) computed as a max over height and width.

    The same values, but a backward pass that `trainer.deterministic=true` accepts on a GPU: adaptive_max_pool2d's
    CUDA backward adds into the input gradient with atomics and has no deterministic version, while amax's is
    elementwise. Where several positions tie for the maximum they share its gradient instead of one taking all.
    """

    def __init__(self) -> None:
        super().__init__(output_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return x.amax(dim=(2, 3), keepdim=True)  # (B, C, H, W) -> (B, C, 1, 1)


class ResNet9(nn.Module):
    """ResNet-9 for 32x32 images (any channel count and class count; sizes divisible by 8)."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        widths: list[int] = (64, 128, 256, 512),
        logit_scale: float = 0.125,
        conv_impl: str = "torch",
    ) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        self.prep = ConvBNPool(in_channels, w0, pool=False, conv_impl=conv_impl)
        self.layer1 = nn.Sequential(ConvBNPool(w0, w1, pool=True, conv_impl=conv_impl), ResBlk(w1, w1, 1, conv_impl))
        self.layer2 = ConvBNPool(w1, w2, pool=True, conv_impl=conv_impl)
        self.layer3 = nn.Sequential(ConvBNPool(w2, w3, pool=True, conv_impl=conv_impl), ResBlk(w3, w3, 1, conv_impl))
        self.pool = GlobalMaxPool2d()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(w3, num_classes, bias=False)
        # Page scales the logits down by 8: the unscaled network starts out overconfident and trains slower.
        self.logit_scale = logit_scale

    def forward(self, x: Tensor) -> Tensor:
        x = self.prep(x)  # (B, C, 32, 32) -> (B, 64, 32, 32)
        x = self.layer1(x)  # -> (B, 128, 16, 16)
        x = self.layer2(x)  # -> (B, 256, 8, 8)
        x = self.layer3(x)  # -> (B, 512, 4, 4)
        x = self.flatten(self.pool(x))  # -> (B, 512)
        return self.fc(x) * self.logit_scale  # -> (B, num_classes)
