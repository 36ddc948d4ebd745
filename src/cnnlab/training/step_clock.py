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

    The seconds and the batches timed travel in the checkpoint (Lightning saves a callback's state_dict), so a
    resumed run's figures cover the whole run, the steps before the resume too.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.batches = 0  # training batches timed: the images per second are batches x batch size / seconds
        self.started: float | None = None  # when the running stretch of steps began; None between stretches

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.started is None:
            wait_for(pl_module.device)
            self.started = clock()
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        running = clock() - self.started if self.started is not None else 0.0  # a save inside a stretch of steps
        return {"seconds": self.seconds + running, "batches": self.batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seconds, self.batches = float(state_dict["seconds"]), int(state_dict["batches"])

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
