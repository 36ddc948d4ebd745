"""What a person sees of a training run in the terminal: a short header once training starts, and at the end a
table in the units people read and the commands that continue from here. The whole composed config is printed only
on request (`print_config=true`); it is always in <run dir>/.hydra/config.yaml.
"""

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from rich.table import Table

from cnnlab.checkpoints.resume import resume_command
from cnnlab.checkpoints.run_folder import run_checkpoint


def short_name(target: str | None) -> str:
    """`cnnlab.models.LeNet5` -> `LeNet5`, `torch.optim.lr_scheduler.OneCycleLR` -> `OneCycleLR`."""
    return str(target).rsplit(".", 1)[-1] if target else "none"


def parameter_count(module: L.LightningModule) -> int:
    return sum(p.numel() for p in module.model.parameters())


class RunHeader(Callback):
    """Prints what is about to be trained, once the data is loaded (split sizes are known) and before the first step.

    Args:
        run_dir: the run folder.
        notes: lines to add (what init_from carried over, the step a resumed run continues from).
    """

    def __init__(self, run_dir: Path, notes: list[str] | None = None) -> None:
        self.run_dir, self.notes = run_dir, notes or []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        hp, dm = pl_module.hparams, trainer.datamodule
        sizes = " / ".join(f"{len(dm.splits[s][1]):,} {s}" for s in ("train", "val", "test") if s in dm.splits)
        shape = "x".join(map(str, dm.image_shape))
        steps = trainer.estimated_stepping_batches
        per_epoch = trainer.num_training_batches
        device = trainer.strategy.root_device
        where = f"{device.type} x{trainer.world_size}" if trainer.world_size > 1 else device.type
        scheduler = short_name((hp.scheduler or {}).get("_target_"))
        lines = [
            f"run      {self.run_dir}",
            f"model    {short_name(hp.model['_target_'])}, {parameter_count(pl_module):,} parameters",
            f"data     {getattr(dm, 'name', short_name(hp.data['_target_']))}: {sizes} images of {shape}, "
            f"{len(dm.class_names)} classes, batch {dm.batch_size * trainer.world_size}",
            f"device   {where}, precision {trainer.precision}",
            f"training {trainer.max_epochs} epochs of {per_epoch:,} steps ({int(steps):,} in all), "
            f"{short_name(hp.optimizer['_target_'])} lr {hp.optimizer['lr']:g}, schedule {scheduler}",
            *self.notes,
        ]
        Console().print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)  # paths stay whole


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def summary_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The final table's rows, in the units people read."""
    rows = [("status", str(metrics["status"]))]
    if "test_acc" in metrics:
        rows += [("test accuracy", percent(metrics["test_acc"])), ("test loss", f"{metrics['test_loss']:.4f}")]
    rows += [
        ("best val accuracy", percent(metrics.get("val_acc_best"))),
        ("epochs", str(metrics["epochs"]) + (" (stopped early)" if metrics.get("stopped_early") else "")),
        ("steps", f"{metrics['global_step']:,}"),
        ("training time", f"{metrics['train_seconds']:.1f} s (steps only)"),
        *(
            [("steady step", f"{metrics['steady_step_ms']:.1f} ms ({metrics['warmup_steps']} warm-up steps left out)")]
            if metrics.get("steady_step_ms") is not None
            else []
        ),
        ("wall time", f"{metrics['wall_seconds']:.1f} s (from the job's start)" if "wall_seconds" in metrics else "-"),
        *((f"  {name}", f"{seconds:.1f} s") for name, seconds in (metrics.get("phases") or {}).items()),
        ("throughput", f"{metrics['train_images_per_second']:,.0f} images/s"),
    ]
    return rows


def next_commands(run_dir: Path) -> list[str]:
    """What a person does next with this run: eval and predict on the checkpoint the run folder stands for (best.ckpt,
    or last.ckpt, the final weights, where no checkpoint was chosen by validation)."""
    commands = [f"tensorboard --logdir {run_dir / 'tensorboard'}"]
    scored = run_checkpoint(run_dir)
    if scored:
        commands.append(f"python scripts/eval.py ckpt_path={scored}")
        commands.append(f"python scripts/predict.py ckpt_path={scored} inputs=<image file or folder>")
    commands.append(f"{resume_command(run_dir)} trainer.max_epochs=<more epochs>")
    return commands


def print_summary(console: Console, run_dir: Path, metrics: dict[str, Any]) -> None:
    """The final table of a run and the next commands."""
    console.print(f"\nRun {run_dir}", markup=False, highlight=False, soft_wrap=True)
    table = Table(show_header=False)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in summary_rows(metrics):
        table.add_row(name, value)
    console.print(table)
    commands = next_commands(run_dir)
    console.print("Next:\n" + "\n".join(f"  {c}" for c in commands), markup=False, highlight=False, soft_wrap=True)
