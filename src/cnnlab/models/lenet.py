"""LeNet-5 (LeCun et al., 1998, "Gradient-based learning applied to document recognition").

Two 5x5 convolutions with pooling, then three fully connected layers. The original network saw 32x32 inputs; a
28x28 MNIST digit is zero-padded by 2 in the first convolution so the classic 32x32 geometry holds. With relu, max
pooling and 10 classes on 1x28x28 inputs it has 61,706 parameters.
"""

from torch import Tensor, nn

from cnnlab.ops import conv_output_size, make_conv2d, pool_output_size

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


def _choice(name: str, value: str, options: dict) -> type[nn.Module]:
    if value not in options:
        raise ValueError(f"{name}={value!r} is not known; choose one of {', '.join(options)}.")
    return options[value]


class LeNet5(nn.Module):
    """LeNet-5: conv5x5(6) - act - pool - conv5x5(16) - act - pool - fc120 - fc84 - fc(num_classes)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        activation: str = "relu",
        pooling: str = "max",
        batch_norm: bool = False,
        conv_impl: str = "torch",
    ) -> None:
        super().__init__()
        act, pool = _choice("activation", activation, ACTIVATIONS), _choice("pooling", pooling, POOLS)
        pad = max(0, (32 - image_size + 1) // 2)  # 28 -> 2: the classic 32x32 geometry
        self.conv1 = make_conv2d(conv_impl, in_channels, 6, kernel_size=5, padding=pad, bias=not batch_norm)
        self.bn1 = nn.BatchNorm2d(6) if batch_norm else nn.Identity()
        self.act1 = act()
        self.pool1 = pool(kernel_size=2)
        self.conv2 = make_conv2d(conv_impl, 6, 16, kernel_size=5, bias=not batch_norm)
        self.bn2 = nn.BatchNorm2d(16) if batch_norm else nn.Identity()
        self.act2 = act()
        self.pool2 = pool(kernel_size=2)
        side = pool_output_size(conv_output_size(image_size, 5, padding=pad), 2)
        side = pool_output_size(conv_output_size(side, 5), 2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.act3 = act()
        self.fc2 = nn.Linear(120, 84)
        self.act4 = act()
        self.fc = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))  # (B, C, 28, 28) -> (B, 6, 28, 28)
        x = self.pool1(x)  # -> (B, 6, 14, 14)
        x = self.act2(self.bn2(self.conv2(x)))  # -> (B, 16, 10, 10)
        x = self.pool2(x)  # -> (B, 16, 5, 5)
        x = self.flatten(x)  # -> (B, 400)
        x = self.act3(self.fc1(x))  # -> (B, 120)
        x = self.act4(self.fc2(x))  # -> (B, 84)
        return self.fc(x)  # -> (B, num_classes)
