"""Users' own images: <data_dir>/train/<class>/<image> (and val/, test/), torchvision's ImageFolder layout.

Every image is converted once by cnnlab.data.images.load_image (the rule scripts/predict.py uses too) and the
folder's decoded images are kept in a cache file per split folder, keyed by the files' relative paths, sizes and
modification times and by image_shape. Later runs load the cache (a memory-mapped uint8 tensor) instead of
decoding, so the default tensor loader applies as it does to MNIST; a changed, added or removed file rebuilds it.
With data.loader=torchvision the cache holds no pixels, only the file list and the pixel sums the mean and std
come from, and images are decoded per item by the DataLoader's workers: the path for folders too big for memory.
"""

import hashlib
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch import Tensor

from cnnlab.atomic_files import atomic_path
from cnnlab.data.datamodule import ImageDataModule
from cnnlab.data.images import IMAGE_SUFFIXES, ImageDecodeError, load_image
from cnnlab.errors import UserError
from cnnlab.machine_lock import machine_lock
from cnnlab.writable_folders import writable_folder

SPLIT_FOLDERS = ("train", "val", "test")
CACHE_VERSION = 1  # raise when the cache's content or the conversion rule changes: old caches are then rebuilt
CHUNK_BYTES = 8 * 2**20  # decoded pixels handed back per worker task


def announce(message: str) -> None:
    """Print a line once per run (on the first process only, under DDP)."""
    if rank_zero_only.rank == 0:
        print(message, flush=True)


