"""The DataModule shared by MNIST and CIFAR-10: files -> uint8 tensors -> splits -> loaders.

Two loader paths give the same batches in distribution: `tensor` (the dataset held once as a uint8 tensor on the
training device, batches transformed there; the default) and `torchvision` (a Dataset with per-image torchvision
transforms behind a DataLoader; the general path and the reference the tensor path is tested against).
"""

import hashlib
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from cnnlab.data.tensor_loader import (
    AUGMENT_EACH,
    FLIPS,
    PAD_MODES,
    BatchTransform,
    EpochSampler,
    TensorLoader,
    flip_mode,
)
from cnnlab.errors import UserError

LOADERS = ("tensor", "torchvision")


def check_augmentation(flip: str, crop_pad_mode: str, loader: str, augment_each: str = "batch") -> None:
    """Refuse data.flip, data.crop_pad_mode and data.augment_each values that are not known, or that the loader
    cannot apply."""
    if flip not in FLIPS:
        raise UserError(f"data.flip={flip!r} is not known; choose one of {', '.join(FLIPS)} (true means random).")
    if crop_pad_mode not in PAD_MODES:
        raise UserError(f"data.crop_pad_mode={crop_pad_mode!r} is not known; choose one of {', '.join(PAD_MODES)}.")
    if augment_each not in AUGMENT_EACH:
        raise UserError(f"data.augment_each={augment_each!r} is not known; choose one of {', '.join(AUGMENT_EACH)}.")
    if augment_each == "epoch" and loader != "tensor":
        raise UserError(
            f"data.augment_each=epoch needs data.loader=tensor, which holds the images as one tensor to augment at "
            f"each epoch's start; data.loader={loader} transforms each image as its DataLoader worker reads it. Use "
            "data.loader=tensor, or data.augment_each=batch."
        )
    if flip == "alternating" and loader != "tensor":
        # A per-image torchvision transform knows neither its image's index nor the epoch, which alternating needs.
        raise UserError(
            f"data.flip=alternating needs data.loader=tensor; data.loader={loader} applies per-image torchvision "
            "transforms, which know neither the image nor the epoch. Use data.loader=tensor, or data.flip=random."
        )


class ImageTensorDataset(Dataset):
    """Images held as a uint8 N x C x H x W tensor, served one PIL image at a time through torchvision transforms."""

    def __init__(self, images: Tensor, labels: Tensor, transform: transforms.Compose) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        array = self.images[i].permute(1, 2, 0).numpy()  # (C, H, W) -> (H, W, C)
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        return self.transform(image), int(self.labels[i])


