"""Runs survive kills, signals and bad input: atomic checkpoints, exact resume, clean refusals."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from cnnlab.checkpoints.atomic_save import atomic_torch_save
from cnnlab.checkpoints.resume import resume_arguments
from cnnlab.commands.train import train
from cnnlab.data.tensor_loader import BatchTransform, EpochSampler, TensorLoader
from tests.conftest import compose_config, make_mnist, quick_run
from tests.launch import run_script, start_script, tensorboard_scalars


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory) -> Path:
    """A small MNIST with 50 training batches of 32 per epoch, so a kill lands mid-epoch."""
    return make_mnist(tmp_path_factory.mktemp("mnist"), n_train=1700, n_test=300)


SAVE_EVERY_3_STEPS = [
    "callbacks.last_checkpoint.every_n_train_steps=3",
    "callbacks.last_checkpoint.train_time_interval=null",
]


def three_epochs(data_dir: Path, *extra: str) -> list[str]:
    """Three epochs of 50 steps with the loss logged every step; last.ckpt as shipped unless extra says otherwise."""
    three = ["data.eval_batch_size=100", "trainer.max_epochs=3", "trainer.log_every_n_steps=1"]
    return quick_run(data_dir, *three, *extra)


def wait_for_step_checkpoint(proc: subprocess.Popen, ckpt: Path) -> None:
    """Wait until ckpt exists (a step checkpoint in the first epoch), or fail if the process ends first."""
    deadline = time.monotonic() + 120
    while not ckpt.is_file():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


def last_ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


# --- atomic checkpoints ----------------------------------------------------------------------------------------------
def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(1000)}, path)

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        atomic_torch_save({"step": 2, "w": torch.zeros(1000)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_sigkill_while_writing_a_big_checkpoint_never_leaves_a_truncated_file(tmp_path):
    path = tmp_path / "last.ckpt"
    writer = (
        "import sys, torch; from cnnlab.checkpoints.atomic_save import atomic_torch_save\n"
        "w = torch.randn(16_000_000)\n"  # 64 MB: each save takes a while
        "for step in range(1000): atomic_torch_save({'step': step, 'w': w}, sys.argv[1])\n"
    )
    for delay in (0.6, 1.3):
        proc = subprocess.Popen([sys.executable, "-c", writer, str(path)])
        deadline = time.monotonic() + 60
        while not path.is_file() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = torch.load(path, weights_only=True)  # a torn file would fail to load here
        assert ckpt["w"].numel() == 16_000_000


def test_every_checkpoint_a_run_writes_is_a_temporary_file_in_its_folder_renamed_over_it(
    tiny_data, tmp_path, monkeypatch
):
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def recording_replace(src, dst):
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    train(compose_config(quick_run(tiny_data, "trainer.max_epochs=2", "test=false"), tmp_path))
    written = [(src, dst) for src, dst in renames if dst.suffix == ".ckpt"]
    names = [dst.name for _, dst in written]
    assert names.count("last.ckpt") == 2 and 1 <= names.count("best.ckpt") <= 2  # at each epoch end
    for src, dst in written:  # a rename within one folder is atomic: a reader sees the old file or the new one
        assert src.parent == dst.parent == tmp_path / "checkpoints" and src.name.startswith(f".{dst.name}.")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


# --- exact resume ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("augment", "epoch"),
    [
        ({}, 2),
        ({"crop_padding": 2, "flip": True}, 2),
        ({"crop_padding": 2, "flip": "alternating", "crop_pad_mode": "reflect"}, 3),  # an odd epoch: flips reversed
    ],
    ids=["plain", "crop-flip", "reflect-alternating"],
)
def test_a_restored_tensor_loader_serves_the_rest_of_the_epoch_exactly(augment, epoch):
    images = torch.randint(0, 255, (100, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(100)

    def loader() -> TensorLoader:
        transform = BatchTransform((0.5,), (0.5,), **augment)
        return TensorLoader(images, labels, 16, EpochSampler(100, True, seed=3), transform)

    full = loader()
    full.sampler.set_epoch(epoch)
    expected = list(full)
    first = loader()
    first.sampler.set_epoch(epoch)
    it = iter(first)
    for _ in range(3):
        next(it)
    resumed = loader()  # a new process: epoch 0 until the checkpoint says otherwise
    resumed.load_state_dict(first.state_dict())
    rest = list(resumed)
    assert len(rest) == len(expected) - 3
    for (x, y), (x_ref, y_ref) in zip(rest, expected[3:], strict=True):
        assert torch.equal(y, y_ref) and torch.equal(x, x_ref)


@pytest.fixture(scope="module")
def uninterrupted(mnist_dir, tmp_path_factory) -> tuple[Path, dict]:
    cwd = tmp_path_factory.mktemp("uninterrupted")
    result = run_script("train", *three_epochs(mnist_dir, *SAVE_EVERY_3_STEPS, "hydra.run.dir=run"), cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "run", json.loads((cwd / "run" / "metrics.json").read_text())


def test_sigkilled_run_resumes_in_place_and_ends_like_an_uninterrupted_one(mnist_dir, tmp_path, uninterrupted):
    ref_dir, ref = uninterrupted
    proc = start_script("train", *three_epochs(mnist_dir, *SAVE_EVERY_3_STEPS), cwd=tmp_path)
    (run_dir,) = _wait_for_run_dir(proc, tmp_path)
    wait_for_step_checkpoint(proc, run_dir / "checkpoints" / "last.ckpt")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < killed_at < ref["global_step"]

    result = run_script("train", f"resume={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "outputs" / "train").iterdir()) == [run_dir]  # no second folder
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["epochs"] == 3
    assert metrics["global_step"] == ref["global_step"]
    # the same batches in the same order, so on the CPU the very same weights, and the same test score
    resumed_last, ref_last = last_ckpt(run_dir), last_ckpt(ref_dir)
    assert resumed_last["global_step"] == ref_last["global_step"] == ref["global_step"]
    assert resumed_last["state_dict"].keys() == ref_last["state_dict"].keys()
    assert all(torch.equal(v, ref_last["state_dict"][k]) for k, v in resumed_last["state_dict"].items())
    assert metrics["test_acc"] == ref["test_acc"] and metrics["test_loss"] == ref["test_loss"]
    for tag in ("lr", "val/acc"):  # curves continue: no step twice (the reader checks), none missing, the same values
        curve, ref_curve = tensorboard_scalars(run_dir, tag), tensorboard_scalars(ref_dir, tag)
        assert list(curve.items()) == list(ref_curve.items()), tag
    # The interrupted epoch's train/loss averages only the batches after the resume (the running sums are not in
    # last.ckpt); the epochs after it are the same.
    resumed_loss = list(tensorboard_scalars(run_dir, "train/loss").items())
    ref_loss = list(tensorboard_scalars(ref_dir, "train/loss").items())
    assert [s for s, _ in resumed_loss] == [s for s, _ in ref_loss] and resumed_loss[1:] == ref_loss[1:]


def test_a_kill_with_the_shipped_checkpoint_settings_loses_only_the_steps_since_the_last_epoch_end(
    mnist_dir, tmp_path, uninterrupted
):
    ref_dir, ref = uninterrupted
    shipped = three_epochs(mnist_dir)  # 10 minutes, epoch ends
    killer = ["+callbacks.kill._target_=tests.ddp_helpers.KillAtStep", "+callbacks.kill.step=60",
              f"+callbacks.kill.marker={tmp_path / 'killed'}"]  # fmt: skip
    killed = run_script("train", *shipped, *killer, "hydra.run.dir=run", cwd=tmp_path, timeout=600)
    assert killed.returncode == -signal.SIGKILL  # 10 steps into the second epoch of 50 steps
    saved = last_ckpt(tmp_path / "run")
    assert saved["global_step"] == 50 and saved["epoch"] == 0  # the first epoch's end: what the kill left
    assert not (tmp_path / "run" / "metrics.json").exists()

    resumed = run_script("train", "resume=run", cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["global_step"] == ref["global_step"]
    done, ref_last = last_ckpt(tmp_path / "run"), last_ckpt(ref_dir)
    assert all(torch.equal(v, ref_last["state_dict"][k]) for k, v in done["state_dict"].items())


def _wait_for_run_dir(proc: subprocess.Popen, cwd: Path) -> list[Path]:
    deadline = time.monotonic() + 60
    while not (cwd / "outputs" / "train").is_dir() or not list((cwd / "outputs" / "train").iterdir()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return list((cwd / "outputs" / "train").iterdir())


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_the_run_and_prints_the_resume_command(mnist_dir, tmp_path, uninterrupted, sig, code):
    ref_dir, ref = uninterrupted
    proc = start_script("train", *three_epochs(mnist_dir, *SAVE_EVERY_3_STEPS, "hydra.run.dir=run"), cwd=tmp_path)
    run_dir = tmp_path / "run"
    wait_for_step_checkpoint(proc, run_dir / "checkpoints" / "last.ckpt")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr
    assert f"python scripts/train.py resume={run_dir.resolve()}" in stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["global_step"] < ref["global_step"]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == metrics["global_step"]  # the state at the stop, not an older one

    result = run_script("train", f"resume={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["status"] == "finished" and resumed["global_step"] == ref["global_step"]
    assert resumed["test_acc"] == ref["test_acc"] and resumed["test_loss"] == ref["test_loss"]
    resumed_last, ref_last = last_ckpt(run_dir), last_ckpt(ref_dir)
    assert all(torch.equal(v, ref_last["state_dict"][k]) for k, v in resumed_last["state_dict"].items())


def test_a_second_ctrl_c_aborts_at_once_without_waiting_for_the_step_to_end(mnist_dir, tmp_path):
    marker = tmp_path / "in_the_long_step"
    sleeper = ["+callbacks.slow._target_=tests.ddp_helpers.SleepAtStep", "+callbacks.slow.step=5",
               f"+callbacks.slow.marker={marker}"]  # fmt: skip
    shipped = three_epochs(mnist_dir)
    proc = start_script("train", *shipped, *sleeper, "hydra.run.dir=run", cwd=tmp_path)
    wait_for_step_checkpoint(proc, marker)  # inside step 5's two-minute end
    proc.send_signal(signal.SIGINT)  # the first asks for a stop after this step ...
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)  # ... the second aborts
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 1, stderr[-3000:]  # Lightning's exit on KeyboardInterrupt, not 130 after the step
    assert stdout.count("SIGINT received: saving after this step") == 1
    assert "Detected KeyboardInterrupt" in stdout + stderr
    assert not (tmp_path / "run" / "metrics.json").exists()  # no stop was recorded ...
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()  # ... and nothing saved


def test_the_torchvision_loader_restarts_an_interrupted_epoch_from_its_first_batch(tiny_data, tmp_path):
    from lightning.pytorch.callbacks import Callback

    class RecordBatches(Callback):
        def __init__(self):
            self.labels: list[tuple[int, list[int]]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.labels.append((trainer.global_step, batch[1].tolist()))

    class CrashAfterStep5(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 5:
                raise RuntimeError("crash")

    overrides = [*quick_run(tiny_data), "data.loader=torchvision", "trainer.max_epochs=1", "test=false",
                 "callbacks.last_checkpoint.every_n_train_steps=3"]  # fmt: skip
    first = RecordBatches()
    with pytest.raises(RuntimeError, match="crash"):
        train(compose_config(overrides, tmp_path), extra_callbacks=[first, CrashAfterStep5()])
    assert last_ckpt(tmp_path)["global_step"] == 3
    resumed = RecordBatches()
    with pytest.warns(UserWarning, match="not resumable"):  # Lightning says so
        train(compose_config([*overrides, f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"], tmp_path),
              extra_callbacks=[resumed])  # fmt: skip
    # The step count continues from 3, but the batches start again from the epoch's first, in the same order.
    datamodule = instantiate(compose_config(overrides, tmp_path).data)
    datamodule.setup()
    epoch = [labels.tolist() for _, labels in datamodule.train_dataloader()]
    assert [labels for _, labels in first.labels] == epoch[:5]  # steps 1 to 5
    assert [step for step, _ in resumed.labels] == list(range(3, 16))
    assert [labels for _, labels in resumed.labels] == epoch[:13]  # not epoch[3:], where the crash left off


def test_resume_arguments_replay_the_original_overrides_and_keep_the_folder(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- model=resnet8\n- trainer.max_epochs=3\n- hydra.run.dir=run\n")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    args = resume_arguments([f"resume={run_dir}", "trainer.max_epochs=5"])
    assert args == [
        "model=resnet8",
        "trainer.max_epochs=5",
        f"resume={run_dir}",
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={run_dir}",
    ]
    assert resume_arguments([f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"])[-1] == f"hydra.run.dir={run_dir}"
    assert resume_arguments(["model=resnet8"]) == ["model=resnet8"]


# --- determinism and divergence --------------------------------------------------------------------------------------
def test_the_same_seed_gives_identical_metrics_on_cpu(tiny_data, tmp_path):
    overrides = quick_run(tiny_data, "trainer.max_epochs=2")
    first = train(compose_config(overrides, tmp_path / "a"))
    second = train(compose_config(overrides, tmp_path / "b"))
    timed = ("best_checkpoint", "phases", "steady_step_ms")  # a path, the phases' seconds, a step's time
    timeless = {k for k in first if "seconds" not in k and "per_second" not in k and k not in timed}
    assert {k: first[k] for k in timeless} == {k: second[k] for k in timeless}
    # training images per second of training: 2 epochs of 500 images (the last batch of each has 20, counted as 32)
    assert first["train_images_per_second"] == pytest.approx(32 * 32 / first["train_seconds"], rel=0.01)


def test_an_early_divergence_with_the_shipped_settings_leaves_last_ckpt_with_the_last_good_weights(tiny_data, tmp_path):
    from cnnlab.training.stopping import NonFiniteLoss
    from tests.test_train import RecordWeights

    cfg = compose_config(quick_run(tiny_data, "optimizer.lr=1e6"), tmp_path)
    assert (
        cfg.callbacks.last_checkpoint.every_n_train_steps is None
    )  # shipped: no step saves before the first epoch end
    weights = RecordWeights()
    with pytest.raises(NonFiniteLoss, match=r"at step (\d+) .* keeps the last good state \(step (\d+)\)") as stop:
        train(cfg, extra_callbacks=[weights])
    bad, kept = (int(n) for n in re.search(r"at step (\d+) .*\(step (\d+)\)", str(stop.value)).groups())
    assert 1 < bad < 16 and kept == bad - 1  # in the first epoch, before any scheduled save
    saved = last_ckpt(tmp_path)
    assert saved["global_step"] == kept
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in weights.after_step[kept].items())
    assert saved["MNISTDataModule"]["train_loader"]["served"] == kept  # a resumed run serves the bad batch again
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "diverged"


def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_keeps_the_last_good_checkpoint(mnist_dir, tmp_path):
    shipped = three_epochs(mnist_dir)
    result = run_script("train", *shipped, "optimizer.lr=1e6", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "at step" in result.stderr and "optimizer.lr" in result.stderr and "16-bit" in result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "diverged"
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


@pytest.mark.parametrize(
    ("check_every", "step_saves", "message"),
    [(1000, "1", r"non-finite at step (\d+) "), (4, "null", r"non-finite between steps 1 and (4) ")],
    ids=["read-before-every-save", "read-every-4-steps"],
)
def test_on_an_accelerator_the_nan_check_reads_the_device_flag_rarely_and_never_lets_a_bad_step_be_saved(
    mnist_dir, tmp_path, monkeypatch, check_every, step_saves, message
):
    from cnnlab.commands.train import train
    from cnnlab.training.stopping import NonFiniteLoss, StopOnNonFiniteLoss

    # What a GPU run does: the CPU's free per-step read is turned off, so the loss is only read as the device would be.
    monkeypatch.setattr(StopOnNonFiniteLoss, "reads_are_free", staticmethod(lambda device: False))
    overrides = [
        *three_epochs(mnist_dir, *SAVE_EVERY_3_STEPS, "optimizer.lr=1e6"),
        f"callbacks.last_checkpoint.every_n_train_steps={step_saves}",
        f"callbacks.non_finite_loss.device_check_every_n_steps={check_every}",
    ]
    with pytest.raises(NonFiniteLoss, match=message) as stop:
        train(compose_config(overrides, tmp_path))
    stopped_at = int(re.search(message, str(stop.value)).group(1))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["global_step"] == stopped_at
    last = tmp_path / "checkpoints" / "last.ckpt"
    if step_saves == "1":  # a save after every step: the last one written is of the step before the bad one
        ckpt = torch.load(last, weights_only=True)
        assert ckpt["global_step"] == stopped_at - 1
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    else:  # no step saves, and the run stopped before its first epoch end: nothing was saved
        assert not last.exists()


@pytest.mark.parametrize(
    ("nan_at", "read_at", "kept"),
    [(55, 75, None), (80, 100, 75)],
    ids=["read-at-the-epoch-end", "read-after-50-steps"],
)
def test_on_an_accelerator_the_shipped_nan_check_reads_every_50_steps_and_at_each_epoch_end(
    tmp_path, monkeypatch, nan_at, read_at, kept
):
    from cnnlab.training.stopping import NonFiniteLoss, StopOnNonFiniteLoss
    from tests.ddp_helpers import NaNInputOnRank

    # What a GPU run does: the loss is read only as the device would be (every 50 steps, at each epoch end and
    # before each checkpoint write), not every step as on the CPU.
    monkeypatch.setattr(StopOnNonFiniteLoss, "reads_are_free", staticmethod(lambda device: False))
    data = make_mnist(tmp_path / "data", n_train=2500, n_test=100)  # 75 steps of 32 images per epoch
    cfg = compose_config(quick_run(data, "trainer.max_epochs=2"), tmp_path / "run")
    assert cfg.callbacks.non_finite_loss.device_check_every_n_steps == 50
    previous_read = read_at - 25  # step 50 before the first case's epoch end, the epoch end (75) before step 100
    with pytest.raises(NonFiniteLoss, match=f"between steps {previous_read + 1} and {read_at} "):
        train(cfg, extra_callbacks=[NaNInputOnRank(rank=0, step=nan_at - 1)])  # the batch of step nan_at
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["global_step"] == read_at
    checkpoints = tmp_path / "run" / "checkpoints"
    if kept is None:  # no checkpoint was due before the first epoch end, and none took the damaged weights
        assert not checkpoints.exists() or not list(checkpoints.iterdir())
    else:  # the first epoch's checkpoints, untouched by the damage
        assert last_ckpt(tmp_path / "run")["global_step"] == kept
        assert all(torch.isfinite(v).all() for v in last_ckpt(tmp_path / "run")["state_dict"].values())


# --- bad input ------------------------------------------------------------------------------------------------------
class Hostile:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def resnet8_checkpoint(mnist_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("resnet8")
    overrides = quick_run(mnist_dir, "trainer.max_epochs=1", "trainer.limit_train_batches=1", model="resnet8")
    train(compose_config([*overrides, "test=false"], run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


BAD_INPUTS = [
    (["optimizer.lr=0"], "optimizer.lr"),
    (["optimizer.lr=-0.1"], "optimizer.lr"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.eval_batch_size=0"], "data.eval_batch_size"),
    (["trainer.max_epochs=0"], "trainer.max_epochs"),
    (["data.val_size=1700"], "data.val_size"),
    (["data.val_size=-1"], "data.val_size"),
    (["model.in_channels=3"], "model.in_channels"),
    (["model.image_size=32"], "model.image_size"),
    (["model=resnet8", "model.in_channels=3"], "model.in_channels"),
    (["model.num_classes=7"], "model.num_classes"),
    (["model.activation=gelu"], "activation='gelu'"),
    (["paths.output_dir=/proc/cnnlab"], "paths.output_dir"),
    (["data.data_dir=/proc/cnnlab", "data.download=true"], "data.data_dir"),
    (["data.data_dir=nowhere", "data.download=false"], "data.data_dir"),
    (["data.loader=fast"], "data.loader"),
    (["ckpt_path=missing.ckpt"], "ckpt_path"),
    (["ckpt_path=hostile.ckpt"], "ckpt_path"),
    (["ckpt_path=resnet8.ckpt"], "ckpt_path"),
    (["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.sync_batchnorm=true"], "sync_batchnorm"),
    # asking for a GPU is only a mistake where there is none (always so in CI)
    *([(["trainer.accelerator=gpu"], "trainer=gpu")] if not torch.cuda.is_available() else []),
]


@pytest.fixture
def bad_input_folder(mnist_dir, resnet8_checkpoint, tmp_path, monkeypatch) -> Path:
    """A working directory holding a hostile checkpoint (its unpickling would create `marker`) and a ResNet-8 one."""
    torch.save({"state_dict": Hostile(tmp_path / "marker")}, tmp_path / "hostile.ckpt")
    (tmp_path / "resnet8.ckpt").write_bytes(resnet8_checkpoint.read_bytes())
    monkeypatch.chdir(tmp_path)  # relative paths in the overrides, as typed in a shell
    return tmp_path


def bad_run(mnist_dir: Path, overrides: list[str]) -> list[str]:
    return three_epochs(mnist_dir, *SAVE_EVERY_3_STEPS, *overrides)  # a data.data_dir in overrides wins


@pytest.mark.parametrize(("overrides", "key"), BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_refused_with_one_paragraph_and_leaves_no_run_folder(
    mnist_dir, bad_input_folder, capsys, overrides, key
):
    """The command's own error path (cnnlab.cli.run_reporting_user_errors) in this process, on the folder that Hydra
    would have made; test_bad_input_on_the_command_line runs a few of these through scripts/train.py."""
    from cnnlab.cli import run_reporting_user_errors

    outputs = bad_input_folder / "outputs"
    run_dir = outputs / "train" / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    own_outputs = not any(o.startswith("paths.output_dir=") for o in overrides)
    cfg = compose_config([*bad_run(mnist_dir, overrides), *[f"paths.output_dir={outputs}"] * own_outputs], run_dir)
    with pytest.raises(SystemExit) as stopped:
        run_reporting_user_errors(train, cfg)
    stderr = capsys.readouterr().err
    assert stopped.value.code == 2, stderr
    assert re.fullmatch(r"\nError: [^\n]+\n\n", stderr), stderr  # one paragraph, nothing else
    assert key in stderr
    assert not (outputs if own_outputs else run_dir).exists()  # the run folder is gone, and the folders it empties
    assert not (bad_input_folder / "marker").exists()  # the hostile checkpoint's code never ran


def test_a_missing_run_folder_to_resume_is_refused_naming_it(tmp_path):
    from cnnlab.errors import UserError

    with pytest.raises(UserError, match="resume=not_a_run"):
        resume_arguments(["resume=not_a_run"])


@pytest.mark.parametrize(
    ("overrides", "key", "code"),
    [
        (["optimizer.lr=0"], "optimizer.lr", 2),
        (["ckpt_path=hostile.ckpt"], "ckpt_path", 2),
        (["model=lenet6"], "lenet5", 1),  # Hydra's own error, before any cnnlab code runs
    ],
    ids=["config value", "hostile checkpoint", "unknown config group option"],
)
def test_bad_input_on_the_command_line_exits_without_a_traceback_and_leaves_no_run_folder(
    mnist_dir, bad_input_folder, overrides, key, code
):
    result = run_script("train", *bad_run(mnist_dir, overrides), cwd=bad_input_folder)
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert key in result.stderr, result.stderr[-3000:]
    assert not (bad_input_folder / "outputs").exists()  # the run folder Hydra made is gone again
    assert not (bad_input_folder / "marker").exists()


def test_the_trainer_profiles_only_when_asked(tiny_data, tmp_path):
    from lightning.pytorch.profilers import PassThroughProfiler, SimpleProfiler

    from cnnlab.commands.train import build_trainer

    assert type(build_trainer(compose_config(quick_run(tiny_data), tmp_path)).profiler) is PassThroughProfiler
    cfg = compose_config(quick_run(tiny_data, "trainer.profiler=simple"), tmp_path)
    assert isinstance(build_trainer(cfg).profiler, SimpleProfiler)
