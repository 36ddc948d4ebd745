"""last.ckpt holds whole optimizer steps and each epoch's state after its validation, so a run continued from it
(after a kill, a signal or to extend it) ends exactly as an uninterrupted run, EMA weights included."""

import os
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from cnnlab.commands.train import train
from cnnlab.training.stopping import RunInterrupted
from tests.conftest import compose_config, quick_run
from tests.launch import tensorboard_scalars

STEPS_PER_EPOCH = 16  # tiny_data: 500 training images in batches of 32
STEP_SAVES = "callbacks.last_checkpoint.every_n_train_steps"
ACCUMULATE_2 = "+trainer.accumulate_grad_batches=2"
EMA_EVERY_STEP = ["+callbacks.ema._target_=cnnlab.training.ema.EMA", "+callbacks.ema.decay=0.99",
                  "+callbacks.ema.update_every_n_steps=1", "+callbacks.ema.warmup=10"]  # fmt: skip


def run(data_dir: Path, run_dir: Path, *extra: str, callbacks: tuple[Callback, ...] = ()) -> dict:
    """Two epochs of train() on the tiny data, without the test stage; extra can change either."""
    cfg = compose_config(quick_run(data_dir, "trainer.max_epochs=2", "test=false", *extra), run_dir)
    return train(cfg, extra_callbacks=list(callbacks))


