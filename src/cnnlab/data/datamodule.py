"""The DataModule shared by MNIST and CIFAR-10: files -> uint8 tensors -> splits -> loaders.

Two loader paths give the same batches in distribution: `tensor` (the dataset held once as a uint8 tensor on the
training device, batches transformed there; the default) and `torchvision` (a Dataset with per-image torchvision
transforms behind a DataLoader; the general path and the reference the tensor path is tested against).
"""

import hashlib
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from cnnlab.data.erasing import ERASING_RATIO, ERASING_SCALE, check_erasing, cutout_image
from cnnlab.data.mixing import BatchMixing, check_mixing
from cnnlab.data.policies import check_policy_settings, per_image_stage, per_image_transforms
from cnnlab.data.tensor_loader import (
    AUGMENT,
    AUGMENT_EACH,
    FLIPS,
    PAD_MODES,
    BatchTransform,
    EpochSampler,
    TensorLoader,
    flip_mode,
    stream_seed,
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

    def __init__(self, images: Tensor, labels: Tensor, transform: v2.Compose) -> None:
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
        policy: str = "none",
        policy_magnitude: int | None = None,
        random_resized_crop: bool = False,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (0.75, 4 / 3),
        interpolation: str = "bilinear",
        erasing: float = 0.0,
        cutout_size: int = 0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
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
        check_policy_settings(policy, policy_magnitude, interpolation, random_resized_crop, crop_scale, crop_ratio)
        check_erasing(erasing, cutout_size, self.image_shape)
        check_mixing(mixup_alpha, cutmix_alpha)
        if random_resized_crop and augment and crop_padding:
            raise UserError(
                "data.random_resized_crop=true crops each training image at random already; with data.augment=true "
                f"and data.crop_padding={crop_padding} it would be cropped twice. Set data.crop_padding=0 (data.augment"
                " then only flips), or data.random_resized_crop=false."
            )
        self.policy, self.policy_magnitude, self.interpolation = policy, policy_magnitude, interpolation
        self.random_resized_crop, self.crop_scale, self.crop_ratio = random_resized_crop, crop_scale, crop_ratio
        self.erasing, self.cutout_size = erasing, cutout_size
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
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
        if self.loader == "torchvision" and world_size > 1 and self.num_workers == 0:
            # Per-image transforms then run in this process, from torch's global generator, which every rank seeded
            # alike: seeded by rank here, so that ranks augment differently (workers are seeded by loader_seed).
            torch.manual_seed(self.loader_seed(rank))
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
        self.train_loader = self._loader("train", self.batch_size, shuffle=True, augment=True, drop_last=self.drop_last)
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

    def per_image_steps(self) -> list[v2.Transform]:
        """The training images' per-image steps (random-resized crop, policy), torchvision v2 transforms."""
        return per_image_transforms(
            self.image_shape[1:],
            self.random_resized_crop,
            self.crop_scale,
            self.crop_ratio,
            self.policy,
            self.policy_magnitude,
            self.interpolation,
        )

    def batch_transform(self, augment: bool) -> BatchTransform:
        """The tensor path's normalization, and for training images (`augment`) their augmentation, on whole batches.

        augment=False is the evaluation transform: validation, the test stage, eval, predict and export use it.
        """
        if not augment:
            return BatchTransform(self.mean, self.std, 0, "none", self.crop_pad_mode)
        return BatchTransform(
            self.mean,
            self.std,
            self.crop_padding if self.augment else 0,
            self.flip if self.augment else "none",
            self.crop_pad_mode,
            per_image=per_image_stage(self.per_image_steps()),
            erasing=self.erasing,
            cutout_size=self.cutout_size,
        )

    def image_transform(self, augment: bool) -> v2.Compose:
        """The torchvision path's per-image transforms, equivalent to batch_transform (PIL images or uint8 tensors)."""
        steps: list = self.per_image_steps() if augment else []
        if augment and self.augment and self.crop_padding:
            mode = {"zeros": "constant", "reflect": "reflect"}[self.crop_pad_mode]
            steps.append(v2.RandomCrop(self.image_shape[1:], padding=self.crop_padding, padding_mode=mode))
        if augment and self.augment and self.flip == "random":  # alternating is refused here (check_augmentation)
            steps.append(v2.RandomHorizontalFlip())
        steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        if augment and self.erasing:
            steps.append(v2.RandomErasing(p=self.erasing, scale=ERASING_SCALE, ratio=ERASING_RATIO, value=0))
        if augment and self.cutout_size:
            steps.append(v2.Lambda(partial(cutout_image, size=self.cutout_size)))
        steps.append(v2.ToPureTensor())
        return v2.Compose(steps)

    def mixing(self) -> BatchMixing:
        """MixUp / CutMix of training batches (mixing.py), none when both alphas are 0."""
        return BatchMixing(self.mixup_alpha, self.cutmix_alpha, self.num_classes or 0, self.seed)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches on the device are mixed (MixUp / CutMix) into images and soft targets; others pass."""
        trainer = self.trainer
        if trainer is None or not trainer.training or not (self.mixup_alpha or self.cutmix_alpha):
            return batch
        if getattr(self, "batch_mixing", None) is None:
            self.batch_mixing = self.mixing()
        images, labels = batch
        # Batches served before this one in the whole run (a resumed run's count comes back with its checkpoint).
        before = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        return self.batch_mixing(images, labels, before, trainer.global_rank)

    def loader_seed(self, rank: int) -> int:
        """The torchvision loader's seed on rank: the run's seed on rank 0 (as before ranks were told apart), a
        stream of its own on each other rank, so that their DataLoader workers augment differently."""
        return self.seed if rank == 0 else stream_seed(self.seed, 0, AUGMENT, rank)

    def _loader(self, split: str, batch_size: int, shuffle: bool, augment: bool, drop_last: bool = False):
        images, labels = self.splits[split]
        if self.loader == "tensor":
            rank, world_size = getattr(self, "rank", 0), getattr(self, "world_size", 1)
            sampler = EpochSampler(len(labels), shuffle, self.seed, rank, world_size, pad=split == "train")
            transform = self.batch_transform(augment)
            return TensorLoader(images, labels, batch_size, sampler, transform, drop_last, self.augment_each)
        dataset = ImageTensorDataset(images, labels, self.image_transform(augment))
        rank = getattr(self, "rank", 0)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # Seeds the order and each worker's augmentation stream; by rank, so that DDP ranks augment differently.
            generator=torch.Generator().manual_seed(self.loader_seed(rank)) if shuffle else None,
        )
