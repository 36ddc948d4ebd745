"""Checkpoints for the eval, predict and export tests: briefly trained, untrained, foreign, damaged and hostile."""

import zipfile
from pathlib import Path

import torch

from cnnlab.commands.train import build_classifier, train
from tests.conftest import compose_config, quick_run

# Two short epochs reach about 80% tiny test accuracy: right on most images but not all, so errors and ranks
# mean something.
BRIEF = ["trainer.max_epochs=2", "trainer.limit_train_batches=8", "optimizer.lr=0.1"]


def train_briefly(data_dir: Path, run_dir: Path, *extra: str) -> dict:
    """train() on the tiny data; returns its metrics (the run's best.ckpt is under run_dir/checkpoints/)."""
    return train(compose_config(quick_run(data_dir, *BRIEF, *extra), run_dir))


def save_untrained_checkpoint(path: Path, data_dir: Path, model: str = "lenet5", data: str = "mnist") -> Path:
    """A checkpoint as cnnlab writes it (state_dict + plain hyper_parameters), of an untrained model."""
    cfg = compose_config(quick_run(data_dir, model=model, data=data), path.parent)
    classifier = build_classifier(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": classifier.state_dict(), "hyper_parameters": dict(classifier.hparams)}, path)
    return path


class CreatesFile:
    """Unpickling this object calls open(marker, "w"), creating the marker: what a hostile checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint-shaped file whose full unpickling would create marker."""
    payload = {"state_dict": {}, "hyper_parameters": {"model": {}}, "callbacks": CreatesFile(marker)}
    torch.save(payload, path)
    return path


def bad_files(tmp_path: Path, good: Path) -> dict[str, Path]:
    """Files that are not usable checkpoints, by the kind of mistake."""
    truncated = tmp_path / "truncated.ckpt"
    raw = good.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    assert not zipfile.is_zipfile(truncated)
    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint\n")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, foreign)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    return {
        "missing": tmp_path / "nowhere" / "best.ckpt",
        "truncated": truncated,
        "not a checkpoint": text,
        "not a lightning checkpoint": tensor,
        "another project": foreign,
    }


# The phrase each kind of bad file's message contains.
EXPECTED_MESSAGE = {
    "missing": "does not exist",
    "truncated": "truncated or corrupt",
    "not a checkpoint": "is not a checkpoint",
    "not a lightning checkpoint": "not a Lightning checkpoint",
    "another project": "not written by cnnlab",
}
