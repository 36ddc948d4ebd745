"""CIFAR-10 (Krizhevsky, 2009): 50,000 training and 10,000 test images, 3x32x32, as python pickle batches."""

from pathlib import Path

import numpy as np

from cnnlab.data.datamodule import ImageDataModule
from cnnlab.data.formats import read_cifar_batch

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 from `<data_dir>/cifar-10-batches-py/`; any well-formed batch files load (no checksum test)."""

    name = "CIFAR-10"
    folder = "cifar-10-batches-py"

    @property
    def batch_dir(self) -> Path:
        return self.data_dir / self.folder

    def required_files(self) -> list[Path]:
        return [self.batch_dir / name for name in [*TRAIN_BATCHES, "test_batch"]]

    def read_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        names = TRAIN_BATCHES if split == "train" else ["test_batch"]
        parts = [read_cifar_batch(self.batch_dir / name, self.image_shape) for name in names]
        self.files_read += [self.batch_dir / name for name in names]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def fetch(self) -> None:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(self.data_dir), train=True, download=True)
