"""The networks: plain nn.Modules, usable without Lightning or Hydra.

Each name is imported on first use (PEP 562), so `from cnnlab.models.lenet import LeNet5` loads torch alone and not
torchvision, which only torchvision_net needs.
"""

from importlib import import_module

_MODULES = {
    "AirbenchNet": "airbench",
    "LeNet5": "lenet",
    "ResBlk": "resnet",
    "ResNet": "resnet",
    "ResNet9": "resnet9",
    "torchvision_net": "torchvision_net",
}
__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_MODULES[name]}"), name)