def resume(data_dir: Path, run_dir: Path, *extra: str) -> dict:
    """Continue the run in run_dir from its last.ckpt, with the same settings (and extra)."""
    return run(data_dir, run_dir, *extra, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def last(run_dir: Path) -> dict:
    return load(run_dir / "checkpoints" / "last.ckpt")


def best_state(ckpt: dict) -> dict:
    """best.ckpt's ModelCheckpoint state as saved in a checkpoint (the one monitoring val/acc)."""
    (state,) = [v for k, v in ckpt["callbacks"].items() if "'monitor': 'val/acc'" in k]
    return state


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def assert_same_training_state(ckpt: dict, ref: dict) -> None:
    """The weights (averaged and raw), optimizer state, loop progress and best score of two checkpoints are equal."""
    assert ckpt["global_step"] == ref["global_step"] and ckpt["epoch"] == ref["epoch"]
    assert_same_tensors(ckpt["state_dict"], ref["state_dict"])
    if "current_model_state" in ref:
        assert_same_tensors(ckpt["current_model_state"], ref["current_model_state"])
    for group, ref_group in zip(ckpt["optimizer_states"][0]["state"].values(),
                                ref["optimizer_states"][0]["state"].values(), strict=True):  # fmt: skip
        assert_same_tensors(group, ref_group)
    assert ckpt["loops"] == ref["loops"]
    assert best_state(ckpt)["best_model_score"] == best_state(ref)["best_model_score"]


class CrashAfterStep(Callback):
    """Raises at the end of the batch that completes optimizer step `step`, before that step's checkpoints are
    written: the process dies there as under kill -9, with nothing saved on the way out."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash after step {self.step}")


class SignalDuringStep(Callback):
    """Sends the process `signum` at the start of the batch that makes optimizer step `step`, as `kill` would."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step - 1 and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class CheckpointLog(Callback):
    """Records each checkpoint file the run renames into place: (name, global step, batches done in the epoch)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.saves: list[tuple[str, int, int]] = []
        self.trainer = None
        real_replace = os.replace

        def recording_replace(src, dst) -> None:
            real_replace(src, dst)
            if self.trainer is not None and str(dst).endswith(".ckpt"):
                done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
                self.saves.append((Path(dst).name, self.trainer.global_step, done))

        monkeypatch.setattr(os, "replace", recording_replace)

    def on_train_start(self, trainer, *args) -> None:
        self.trainer = trainer

    def last_saves(self) -> list[tuple[int, int]]:
        return [(step, done) for name, step, done in self.saves if name == "last.ckpt"]


# --- the epoch's save comes after its validation --------------------------------------------------------------------
@pytest.mark.parametrize("every", [8, 16])
def test_a_step_interval_that_divides_the_epoch_leaves_last_ckpt_at_the_state_after_validation(
    tiny_data, tmp_path, every
):
    run(tiny_data, tmp_path / "epoch_ends")  # the shipped settings: at each epoch end (10 minutes never pass)
    run(tiny_data, tmp_path / "steps", f"{STEP_SAVES}={every}")
    assert_same_training_state(last(tmp_path / "steps"), last(tmp_path / "epoch_ends"))


def test_extending_a_run_moves_best_ckpt_only_on_a_better_score(tiny_data, tmp_path):
    # lr 1e-9: the weights barely move, so the second epoch's val/acc ties the first's.
    still = [f"{STEP_SAVES}={STEPS_PER_EPOCH // 2}", "optimizer.lr=1e-9", "scheduler=none"]
    run(tiny_data, tmp_path, *still, "trainer.max_epochs=1")
    assert best_state(last(tmp_path))["best_model_score"] is not None  # the first epoch's score is in last.ckpt
    resume(tiny_data, tmp_path, *still, "trainer.max_epochs=2")
    val_acc = tensorboard_scalars(tmp_path, "val/acc")
    assert len(val_acc) == 2
    first_best = list(val_acc.values()).index(max(val_acc.values()))  # a tie keeps the earlier epoch
    assert load(tmp_path / "checkpoints" / "best.ckpt")["epoch"] == first_best


# --- whole optimizer steps under gradient accumulation --------------------------------------------------------------
def test_under_gradient_accumulation_last_ckpt_is_written_once_per_optimizer_step_and_never_before_the_first(
    tiny_data, tmp_path, monkeypatch
):
    log = CheckpointLog(monkeypatch)
    run(tiny_data, tmp_path, ACCUMULATE_2, f"{STEP_SAVES}=1", callbacks=(log,))
    steps = STEPS_PER_EPOCH // 2  # 8 optimizer steps of two batches per epoch
    # after the second batch of each step, once; the epoch's last step after validation, with its 16 batches done
    assert log.last_saves() == [(s, 2 * ((s - 1) % steps + 1)) for s in range(1, 2 * steps + 1)]


def test_under_gradient_accumulation_the_time_interval_waits_for_the_end_of_the_optimizer_step(
    tiny_data, tmp_path, monkeypatch
):
    import cnnlab.training.last_checkpoint as last_checkpoint

    # Every batch takes 250 s of the clock the callback reads: the default 10 minutes pass during every third batch.
    clock = {"now": 0.0}
    monkeypatch.setattr(last_checkpoint, "monotonic", lambda: clock["now"])

    class AdvanceClock(Callback):
        def on_train_batch_start(self, *args) -> None:
            clock["now"] += 250.0

    log = CheckpointLog(monkeypatch)
    run(tiny_data, tmp_path, ACCUMULATE_2, "trainer.max_epochs=1", callbacks=(AdvanceClock(), log))
    saves = log.last_saves()
    assert saves[-1] == (8, 16)  # the epoch end
    # 10 minutes since the last save have passed by batches 3, 7 and 11, each the first of a step's two batches
    assert [done for _, done in saves[:-1]] == [4, 8, 12]
    assert all(done % 2 == 0 for _, done in saves)


# --- a kill, then resume: the same end as without the kill ---------------------------------------------------------
SETTINGS = {
    "step saves dividing the epoch": [f"{STEP_SAVES}=8"],
    "accumulation 2, a save every step": [ACCUMULATE_2, f"{STEP_SAVES}=1"],
    "accumulation 2, a save every 3 steps": [ACCUMULATE_2, f"{STEP_SAVES}=3"],
    # both rules' momentum buffers (Muon's on the filters, SGD's on the rest) come back with last.ckpt
    "muon, accumulation 2, a save every 3 steps": ["optimizer=muon", ACCUMULATE_2, f"{STEP_SAVES}=3"],
    "muon with adamw on the rest, a save every 3 steps": [
        "optimizer=muon",
        "optimizer.rest_rule=adamw",
        "optimizer.sgd_lr=1e-3",
        f"{STEP_SAVES}=3",
    ],  # fmt: skip
    # the same images after the kill: per-image policy and erasing from the epoch's stream, mixing by batch count
    "augmentation, a save every 3 steps": [
        "data.policy=trivial_augment_wide",
        "data.erasing=0.5",
        "data.mixup_alpha=0.2",
        "data.cutmix_alpha=1.0",
        f"{STEP_SAVES}=3",
    ],
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_a_run_killed_after_a_step_and_resumed_ends_exactly_as_an_uninterrupted_one(tiny_data, tmp_path, setting):
    extra = SETTINGS[setting]
    run(tiny_data, tmp_path / "ref", *extra)
    killed_at = 5 if "accumulation" in setting else 21  # a step after a mid-epoch save, or into the second epoch
    with pytest.raises(RuntimeError, match="crash after step"):
        run(tiny_data, tmp_path / "run", *extra, callbacks=(CrashAfterStep(killed_at),))
    assert 0 < last(tmp_path / "run")["global_step"] < killed_at
    resume(tiny_data, tmp_path / "run", *extra)
    assert_same_training_state(last(tmp_path / "run"), last(tmp_path / "ref"))
    if "muon" in setting:
        states = last(tmp_path / "run")["optimizer_states"][0]["state"].values()
        if "adamw" in setting:  # Muon's buffers on the filters, AdamW's moments on the biases and the head
            assert {s["momentum_buffer"].ndim for s in states if "momentum_buffer" in s} == {4}
            assert {s["exp_avg"].ndim for s in states if "exp_avg" in s} == {1, 2}
        else:
            assert {s["momentum_buffer"].ndim for s in states} == {1, 2, 4}  # Muon's filters, SGD's biases and head
    assert (
        load(tmp_path / "run" / "checkpoints" / "best.ckpt")["epoch"]
        == load(tmp_path / "ref" / "checkpoints" / "best.ckpt")["epoch"]
    )


# --- EMA: stopped by a signal, resumed exactly; one update per optimizer step -----------------------------------------
@pytest.fixture(scope="module")
def ema_reference(tiny_data, tmp_path_factory) -> dict[str, dict]:
    """Uninterrupted EMA runs' last.ckpt, without and with gradient accumulation."""
    refs = {}
    for name, extra in (("plain", []), ("accumulate", [ACCUMULATE_2])):
        run_dir = tmp_path_factory.mktemp(f"ema_{name}")
        run(tiny_data, run_dir, *EMA_EVERY_STEP, *extra)
        refs[name] = last(run_dir)
    return refs


# Steps drawn once at random from the two epochs (random.Random(21).sample(range(1, 32), 2)), the first epoch's last
# step, and a step under accumulation.
SIGTERM_AT = [("plain", 22), ("plain", 4), ("plain", STEPS_PER_EPOCH), ("accumulate", 5)]


@pytest.mark.parametrize(("kind", "step"), SIGTERM_AT, ids=[f"{k}-step{s}" for k, s in SIGTERM_AT])
def test_sigterm_during_an_ema_run_resumes_to_bit_identical_averaged_and_raw_weights(
    tiny_data, tmp_path, ema_reference, kind, step
):
    extra = [*EMA_EVERY_STEP, *([ACCUMULATE_2] if kind == "accumulate" else [])]
    with pytest.raises(RunInterrupted):
        run(tiny_data, tmp_path, *extra, callbacks=(SignalDuringStep(step),))
    stopped = last(tmp_path)
    assert stopped["global_step"] == step  # the state after the step the signal came in
    (ema_state,) = [v for k, v in stopped["callbacks"].items() if k.startswith("EMA")]
    assert ema_state["updates"] == step  # that step's update is in
    resume(tiny_data, tmp_path, *extra)
    assert_same_training_state(last(tmp_path), ema_reference[kind])


def test_under_gradient_accumulation_ema_updates_once_per_optimizer_step_from_the_first(tiny_data, tmp_path):
    from tests.test_train import RecordWeights

    weights = RecordWeights()
    run(tiny_data, tmp_path, *EMA_EVERY_STEP, ACCUMULATE_2, "trainer.max_epochs=1", callbacks=(weights,))
    ckpt = last(tmp_path)
    (ema_state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("EMA")]
    assert ckpt["global_step"] == 8 and ema_state["updates"] == 8
    # The average by the documented rule over the weights after each optimizer step: update 0 copies step 1's.
    expected: dict[str, torch.Tensor] = {}
    for n, step in enumerate(range(1, 9)):
        decay = min(0.99, (1 + n) / (10 + n)) if n else 0.0
        for key, value in weights.after_step[step].items():
            if not value.is_floating_point():
                expected[key] = value
            else:
                expected[key] = value.clone() if n == 0 else torch.lerp(expected[key], value, 1.0 - decay)
    for key, value in ckpt["state_dict"].items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)
