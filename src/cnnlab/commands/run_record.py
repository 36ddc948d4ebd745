"""What a run directory records about itself: metrics.json and env.json."""

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig

from cnnlab.atomic_files import write_text_atomic
from cnnlab.commands.console import short_name

_IMPORTED_AT = time.time()  # process_start_time's answer where /proc cannot tell


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file + rename), so a killed process never leaves half a file."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


# The scalars TensorBoard's HPARAMS tab shows beside each run's settings (their last value in the run).
HPARAMS_METRICS = ("test/acc", "test/loss", "val/acc", "val/loss", "train/loss")


def hparams_row(cfg: DictConfig, parameters: int, global_batch: int) -> dict[str, Any]:
    """The settings a person compares across runs, flat and short (the whole config is in .hydra/config.yaml)."""

    def name(node: Any) -> str:
        return short_name(node.get("_target_") if node else None)

    ema = (cfg.get("callbacks") or {}).get("ema")
    return {
        "model": name(cfg.model),
        "parameters": parameters,
        "data": name(cfg.data),
        "epochs": cfg.trainer.max_epochs,
        "batch_size": global_batch,
        "optimizer": name(cfg.optimizer),
        "lr": float(cfg.optimizer.lr),
        "weight_decay": float(cfg.optimizer.get("weight_decay") or 0.0),
        "scheduler": name(cfg.get("scheduler")),
        "label_smoothing": float(cfg.label_smoothing),
        "precision": str(cfg.trainer.precision),
        "seed": int(cfg.seed),
        "ema_decay": float(ema.decay) if ema else 0.0,
        "tta": str(cfg.tta),
        "init_from": str(cfg.get("init_from") or ""),
    }


def log_hparams(logger: TensorBoardLogger, row: dict[str, Any]) -> None:
    """Give TensorBoard's HPARAMS tab this run's row, with HPARAMS_METRICS as its columns.

    Lightning's log_hyperparams(params, metrics) would also write each metric again as a scalar at step 0 (a
    duplicate point in the test/acc chart, or one-point hp/* charts); the summaries alone refer to the scalars the
    run logged. Written through the writer's _get_file_writer(), as Lightning's own logger does;
    tests/test_train.py reads the tab back.
    """
    from torch.utils.tensorboard.summary import hparams

    writer = logger.experiment._get_file_writer()
    for summary in hparams(row, dict.fromkeys(HPARAMS_METRICS, 0.0)):
        writer.add_summary(summary)
    writer.flush()


def early_stopping_record(trainer: L.Trainer) -> dict[str, Any]:
    """Whether early stopping (callbacks/early_stopping) ended the run, and after which epoch (counted from 0)."""
    stopper = trainer.early_stopping_callback
    if stopper is None:
        return {"stopped_early": False, "stopped_epoch": None}
    # Recent Lightning records stopping_reason, which also tells a stop at epoch 0 (a non-finite val/acc).
    reason = getattr(stopper, "stopping_reason", None)
    stopped = reason.name != "NOT_STOPPED" if reason is not None else stopper.stopped_epoch > 0
    return {"stopped_early": stopped, "stopped_epoch": stopper.stopped_epoch if stopped else None}


def _git_state() -> dict[str, Any]:
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"git_commit": None, "git_dirty": None}
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=source, capture_output=True, text=True, timeout=10
        )
        return {"git_commit": commit.stdout.strip(), "git_dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {"git_commit": None, "git_dirty": None}


def environment(seed: int, deterministic: bool | str | None, data_files: dict[str, str]) -> dict[str, Any]:
    """Versions, device, code state, seed and data checksums: what it takes to repeat a run."""
    import hydra
    import lightning
    import torchvision

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "hydra": hydra.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "seed": seed,
        "deterministic": deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "data_files_sha256": data_files,
        **_git_state(),
    }


_jobs_started = 0  # train() calls in this process so far


def job_start_time() -> float:
    """When this training job started, for its wall_seconds: the process's start for its first job (imports
    included), the call itself for every later one (a -m sweep or a search runs its jobs one after another in one
    process, and each job's time is its own)."""
    global _jobs_started
    _jobs_started += 1
    return process_start_time() if _jobs_started == 1 else time.time()


def process_start_time() -> float:
    """Wall-clock time at which this process started (Linux /proc; else the time this module was imported)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT
