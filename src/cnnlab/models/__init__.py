"""The networks: plain nn.Modules, usable without Lightning or Hydra."""

from cnnlab.models.airbench import AirbenchNet
from cnnlab.models.lenet import LeNet5
from cnnlab.models.resnet import ResBlk, ResNet
from cnnlab.models.resnet9 import ResNet9
from cnnlab.models.torchvision_net import torchvision_net

__all__ = ["AirbenchNet", "LeNet5", "ResBlk", "ResNet", "ResNet9", "torchvision_net"]
