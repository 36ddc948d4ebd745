"""MNIST (LeCun et al.) and Fashion-MNIST (Xiao et al., 2017): 60,000 training and 10,000 test images, 1x28x28,
in IDX files under MNIST/raw/ and FashionMNIST/raw/."""

from pathlib import Path

import numpy as np

from cnnlab.data.datamodule import ImageDataModule
from cnnlab.data.formats import read_idx
from cnnlab.errors import UserError

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class MNISTDataModule(ImageDataModule):
    """MNIST from `<data_dir>/MNIST/raw/` (plain or .gz IDX files), as torchvision lays it out."""

    name = "MNIST"
    folder = "MNIST"  # torchvision's folder under data_dir

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / self.folder / "raw"

    def _path(self, name: str) -> Path:
        plain = self.raw_dir / name
        gz = plain.with_name(name + ".gz")
        return gz if not plain.is_file() and gz.is_file() else plain

    def required_files(self) -> list[Path]:
        return [self._path(name) for pair in FILES.values() for name in pair]

    def read_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = (self._path(name) for name in FILES[split])
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1:
            raise UserError(
                f"{image_path} should hold N x 28 x 28 images and {label_path} N labels, but they have shapes "
                f"{images.shape} and {labels.shape}. Replace them with the original {self.name} files."
            )
        if len(images) != len(labels):
            raise UserError(
                f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels; "
                f"the files do not belong together. Replace them with the original {self.name} files."
            )
        self.files_read += [image_path, label_path]
        return images[:, None], labels.astype(np.int64)  # (N, 28, 28) -> (N, 1, 28, 28)

    def fetch(self) -> None:
        from torchvision.datasets import MNIST

        MNIST(str(self.data_dir), train=True, download=True)


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Zalando's article images) from `<data_dir>/FashionMNIST/raw/`: MNIST's file names and format."""

    name = "Fashion-MNIST"
    folder = "FashionMNIST"

    def fetch(self) -> None:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(self.data_dir), train=True, download=True)
