"""Settings that take effect as written: the momentum the optimizer uses, one MLflow run per training run across
resumes, a used run folder refused unless overwrite=true, and files created with the permissions the umask gives."""

import math
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from mlflow.tracking import MlflowClient

from cnnlab.cli import config_dir
from cnnlab.commands.export import export
from cnnlab.commands.train import train
from cnnlab.errors import UserError
from tests.checkpoint_helpers import train_briefly
from tests.conftest import compose_config, quick_run
from tests.launch import run_script

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


# --- a second run into a folder that holds a run ----------------------------------------------------------------------
SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "test=false"]


def run_files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run folder but Hydra's log, by relative path, with its bytes."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != "train.log"
    }


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_unless_overwrite_is_set(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    train(compose_config(quick_run(tiny_data, *SHORT), run_dir))
    before = run_files(run_dir)
    with pytest.raises(UserError) as refused:
        train(compose_config(quick_run(tiny_data, *SHORT, "optimizer.lr=0.01"), run_dir))
    message = str(refused.value)
    assert "\n" not in message and str(run_dir) in message
    assert f"resume={run_dir}" in message and "hydra.run.dir=" in message and "overwrite=true" in message
    assert run_files(run_dir) == before  # nothing written, nothing removed

    train(compose_config(quick_run(tiny_data, *SHORT, "optimizer.lr=0.01", "overwrite=true"), run_dir))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]  # no -v1 files
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["optimizer"]["lr"] == 0.01  # the new run's


def test_the_train_command_refuses_a_used_run_folder_before_hydra_rewrites_its_record(tiny_data, tmp_path):
    args = quick_run(tiny_data, *SHORT)
    first = run_script("train", *args, "hydra.run.dir=run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = run_files(tmp_path / "run")
    again = run_script("train", *args, "model=resnet8", "hydra.run.dir=run", cwd=tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    paragraphs = [p for p in again.stderr.strip().split("\n\n") if p.strip()]
    assert len(paragraphs) == 1 and "resume=" in paragraphs[0] and "overwrite=true" in paragraphs[0]
    assert run_files(tmp_path / "run") == before  # .hydra/overrides.yaml too: resume=run still finds the run's own


# --- MLflow: one run per training run, across resumes -----------------------------------------------------------------
def mlflow_runs(outputs: Path) -> tuple[MlflowClient, list]:
    """The store's client and the runs of its `train` experiment, oldest first."""
    client = MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("train")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]) if experiment else []
    return client, runs


class RecordMlflowStatus(Callback):
    """The status of the run's MLflow run, read from the store at each training epoch's end."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (logger,) = trainer.loggers
        self.seen.append(logger.experiment.get_run(logger.run_id).info.status)


def test_an_extended_run_continues_its_mlflow_run(tiny_data, tmp_path):
    outputs, run_dir = tmp_path / "outputs", tmp_path / "outputs" / "train" / "run"
    logged = quick_run(tiny_data, "trainer.limit_train_batches=4", "logger=mlflow", f"paths.output_dir={outputs}")
    train(compose_config([*logged, "trainer.max_epochs=1"], run_dir))
    last = run_dir / "checkpoints" / "last.ckpt"
    status = RecordMlflowStatus()
    metrics = train(compose_config([*logged, "trainer.max_epochs=2", f"ckpt_path={last}"], run_dir), [status])
    assert status.seen == ["RUNNING"]  # while it trains again; it had ended FINISHED

    client, runs = mlflow_runs(outputs)
    (run,) = runs  # not one MLflow run per process
    assert run.info.status == "FINISHED" and run.info.run_name == str(run_dir)
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert sorted(m.step for m in history) == [3, 7]  # both epochs' curves in the one run
    assert run.data.metrics["epochs"] == metrics["epochs"] == 2
    assert run.data.params["trainer/max_epochs"] == "1"  # MLflow keeps a parameter's first value; the new one:
    assert run.data.tags["resumed/trainer/max_epochs"] == "2"


def test_a_killed_run_resumed_from_the_command_line_finishes_its_mlflow_run(tiny_data, tmp_path):
    killer = ["+callbacks.kill._target_=tests.ddp_helpers.KillAtStep", "+callbacks.kill.step=6",
              f"+callbacks.kill.marker={tmp_path / 'killed'}"]  # fmt: skip
    args = quick_run(tiny_data, "trainer.limit_train_batches=4", "trainer.max_epochs=2", "logger=mlflow", *killer)
    killed = run_script("train", *args, "hydra.run.dir=run", cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]  # in the second epoch, after last.ckpt at 4
    client, (run,) = mlflow_runs(tmp_path / "outputs")
    assert run.info.status == "RUNNING"  # what a kill leaves: nothing could mark it

    resumed = run_script("train", "resume=run", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, runs = mlflow_runs(tmp_path / "outputs")
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run.info.run_id, "FINISHED")]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/acc")) == [3, 7]
    assert "test_acc" in runs[0].data.metrics


# --- the momentum the optimizer uses ----------------------------------------------------------------------------------
class RecordMomentum(Callback):
    """The momentum of each optimizer step, as the optimizer holds it when the step's batch starts."""

    def __init__(self) -> None:
        self.momenta: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.momenta.append(trainer.optimizers[0].param_groups[0]["momentum"])


@pytest.mark.parametrize("cycle", [False, True])
def test_the_optimizer_steps_with_the_configured_momentum_or_the_configured_cycle(tiny_data, tmp_path, cycle):
    cfg = compose_config(quick_run(tiny_data, *SHORT, "trainer.limit_train_batches=8", "trainer.max_epochs=2",
                                   f"scheduler.cycle_momentum={cycle}"), tmp_path)  # fmt: skip
    assert cfg.scheduler._target_.endswith("OneCycleLR") and cfg.optimizer.momentum == 0.9  # the shipped defaults
    recorder = RecordMomentum()
    train(cfg, extra_callbacks=[recorder])
    assert len(recorder.momenta) == 16
    if not cycle:
        assert recorder.momenta == [cfg.optimizer.momentum] * 16
        return
    # OneCycleLR's cosine cycle over 16 steps: max_momentum, down to base_momentum at the peak rate (step
    # pct_start * 16 - 1 = 3), back up to max_momentum at the last step.
    base, top, peak = cfg.scheduler.base_momentum, cfg.scheduler.max_momentum, 3
    expected = [top - (top - base) * (1 - math.cos(math.pi * s / peak)) / 2 for s in range(peak + 1)]
    expected += [base + (top - base) * (1 - math.cos(math.pi * s / (15 - peak))) / 2 for s in range(1, 16 - peak)]
    assert recorder.momenta == pytest.approx(expected, abs=1e-9)
