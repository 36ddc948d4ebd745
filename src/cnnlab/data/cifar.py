"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009): 50,000 training and 10,000 test images, 3x32x32, as python pickles."""

from pathlib import Path
from typing import Any

import numpy as np

from cnnlab.data.datamodule import ImageDataModule
from cnnlab.data.formats import read_cifar_batch, read_cifar_pickle
from cnnlab.data.prepare_once import prepare_once_per_machine
from cnnlab.errors import UserError

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
LABEL_KINDS = ("fine", "coarse")


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


class CIFAR100DataModule(ImageDataModule):
    """CIFAR-100 from `<data_dir>/cifar-100-python/` (train, test, meta): 100 fine classes, or the 20 superclasses.

    Args:
        label_kind: "fine" (100 classes) or "coarse" (the 20 superclasses); class names come from the meta file.
    """

    name = "CIFAR-100"
    folder = "cifar-100-python"

    def __init__(self, label_kind: str = "fine", **settings: Any) -> None:
        if label_kind not in LABEL_KINDS:
            raise UserError(
                f"data.label_kind={label_kind!r} is not known; choose fine (100 classes) or coarse (20 superclasses)."
            )
        super().__init__(**settings)
        self.label_kind = label_kind

    @property
    def batch_dir(self) -> Path:
        return self.data_dir / self.folder

    def required_files(self) -> list[Path]:
        return [self.batch_dir / name for name in ("train", "test", "meta")]

    def discover(self) -> dict[str, Any]:
        """The label kind's class names (from the meta file) and their number, where the config left them null."""
        facts: dict[str, Any] = {}
        if self.class_names is None:
            prepare_once_per_machine(self)  # every process of a run reads the meta file; one downloads it
            meta_path = self.batch_dir / "meta"
            names = read_cifar_pickle(meta_path).get(f"{self.label_kind}_label_names")
            if not isinstance(names, list) or not names:
                raise UserError(
                    f"Data file {meta_path} lacks the '{self.label_kind}_label_names' list of a CIFAR-100 meta file; "
                    "replace it."
                )
            self.class_names = facts["class_names"] = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
            self.files_read.append(meta_path)
        if self.num_classes is None:
            self.num_classes = facts["num_classes"] = len(self.class_names)
        return facts

    def read_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        path = self.batch_dir / split
        self.files_read.append(path)
        return read_cifar_batch(path, self.image_shape, label_key=f"{self.label_kind}_labels")

    def fetch(self) -> None:
        from torchvision.datasets import CIFAR100

        CIFAR100(str(self.data_dir), train=True, download=True)
