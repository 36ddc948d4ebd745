"""What a run means with the shipped defaults: the newest last.ckpt, what EMA and TTA runs evaluate, extending a
finished run, a full disk, stops every DDP rank obeys, seeds, evaluation losses.

Each test runs the default callbacks and schedules unchanged; only sizes that tiny data forces are set.
"""

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

from cnnlab.checkpoints.load import load_checkpoint
from cnnlab.commands.train import train
from cnnlab.errors import UserError
from cnnlab.training.classifier import classifier_from_checkpoint
from tests.conftest import DDP_ON_CPU, compose_config, make_mnist, quick_run
from tests.inference_path import assert_one_inference_path
from tests.launch import run_script, script_env, script_path, start_script, tensorboard_events, tensorboard_scalars

SMALL = ["data.val_size=100", "data.download=false", "trainer=cpu"]  # what a few hundred images force


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


# --- last.ckpt: one owner, always the newest state -------------------------------------------------------------------
def test_last_ckpt_is_the_newest_state_even_when_val_acc_stops_improving(real_small, tmp_path):
    # lr 1e-9: the weights barely move, so val/acc never improves after the first epoch.
    args = [f"data.data_dir={real_small}", *SMALL, "trainer.max_epochs=4", "optimizer.lr=1e-9", "scheduler=none"]
    result = run_script("train", *args, "hydra.run.dir=run", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]  # never a last-v1.ckpt
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 16  # 500 training images, 128 per step, 4 epochs
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 16 and last["epoch"] == 3

    resumed = run_script("train", "resume=run", "trainer.max_epochs=5", cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["global_step"] == 20
    assert tensorboard_scalars(tmp_path / "run", "train/loss").keys() == {3, 7, 11, 15, 19}  # each epoch once


def test_last_ckpt_is_refreshed_every_ten_minutes_of_training_within_an_epoch(tiny_data, tmp_path, monkeypatch):
    import cnnlab.training.last_checkpoint as last_checkpoint

    # Every training step takes 100 s of the clock the callback reads: the default 10 minutes pass every 6 steps.
    clock = {"now": 0.0}
    monkeypatch.setattr(last_checkpoint, "monotonic", lambda: clock["now"])
    saved: list[int] = []
    original = last_checkpoint.LastCheckpoint.save

    def recording_save(self, trainer):
        saved.append(trainer.global_step)
        original(self, trainer)

    monkeypatch.setattr(last_checkpoint.LastCheckpoint, "save", recording_save)

    class AdvanceClock(Callback):
        def on_train_batch_end(self, trainer, *args):
            clock["now"] = 100.0 * trainer.global_step

    cfg = compose_config(quick_run(tiny_data, "trainer.max_epochs=2", "test=false"), tmp_path)
    assert cfg.callbacks.last_checkpoint.train_time_interval.minutes == 10  # the shipped default
    train(cfg, extra_callbacks=[AdvanceClock()])
    # 500 training images in batches of 32: 16 steps per epoch. Every 6 steps, and at each epoch end.
    assert saved == [6, 12, 16, 22, 28, 32]
    assert ckpt_step(tmp_path / "checkpoints" / "last.ckpt") == 32


# --- extending a finished run -----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["onecycle", "cosine"])
def test_extending_a_finished_run_continues_the_schedule_planned_over_the_new_length(tiny_data, tmp_path, scheduler):
    args = quick_run(tiny_data, f"scheduler={scheduler}", "trainer.log_every_n_steps=1", "test=false")
    first = run_script("train", *args, "trainer.max_epochs=2", "hydra.run.dir=run", cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    extended = run_script("train", "resume=run", "trainer.max_epochs=3", cwd=tmp_path, timeout=600)
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "Traceback" not in extended.stderr
    lr = tensorboard_scalars(tmp_path / "run", "lr")
    # What a run planned for 3 epochs (48 steps) from the start has at each step: the rate TensorBoard shows
    # for steps 33.. (logged before each step, so step k shows the rate of the (k+1)-th update).
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    planned = (
        torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=0.05, total_steps=48, pct_start=0.25, div_factor=25.0, final_div_factor=1e4
        )
        if scheduler == "onecycle"
        else torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=48)
    )
    expected = {}
    for step in range(48):
        expected[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        planned.step()
    for step in range(33, 48):
        assert lr[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-9), step
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["global_step"] == 48


# --- the shipped schedules and optimizers ---------------------------------------------------------------------
def logged_rates(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every learning-rate tag in the run's TensorBoard files, with its values by step."""
    tags = [tag for tag in tensorboard_events(run_dir).Tags()["scalars"] if tag.startswith("lr")]
    return {tag: tensorboard_scalars(run_dir, tag) for tag in tags}


def test_a_one_cycle_run_peaks_at_optimizer_lr_and_ends_at_its_final_rate_on_its_last_step(tiny_data, tmp_path):
    overrides = quick_run(tiny_data, "trainer.max_epochs=2", "trainer.log_every_n_steps=1", "test=false")
    train(compose_config([*overrides, "optimizer.lr=0.07"], tmp_path))
    lr = logged_rates(tmp_path)["lr"]
    assert sorted(lr) == list(range(32))  # one rate per step of 2 epochs of 16 steps: the cycle spans the run
    assert lr[0] == pytest.approx(0.07 / 25, rel=1e-6)  # div_factor 25
    peak = max(lr, key=lr.get)
    assert peak == 7 and lr[peak] == pytest.approx(0.07, rel=1e-6)  # pct_start 0.25 of 32 steps: up for 8 updates
    assert lr[31] == pytest.approx(0.07 / 25 / 1e4, rel=1e-4)  # final_div_factor 1e4, reached on the last update
    assert all(lr[k] > lr[k + 1] for k in range(7, 31))


@pytest.mark.parametrize(
    ("optimizer", "scheduler", "tag"),
    [("adamw", "cosine", "lr"), ("sgd", "none", "lr-SGD"), ("adamw", "none", "lr-AdamW")],
)
def test_the_shipped_optimizers_and_schedules_train_and_log_their_rate(tiny_data, tmp_path, optimizer, scheduler, tag):
    overrides = quick_run(tiny_data, f"optimizer={optimizer}", f"scheduler={scheduler}", "test=false")
    cfg = compose_config([*overrides, "trainer.max_epochs=2", "trainer.log_every_n_steps=1"], tmp_path)
    metrics = train(cfg)
    assert metrics["val_acc_best"] > 0.3  # it learns (chance: 0.1)
    rates = logged_rates(tmp_path)
    assert list(rates) == [tag]  # with scheduler=none the rate is named after the optimizer's class
    peak, lr = cfg.optimizer.lr, rates[tag]
    assert sorted(lr) == list(range(32))
    if scheduler == "none":
        assert all(value == pytest.approx(peak) for value in lr.values())
    else:  # cosine annealing from optimizer.lr to eta_min=0 over the 32 steps of the run
        for step, value in lr.items():
            assert value == pytest.approx(peak * (1 + math.cos(math.pi * step / 32)) / 2, rel=1e-5, abs=1e-9), step
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    (group,) = state["optimizer_states"][0]["param_groups"]
    moments = next(iter(state["optimizer_states"][0]["state"].values()))
    if optimizer == "adamw":  # AdamW's own state: two moment estimates per parameter, decoupled weight decay 0.01
        assert {"exp_avg", "exp_avg_sq"} <= set(moments) and group["weight_decay"] == 0.01
    else:
        assert set(moments) == {"momentum_buffer"} and group["nesterov"] is True


# --- one evaluation path: EMA and TTA ---------------------------------------------------------------------------
def ema_recipe(data_dir: Path) -> list[str]:
    """experiment=cifar10_fast on a CPU, with a batch that gives a few hundred images several steps per epoch."""
    return [
        f"data.data_dir={data_dir}",
        "experiment=cifar10_fast",
        *SMALL,
        "trainer.precision=32-true",  # bf16 autocast is slow on most CPUs; the recipe's EMA and TTA are unchanged
        "data.batch_size=32",
        "data.eval_batch_size=100",
    ]


def accuracy(classifier, images: torch.Tensor, labels: torch.Tensor, datamodule) -> float:
    with torch.inference_mode():
        logits = classifier.predict_logits(datamodule.batch_transform(augment=False)(images))
    return (logits.argmax(1) == labels).float().mean().item()


def test_ema_weights_follow_the_training_from_the_first_epochs(tiny_data, tmp_path):
    overrides = [*ema_recipe(tiny_data), "model.widths=[16,32,64,128]", "trainer.max_epochs=4", "test=false"]
    cfg = compose_config(overrides, tmp_path)
    assert cfg.callbacks.ema.decay == 0.99 and cfg.callbacks.ema.update_every_n_steps == 5  # the recipe's EMA
    train(cfg)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    images, labels = datamodule.splits["val"]
    averaged = classifier_from_checkpoint(load_checkpoint(tmp_path / "checkpoints" / "last.ckpt"))
    raw = classifier_from_checkpoint({**last, "state_dict": last["current_model_state"]})
    raw_acc, ema_acc = accuracy(raw, images, labels, datamodule), accuracy(averaged, images, labels, datamodule)
    assert raw_acc > 0.4  # the tiny patterns are being learnt (chance: 0.1)
    # 64 steps, 12 averaging updates: a constant decay of 0.99 would still hold 89% of the untrained weights and
    # score near chance. The warmed-up average lags the raw weights by a few steps, which on this tiny run moves its
    # accuracy by up to about 0.15 depending on the data order and augmentation drawn.
    assert ema_acc >= raw_acc - 0.2


@pytest.fixture(scope="module")
def ema_run(real_small, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ema")
    args = [*ema_recipe(real_small), "trainer.max_epochs=3", "hydra.run.dir=run"]
    result = run_script("train", *args, cwd=cwd, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "run"


def test_test_stage_eval_predict_and_export_score_the_same_averaged_flip_averaged_weights(ema_run, tmp_path):
    best = ema_run / "checkpoints" / "best.ckpt"
    assert "current_model_state" in load_checkpoint(best)  # the raw weights ride along; state_dict is the average
    train_metrics = json.loads((ema_run / "metrics.json").read_text())
    assert_one_inference_path(best, train_metrics, tmp_path, tta="flip")


def test_eval_reproduces_the_test_score_of_a_flip_tta_run_in_bf16(tiny_data, tmp_path):
    from cnnlab.commands.evaluate import evaluate

    overrides = quick_run(tiny_data, "tta=flip", "trainer.precision=bf16-mixed", model="resnet8", data="cifar10")
    metrics = train(compose_config([*overrides, "trainer.max_epochs=2"], tmp_path / "run"))
    evaluated = evaluate(
        compose_config([f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'best.ckpt'}"], tmp_path / "ev", "eval")
    )
    assert evaluated["precision"] == "bf16-mixed"  # precision=auto: the one the run was tested in
    assert evaluated["test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-6)
    assert evaluated["test_loss"] == pytest.approx(metrics["test_loss"], abs=1e-5)


def test_evaluation_losses_are_plain_cross_entropy_whatever_the_label_smoothing(tiny_data, tmp_path):
    overrides = quick_run(tiny_data, "label_smoothing=0.3", "trainer.max_epochs=2")
    cfg = compose_config(overrides, tmp_path)
    metrics = train(cfg)
    classifier = classifier_from_checkpoint(load_checkpoint(metrics["best_checkpoint"]))
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    images, labels = datamodule.splits["test"]
    with torch.inference_mode():
        logits = classifier.predict_logits(datamodule.batch_transform(augment=False)(images))
    plain = torch.nn.functional.cross_entropy(logits, labels).item()
    assert metrics["test_loss"] == pytest.approx(plain, rel=1e-5)
    smoothed = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.3).item()
    assert abs(plain - smoothed) > 1e-3  # the two would be told apart


# --- a full disk ------------------------------------------------------------------------------------------------
def test_a_checkpoint_write_that_fails_for_lack_of_space_stops_with_one_paragraph(tiny_data, tmp_path, monkeypatch):
    import cnnlab.checkpoints.atomic_save as checkpoint_io

    real_save, saves = torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) > 2:  # best.ckpt and last.ckpt of the first epoch fit; then the disk is full
            f.write(b"PK\x03\x04 a partial write")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_io.torch, "save", save_until_full)
    cfg = compose_config(quick_run(tiny_data, "trainer.max_epochs=3"), tmp_path)
    with pytest.raises(UserError) as stop:
        train(cfg)
    message = str(stop.value)
    assert "free" in message and "resume=" in message and str(tmp_path / "checkpoints") in message
    assert "\n" not in message.strip()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["global_step"] == 32
    assert ckpt_step(tmp_path / "checkpoints" / "last.ckpt") == 16  # the previous state, intact
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def _can_mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True)
    if ok.returncode == 0:
        subprocess.run(["umount", str(path)], check=True)
    return ok.returncode == 0


@pytest.fixture
def small_filesystem(tmp_path):
    mount = tmp_path / "disk"
    if not _can_mount_tmpfs(mount):
        pytest.skip("mounting a tmpfs needs root and the mount command (the injected-error test covers the logic)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_run_with_exit_2_and_keeps_the_previous_checkpoint(tiny_data, small_filesystem, tmp_path):
    run_dir = small_filesystem / "run"
    args = quick_run(tiny_data, "trainer.max_epochs=4", f"hydra.run.dir={run_dir}")
    result = run_script("train", *args, cwd=tmp_path, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "full" in result.stderr and f"resume={run_dir}" in result.stderr
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert checkpoints, "the first checkpoints fit on the disk"
    for path in checkpoints:
        load_checkpoint(path)  # each one whole
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():  # where it could still be written
        assert json.loads(metrics_path.read_text())["status"] == "failed"


# --- distributed stops: every rank agrees --------------------------------------------------------------------------
DDP = [*DDP_ON_CPU, *quick_run(trainer=None)]


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads processes from /proc")
def test_sigterm_to_the_launching_process_stops_every_ddp_rank_with_one_checkpoint(tmp_path):
    data = make_mnist(tmp_path / "data", n_train=3300, n_test=100)  # 50 steps of 2 x 32 images per epoch
    args = [*DDP, f"data.data_dir={data}", "trainer.max_epochs=20", "hydra.run.dir=run"]
    proc = start_script("train", *args, cwd=tmp_path)
    deadline = time.monotonic() + 180
    while not (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file():  # the first epoch is done
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ranks = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-3000:]
    stopped = time.monotonic()
    while any(alive(pid) for pid in ranks) and time.monotonic() < stopped + 20:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in ranks), "a rank outlived the stop"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    assert ckpt_step(tmp_path / "run" / "checkpoints" / "last.ckpt") == metrics["global_step"]
    assert "resume=" in stderr


def test_a_nan_on_one_ddp_rank_stops_every_rank_and_keeps_the_last_good_state(tmp_path):
    data = make_mnist(tmp_path / "data", n_train=1700, n_test=100)
    args = [*DDP, f"data.data_dir={data}", "trainer.max_epochs=3", "hydra.run.dir=run",
            "+callbacks.nan._target_=tests.ddp_helpers.NaNInputOnRank", "+callbacks.nan.rank=1",
            "+callbacks.nan.step=30"]  # fmt: skip
    result = run_script("train", *args, cwd=tmp_path, timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "at step 31" in result.stderr and "Traceback" not in result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["global_step"] == 30
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 30
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_data_is_prepared_once_per_machine_not_once_per_process(tiny_data, tmp_path):
    # torchrun starts both processes at once, as srun does: each runs train() from the start.
    log = tmp_path / "downloads.log"
    args = [*DDP, f"data.data_dir={tmp_path / 'empty'}", "data.download=true", "trainer.max_epochs=1",
            "trainer.limit_train_batches=2", "data._target_=tests.ddp_helpers.CountingMNIST",
            f"+data.source={tiny_data}", f"+data.log={log}", "hydra.run.dir=run", "test=false"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*torchrun, script_path("train"), *args]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=script_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert log.read_text().split() == ["0"]


# --- seeds ------------------------------------------------------------------------------------------------------
def test_different_seeds_give_independent_data_orders_and_augmentations():
    from cnnlab.data.tensor_loader import BatchTransform, EpochSampler, TensorLoader

    def epoch_order(seed: int, epoch: int) -> torch.Tensor:
        sampler = EpochSampler(1000, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return sampler.indices()

    assert not torch.equal(epoch_order(43, 0), epoch_order(42, 1))  # seed + epoch would make these the same
    assert torch.equal(epoch_order(42, 1), epoch_order(42, 1))
    for a, b in ((42, 43), (42, 41)):  # shared positions between two seeds' first epochs: about 1 in 1000
        assert (epoch_order(a, 0) == epoch_order(b, 0)).sum() < 10

    images = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    images[:, :, 2:4, 1:3] = 255

    def augmented(seed: int, epoch: int, rank: int = 0) -> torch.Tensor:
        sampler = EpochSampler(64, shuffle=False, seed=seed, rank=rank, world_size=2)
        sampler.set_epoch(epoch)
        transform = BatchTransform((0.0,), (1.0,), crop_padding=2, flip=True)
        return torch.cat([x for x, _ in TensorLoader(images, torch.zeros(64), 64, sampler, transform)])

    assert not torch.equal(augmented(43, 0), augmented(42, 1))
    assert not torch.equal(augmented(42, 0, rank=0), augmented(42, 0, rank=1))
    assert torch.equal(augmented(42, 3), augmented(42, 3))


def test_ema_average_is_a_copy_then_follows_the_warmed_up_decay():
    import lightning as L

    from cnnlab.training.ema import EMA

    class Scalar(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    class Steps:  # what the callback reads of the trainer
        global_step = 0

    module, trainer, ema = Scalar(), Steps(), EMA(decay=0.99, update_every_n_steps=1, warmup=10)
    ema.setup(trainer, module, "fit")
    expected = None
    for step, value in enumerate([1.0, 3.0, -2.0, 5.0], start=1):
        module.w.data.fill_(value)
        trainer.global_step = step
        ema.on_train_batch_end(trainer, module, None, None, step - 1)
        n = step - 1  # update n mixes in the weights with decay min(0.99, (1 + n) / (10 + n)); update 0 copies
        expected = (
            value if n == 0 else min(0.99, (1 + n) / (10 + n)) * expected + (1 - min(0.99, (1 + n) / (10 + n))) * value
        )
        assert ema._average_model.module.w.item() == pytest.approx(expected, rel=1e-6)
    assert ema.updates == 4 and ema._average_model.n_averaged.item() == 4
