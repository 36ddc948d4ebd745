"""data=fashion_mnist and data=cifar100 (fine and coarse labels): their files, class names and models, on tiny files."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from cnnlab.commands.train import train
from cnnlab.commands.validation import check_model_fits_data
from cnnlab.data import CIFAR100DataModule, FashionMNISTDataModule
from cnnlab.data.formats import read_cifar_pickle, read_idx
from cnnlab.errors import UserError
from tests.conftest import (
    CIFAR100_COARSE,
    CIFAR100_FINE,
    MODELS,
    compose_config,
    make_cifar100,
    make_mnist,
    quick_run,
)

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag"]


@pytest.fixture(scope="module")
def more_data(tmp_path_factory) -> Path:
    """A data_dir with a tiny Fashion-MNIST (FashionMNIST/raw/) and a tiny CIFAR-100 (cifar-100-python/)."""
    root = tmp_path_factory.mktemp("more_data")
    make_mnist(root, n_train=300, n_test=100, folder="FashionMNIST")
    make_cifar100(root)
    return root


def composed(data_dir: Path, data: str, tmp_path: Path, *extra: str, model: str = "lenet5"):
    cfg = compose_config(quick_run(data_dir, *extra, model=model, data=data), tmp_path)
    with open_dict(cfg):
        cfg.data.update(instantiate(cfg.data).discover())  # as train() does
    return cfg


def test_fashion_mnist_reads_its_own_folder_with_zalandos_class_names(more_data, tmp_path):
    cfg = composed(more_data, "fashion_mnist", tmp_path)
    dm = instantiate(cfg.data)
    dm.setup()
    assert dm.class_names[:9] == FASHION_CLASSES and dm.class_names[9] == "Ankle boot"
    assert [len(dm.splits[s][1]) for s in ("train", "val", "test")] == [200, 100, 100]
    raw = more_data / "FashionMNIST" / "raw"
    assert torch.equal(dm.splits["test"][0][:, 0], torch.from_numpy(read_idx(raw / "t10k-images-idx3-ubyte").copy()))
    assert all("FashionMNIST" in str(p) for p in dm.files_read)


def test_fashion_mnist_without_files_and_offline_is_one_paragraph_naming_them(tmp_path, monkeypatch):
    make_mnist(tmp_path, n_train=20, n_test=10)  # MNIST's files are not Fashion-MNIST's

    def offline(self):
        raise OSError("no network")

    monkeypatch.setattr(FashionMNISTDataModule, "fetch", offline)
    with pytest.raises(UserError, match=r"Fashion-MNIST files are not in .*FashionMNIST/raw/train-images-idx3-ubyte"):
        FashionMNISTDataModule(data_dir=str(tmp_path), download=True).prepare_data()


@pytest.mark.parametrize("kind, names", [("fine", CIFAR100_FINE), ("coarse", CIFAR100_COARSE)])
def test_cifar100_labels_and_class_names_follow_label_kind(more_data, tmp_path, kind, names):
    cfg = composed(more_data, "cifar100", tmp_path, f"data.label_kind={kind}")
    assert cfg.data.class_names == names and cfg.data.num_classes == len(names)
    dm = instantiate(cfg.data)
    dm.setup()
    stored = read_cifar_pickle(more_data / "cifar-100-python" / "test")
    assert dm.splits["test"][1].tolist() == list(stored[f"{kind}_labels"])
    assert dm.splits["test"][0].shape == (100, 3, 32, 32)
    assert dm.splits["train"][1].max() < len(names)


def test_cifar100_class_names_come_from_the_meta_file(tmp_path):
    make_cifar100(tmp_path, n_train=20, n_test=10)
    dm = CIFAR100DataModule(data_dir=str(tmp_path), label_kind="coarse", num_classes=None, val_size=5, download=False)
    assert dm.discover() == {"class_names": CIFAR100_COARSE, "num_classes": 20}
    assert dm.discover() == {}  # found once; the config then holds them


def test_cifar100_unknown_label_kind_and_damaged_meta_are_refused(tmp_path):
    make_cifar100(tmp_path, n_train=20, n_test=10)
    with pytest.raises(UserError, match="data.label_kind='medium' is not known"):
        CIFAR100DataModule(data_dir=str(tmp_path), label_kind="medium")
    (tmp_path / "cifar-100-python" / "meta").write_bytes(b"\x80\x02}q\x00.")  # an empty dict
    with pytest.raises(UserError, match="lacks the 'fine_label_names' list"):
        CIFAR100DataModule(data_dir=str(tmp_path), num_classes=None, download=False).discover()


def test_cifar100_without_files_and_offline_is_one_paragraph_naming_them(tmp_path, monkeypatch):
    monkeypatch.setattr(CIFAR100DataModule, "fetch", lambda self: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(UserError, match=r"CIFAR-100 files are not in .*cifar-100-python/train, .*test, .*meta"):
        CIFAR100DataModule(data_dir=str(tmp_path), num_classes=None).discover()


@pytest.mark.parametrize("data, extra", [("fashion_mnist", []), ("cifar100", []), ("cifar100", ["coarse"])])
@pytest.mark.parametrize("model", MODELS)
def test_every_model_fits_the_new_data_configs(more_data, tmp_path, model, data, extra):
    overrides = [f"data.label_kind={kind}" for kind in extra]
    cfg = composed(more_data, data, tmp_path, *overrides, model=model)
    check_model_fits_data(cfg)  # raises when in_channels, image size or num_classes do not follow the data


def test_a_cifar100_coarse_run_stores_the_superclass_names_in_its_checkpoint(more_data, tmp_path):
    overrides = quick_run(more_data, "data.label_kind=coarse", model="resnet8", data="cifar100")
    cfg = compose_config([*overrides, "trainer.max_epochs=1", "trainer.limit_train_batches=2"], tmp_path)
    metrics = train(cfg)
    ckpt = torch.load(metrics["best_checkpoint"], weights_only=True, map_location="cpu")
    data = ckpt["hyper_parameters"]["data"]
    assert data["class_names"] == CIFAR100_COARSE and data["num_classes"] == 20
    assert ckpt["state_dict"]["model.fc.weight"].shape[0] == 20
    assert np.isclose(data["mean"][0], 0.5071)
