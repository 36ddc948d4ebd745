"""What metrics.json says of a run, checked against what the test measures or computes itself: the steps' seconds
(with and without validation, across a resume), images per second, a sweep job's wall time, and which weights the
test stage scores."""

import json
import time

import pytest
import torch
from lightning.pytorch import Callback

import cnnlab.training.step_clock as step_clock
from cnnlab.commands.evaluate import evaluate
from cnnlab.commands.train import train
from tests.conftest import compose_config, quick_run

BATCHES = 4  # training batches per epoch in these runs (limit_train_batches)


def short(tiny_data, *extra):
    return quick_run(tiny_data, "trainer.max_epochs=2", f"trainer.limit_train_batches={BATCHES}", *extra)


class StepDurations(Callback):
    """Each training step's own duration and the whole fit's, measured here."""

    def __init__(self) -> None:
        self.steps: list[float] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fit_started = time.perf_counter()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.fit_seconds = time.perf_counter() - self.fit_started

    def on_train_batch_start(self, *args) -> None:
        self.step_started = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.steps.append(time.perf_counter() - self.step_started)


@pytest.mark.parametrize("validation", ["val_size=100", "val_size=0"])
def test_train_seconds_cover_every_step_and_no_more_than_the_fit(tiny_data, tmp_path, validation):
    """With data.val_size=0 (as cifar10_record) no validation closes an epoch's stretch of steps: its end does."""
    durations = StepDurations()
    metrics = train(compose_config(short(tiny_data, f"data.{validation}"), tmp_path), [durations])
    assert len(durations.steps) == 2 * BATCHES
    assert sum(durations.steps) <= metrics["train_seconds"] <= durations.fit_seconds


def test_the_step_clock_waits_for_the_device_before_each_reading(tiny_data, tmp_path, monkeypatch):
    """On a GPU the steps run ahead of the host: a clock read without waiting would stop before the work is done."""
    events = []
    monkeypatch.setattr(step_clock, "wait_for", lambda device: events.append("wait"))
    monkeypatch.setattr(step_clock, "clock", lambda: events.append("read") or time.perf_counter())
    train(compose_config(short(tiny_data), tmp_path))
    reads = [i for i, e in enumerate(events) if e == "read"]
    assert len(reads) == 2 * 2  # each epoch's stretch of steps opened and closed
    assert all(events[i - 1] == "wait" for i in reads)


class SlowFirstEpoch(Callback):
    """Each step of the first epoch takes `seconds` longer, as cuDNN autotuning and first-call caches make it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.current_epoch == 0:
            time.sleep(self.seconds)


def test_the_steady_step_time_leaves_out_the_first_epoch_and_names_its_steps(tiny_data, tmp_path):
    durations = StepDurations()
    metrics = train(compose_config(short(tiny_data, "trainer.max_epochs=3", "data.val_size=0"), tmp_path),
                    [SlowFirstEpoch(0.25), durations])  # fmt: skip
    assert metrics["warmup_steps"] == BATCHES and len(durations.steps) == 3 * BATCHES
    steady = durations.steps[BATCHES:]  # the steps of epochs 2 and 3, each timed here on its own
    assert min(durations.steps[:BATCHES]) >= 0.25 > max(steady)
    assert 1000 * sum(steady) / len(steady) <= metrics["steady_step_ms"] <= 1000 * max(steady) + 50
    # the steady seconds are the part of train_seconds after the slow epoch
    assert metrics["steady_step_ms"] * 2 * BATCHES / 1000 <= metrics["train_seconds"] - sum(durations.steps[:BATCHES])


def test_the_epochs_augmentation_done_as_its_first_batch_is_fetched_counts_in_the_training_seconds(
    tiny_data, tmp_path, monkeypatch
):
    """data.augment_each=epoch crops and flips the whole epoch when the loader serves its first batch, before the
    first step's hooks: that work is the steps' own, as it is in airbench94's timed epochs."""
    from cnnlab.data.tensor_loader import BatchTransform

    original = BatchTransform.augment

    def slow_epoch_pass(self, x, *args):
        if len(x) > 32:  # the whole shard, not a batch of data.batch_size=32
            time.sleep(0.5)
        return original(self, x, *args)

    monkeypatch.setattr(BatchTransform, "augment", slow_epoch_pass)
    durations = StepDurations()
    metrics = train(compose_config(short(tiny_data, "data=cifar10", "data.augment_each=epoch"), tmp_path), [durations])
    assert metrics["train_seconds"] >= 2 * 0.5 + sum(durations.steps)  # both epochs' passes and every step


