"""Stopping a run without losing it: Ctrl-C / SIGTERM save last.ckpt and stop; a NaN or inf loss stops at once.

In a run of several processes every process stops at the same step (ranks.py), whichever of them saw the signal
or the NaN, so none is left waiting for the others in a gradient all-reduce.
"""

import math
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from cnnlab.errors import UserError
from cnnlab.training.last_checkpoint import owner
from cnnlab.training.ranks import agreement_due, any_rank

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """Training stopped on a signal after saving last.ckpt; exit_code is 128 + the signal number, as shells report."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        where = f"is in {checkpoint}" if checkpoint else "was not saved (callbacks.last_checkpoint is off)"
        super().__init__(f"{self.signal_name} received; the state after the last finished step {where}")


class NonFiniteLoss(UserError):
    """The training loss became NaN or inf."""


class GracefulStop(Callback):
    """On SIGINT (Ctrl-C) or SIGTERM, finish the current step, save last.ckpt, and stop with RunInterrupted.

    Lightning's own handling (KeyboardInterrupt at an arbitrary point, SIGTERM raised between batches without a
    checkpoint) can stop inside an optimizer step and saves nothing; this waits for the step to end. The save and the
    stop are left to last.ckpt's owner (last_checkpoint.py), which Lightning calls after every other callback:
    the saved state holds the step's EMA update and other callbacks' work, a whole gradient-accumulation window, and
    on an epoch's last step the epoch's validation. A second Ctrl-C stops at once. Every process of a distributed run
    installs the handler; a signal that reaches only one of them (SIGTERM to the launching process) stops all of them
    within `cnnlab.training.ranks.AGREE_EVERY_N_STEPS` steps.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name} received: saving after this step, then stopping (Ctrl-C again: abort)")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self.previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}

    def _restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not agreement_due(trainer) or not any_rank(trainer, self.received is not None):
            return
        last = owner(trainer)
        stop = RunInterrupted(self.received or signal.SIGTERM, last.path if last else None)
        if last is None:
            raise stop
        last.stop_after_this_step(stop)  # it saves after the other callbacks' work for this step, then raises

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()


class StopOnNonFiniteLoss(Callback):
    """Stop at the first NaN or inf training loss, keeping last.ckpt at the last good state.

    Where reading a value back is free (the CPU), the loss is read every step, before that step's backward pass and
    optimizer step touch the weights: the weights are still good then, so last.ckpt is written with them and the run
    stops. On an accelerator a read every step would make the host wait for the device every step, which costs small
    models much of their speed; there each step's finiteness is folded into one flag on the device, read every
    `device_check_every_n_steps` steps, at each epoch end and before every checkpoint is written. The run then stops
    at most that many steps late, and no checkpoint ever holds weights that a non-finite step has touched.
    In a run of several processes the processes compare their flags at each read, so all of them stop together.

    Args:
        device_check_every_n_steps: steps between reads on an accelerator; 1 reads every step there too.
    """

    def __init__(self, device_check_every_n_steps: int = 50) -> None:
        self.every = device_check_every_n_steps
        self.all_finite: Tensor | None = None  # on the device: whether every loss since the last read was finite
        self.unread_from = 0  # the first step whose loss has not been read yet

    @staticmethod
    def reads_are_free(device: torch.device) -> bool:
        return device.type == "cpu"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.all_finite = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        step = trainer.global_step + 1
        if self.every <= 1 or self.reads_are_free(loss.device):
            value = loss.item()  # 0.2 us on a CPU; torch.isfinite(...).all() would take 7 us
            if any_rank(trainer, not math.isfinite(value)):
                batch = trainer.fit_loop.epoch_loop.batch_idx + 1
                where = f"at step {step} (epoch {trainer.current_epoch}, batch {batch})"
                what = f"became {value} {where}" if not math.isfinite(value) else f"became non-finite {where}"
                self._save_good_state(trainer)
                self._stop(trainer, what + (" on another process" if math.isfinite(value) else ""))
            return
        finite = torch.isfinite(loss.detach())  # stays on the device: no synchronization
        if self.all_finite is None:
            self.all_finite, self.unread_from = finite, step
        else:
            self.all_finite = self.all_finite & finite

    @staticmethod
    def _save_good_state(trainer: L.Trainer) -> None:
        """Write last.ckpt with the weights of the last good step; a resumed run serves the bad batch again."""
        last = owner(trainer)
        if last is None:
            return
        loader = getattr(trainer.datamodule, "train_loader", None) if trainer.datamodule else None
        if hasattr(loader, "rewind"):
            loader.rewind()  # the loader handed out the batch this step did not finish
        last.save(trainer)

    def _read(self, trainer: L.Trainer) -> None:
        if self.all_finite is None:
            return
        finite, self.all_finite = bool(self.all_finite), None
        if any_rank(trainer, not finite):
            first, last = self.unread_from, trainer.global_step
            steps = f"at step {last}" if first == last else f"between steps {first} and {last}"
            self._stop(trainer, f"became non-finite {steps} (epoch {trainer.current_epoch})")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % max(self.every, 1) == 0:
            self._read(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._read(trainer)  # raising here stops the save before anything is written

    def _stop(self, trainer: L.Trainer, what: str) -> None:
        last = owner(trainer)
        if last is None:
            kept = "no checkpoint was kept (callbacks.last_checkpoint is off)"
        elif last.path.is_file():
            step = torch.load(last.path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
            kept = f"{last.path} keeps the last good state (step {step})"
        else:
            kept = "no checkpoint had been written yet"
        raise NonFiniteLoss(
            f"The training loss {what}; training stopped there and {kept}. Likely causes: a learning rate too high "
            "for this model (lower optimizer.lr, e.g. by 10x), bad input data (check the files and data.mean/std), "
            "or overflow in 16-bit precision (use trainer.precision=bf16-mixed or 32-true)."
        )
