"""Where a run's wall time goes outside its training steps: the phases of metrics.json's `phases` and the final table.

Lightning's Timer callback times whole stages (train, validate, test), and its profilers time every hook at a cost
per step; the question here is coarser and free: how much of a run is start-up, reading data, set-up at fit start,
validation, checkpoint writes and the test, beside the steps that StepClock times.
"""

import time

import lightning as L

from cnnlab.training.step_clock import wait_for

clock = time.perf_counter


class PhaseClock(L.Callback):
    """Times the phases of one run of train(): marks set by train() (`mark`) and Lightning's hooks in between.

    phases: start-up (the job's start to train(): imports, for a process's first job), set-up (train() to fit():
    config checks, the start, finding a folder's classes and statistics, building the model), data (fit() to the
    callbacks' setup: the DataModule reading its splits and moving them to the device), fit start (the callbacks'
    setup to the first step: data-dependent initialization such as the whitening, the optimizer, the sanity
    check), validation (every validation loop during fitting), checkpoints (every checkpoint file written, from
    cnnlab.checkpoints.atomic_save), test (the test stage, its data and test-time augmentation included) and record
    (env.json's checksums of the data files, the TensorBoard row, MLflow/W&B). What is left of the wall time is
    the steps (train_seconds) and the loops' own work between them.
    """

    def __init__(self, start_up_seconds: float) -> None:
        """Built as train() begins: start_up_seconds is the time since the job started, and set-up starts now."""
        self.seconds: dict[str, float] = {"start-up": max(start_up_seconds, 0.0)}
        self.marks: dict[str, float] = {"set-up": clock()}
        self.validating: float | None = None

    def mark(self, phase: str) -> None:
        """Close the open phase marked last and open `phase` now."""
        now = clock()
        for name, started in self.marks.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + now - started
        self.marks = {phase: now}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.mark("fit start")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wait_for(pl_module.device)
        self.mark("fit loop")  # the steps and what Lightning does between them; not reported itself

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validating = clock()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.validating is not None:
            wait_for(pl_module.device)
            self.seconds["validation"] = self.seconds.get("validation", 0.0) + clock() - self.validating
            self.validating = None

    def report(self, checkpoint_seconds: float) -> dict[str, float]:
        """The phases timed so far, in seconds to the millisecond, in the order a run passes through them."""
        order = ("start-up", "set-up", "data", "fit start", "validation", "checkpoints", "test", "record")
        seconds = {**self.seconds, "checkpoints": checkpoint_seconds}
        return {name: round(seconds[name], 3) for name in order if name in seconds}
