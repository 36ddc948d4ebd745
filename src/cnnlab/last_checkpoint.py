"""checkpoints/last.ckpt, the newest state of a run: what `resume=<run dir>` continues from.

One callback owns the file. It writes it at every epoch end, during an epoch every `train_time_interval` of training
(or every `every_n_train_steps` steps), and when a stop asks for it (Ctrl-C or SIGTERM, and a NaN loss caught before
it touched the weights). Lightning's ModelCheckpoint is kept for best.ckpt only: as a writer of `last` it saves only
when its own trigger fires (with a time interval, never at an epoch end), and two instances both claiming `last`
write `last-v1.ckpt` beside each other's file.
"""

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from cnnlab.ranks import agreement_due, any_rank

monotonic = time.monotonic  # the clock train_time_interval is measured on


class LastCheckpoint(Checkpoint):
    """Keeps <dirpath>/last.ckpt the newest state of the run.

    A `Checkpoint` subclass, so Lightning calls it after the LightningModule's epoch-end hook (the epoch's metrics are
    logged) and after best.ckpt's ModelCheckpoint (its record of the best epoch is current in the saved state).

    Args:
        dirpath: the checkpoint folder.
        every_n_train_steps: also write every this many training steps; None: not by steps.
        train_time_interval: also write once this much training time has passed since the last write; None: not by
            time. With several processes the time is compared every few steps (see cnnlab.ranks).
    """

    def __init__(
        self, dirpath: str, every_n_train_steps: int | None = None, train_time_interval: timedelta | None = None
    ) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_train_steps = every_n_train_steps
        self.interval = train_time_interval.total_seconds() if train_time_interval is not None else None
        self.saved_at_step: int | None = None
        self.saved_at_time = monotonic()

    def save(self, trainer: L.Trainer) -> None:
        """Write last.ckpt now. Every process calls this together; the first one writes the file."""
        trainer.save_checkpoint(self.path, weights_only=False)  # the whole training state, to resume from
        self.saved_at_step, self.saved_at_time = trainer.global_step, monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.saved_at_step, self.saved_at_time = None, monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        due = bool(self.every_n_train_steps) and step % self.every_n_train_steps == 0
        if self.interval is not None and agreement_due(trainer):
            due = any_rank(trainer, monotonic() - self.saved_at_time >= self.interval) or due
        if due:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.saved_at_step != trainer.global_step:
            self.save(trainer)


def owner(trainer: L.Trainer) -> LastCheckpoint | None:
    """The run's LastCheckpoint callback, through which a stop saves last.ckpt; None when it is turned off."""
    return next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