def test_a_run_of_one_epoch_has_no_steady_step_time(tiny_data, tmp_path):
    metrics = train(compose_config(short(tiny_data, "trainer.max_epochs=1"), tmp_path))
    assert metrics["steady_step_ms"] is None and metrics["warmup_steps"] == BATCHES


def test_a_resumed_run_reports_the_seconds_and_images_per_second_of_the_whole_run(tiny_data, tmp_path):
    first = train(compose_config(short(tiny_data, "trainer.max_epochs=1"), tmp_path))
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    clock_state = saved["callbacks"]["StepClock"]
    assert clock_state["batches"] == BATCHES
    assert clock_state["seconds"] == pytest.approx(first["train_seconds"], abs=1e-3)  # metrics round to 1 ms
    durations = StepDurations()
    resumed = train(
        compose_config(short(tiny_data, f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"), tmp_path), [durations]
    )
    assert len(durations.steps) == BATCHES  # the second epoch only
    assert resumed["train_seconds"] >= clock_state["seconds"] + sum(durations.steps) - 2e-3  # metrics round to 1 ms
    images = 2 * BATCHES * 32  # both epochs' batches of data.batch_size=32
    assert resumed["train_images_per_second"] == pytest.approx(images / resumed["train_seconds"], rel=0.01)
    # each process's first epoch is a warm-up (the resumed process autotunes and fills its caches again): here both
    assert resumed["warmup_steps"] == 2 * BATCHES and resumed["steady_step_ms"] is None


def test_a_resumed_process_times_its_epochs_after_its_first_as_steady(tiny_data, tmp_path):
    train(compose_config(short(tiny_data, "trainer.max_epochs=1"), tmp_path))
    durations = StepDurations()
    resumed = train(compose_config(short(tiny_data, "trainer.max_epochs=3",
                                         f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"), tmp_path),
                    [SlowFirstEpoch(0.25), durations])  # fmt: skip
    # epoch 1 is the first process's warm-up and epoch 2 (slowed here, as a fresh process's first epoch is) the
    # resumed process's; only epoch 3 is steady
    assert resumed["warmup_steps"] == 2 * BATCHES and len(durations.steps) == 2 * BATCHES
    assert 1000 * sum(durations.steps[BATCHES:]) / BATCHES <= resumed["steady_step_ms"] < 250


def test_each_job_of_a_sweep_reports_its_own_wall_time(tiny_data, tmp_path):
    """-m sweeps and searches run their jobs one after another in one process."""
    train(compose_config(short(tiny_data), tmp_path / "0"))
    started = time.time()
    second = train(compose_config(short(tiny_data), tmp_path / "1"))
    assert second["wall_seconds"] <= time.time() - started
    assert json.loads((tmp_path / "1" / "metrics.json").read_text())["wall_seconds"] == second["wall_seconds"]


class ZeroWeightsBeforeLastValidation(Callback):
    """Sets every weight to zero after the last epoch's steps, before its validation: that epoch then scores worst,
    best.ckpt stays at the first epoch, and the final weights are useless."""

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == trainer.max_epochs - 1:
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    parameter.zero_()


def test_the_test_stage_scores_best_ckpt_not_the_final_weights(tiny_data, tmp_path):
    overrides = short(tiny_data, "trainer.limit_train_batches=8", "optimizer.lr=0.1")  # about 80% after one epoch
    metrics = train(compose_config(overrides, tmp_path / "run"), [ZeroWeightsBeforeLastValidation()])
    checkpoints = tmp_path / "run" / "checkpoints"
    best = torch.load(checkpoints / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] == 0 and metrics["best_checkpoint"] == str(checkpoints / "best.ckpt")
    scored = {
        name: evaluate(compose_config([f"ckpt_path={checkpoints / name}"], tmp_path / name, config_name="eval"))
        for name in ("best.ckpt", "last.ckpt")
    }
    assert scored["best.ckpt"]["test_acc"] > scored["last.ckpt"]["test_acc"] + 0.2  # the two are told apart
    assert abs(metrics["test_acc"] - scored["best.ckpt"]["test_acc"]) <= 1e-6


class StageDurations(Callback):
    """The validation loops' and the test stage's durations, measured here."""

    def __init__(self) -> None:
        self.validation, self.test = 0.0, 0.0

    def on_validation_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.validation += time.perf_counter() - self.started

    def on_test_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def on_test_end(self, trainer, pl_module) -> None:
        self.test += time.perf_counter() - self.started


def test_the_phase_table_puts_each_part_of_a_run_where_it_happened(tiny_data, tmp_path, monkeypatch, capsys):
    """Known delays put into reading the data and into the data checksums show up in those phases; the validation,
    checkpoint and test phases hold at least what the test measured of them; the phases and the steps do not
    overlap, so together they stay within the wall time."""
    import cnnlab.checkpoints.atomic_save as atomic_save
    from cnnlab.data.datamodule import ImageDataModule

    load_splits, checksums, save = (
        ImageDataModule.load_splits,
        ImageDataModule.file_checksums,
        atomic_save.atomic_torch_save,
    )
    saving = []

    def timed_save(*args):
        started = time.perf_counter()
        save(*args)
        saving.append(time.perf_counter() - started)

    monkeypatch.setattr(ImageDataModule, "load_splits", lambda self: time.sleep(0.3) or load_splits(self))
    monkeypatch.setattr(ImageDataModule, "file_checksums", lambda self: time.sleep(0.2) or checksums(self))
    monkeypatch.setattr(atomic_save, "atomic_torch_save", timed_save)
    stages = StageDurations()
    metrics = train(compose_config(short(tiny_data), tmp_path), [stages])
    phases = metrics["phases"]
    names = ["start-up", "set-up", "data", "fit start", "validation", "checkpoints", "test", "record"]
    assert list(phases) == names and all(v >= 0 for v in phases.values())
    assert phases["data"] >= 0.3 and phases["record"] >= 0.2
    assert len(saving) == 4  # best.ckpt and last.ckpt after each of the 2 epochs
    assert phases["checkpoints"] >= round(sum(saving), 3) - 1e-3
    assert phases["validation"] >= round(stages.validation, 3) - 1e-3 and phases["test"] >= round(stages.test, 3) - 1e-3
    inside = sum(phases.values()) - phases["start-up"] - phases["checkpoints"] + metrics["train_seconds"]
    assert inside <= metrics["wall_seconds"] - phases["start-up"] + 0.01  # checkpoints fall inside the fit loop
    shown = capsys.readouterr().out
    assert all(f"  {name}" in shown for name in names)


def test_the_final_table_shows_the_steady_step_time_where_a_run_has_one(tiny_data, tmp_path):
    from cnnlab.commands.console import summary_rows

    metrics = train(compose_config(short(tiny_data, "data.val_size=0"), tmp_path))
    rows = dict(summary_rows(metrics))
    assert rows["steady step"] == f"{metrics['steady_step_ms']:.1f} ms ({BATCHES} warm-up steps left out)"
    assert "steady step" not in dict(summary_rows({**metrics, "steady_step_ms": None}))
