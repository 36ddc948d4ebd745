"""torchvision's ImageNet classification networks (ResNet, MobileNetV3, EfficientNet, ConvNeXt, ...) with a head
sized for another class count: the backbones a user's own images are fine-tuned from.

The network returned is torchvision's own module, built by `torchvision.models.get_model`, so its parameter names are
those of torchvision's weight files (`conv1.weight`, `layer1.0.bn1.running_mean`, `fc.weight`) and every module name
torchvision gives (`layer4`, `features.3`) can be frozen. It starts randomly initialized: the ImageNet weights are
copied in by the code that starts training (training/pretrained.py), never here, so that rebuilding a trained network
from its checkpoint, or on the meta device to check a config, reads no weights file.
"""

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from torchvision.models import Weights

# torchvision is imported inside the functions, when a network is built: importing it costs seconds (it loads
# torch._dynamo), and LeNet-5 or the plain loop in cnnlab.tools.plain_mnist import this package without needing it.

# Their forward returns a tuple with auxiliary classifiers' logits while training, not one tensor of logits.
AUXILIARY_OUTPUTS = ("googlenet", "inception_v3")


def weights_named(arch: str, weights: str | None) -> "Weights | None":
    """The torchvision weights `weights` (e.g. IMAGENET1K_V1, DEFAULT) of architecture arch; None for None."""
    import torchvision.models
    from torchvision.models import get_model_weights, list_models

    if arch not in list_models(module=torchvision.models) or arch in AUXILIARY_OUTPUTS:
        raise ValueError(
            f"arch={arch!r} is not a torchvision classification model; choose one of "
            "torchvision.models.list_models(module=torchvision.models), e.g. resnet18, resnet50, mobilenet_v3_small, "
            f"efficientnet_b0, convnext_tiny ({', '.join(AUXILIARY_OUTPUTS)} are left out: they return auxiliary "
            "outputs while training)."
        )
    if weights is None:
        return None
    enum = get_model_weights(arch)
    if weights not in enum.__members__:
        raise ValueError(f"weights={weights!r} are not weights of {arch}; choose one of {', '.join(enum.__members__)}.")
    return enum[weights]


def torchvision_net(arch: str = "resnet18", num_classes: int = 1000, weights: str | None = None) -> nn.Module:
    """torchvision's `arch` with num_classes outputs, randomly initialized.

    Args:
        arch: a torchvision classification model name, e.g. resnet18, resnet50, mobilenet_v3_small, efficientnet_b0,
            convnext_tiny.
        num_classes: outputs of the classifier head (the only layers whose shapes depend on it).
        weights: the name of the torchvision weights this network is fine-tuned from (IMAGENET1K_V1, DEFAULT, ...),
            or None to train from scratch. Checked against arch here; they decide the input size and normalization
            the network expects, and cnnlab.training.pretrained loads them at the start of training.
    """
    from torchvision.models import get_model

    weights_named(arch, weights)
    return get_model(arch, weights=None, num_classes=num_classes)
