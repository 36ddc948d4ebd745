"""Which checkpoint a run folder stands for: the one rule eval, predict, export and a run's final "Next:" lines share.

A run with a validation split writes best.ckpt (its best val/acc) beside last.ckpt; a run that trains on every image
(data.val_size=0, as experiment=cifar10_record and mnist_fast do) writes last.ckpt only, and its test stage scores
those final weights. So a run folder means its best.ckpt where there is one, else its last.ckpt.
"""

from pathlib import Path

from cnnlab.errors import UserError

CHOICES = ("best.ckpt", "last.ckpt")  # in order of preference


def run_checkpoint(run_dir: Path) -> Path | None:
    """run_dir/checkpoints/best.ckpt where the run wrote one, else its last.ckpt; None for a folder without either."""
    return next((run_dir / "checkpoints" / n for n in CHOICES if (run_dir / "checkpoints" / n).is_file()), None)


def why(checkpoint: Path) -> str:
    """The line a command prints about the checkpoint a run folder stood for."""
    if checkpoint.name == "best.ckpt":
        return f"{checkpoint}: the run's best validation accuracy"
    return f"{checkpoint}: the run's final weights (no best.ckpt: it trained without a validation split)"


def checkpoint_file(path: str | Path, key: str = "ckpt_path") -> Path:
    """path itself, or for a run folder the checkpoint it stands for (run_checkpoint), said in one printed line."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    found = run_folder_checkpoints(path, key)
    if len(found) > 1:
        raise UserError(
            f"{key}={path} holds {len(found)} runs ({found[0].parent.parent.name}, {found[1].parent.parent.name}, "
            "...); this command takes one. Give one run's folder or checkpoint file."
        )
    print(f"{key}={path} -> {why(found[0])}")
    return found[0]


def run_folder_checkpoints(folder: Path, key: str = "ckpt_path") -> list[Path]:
    """The checkpoint of the run in folder, or of every run below it (a -m sweep's folder), sorted by run folder.

    A run is a folder holding checkpoints/best.ckpt or checkpoints/last.ckpt; each counts once, by run_checkpoint.
    """
    own = run_checkpoint(folder)
    if own is not None:
        return [own]
    runs = sorted({p.parent.parent for name in CHOICES for p in folder.rglob(f"checkpoints/{name}")})
    found = [c for c in (run_checkpoint(r) for r in runs) if c is not None]
    if not found:
        raise UserError(
            f"{key}={folder} is a directory without any run below it (no checkpoints/best.ckpt or checkpoints/"
            "last.ckpt). Give a .ckpt file, a run directory (outputs/train/<time>) or a multirun directory."
        )
    return found