class ImageDataModule(L.LightningDataModule):
    """Holds a dataset's train/val/test splits and serves them through the tensor or the torchvision path.

    Subclasses name their files and read them; everything else (splits, transforms, loaders) lives here.
    """

    name = "images"

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        val_size: int = 5000,
        split_seed: int = 0,
        seed: int = 0,
        loader: str = "tensor",
        num_workers: int = 0,
        augment: bool = False,
        crop_padding: int = 0,
        crop_pad_mode: str = "zeros",
        flip: bool | str = False,
        augment_each: str = "batch",
        drop_last: bool = False,
        download: bool = True,
        num_classes: int | None = 10,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        mean: tuple[float, ...] | None = (0.5,),
        std: tuple[float, ...] | None = (0.5,),
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        if loader not in LOADERS:
            raise UserError(f"data.loader={loader!r} is not known; choose one of {', '.join(LOADERS)}.")
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.split_seed, self.seed = val_size, split_seed, seed
        self.loader, self.num_workers, self.download = loader, num_workers, download
        self.augment, self.crop_padding, self.crop_pad_mode = augment, crop_padding, crop_pad_mode
        self.flip = flip_mode(flip)  # true/false: random/none, as configs written before the modes say
        self.augment_each = augment_each
        check_augmentation(self.flip, crop_pad_mode, loader, augment_each)
        self.drop_last = drop_last
        self.num_classes, self.image_shape = num_classes, tuple(image_shape)
        # None: found in the files by discover() (a folder's classes and pixel statistics, CIFAR-100's class names).
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.class_names = list(class_names) if class_names else None
        if self.class_names is None and num_classes is not None:
            self.class_names = [str(i) for i in range(num_classes)]
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}
        self.files_read: list[Path] = []

    # --- what a subclass provides -------------------------------------------------------------------------------
    def required_files(self) -> list[Path]:
        raise NotImplementedError

    def read_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Read 'train' or 'test' into (uint8 N x C x H x W, int64 N)."""
        raise NotImplementedError

    def fetch(self) -> None:
        """Download the dataset's files into data_dir."""
        raise NotImplementedError

    def discover(self) -> dict[str, Any]:
        """The data-config values this dataset finds in its files, and only those the config left null.

        train() calls it once, before it checks the config or builds the model, and writes the result into cfg.data,
        so the checkpoint stores the values and evaluation, prediction and export use them as they are. A dataset
        whose config states everything (MNIST, CIFAR-10) returns {}.
        """
        return {}

    def has_split(self, split: str) -> bool:
        """Whether the split will hold images, known without reading any: a validation split only where val_size
        holds images out of the training files; the test files are always there."""
        return split != "val" or self.val_size > 0

    # --- Lightning hooks ------------------------------------------------------------------------------------------
    def missing_files(self) -> list[Path]:
        return [p for p in self.required_files() if not p.is_file()]

    def prepare_data(self) -> None:
        missing = self.missing_files()
        if not missing:
            return
        if self.download:
            try:
                self.fetch()
            except Exception:  # offline, blocked or interrupted: the paragraph below says what to do
                pass
            missing = self.missing_files()
        if missing:
            names = ", ".join(str(p.relative_to(self.data_dir)) for p in missing)
            raise UserError(
                f"The {self.name} files are not in {self.data_dir} (missing: {names}) and could not be downloaded. "
                f"Put the files there in torchvision's layout, or point data.data_dir=<folder> at a folder that "
                "holds them."
            )

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.prepare_data()
        device = torch.device("cpu")
        rank, world_size = 0, 1
        if self.trainer is not None:
            rank, world_size = self.trainer.global_rank, self.trainer.world_size
            if self.loader == "tensor":
                device = self.trainer.strategy.root_device
        self.rank, self.world_size = rank, world_size
        self.discover()  # a DataModule built without train() (tests, notebooks) finds its values here
        self.splits = {split: (x.to(device), y.to(device)) for split, (x, y) in self.load_splits().items()}
        if self.trainer is not None and not len(self.splits["val"][1]):
            # No validation split (val_size=0 trains on every image): the Trainer skips the validation loop and its
            # sanity check rather than running them over an empty loader and warning about it.
            self.trainer.limit_val_batches = 0

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        """train, val and test on the CPU: the training files split by val_size and split_seed, and the test files."""
        train_x, train_y = self._checked(*self.read_split("train"), "train")
        test_x, test_y = self._checked(*self.read_split("test"), "test")
        if not 0 <= self.val_size < len(train_y):
            raise UserError(
                f"data.val_size={self.val_size} must be at least 0 and below the {len(train_y)} training images "
                f"in {self.data_dir}; lower it."
            )
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        return {
            "train": (train_x[train_idx], train_y[train_idx]),
            "val": (train_x[val_idx], train_y[val_idx]),
            "test": (test_x, test_y),
        }

    def _checked(self, images: np.ndarray, labels: np.ndarray, split: str) -> tuple[Tensor, Tensor]:
        if tuple(images.shape[1:]) != self.image_shape:
            raise UserError(
                f"The {self.name} {split} images in {self.data_dir} have shape {tuple(images.shape[1:])}, but the data "
                f"config says image_shape={list(self.image_shape)}. Fix data.image_shape or the files."
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise UserError(
                f"The {self.name} {split} labels in {self.data_dir} run from {labels.min()} to {labels.max()}, outside "
                f"0..{self.num_classes - 1} for num_classes={self.num_classes}. Fix data.num_classes or the files."
            )
        return torch.from_numpy(np.array(images, copy=True)), torch.from_numpy(labels.astype(np.int64))

    def file_checksums(self) -> dict[str, str]:
        """sha256 of every data file read, for the run's reproducibility record."""
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in self.files_read}

    # --- resuming mid-epoch --------------------------------------------------------------------------------------
    # Lightning builds the training loader before it restores a checkpoint (the schedulers' step count needs it), so
    # it never hands the loader its saved position; the DataModule's own state, which Lightning does restore, does.
    def state_dict(self) -> dict:
        loader = getattr(self, "train_loader", None)
        return {"train_loader": loader.state_dict()} if isinstance(loader, TensorLoader) else {}

    def load_state_dict(self, state: dict) -> None:
        self.train_loader_state = state.get("train_loader")
        loader = getattr(self, "train_loader", None)
        if isinstance(loader, TensorLoader) and self.train_loader_state:
            loader.load_state_dict(self.train_loader_state)
            self.train_loader_state = None

    # --- loaders --------------------------------------------------------------------------------------------------
    def train_dataloader(self):
        self.train_loader = self._loader(
            "train", self.batch_size, shuffle=True, augment=self.augment, drop_last=self.drop_last
        )
        if isinstance(self.train_loader, TensorLoader) and getattr(self, "train_loader_state", None):
            self.train_loader.load_state_dict(self.train_loader_state)
            self.train_loader_state = None
        return self.train_loader

    def val_dataloader(self):
        return self._loader("val", self.eval_batch_size, shuffle=False, augment=False)

    def test_dataloader(self):
        return self._loader("test", self.eval_batch_size, shuffle=False, augment=False)

    def predict_dataloader(self):
        return self.test_dataloader()

    def batch_transform(self, augment: bool) -> BatchTransform:
        """The tensor path's normalization (and augmentation when asked), on whole batches."""
        flip = self.flip if augment else "none"
        return BatchTransform(self.mean, self.std, self.crop_padding if augment else 0, flip, self.crop_pad_mode)

    def image_transform(self, augment: bool) -> transforms.Compose:
        """The torchvision path's per-image transforms, equivalent to batch_transform."""
        steps: list = []
        if augment and self.crop_padding:
            mode = {"zeros": "constant", "reflect": "reflect"}[self.crop_pad_mode]
            steps.append(transforms.RandomCrop(self.image_shape[1:], padding=self.crop_padding, padding_mode=mode))
        if augment and self.flip == "random":  # alternating is refused on this path (check_augmentation)
            steps.append(transforms.RandomHorizontalFlip())
        steps += [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        return transforms.Compose(steps)

    def _loader(self, split: str, batch_size: int, shuffle: bool, augment: bool, drop_last: bool = False):
        images, labels = self.splits[split]
        if self.loader == "tensor":
            rank, world_size = getattr(self, "rank", 0), getattr(self, "world_size", 1)
            sampler = EpochSampler(len(labels), shuffle, self.seed, rank, world_size, pad=split == "train")
            transform = self.batch_transform(augment)
            return TensorLoader(images, labels, batch_size, sampler, transform, drop_last, self.augment_each)
        dataset = ImageTensorDataset(images, labels, self.image_transform(augment))
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )
