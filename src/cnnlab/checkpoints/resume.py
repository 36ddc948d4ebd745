"""Continuing a run: `resume=<run dir>` (or `ckpt_path=<run dir>/checkpoints/<name>.ckpt`) becomes the original
run's own overrides plus its folder and checkpoint, so the resumed run has the same config, writes into the same
folder (Hydra creates no new one) and continues its step count, optimizer, schedule and data order.
"""

from pathlib import Path
from typing import Any

import yaml

from cnnlab.checkpoints.load import load_checkpoint
from cnnlab.errors import UserError

DROPPED = ("resume", "ckpt_path", "hydra.run.dir")  # set anew for the resumed run


def override_key(arg: str) -> str:
    """The key an override sets: `+trainer.x=1` -> `trainer.x`, `model=resnet8` -> `model`."""
    return arg.split("=", 1)[0].lstrip("+~")


def legacy_override(arg: str) -> str:
    """An override of a run made before a key was renamed, in today's terms: tta_flip=true is tta=flip."""
    if override_key(arg) == "tta_flip":
        value = arg.split("=", 1)[1].strip().lower()
        return f"tta={'flip' if value == 'true' else 'none'}"
    return arg


def run_dir_of_checkpoint(ckpt: Path) -> Path | None:
    """The run folder holding ckpt when it is <run dir>/checkpoints/<name>.ckpt of a run with its .hydra/ record."""
    run_dir = ckpt.parent.parent
    if ckpt.parent.name == "checkpoints" and (run_dir / ".hydra" / "overrides.yaml").is_file():
        return run_dir
    return None


def resume_arguments(args: list[str]) -> list[str]:
    """Rewrite command-line arguments so that a `resume=` or run-folder `ckpt_path=` continues that run in place.

    Arguments without either come back unchanged. Overrides given with the resume win over the original ones
    (e.g. `trainer.max_epochs=20` extends a finished run).
    """
    values = {override_key(a): a.split("=", 1)[1] for a in args if "=" in a and not a.startswith("-")}
    if values.get("resume") not in (None, "", "null"):
        run_dir = Path(values["resume"]).expanduser()
        if not (run_dir / ".hydra" / "overrides.yaml").is_file():
            raise UserError(
                f"resume={values['resume']} is not a run folder: {run_dir.resolve()} has no .hydra/overrides.yaml. "
                "Give the folder of an earlier run, e.g. resume=outputs/train/<time>."
            )
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise UserError(
                f"resume={values['resume']}: the run has no checkpoints/last.ckpt to continue from (it stopped "
                "before its first checkpoint). Start it again without resume=."
            )
    elif values.get("ckpt_path") not in (None, "", "null"):
        ckpt = Path(values["ckpt_path"]).expanduser()
        run_dir = run_dir_of_checkpoint(ckpt) if ckpt.is_file() else None
        if run_dir is None:
            return args  # a checkpoint from elsewhere: train.py checks it and starts a new folder
    else:
        return args
    if any(a in ("-m", "--multirun") for a in args):
        raise UserError("resume= continues one run; it does not combine with -m/--multirun. Drop -m.")
    run_dir, ckpt = run_dir.resolve(), ckpt.resolve()
    original = [legacy_override(a) for a in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []]
    given = [a for a in args if override_key(a) not in DROPPED]
    given_keys = {override_key(a) for a in given if "=" in a}
    kept = [a for a in original if override_key(a) not in DROPPED and override_key(a) not in given_keys]
    return [*kept, *given, f"resume={run_dir}", f"ckpt_path={ckpt}", f"hydra.run.dir={run_dir}"]


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in run_dir."""
    return f"python scripts/train.py resume={run_dir}"


def load_resume_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """The checkpoint a run resumes from, refused when it does not load safely or holds no training state."""
    try:
        ckpt = load_checkpoint(ckpt_path)  # weights_only=True; missing, torn, foreign and hostile files refused
    except UserError as err:
        raise UserError(f"ckpt_path={ckpt_path}: {err}") from None
    if "optimizer_states" not in ckpt:
        raise UserError(
            f"ckpt_path={ckpt_path} holds no optimizer state to resume from (a weights-only file). Use "
            "<run dir>/checkpoints/last.ckpt of a run, or init_from=<checkpoint> to start a new run from its weights."
        )
    return ckpt


def check_checkpoint_fits(ckpt: dict[str, Any], ckpt_path: str | Path, model: dict[str, Any]) -> None:
    """Refuse a checkpoint to resume from that was trained with another model config."""
    saved = ckpt["hyper_parameters"]["model"]
    if saved.get("_target_") != model.get("_target_"):
        differing = ["_target_"]
    else:
        differing = sorted(k for k in set(saved) | set(model) if saved.get(k) != model.get(k))
    if differing:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {model.get(k)!r}" for k in differing)
        raise UserError(
            f"ckpt_path={ckpt_path} was trained with a different model ({details}). Resume with the run's own "
            "config (resume=<run dir> applies it), start a new run without ckpt_path, or start a new run from its "
            "weights with init_from=<checkpoint>."
        )
