"""What a run directory records about itself: metrics.json and env.json."""

import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch

from cnnlab.atomic_files import write_text_atomic


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file + rename), so a killed process never leaves half a file."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


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
