"""checkpoints/last.ckpt, the newest state of a run: what `resume=<run dir>` continues from.

LastCheckpoint is Lightning's ModelCheckpoint writing only `last` (save_last, no top-k files; one instance owns the
name, so no `last-v1.ckpt`). From Lightning it keeps: no save before the first optimizer step and none twice at one
global step (global_step counts optimizer steps, so a step trigger never fires twice inside one gradient-accumulation
window), none while sanity-checking, outside fit or in a fast_dev_run, `every_n_train_steps`, and the file's path in
its saved state. What it adds, and why:

- A save at every epoch end, after that epoch's validation and after best.ckpt's ModelCheckpoint (Lightning calls
  Checkpoint callbacks after all others, in list order), so the saved record of the best score is current. Lightning
  writes `last` at an epoch end only after a top-k save, and a step save on the epoch's last batch (an interval that
  divides the epoch) takes that global step, so the after-validation save would be skipped and an extended run would
  start from the previous epoch's best score. Here no step or time save is made on an epoch's last batch: the
  epoch-end save follows it.
- A time interval together with the epoch ends. Lightning's `train_time_interval` replaces the epoch trigger, compares
  the clock across processes after every batch, and can fire after any batch of an accumulation window, leaving a
  checkpoint whose resumed run drops that window's gradients. Here the time is compared every few steps in a
  multi-process run (ranks.py), and every save during an epoch waits for a batch that ended an optimizer step.
- The save of a stop. `stop_after_this_step` (Ctrl-C, SIGTERM) writes once every other callback has finished the
  step (the EMA's update included) and then raises the stop; on an epoch's last step, after the validation. `save()`
  writes now (a NaN loss caught before it touched the weights).
"""

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from cnnlab.training.ranks import agreement_due, any_rank

monotonic = time.monotonic  # the clock train_time_interval is measured on


class LastCheckpoint(ModelCheckpoint):
    """Keeps <dirpath>/last.ckpt the newest state of the run: whole optimizer steps, each epoch after validation.

    Args:
        dirpath: the checkpoint folder.
        every_n_train_steps: also write every this many optimizer steps; None: not by steps.
        train_time_interval: also write once this much training time has passed since the last write; None: not by
            time. With several processes the time is compared every few steps (see cnnlab.training.ranks).
    """

    def __init__(
        self, dirpath: str, every_n_train_steps: int | None = None, train_time_interval: timedelta | None = None
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,  # last.ckpt is replaced, never set beside as last-v1.ckpt
        )
        self.interval = train_time_interval.total_seconds() if train_time_interval is not None else None
        self.saved_at_time = monotonic()
        self.step_at_batch_start = 0
        self.stop: BaseException | None = None  # raised once the step it came in has been saved

    @property
    def path(self) -> Path:
        return Path(self.dirpath or ".") / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def save(self, trainer: L.Trainer) -> None:
        """Write last.ckpt now. Every process calls this together; the first one writes the file."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self.saved_at_time = monotonic()

    def stop_after_this_step(self, stop: BaseException) -> None:
        """Write last.ckpt after every callback has finished the current optimizer step, then raise stop."""
        self.stop = stop

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.saved_at_time, self.stop = monotonic(), None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step_at_batch_start:
            return  # no optimizer step ended with this batch: its gradients are not in the weights yet
        if self._epoch_ends(trainer):
            return  # on_train_epoch_end saves, after the validation
        if self.stop is not None:
            self.save(trainer)
            raise self.stop
        if self._should_skip_saving_checkpoint(trainer):
            return
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if self.interval is not None and agreement_due(trainer):
            due = any_rank(trainer, monotonic() - self.saved_at_time >= self.interval) or due
        if due:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self.save(trainer)
        if self.stop is not None:
            raise self.stop

    @staticmethod
    def _epoch_ends(trainer: L.Trainer) -> bool:
        """Whether the epoch's training ends with this batch (its last, or the run's max_steps reached)."""
        progress = trainer.fit_loop.epoch_loop.batch_progress
        last_batch = progress.is_last_batch or progress.current.ready >= trainer.num_training_batches
        return last_batch or 0 < trainer.max_steps <= trainer.global_step


def owner(trainer: L.Trainer) -> LastCheckpoint | None:
    """The run's LastCheckpoint callback, through which a stop saves last.ckpt; None when it is turned off."""
    return next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
