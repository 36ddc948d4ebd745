"""Datasets: on-disk readers, DataModules, and the tensor-resident loader."""

from cnnlab.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from cnnlab.data.datamodule import ImageDataModule
from cnnlab.data.folder import FolderDataModule
from cnnlab.data.mnist import FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "FashionMNISTDataModule",
    "FolderDataModule",
    "ImageDataModule",
    "MNISTDataModule",
]
