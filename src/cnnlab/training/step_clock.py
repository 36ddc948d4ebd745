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
    """Sums, over the epochs, the time from the start of an epoch (before its loader serves the first batch) to the
    end of its last training step.

    What that covers: the loader's work for the epoch (with data.augment_each=epoch, the epoch's crop and flip, done
    as the first batch is fetched), each step's batch transform on the device, forward, backward, optimizer step and
    the callbacks' per-step hooks (with a compiled model, the first step's compilation too). What it leaves out:
    reading and preparing the data, building the model, the sanity check, validation and the checkpoints written at
    epoch ends (Lightning runs those after the last step's end), and the test. On a GPU the clock waits for the
    device at the two ends of each stretch of steps only, never inside one. Lightning's Timer callback times whole
    stages (its training time holds the validation that runs inside each epoch), so it cannot give the steps alone.

    Apart, the steady steps: those of every epoch after the first one a process trains (steady_seconds,
    steady_batches), whose mean is a step's time once that process's one-off costs are paid (cuDNN autotuning for
    each batch shape, allocator growth, first-call caches, a compiled model's compilation), as the records time their
    runs after a warm-up run; a resumed run's process pays them again in its first epoch. warmup_batches counts the
    steps so left out. The clock reads stay at the stretches' ends: a per-step reading would make the host wait for
    the device at every step.

    The seconds and the batches timed travel in the checkpoint (Lightning saves a callback's state_dict), so a
    resumed run's figures cover the whole run, the steps before the resume too.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.batches = 0  # training batches timed: the images per second are batches x batch size / seconds
        self.started: float | None = None  # when the running stretch of steps began; None between stretches
        self.steady = False  # whether the running stretch is of an epoch after this process's first
        self.first_epoch: int | None = None  # the first epoch this process trains
        self.stretch_batches = 0
        self.steady_seconds, self.steady_batches, self.warmup_batches = 0.0, 0, 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open(trainer, pl_module)  # before the loader's first batch of the epoch is fetched

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._open(trainer, pl_module)  # a stretch after a validation inside the epoch (val_check_interval)
        self.batches += 1
        self.stretch_batches += 1
        if not self.steady:
            self.warmup_batches += 1

    def steady_step_ms(self) -> float | None:
        """Mean milliseconds of a steady step; None for a run of one epoch."""
        return 1000 * self.steady_seconds / self.steady_batches if self.steady_batches else None

    def state_dict(self) -> dict[str, Any]:
        running = clock() - self.started if self.started is not None else 0.0  # a save inside a stretch of steps
        steady = (running, self.stretch_batches) if self.steady else (0.0, 0)
        return {
            "seconds": self.seconds + running,
            "batches": self.batches,
            "steady_seconds": self.steady_seconds + steady[0],
            "steady_batches": self.steady_batches + steady[1],
            "warmup_batches": self.warmup_batches,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seconds, self.batches = float(state_dict["seconds"]), int(state_dict["batches"])
        # Checkpoints from before the steady figures: their steps count as neither.
        self.steady_seconds = float(state_dict.get("steady_seconds", 0.0))
        self.steady_batches = int(state_dict.get("steady_batches", 0))
        self.warmup_batches = int(state_dict.get("warmup_batches", 0))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close(pl_module)  # after an epoch's last step (or mid-epoch, with val_check_interval)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close(pl_module)  # an epoch without validation

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close(pl_module)

    def _open(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.started is not None:
            return
        wait_for(pl_module.device)
        self.started = clock()
        if self.first_epoch is None:
            self.first_epoch = trainer.current_epoch
        self.steady, self.stretch_batches = trainer.current_epoch > self.first_epoch, 0

    def _close(self, pl_module: L.LightningModule) -> None:
        if self.started is None:
            return
        wait_for(pl_module.device)
        seconds = clock() - self.started
        self.seconds += seconds
        if self.steady:
            self.steady_seconds += seconds
            self.steady_batches += self.stretch_batches
        self.started = None