def physical_memory() -> int | None:
    """Bytes of RAM in this machine; None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_workers() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def list_split(split_dir: Path, root: Path) -> tuple[list[str], list[tuple[str, int, int, int]], int]:
    """One split folder's classes (sorted folder names) and image files, and the count of other files ignored.

    Files are (path relative to root, class index, size, mtime in ns), class by class, folders and names sorted.
    Images may sit in subfolders of a class folder; hidden files and folders (".name") are skipped. Plain string
    paths and os.scandir: pathlib's per-file parsing took 2 of the 3 seconds a 60,000-file listing needed.
    """
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    ignored = sum(1 for e in os.scandir(split_dir) if e.is_file() and not e.name.startswith("."))
    files: list[tuple[str, int, int, int]] = []

    def walk(folder: str, relative: str, label: int) -> None:
        nonlocal ignored
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                walk(entry.path, f"{relative}/{entry.name}", label)
            elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                stat = entry.stat()
                files.append((f"{relative}/{entry.name}", label, stat.st_size, stat.st_mtime_ns))
            else:
                ignored += 1

    for label, name in enumerate(classes):
        walk(os.path.join(split_dir, name), f"{split_dir.relative_to(root).as_posix()}/{name}", label)
    return classes, files, ignored


def listing_key(classes: list[str], files: list[tuple[str, int, int, int]], image_shape: tuple[int, int, int]) -> str:
    """What a cache was built from: the format version, image_shape, the class folders (an empty one counts) and
    every file's path, size and mtime."""
    lines = [f"cnnlab-folder-cache {CACHE_VERSION} {list(image_shape)}", *classes]
    lines += [f"{path}\t{size}\t{mtime}" for path, _, size, mtime in files]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def decode_chunk(
    root: str, paths: list[str], image_shape: tuple[int, int, int], keep_pixels: bool
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Decode files (relative to root): pixels (or None), per-image channel sums and sums of squares, failures."""
    images = np.zeros((len(paths), *image_shape), dtype=np.uint8)
    failures = []
    for i, path in enumerate(paths):
        try:
            images[i] = load_image(Path(root) / path, image_shape)
        except ImageDecodeError as err:
            failures.append((i, err.reason))
    flat = images.reshape(len(paths), image_shape[0], -1)  # (K, C, H*W)
    sums = flat.sum(axis=2, dtype=np.int64)
    sums_of_squares = np.square(flat, dtype=np.uint32).sum(axis=2, dtype=np.int64)
    return (images if keep_pixels else None), sums, sums_of_squares, failures


def decode_files(
    root: Path, paths: list[str], image_shape: tuple[int, int, int], keep_pixels: bool, workers: int
) -> dict[str, Any]:
    """Decode every file, on `workers` processes when there is more than a chunk of work.

    Processes rather than threads: for small images most of the time is Python code in Pillow (opening, header
    parsing), which holds the GIL; threads measured slower than one thread on 32x32 PNGs.
    """
    # Several chunks per worker keep them all busy to the end; a chunk's pixels stay near CHUNK_BYTES.
    per_chunk = max(1, min(CHUNK_BYTES // int(np.prod(image_shape)), -(-len(paths) // (4 * workers))))
    chunks = [paths[i : i + per_chunk] for i in range(0, len(paths), per_chunk)] or [[]]
    work = partial(decode_chunk, str(root), image_shape=image_shape, keep_pixels=keep_pixels)
    # Each chunk's results go straight into arrays made once, so the folder is in memory once, not twice.
    images = np.empty((len(paths), *image_shape), dtype=np.uint8) if keep_pixels else None
    sums = np.empty((len(paths), image_shape[0]), dtype=np.int64)
    sums_of_squares = np.empty_like(sums)
    failures: list[tuple[int, str]] = []

    def collect(results) -> None:
        for start, (pixels, chunk_sums, chunk_squares, chunk_failures) in zip(range(0, len(paths), per_chunk), results):
            end = start + len(chunk_sums)
            if images is not None:
                images[start:end] = pixels
            sums[start:end], sums_of_squares[start:end] = chunk_sums, chunk_squares
            failures.extend((start + i, reason) for i, reason in chunk_failures)

    if workers > 1 and len(chunks) > 1:
        # fork: the workers need nothing but Pillow and numpy, and start at once (spawn would import the project).
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context) as pool:
            collect(pool.map(work, chunks))
    else:
        collect(map(work, chunks))
    good = np.ones(len(paths), dtype=bool)
    good[[i for i, _ in failures]] = False
    if failures:  # rare: the one copy that leaves them out
        images = images[good] if images is not None else None
        sums, sums_of_squares = sums[good], sums_of_squares[good]
    return {
        "images": torch.from_numpy(images) if images is not None else None,
        "sums": torch.from_numpy(sums),
        "sums_of_squares": torch.from_numpy(sums_of_squares),
        "good": good,
        "failures": [(paths[i], reason) for i, reason in failures],
    }


class LazyImages:
    """Image files decoded when indexed, standing in for a uint8 N x C x H x W tensor (the torchvision loader's)."""

    def __init__(self, paths: list[Path], image_shape: tuple[int, int, int]) -> None:
        self.paths, self.image_shape = paths, image_shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int | Tensor) -> Tensor:
        if isinstance(index, int) or (isinstance(index, Tensor) and index.dim() == 0):
            return torch.tensor(load_image(self.paths[int(index)], self.image_shape))  # a copy: Pillow's is read-only
        if isinstance(index, slice):  # images[:1], as the conv-images callback takes its fixed image
            index = range(*index.indices(len(self)))
        rows = [self[int(i)] for i in index]
        return torch.stack(rows) if rows else torch.empty((0, *self.image_shape), dtype=torch.uint8)

    def to(self, device: torch.device | str) -> "LazyImages":
        """Stays on the CPU: DataLoader workers decode items there (the tensor loader never gets lazy images)."""
        return self


class FolderDataModule(ImageDataModule):
    """A folder of the user's images: class names from the folder names, mean and std from the training images."""

    name = "image folder"

    def __init__(
        self,
        data_dir: str | None = None,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        cache_dir: str | None = None,
        decode_workers: int | None = None,
        skip_bad_files: bool = False,
        **settings: Any,
    ) -> None:
        if not data_dir:
            raise UserError(
                "data=folder needs the folder of your images: give data.data_dir=<folder> holding train/<class>/"
                "<image files> (and optionally val/ and test/ laid out the same way)."
            )
        shape = tuple(image_shape)
        if len(shape) != 3 or shape[0] not in (1, 3) or min(shape[1:]) < 1:
            raise UserError(
                f"data.image_shape={list(shape)} must be [channels, height, width] with 1 (grayscale) or 3 (RGB) "
                "channels, e.g. data.image_shape=[1,28,28] or data.image_shape=[3,32,32]."
            )
        super().__init__(
            data_dir=data_dir,
            image_shape=shape,
            num_classes=num_classes,
            class_names=class_names,
            mean=mean,
            std=std,
            **settings,
        )
        self.class_names = list(class_names) if class_names else None  # not "0", "1", ...: the folders name them
        self.cache_dir = Path(cache_dir).expanduser().resolve() if cache_dir else None
        self.decode_workers = decode_workers or default_workers()
        self.skip_bad_files = skip_bad_files
        self.indexes: dict[str, dict[str, Any]] = {}  # split folder -> its cache content (files, labels, pixels, ...)
        self.sources: dict[str, tuple] = {}  # split folder -> what was read (images or listing, labels), for env.json
        self.said: set[str] = set()  # the one-time lines already printed
        self.images_held = 0  # images of the split folders read so far (the tensor loader holds them all)

    def say_once(self, topic: str, message: str) -> None:
        if topic not in self.said:
            self.said.add(topic)
            announce(message)

    # --- files ----------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        train = self.data_dir / "train"
        if not train.is_dir():
            what = "does not exist" if not self.data_dir.exists() else "has no train/ folder"
            raise UserError(
                f"data.data_dir={self.data_dir} {what}. data=folder reads images laid out as <data_dir>/train/<class "
                "name>/<image> (PNG, JPEG, BMP or WebP), with optional val/ and test/ folders of the same classes; "
                "point data.data_dir at such a folder."
            )

    def has_split(self, split: str) -> bool:
        """Whether the split will hold images, from the folders alone: validation from val/ or val_size images held
        out of train/; the test stage scores test/, or the validation images where there is no test/."""
        if split == "train":
            return True
        validation = (self.data_dir / "val").is_dir() or self.val_size > 0
        return validation if split == "val" else (self.data_dir / "test").is_dir() or validation

    def cache_folders(self) -> list[Path]:
        """Where caches are looked for, in order, and the first writable one written: data.cache_dir if set, else
        <data_dir>/.cnnlab-cache, else the user's cache folder (a read-only data folder)."""
        name = f"{self.data_dir.name}-{hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:8]}"
        if self.cache_dir is not None:
            return [self.cache_dir / name]
        user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnlab" / name
        return [self.data_dir / ".cnnlab-cache", user_cache]

    def cache_file(self, folder: Path, split: str) -> Path:
        return folder / f"{split}-{'x'.join(map(str, self.image_shape))}.pt"

    def read_cache(self, split: str, key: str, need_pixels: bool) -> dict[str, Any] | None:
        for folder in self.cache_folders():
            path = self.cache_file(folder, split)
            if not path.is_file():
                continue
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # damaged or from another version: rebuilt below
                continue
            if (
                isinstance(cached, dict)
                and cached.get("key") == key
                and (cached.get("images") is not None or not need_pixels)
            ):
                return cached
        return None

    def write_cache(self, split: str, content: dict[str, Any]) -> None:
        folders = self.cache_folders()
        writable = next((f for f in folders if writable_folder(f)), None)
        if writable is None:
            self.say_once(
                "no cache",
                f"No writable folder for the decoded-image cache ({', '.join(map(str, folders))}): images are decoded "
                "again on every run. Set data.cache_dir=<writable folder> to keep them.",
            )
            return
        if writable != folders[0]:
            self.say_once("cache moved", f"{folders[0].parent} is read-only: caching decoded images in {writable}.")
        try:
            with atomic_path(self.cache_file(writable, split)) as tmp:
                torch.save(content, tmp)
        except (OSError, RuntimeError) as err:  # a full disk costs the next run a decode, not this run
            reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
            announce(f"Could not write the decoded-image cache in {writable} ({reason}); not cached.")

    def index_split(self, split: str) -> dict[str, Any]:
        """A split folder's cache: loaded if fresh, else decoded (pixels kept for the tensor loader) and written."""
        split_dir = self.data_dir / split
        classes, files, ignored = list_split(split_dir, self.data_dir)
        if ignored:
            self.say_once(
                f"ignored {split}",
                f"{split_dir}: ignored {ignored} files that are not PNG, JPEG, BMP or WebP images in a class folder.",
            )
        if split != "train" and not files:
            raise UserError(
                f"{split_dir} holds no PNG, JPEG, BMP or WebP images in class folders. Add them as {split}/<class "
                f"name>/<image>, or remove the {split}/ folder."
            )
        need_pixels = self.loader == "tensor"
        if need_pixels:
            self.check_memory(len(files))
        key = listing_key(classes, files, self.image_shape)
        cached = self.read_cache(split, key, need_pixels)
        if cached is not None:
            return cached
        start = time.perf_counter()
        workers = min(self.decode_workers, max(1, len(files) // 64))  # at least 64 files per process started
        processes = f"{workers} process{'es' if workers > 1 else ''}"
        announce(f"Decoding {len(files):,} images in {split_dir} with {processes} (once; then cached) ...")
        decoded = decode_files(self.data_dir, [f[0] for f in files], self.image_shape, need_pixels, workers)
        seconds = time.perf_counter() - start
        announce(f"Decoded {len(files):,} images in {seconds:.1f} s ({len(files) / max(seconds, 1e-9):,.0f} images/s).")
        labels = torch.tensor([f[1] for f in files], dtype=torch.int64)[torch.from_numpy(decoded["good"])]
        content = {
            "key": key,
            "image_shape": list(self.image_shape),
            "classes": classes,
            # One string, not a list: the weights_only unpickler takes 6 us per list item.
            "files": "\n".join(f[0] for f, ok in zip(files, decoded["good"]) if ok),
            "labels": labels,
            "failures": [list(f) for f in decoded["failures"]],
            "sums": decoded["sums"],
            "sums_of_squares": decoded["sums_of_squares"],
            "images": decoded["images"],
            "decode_seconds": seconds,
        }
        self.write_cache(split, content)
        return content

    def check_memory(self, count: int) -> None:
        """Refuse, before decoding, a folder whose uint8 tensors would take more than half of this machine's RAM."""
        self.images_held += count
        needed, available = self.images_held * int(np.prod(self.image_shape)), physical_memory()
        if available is not None and needed > available // 2:
            count = self.images_held
            raise UserError(
                f"The {count:,} images in {self.data_dir} take {needed / 2**30:.1f} GiB as uint8 tensors "
                f"({count:,} x {' x '.join(map(str, self.image_shape))} bytes), more than half of this machine's "
                f"{available / 2**30:.1f} GiB of memory. Train with data.loader=torchvision data.num_workers=<cores> "
                "(images decoded per batch, nothing held), or lower data.image_shape."
            )

    def read_indexes(self) -> None:
        """Every split folder's cache, once; bad files reported together (or skipped and counted)."""
        if self.indexes:
            return
        self.prepare_data()
        # Every process of a torchrun/srun run reads the folder before the model is built: under the lock one
        # decodes and writes the caches, and the others then load them.
        with machine_lock("decode", self.data_dir):
            for split in SPLIT_FOLDERS:
                if (self.data_dir / split).is_dir():
                    self.indexes[split] = self.index_split(split)
        failures = [(path, reason) for index in self.indexes.values() for path, reason in index["failures"]]
        if failures and not self.skip_bad_files:
            listed = "; ".join(f"{self.data_dir / path} ({reason})" for path, reason in failures[:10])
            more = f"; and {len(failures) - 10} more" if len(failures) > 10 else ""
            raise UserError(
                f"{len(failures)} image files in {self.data_dir} cannot be decoded: {listed}{more}. Replace or delete "
                "them, or set data.skip_bad_files=true to train without them (they are then counted and listed "
                "in the cache, not read again)."
            )
        if failures:
            self.say_once("skipped", f"Skipped {len(failures)} image files in {self.data_dir} that cannot be decoded.")
        if not self.indexes["train"]["classes"]:
            raise UserError(
                f"{self.data_dir / 'train'} holds no class folders. Put each class's images in a folder named for "
                "the class: train/<class name>/<image>."
            )
        counts = torch.bincount(self.indexes["train"]["labels"], minlength=len(self.indexes["train"]["classes"]))
        failed = {Path(path).parts[1] for path, _ in self.indexes["train"]["failures"]}
        empty = [c for c, n in zip(self.indexes["train"]["classes"], counts.tolist()) if n == 0 and c not in failed]
        if empty:
            raise UserError(
                f"The class folder {self.data_dir / 'train' / empty[0]} holds no PNG, JPEG, BMP or WebP images. Add "
                "images or remove the folder (every folder in train/ is a class)."
            )

    # --- what the folder tells the config --------------------------------------------------------------------------
    def discover(self) -> dict[str, Any]:
        """Class names (sorted folder names of train/), num_classes, and per-channel mean and std of the training
        images, for the ones the config left null."""
        self.read_indexes()
        facts: dict[str, Any] = {}
        if self.class_names is None:
            self.class_names = facts["class_names"] = list(self.indexes["train"]["classes"])
            if len(self.class_names) < 2:
                raise UserError(
                    f"{self.data_dir / 'train'} holds one class folder ({self.class_names[0]}); a classifier needs at "
                    "least two. Add a folder per class."
                )
        if self.num_classes is None:
            self.num_classes = facts["num_classes"] = len(self.class_names)
        if self.num_classes != len(self.class_names):
            raise UserError(
                f"data.num_classes={self.num_classes} but {self.data_dir} has {len(self.class_names)} classes "
                f"({', '.join(self.class_names[:5])}{', ...' if len(self.class_names) > 5 else ''}). Leave "
                "data.num_classes null: it follows the class folders."
            )
        for split, index in self.indexes.items():
            unknown = [c for c in index["classes"] if c not in self.class_names]
            if unknown:
                raise UserError(
                    f"The class folder {self.data_dir / split / unknown[0]} is not one of the model's classes "
                    f"({', '.join(self.class_names)}). Every folder in val/ and test/ must also be a class of "
                    "train/ (or of the checkpoint being evaluated); rename or remove it."
                )
        if "test" not in self.indexes and self.has_split("val"):
            source = "val/" if "val" in self.indexes else f"the {self.val_size} validation images held out of train/"
            self.say_once("no test", f"{self.data_dir} has no test/ folder: the test stage scores {source}.")
        if self.mean is None or self.std is None:
            self.mean, self.std = self.pixel_statistics()
            facts["mean"], facts["std"] = list(self.mean), list(self.std)
        return facts

    def split_rows(self) -> tuple[Tensor, Tensor | None]:
        """Rows of train/ that train, and those held out for validation (None when there is a val/ folder)."""
        n = len(self.indexes["train"]["labels"])
        if "val" in self.indexes:
            return torch.arange(n), None
        if not 0 <= self.val_size < n:
            raise UserError(
                f"data.val_size={self.val_size} must be at least 0 and below the {n} training images in "
                f"{self.data_dir / 'train'} (held out for validation when there is no val/ folder); lower it, e.g. "
                f"data.val_size={n // 10}, or add a val/ folder."
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        return order[self.val_size :], order[: self.val_size]

    def pixel_statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and standard deviation of the training split's pixels, in [0, 1]."""
        train_rows, _ = self.split_rows()
        index = self.indexes["train"]
        pixels = len(train_rows) * self.image_shape[1] * self.image_shape[2]
        if pixels == 0:
            raise UserError(f"{self.data_dir / 'train'} holds no decodable training images.")
        mean = index["sums"][train_rows].sum(0).double() / pixels / 255
        mean_of_squares = index["sums_of_squares"][train_rows].sum(0).double() / pixels / 255**2
        # A constant channel (std 0) would divide by zero; one grey level is the smallest meaningful spread.
        std = (mean_of_squares - mean**2).clamp(min=0).sqrt().clamp(min=1 / 255)
        return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())

    # --- splits ---------------------------------------------------------------------------------------------------
    def split_data(self, split: str) -> tuple[Tensor | LazyImages, Tensor]:
        """A split folder's images (a tensor, or lazy files for the torchvision loader) and labels in class_names."""
        index = self.indexes[split]
        lookup = torch.tensor([self.class_names.index(c) for c in index["classes"]] or [0], dtype=torch.int64)
        labels = lookup[index["labels"]]
        self.sources[str(self.data_dir / split)] = (index["images"], labels, index["key"])
        if self.loader == "tensor":
            return index["images"], labels
        paths = [self.data_dir / p for p in index["files"].split("\n")] if index["files"] else []
        return LazyImages(paths, self.image_shape), labels

    def load_splits(self) -> dict[str, tuple[Any, Tensor]]:
        self.discover()
        train_x, train_y = self.split_data("train")
        train_rows, val_rows = self.split_rows()
        subset = (lambda x, rows: x[rows]) if self.loader == "tensor" else self.lazy_subset
        if val_rows is None:
            splits = {"train": (train_x, train_y), "val": self.split_data("val")}
        else:
            splits = {
                "train": (subset(train_x, train_rows), train_y[train_rows]),
                "val": (subset(train_x, val_rows), train_y[val_rows]),
            }
        splits["test"] = self.split_data("test") if "test" in self.indexes else splits["val"]
        return splits

    @staticmethod
    def lazy_subset(images: LazyImages, rows: Tensor) -> LazyImages:
        return LazyImages([images.paths[i] for i in rows.tolist()], images.image_shape)

    def file_checksums(self) -> dict[str, str]:
        """Per split folder: sha256 of its decoded images and labels, or (no pixels cached) of its file listing."""
        checksums = {}
        for folder, (images, labels, key) in self.sources.items():
            if images is None:
                checksums[folder] = f"listing {key}"
                continue
            digest = hashlib.sha256(np.ascontiguousarray(images.numpy()).data)
            digest.update(np.ascontiguousarray(labels.numpy()).data)
            checksums[folder] = digest.hexdigest()
        return checksums
