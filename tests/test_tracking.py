"""Experiment tracking: logger=mlflow fills one SQLite store (read back with MlflowClient and over the tracking
server's REST API, from single runs, sweeps and searches); logger=wandb writes offline or asks for its package."""

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from cnnlab.commands.train import train
from cnnlab.errors import UserError
from tests.conftest import compose_config, quick_run
from tests.launch import free_port, run_script, tensorboard_events

EPOCH_METRICS = ["train/loss", "train/acc", "val/loss", "val/acc"]


def flattened(node: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow parameters: keys joined with "/", values as text (at most 250 characters)."""
    if not isinstance(node, dict):
        return {prefix: str(node)[:250]}
    items = {}
    for key, value in node.items():
        items.update(flattened(value, f"{prefix}/{key}" if prefix else str(key)))
    return items


def store(folder: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")


def runs_of(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment named {experiment}"
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


def test_mlflow_run_holds_the_config_epoch_metrics_final_metrics_and_best_checkpoint(tiny_data, tmp_path):
    outputs, run_dir = tmp_path / "outputs", tmp_path / "outputs" / "train" / "run"
    cfg = compose_config([*quick_run(tiny_data), "trainer.max_epochs=2", "trainer.limit_train_batches=4",
                          "logger=[tensorboard,mlflow]", f"paths.output_dir={outputs}"], run_dir)  # fmt: skip
    metrics = train(cfg)
    client = store(outputs)
    (run,) = runs_of(client, "train")  # the experiment is named after cfg.task
    assert run.info.status == "FINISHED" and run.info.run_name == str(run_dir)

    assert run.data.params == flattened(OmegaConf.to_container(cfg, resolve=True))

    events = tensorboard_events(run_dir)
    tensorboard_tags = {t for t in events.Tags()["scalars"] if not t.startswith("hp/")}
    assert set(EPOCH_METRICS) | {"test/acc", "test/loss"} <= tensorboard_tags <= set(run.data.metrics)
    for name in EPOCH_METRICS:  # one value per epoch, at the same steps and with the values TensorBoard has
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        board = [(e.step, e.value) for e in events.Scalars(name)]
        assert len(history) == 2 and [s for s, _ in history] == [s for s, _ in board]
        assert [v for _, v in history] == pytest.approx([v for _, v in board], rel=1e-6)

    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    assert {"test_acc", "val_acc_best", "epochs", "train_seconds"} <= set(numbers)
    assert {k: run.data.metrics[k] for k in numbers} == pytest.approx({k: float(v) for k, v in numbers.items()})
    assert run.data.tags["status"] == "finished" and run.data.tags["best_checkpoint"] == metrics["best_checkpoint"]

    (artifact,) = client.list_artifacts(run.info.run_id, "checkpoints")
    assert artifact.path == "checkpoints/best.ckpt"
    copy = Path(client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path / "download")))
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    assert digest == hashlib.sha256((run_dir / "checkpoints" / "best.ckpt").read_bytes()).hexdigest()


def get_json(url: str, payload: dict | None = None) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_mlflow_tracking_server_serves_val_acc_of_a_run_logged_from_the_command_line(tiny_data, tmp_path):
    # paths.output_dir keeps its default, `outputs`: the store is found relative to where the command ran.
    args = quick_run(tiny_data, "trainer.max_epochs=2", "trainer.limit_train_batches=4", "logger=mlflow")
    result = run_script("train", *args, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    database = tmp_path / "outputs" / "mlflow.db"
    assert database.is_file()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{database}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,  # its workers share its group
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        deadline, experiment = time.monotonic() + 120, None
        while experiment is None:
            assert server.poll() is None, "the MLflow server exited"
            assert time.monotonic() < deadline, "the MLflow server did not answer within 120 s"
            try:
                experiment = get_json(f"{api}/experiments/get-by-name?experiment_name=train")["experiment"]
            except (OSError, ValueError):
                time.sleep(1)
        (run,) = get_json(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        query = urllib.parse.urlencode({"run_id": run["info"]["run_id"], "metric_key": "val/acc"})
        points = get_json(f"{api}/metrics/get-history?{query}")["metrics"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert run["info"]["run_name"] == str(tmp_path / "run")
    assert [p["step"] for p in points] == [3, 7]  # the last step of each of the 2 epochs of 4 steps
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert max(p["value"] for p in points) == pytest.approx(metrics["val_acc_best"])


def test_every_job_of_a_sweep_and_every_trial_of_a_search_is_a_run_in_the_one_store(tiny_data, tmp_path):
    logged = quick_run(tiny_data, "trainer.limit_train_batches=4", "trainer.max_epochs=1", "logger=mlflow")
    sweep = run_script("train", "-m", *logged, "optimizer.lr=0.01,0.05", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    search = run_script("search", "n_trials=2", *logged, "hydra.run.dir=search", cwd=tmp_path)
    assert search.returncode == 0, search.stderr[-3000:]

    client = store(tmp_path / "outputs")  # both commands ran here with the default paths.output_dir
    for experiment, folder in (("train", "sweep"), ("search", "search")):
        runs = runs_of(client, experiment)
        assert [r.info.run_name for r in runs] == [str(tmp_path / folder / n) for n in ("0", "1")]
        for run in runs:
            metrics = json.loads((Path(run.info.run_name) / "metrics.json").read_text())
            assert run.info.status == "FINISHED" and run.data.metrics["test_acc"] == pytest.approx(metrics["test_acc"])
            assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 1
    sweep_lrs = [r.data.params["optimizer/lr"] for r in runs_of(client, "train")]
    assert sweep_lrs == ["0.01", "0.05"]
    trials = [json.loads((tmp_path / "search" / n / "trial.json").read_text()) for n in ("0", "1")]
    search_lrs = [float(r.data.params["optimizer/lr"]) for r in runs_of(client, "search")]
    assert search_lrs == pytest.approx([t["params"]["optimizer.lr"] for t in trials])


WANDB_INSTALLED = importlib.util.find_spec("wandb") is not None


@pytest.mark.skipif(WANDB_INSTALLED, reason="checks the message shown where wandb is not installed")
def test_logger_wandb_without_wandb_installed_stops_before_any_work_naming_the_extra(tmp_path):
    cfg = compose_config(quick_run(tmp_path / "no-data", "logger=wandb"), tmp_path / "run")
    with pytest.raises(UserError, match=r'logger\.wandb .*pip install -e "\.\[wandb\]"'):
        train(cfg)  # not the missing data: the logger is checked first
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(WANDB_INSTALLED, reason="checks the message shown where wandb is not installed")
def test_logger_wandb_without_wandb_installed_is_one_paragraph_and_exit_2(tiny_data, tmp_path):
    result = run_script("train", f"data.data_dir={tiny_data}", "logger=wandb", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    paragraphs = [p for p in result.stderr.strip().split("\n\n") if p.strip()]
    assert len(paragraphs) == 1 and 'pip install -e ".[wandb]"' in paragraphs[0]
    assert not (tmp_path / "outputs").exists()  # the run folder Hydra made is removed again


@pytest.mark.skipif(not WANDB_INSTALLED, reason='needs wandb: pip install -e ".[wandb]"')
def test_logger_wandb_writes_one_offline_run_per_training_run(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # Lightning sets it for offline runs; restored after the test
    for name in ("first", "second"):  # in one process, as the jobs of a sweep: the second must not reuse the first
        cfg = compose_config([*quick_run(tiny_data), "trainer.max_epochs=2", "trainer.limit_train_batches=4",
                              "logger=wandb"], tmp_path / name)  # fmt: skip
        train(cfg)
        (offline_run,) = (tmp_path / name / "wandb").glob("offline-run-*")
        # The run's records (protobuf, read by `wandb sync`): per-epoch metrics, the whole config (trainer keys are
        # not among the classifier's hyperparameters) and metrics.json's values (test_acc) in the summary.
        (records,) = offline_run.glob("run-*.wandb")
        content = records.read_bytes()
        assert all(key in content for key in (b"val/acc", b"train/loss", b"max_epochs", b"test_acc", b"stopped_early"))
