"""The seconds a run spends in its training steps, timed as the CIFAR-10 speed records time theirs."""

import time
from typing import Any

import lightning as L
import torch

clock = time.perf_counter  # the clock the steps are timed on


def wait_for(device: torch.device) -> None:
    """Wait until the device has finished the work queued so far (a no-op on the CPU), to read a clock after it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock(L.Callback):
    """Sums, over the epochs, the time from the start of an epoch's first training step to the end of its last.

    What that covers: each step's batch transform on the device, forward, backward, optimizer step and the callbacks'
    per-step hooks (with a compiled model, the first step's compilation too). What it leaves out: reading and
    preparing the data, building the model, the sanity check, validation and the checkpoints written at epoch ends
    (Lightning runs those after the last step's end), and the test. On a GPU the clock waits for the device at the
    two ends of each stretch of steps only, never inside one. Lightning's Timer callback times whole stages (its
    training time holds the validation that runs inside each epoch), so it cannot give the steps alone.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.started: float | None = None  # when the running stretch of steps began; None between stretches

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.started is None:
            wait_for(pl_module.device)
            self.started = clock()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close(pl_module)  # after an epoch's last step (or mid-epoch, with val_check_interval)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close(pl_module)  # an epoch without validation

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close(pl_module)

    def _close(self, pl_module: L.LightningModule) -> None:
        if self.started is None:
            return
        wait_for(pl_module.device)
        self.seconds += clock() - self.started
        self.started = None
