"""Shared fixtures: tiny datasets in the real on-disk formats, and configs composed as the command line does."""

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cnnlab.cli import config_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # the dev extra installs tomli there
    import tomli as tomllib
from cnnlab.data.formats import (
    read_cifar_batch,
    read_idx,
    write_cifar100_batch,
    write_cifar100_meta,
    write_cifar_batch,
    write_cifar_meta,
    write_idx,
    write_image_folder,
)

REPO = Path(__file__).resolve().parents[1]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MODELS = ["lenet5", "resnet8", "resnet20", "resnet18", "resnet9"]
DATASETS = ["mnist", "cifar10"]
CIFAR100_FINE = [f"fine{i:02d}" for i in range(100)]
CIFAR100_COARSE = [f"coarse{i:02d}" for i in range(20)]
FOLDER_CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "jay", "koi"]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def class_patterns(n: int, shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 images whose label is written as a bright square at a class-specific place, over noise."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, c, h, w), dtype=np.uint8)
    for i, label in enumerate(labels):
        top, left = 4 + 6 * (label // 5), 3 + 5 * (label % 5)
        images[i, :, top : top + 5, left : left + 4] = 255
    return images, labels.astype(np.uint8)


def make_mnist(root: Path, n_train: int = 600, n_test: int = 200, seed: int = 0, folder: str = "MNIST") -> Path:
    """Write MNIST-format IDX files under root/<folder>/raw/ (folder="FashionMNIST" for Fashion-MNIST's place)."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        images, labels = class_patterns(n, (1, 28, 28), s)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def make_cifar(root: Path, n_train: int = 500, n_test: int = 200, seed: int = 0) -> Path:
    """Write CIFAR-10 python batches under root/cifar-10-batches-py/ (5 train batches, a test batch, meta)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = class_patterns(n_train, (3, 32, 32), seed)
    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        write_cifar_batch(folder / f"data_batch_{i}", images[part], labels[part])
    images, labels = class_patterns(n_test, (3, 32, 32), seed + 1)
    write_cifar_batch(folder / "test_batch", images, labels)
    write_cifar_meta(folder / "batches.meta", CIFAR_CLASSES)
    return root


def make_cifar100(root: Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    """Write CIFAR-100 python files under root/cifar-100-python/: train, test, meta (100 fine, 20 coarse names).

    Fine label f belongs to superclass f % 20. The images do not depict their labels: these files test the format.
    """
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images, _ = class_patterns(n, (3, 32, 32), s)
        fine = np.random.default_rng(s).integers(0, 100, n)
        write_cifar100_batch(folder / name, images, fine, fine % 20)
    write_cifar100_meta(folder / "meta", CIFAR100_FINE, CIFAR100_COARSE)
    return root


def make_image_folder(
    root: Path,
    shape: tuple[int, int, int] = (3, 32, 32),
    n_train: int = 200,
    n_val: int = 0,
    n_test: int = 60,
    suffix: str = ".png",
    classes: list[str] = FOLDER_CLASSES,
    seed: int = 0,
) -> Path:
    """Write class_patterns images as root/{train,val,test}/<class>/<index><suffix>; n=0 leaves a split out."""
    for split, n, s in (("train", n_train, seed), ("val", n_val, seed + 1), ("test", n_test, seed + 2)):
        if n:
            images, labels = class_patterns(n, shape, s)
            write_image_folder(root, split, images, labels % len(classes), classes, suffix)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A data_dir holding a tiny MNIST and a tiny CIFAR-10 in their real formats."""
    root = tmp_path_factory.mktemp("data")
    make_mnist(root)
    make_cifar(root)
    return root


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    """A LeNet-5 briefly trained on the tiny MNIST, shared by the eval and predict tests, which read it and write
    elsewhere: its run folder (checkpoints/best.ckpt, last.ckpt, metrics.json) and the metrics train() returned."""
    from tests.checkpoint_helpers import train_briefly  # it imports this module

    run_dir = tmp_path_factory.mktemp("trained_run")
    return run_dir, train_briefly(tiny_data, run_dir)


REAL_DATA_MISSING = (
    "CNNLAB_REAL_DATA is not set, so the tests that train on the real MNIST and CIFAR-10 were skipped; to run them: "
    "CNNLAB_REAL_DATA=<folder holding MNIST/raw/ and cifar-10-batches-py/> pytest"
)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real datasets' folder, from CNNLAB_REAL_DATA (.ci/run sets it; in CI a missing setting fails the test)."""
    value = os.environ.get("CNNLAB_REAL_DATA")
    if not value:
        if os.environ.get("CI"):
            pytest.fail(REAL_DATA_MISSING)
        pytest.skip(REAL_DATA_MISSING)
    path = Path(value)
    assert (path / "MNIST" / "raw").is_dir(), f"{path} has no MNIST/raw/"
    return path


def real_subset(real: Path, root: Path, n_train: int, n_test: int) -> Path:
    """The first n_train / n_test real MNIST and CIFAR-10 images, written in their own formats under root."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte"
            write_idx(raw / name, read_idx(real / "MNIST" / "raw" / name)[:n])
    source, folder = real / "cifar-10-batches-py", root / "cifar-10-batches-py"
    folder.mkdir()
    images, labels = read_cifar_batch(source / "data_batch_1")
    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        write_cifar_batch(folder / f"data_batch_{i}", images[part], labels[part])
    images, labels = read_cifar_batch(source / "test_batch")
    write_cifar_batch(folder / "test_batch", images[:n_test], labels[:n_test])
    write_cifar_meta(folder / "batches.meta", CIFAR_CLASSES)
    return root


@pytest.fixture(scope="session")
def real_small(real_data, tmp_path_factory) -> Path:
    """A few hundred real images: MNIST and CIFAR-10, 600 training and 300 test images each, in the real formats.

    Behaviour that a default config controls (checkpoints, schedules, EMA, TTA) is tested on these with the defaults
    unchanged; only the sizes that a few hundred images force (data.val_size, batch limits) are set.
    """
    return real_subset(real_data, tmp_path_factory.mktemp("real_small"), n_train=600, n_test=300)


def compose_config(overrides: list[str], run_dir: Path, config_name: str = "train") -> DictConfig:
    """Compose a config as `scripts/train.py` would, with the run directory set to run_dir."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=config_name, overrides=[*overrides, f"run_dir={run_dir}"])


DDP_ON_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]  # two gloo processes


def quick_run(
    data_dir: Path | str | None = None,
    *extra: str,
    model: str | None = None,
    data: str | None = None,
    trainer: str | None = "cpu",
    progress_bar: bool = False,
) -> list[str]:
    """The overrides of every quick test run: small batches, 100 validation images, offline, on the CPU, then extra.

    The one place that says how the suite shortens a run. Everything else (checkpoints, EMA, schedules, callbacks)
    stays as shipped unless extra says otherwise; a later override of a key wins, so extra can replace any of these.
    Args:
        data_dir: data.data_dir; None keeps the config's (a script run in a folder holding data/).
        model, data: the config groups; None keeps the shipped ones (lenet5, mnist).
        trainer: the trainer config group; None leaves it to extra (DDP_ON_CPU) or the shipped default.
        progress_bar: keep the shipped progress bar (the scripts' own output is under test) instead of none.
    """
    overrides = [f"model={model}"] if model else []
    overrides += [f"data={data}"] if data else []
    overrides += [f"data.data_dir={data_dir}"] if data_dir is not None else []
    overrides += ["data.batch_size=32", "data.eval_batch_size=64", "data.val_size=100"]
    overrides += [] if data == "folder" else ["data.download=false"]  # image folders are never downloaded
    overrides += [f"trainer={trainer}"] if trainer else []
    overrides += [] if progress_bar else ["callbacks.progress_bar=null", "+trainer.enable_progress_bar=false"]
    return [*overrides, *extra]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest -n N, one thread per worker process and for the runs it starts.

    N workers each using every core fight over the cores: on 2 cores the suite took 12 min 19 s with -n 2 and
    PyTorch's default threads, 8 min 07 s with one thread per worker, 10 min 15 s without -n.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the scripts and DDP processes a test starts
        torch.set_num_threads(1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Real-data skips under one location, so that pytest's summary says REAL_DATA_MISSING once, with their count."""
    report = (yield).get_result()
    if report.skipped and isinstance(report.longrepr, tuple) and report.longrepr[2].endswith(REAL_DATA_MISSING):
        fixture = getattr(real_data, "__wrapped__", real_data)  # pytest 8.4 wraps fixture functions
        report.longrepr = ("tests/conftest.py", fixture.__code__.co_firstlineno, REAL_DATA_MISSING)
