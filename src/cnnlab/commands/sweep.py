"""Hydra sweeps (`-m`): a failing job is recorded in its run directory and the sweep goes on; the end reports it.

Hydra's basic launcher stops a sweep at the first exception. A sweep of many runs should rather try them all, so in
multirun mode each job runs through `run_recording_failure`: an exception (a UserError, NaN checks, out of memory, a
bad combination of options) is written to `<job dir>/failed.json` and the job returns None. `SweepReport`, a Hydra
callback, lists the failed jobs when the sweep ends and makes the process exit with code 1 if there were any.
"""

import gc
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from cnnlab.commands.run_record import write_json
from cnnlab.errors import UserError

FAILED_FILE = "failed.json"
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp", "deepspeed")


def in_multirun() -> bool:
    """True inside a job of a `-m` sweep."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def is_distributed(trainer: DictConfig) -> bool:
    """Whether a trainer config asks for more than one process (a DDP-like strategy, several devices or nodes)."""
    strategy = str(trainer.get("strategy") or "auto")
    devices = trainer.get("devices", 1)
    if isinstance(devices, str):
        devices = int(devices) if devices.lstrip("-").isdigit() else -1  # "auto": as many as there are
    many_devices = devices == -1 or devices > 1 if isinstance(devices, int) else len(devices) > 1
    return strategy.startswith(DISTRIBUTED_STRATEGIES) or many_devices or int(trainer.get("num_nodes") or 1) > 1


def refuse_local_distributed_sweep(cfg: DictConfig) -> None:
    """Stop a sweep whose jobs would each start DDP processes from inside one sweeping process."""
    launcher = str(HydraConfig.get().launcher.get("_target_", ""))
    if is_distributed(cfg.trainer) and not launcher.endswith("SlurmLauncher"):  # submitit_slurm: srun makes them
        raise UserError(
            "A -m sweep cannot use a distributed trainer (trainer=ddp, trainer.devices > 1 or trainer.num_nodes > 1) "
            "with the local launcher: Lightning would start each job's extra processes by re-running the whole "
            "sweep command. Run each configuration as its own command (python scripts/train.py trainer=ddp ...), "
            "sweep with one device per job, or sweep on SLURM with hydra/launcher=slurm_ddp (submitit), where every "
            "job is its own allocation with one task per device."
        )


def record_failure(run_dir: Path, error: BaseException) -> None:
    """Write <run_dir>/failed.json: status, error type and message, and the traceback."""
    write_json(
        run_dir / FAILED_FILE,
        {
            "status": "failed",
            "error": type(error).__name__,
            "message": str(error),
            "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        },
    )


def run_recording_failure(fn: Callable[[DictConfig], dict], cfg: DictConfig) -> dict[str, Any] | None:
    """Call fn(cfg); an exception is recorded in the run directory and reported, and None is returned."""
    try:
        return fn(cfg)
    except Exception as error:
        run_dir = Path(cfg.run_dir)
        record_failure(run_dir, error)
        print(f"\nJob {run_dir} failed ({type(error).__name__}): {error}\n", file=sys.stderr)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # an out-of-memory job must not leave its memory to the next one
        return None


def failed_jobs(sweep_dir: Path) -> dict[Path, dict]:
    """The failed.json records under a sweep directory, by job directory."""
    import json

    return {p.parent: json.loads(p.read_text()) for p in sorted(sweep_dir.glob(f"**/{FAILED_FILE}"))}


class SweepReport(Callback):
    """At the end of a sweep, name the failed jobs and exit with code 1 if there were any."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = failed_jobs(sweep_dir)
        if not failed:
            return
        lines = [
            f"  {job}: {record['error']}: {record['message'].splitlines()[0] if record['message'] else ''}"
            for job, record in failed.items()
        ]
        print(f"\n{len(failed)} job(s) of the sweep in {sweep_dir} failed:\n" + "\n".join(lines), file=sys.stderr)
        print(f"Summary: python scripts/summarize.py {sweep_dir}", file=sys.stderr)
        sys.exit(1)
