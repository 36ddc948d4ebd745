"""Stopping a run without losing it: Ctrl-C / SIGTERM save last.ckpt and stop; a NaN or inf loss stops at once."""

import math
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from cnnlab.errors import UserError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """Training stopped on a signal after saving last.ckpt; exit_code is 128 + the signal number, as shells report."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"{self.signal_name} received; the state after the last finished step is in {checkpoint}")


class NonFiniteLoss(UserError):
    """The training loss became NaN or inf."""


class GracefulStop(Callback):
    """On SIGINT (Ctrl-C) or SIGTERM, finish the current step, save last.ckpt, and stop with RunInterrupted.

    Lightning's own handling (KeyboardInterrupt at an arbitrary point, SIGTERM raised between batches without a
    checkpoint) can stop inside an optimizer step and saves nothing; this waits for the step to end. A second Ctrl-C
    stops at once.

    Args:
        dirpath: the checkpoint folder; the state goes to <dirpath>/last.ckpt.
    """

    def __init__(self, dirpath: str) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name} received: saving after this step, then stopping (Ctrl-C again: abort)")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        if trainer.is_global_zero:  # signal handlers can only be set from the main thread
            self.previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}

    def _restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _stop_if_asked(self, trainer: L.Trainer) -> None:
        if self.received is None:
            return
        trainer.save_checkpoint(self.path)
        raise RunInterrupted(self.received, self.path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._stop_if_asked(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_asked(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()


class StopOnNonFiniteLoss(Callback):
    """Stop at the first NaN or inf training loss, before its backward pass and optimizer step touch the weights.

    Checkpoints are only written after finished steps, so last.ckpt keeps the last good state. Reading the loss each
    step costs one device synchronization per step.
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if math.isfinite(loss.item()):  # 0.2 us on a CPU; torch.isfinite(...).all() would take 7 us
            return
        step, epoch = trainer.global_step + 1, trainer.current_epoch
        batch = trainer.fit_loop.epoch_loop.batch_idx + 1
        raise NonFiniteLoss(
            f"The training loss became {loss.item()} at step {step} (epoch {epoch}, batch {batch}); training stopped "
            "there and checkpoints/last.ckpt keeps the last good state. Likely causes: a learning rate too high for "
            "this model (lower optimizer.lr, e.g. by 10x), bad input data (check the files and data.mean/std), or "
            "overflow in 16-bit precision (use trainer.precision=bf16-mixed or 32-true)."
        )
