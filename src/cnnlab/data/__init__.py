"""Datasets: on-disk readers, DataModules, and the tensor-resident loader."""

from cnnlab.data.cifar import CIFAR10DataModule
from cnnlab.data.datamodule import ImageDataModule
from cnnlab.data.mnist import MNISTDataModule

__all__ = ["CIFAR10DataModule", "ImageDataModule", "MNISTDataModule"]
