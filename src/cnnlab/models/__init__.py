"""The networks: plain nn.Modules, usable without Lightning or Hydra."""

from cnnlab.models.lenet import LeNet5
from cnnlab.models.resnet import ResBlk, ResNet

__all__ = ["LeNet5", "ResBlk", "ResNet"]
