"""Runs without a validation split (data.val_size=0) or without test images: what cannot work is refused before any
data is read, what has nothing to do is skipped with one line and recorded, and nothing ends in a traceback."""

import json

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from cnnlab.commands.train import train
from cnnlab.data import FolderDataModule
from cnnlab.data.datamodule import ImageDataModule
from cnnlab.errors import UserError
from tests.conftest import compose_config, make_image_folder, quick_run
from tests.launch import tensorboard_events


@pytest.fixture(scope="module")
def train_only_folder(tmp_path_factory):
    """An image folder with train/ alone: no val/, no test/."""
    return make_image_folder(tmp_path_factory.mktemp("train_only"), n_train=120, n_val=0, n_test=0)


def folder_run(root, *extra):
    return quick_run(root, "data.val_size=0", "trainer.max_epochs=2", *extra, model="resnet8", data="folder")


@pytest.mark.parametrize("pictures", ["default", "off"])
def test_a_folder_with_train_images_only_trains_skips_the_test_stage_in_one_line_and_records_it(
    train_only_folder, tmp_path, capsys, pictures
):
    """conv_images (on by default) has no validation image to draw: it draws a training image; the test stage has
    no images: it is skipped, said once, and metrics.json says why."""
    extra = ["callbacks.conv_images=null"] if pictures == "off" else []
    metrics = train(compose_config(folder_run(train_only_folder, *extra), tmp_path))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["status"] == "finished" and written["epochs"] == 2
    assert "test_acc" not in written and "no test/" in written["test_skipped"]
    assert metrics == written
    shown = capsys.readouterr().out
    assert [line for line in shown.splitlines() if "test stage" in line and "skipped" in line] != []
    if pictures == "default":  # the first layer's filters at the start and after each of the 2 epochs
        assert [e.step for e in tensorboard_events(tmp_path).Images("conv1/filters")] == [0, 1, 2]


def test_early_stopping_without_a_validation_split_is_refused_before_any_data_is_read(tiny_data, tmp_path):
    reads = []
    original = ImageDataModule.load_splits
    ImageDataModule.load_splits = lambda self: reads.append(1) or original(self)
    try:
        overrides = quick_run(tiny_data, "data.val_size=0", "callbacks/early_stopping=default")
        with pytest.raises(UserError, match=r"early_stopping.*val/acc.*data\.val_size=0") as err:
            train(compose_config(overrides, tmp_path))
    finally:
        ImageDataModule.load_splits = original
    assert "\n" not in str(err.value) and reads == []
    assert not (tmp_path / "checkpoints").exists()


def test_early_stopping_is_accepted_on_a_folder_whose_validation_images_are_in_val(tmp_path):
    root = make_image_folder(tmp_path / "images", n_train=120, n_val=40, n_test=0)
    overrides = folder_run(root, "callbacks/early_stopping=default", "trainer.max_epochs=1")
    metrics = train(compose_config(overrides, tmp_path / "run"))
    assert metrics["status"] == "finished" and metrics["val_acc_best"] is not None
    assert "test_acc" in metrics  # the test stage scores val/ where there is no test/


class MonitoringCheckpoints(Callback):
    """The checkpoint callbacks that choose by a logged score, as the fit starts."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.monitors = [c.monitor for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor]


def test_without_a_validation_split_no_best_checkpoint_is_kept_and_the_header_says_so(tiny_data, tmp_path, capsys):
    """The default callbacks' best.ckpt is chosen by val/acc; a run without validation leaves it out (Lightning would
    warn at every epoch that val/acc is missing), says so once, and last.ckpt (the final weights) is what the test
    stage scores."""
    overrides = quick_run(tiny_data, "data.val_size=0", "trainer.max_epochs=2", "trainer.limit_train_batches=3")
    seen = MonitoringCheckpoints()
    metrics = train(compose_config(overrides, tmp_path), [seen])
    assert seen.monitors == []
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    assert metrics["best_checkpoint"] is None and metrics["val_acc_best"] is None
    assert "no best.ckpt" in capsys.readouterr().out


def test_has_split_says_before_reading_which_splits_a_folder_has(tmp_path):
    root = make_image_folder(tmp_path / "a", n_train=40, n_val=0, n_test=0)
    reads = []
    module = FolderDataModule(data_dir=str(root), val_size=0)
    module.read_indexes = lambda: reads.append(1)
    assert [module.has_split(s) for s in ("train", "val", "test")] == [True, False, False]
    module.val_size = 10  # held out of train/: validation, and the test stage scores it
    assert [module.has_split(s) for s in ("val", "test")] == [True, True]
    with_test = make_image_folder(tmp_path / "b", n_train=40, n_val=0, n_test=20)
    assert FolderDataModule(data_dir=str(with_test), val_size=0).has_split("test")
    assert reads == [] and not torch.is_tensor(getattr(module, "splits", {}).get("train"))
