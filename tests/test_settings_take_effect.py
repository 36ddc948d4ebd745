"""Settings that take effect as written: the momentum the optimizer uses, one MLflow run per training run across
resumes, a used run folder refused unless overwrite=true, and files created with the permissions the umask gives."""

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from cnnlab.cli import config_dir
from cnnlab.export import export
from tests.checkpoint_helpers import train_briefly

UMASK = 0o027  # neither the usual 022 nor mkstemp's owner-only 0600: a file gets 0o640 only by honouring it


@pytest.fixture
def umask() -> Iterator[int]:
    previous = os.umask(UMASK)
    try:
        yield UMASK
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_checkpoints_metrics_and_exports_get_the_permissions_the_umask_gives(tiny_data, tmp_path, umask):
    run_dir = tmp_path / "run"
    train_briefly(tiny_data, run_dir)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("export", overrides=[f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}", "format=onnx"])
    onnx = export(cfg)["output"]
    files = [run_dir / "checkpoints" / "best.ckpt", run_dir / "checkpoints" / "last.ckpt", run_dir / "metrics.json"]
    assert {str(f): oct(mode(f)) for f in [*files, Path(onnx)]} == {
        str(f): oct(0o666 & ~umask) for f in [*files, Path(onnx)]
    }
