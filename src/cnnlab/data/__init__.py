"""Datasets: on-disk readers, DataModules, and the tensor-resident loader.

The DataModules are imported on first use (PEP 562), so a reader such as `cnnlab.data.formats` loads without
Lightning.
"""

from importlib import import_module

_MODULES = {
    "CIFAR10DataModule": "cifar",
    "CIFAR100DataModule": "cifar",
    "FashionMNISTDataModule": "mnist",
    "FolderDataModule": "folder",
    "ImageDataModule": "datamodule",
    "MNISTDataModule": "mnist",
}
__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_MODULES[name]}"), name)
