"""train(cfg) end to end on tiny data: every model x data pair, the run directory, and checkpoint contents."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from cnnlab.commands.train import build_classifier, train
from tests.conftest import DATASETS, MODELS, compose_config, make_cifar, make_mnist, quick_run, real_subset
from tests.launch import run_script, script_env, script_path, tensorboard_events, tensorboard_scalars
from tests.test_airbench_model import assert_filters_match_up_to_sign, eigen_whitening
from tests.test_recipe_parts import FastWeights, lookahead_slow_weights


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_fast_dev_run_passes_for_every_model_and_data_pair(tiny_data, tmp_path, model, data):
    cfg = compose_config(quick_run(tiny_data, "trainer.fast_dev_run=true", model=model, data=data), tmp_path)
    metrics = train(cfg)
    # One training step, and one test batch of data.eval_batch_size=64 images scored (200 would give other fractions).
    assert metrics["global_step"] == 1 and (metrics["test_acc"] * 64).is_integer()


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_config(quick_run(tiny_data, "trainer.max_epochs=3", "optimizer.lr=0.05"), run_dir)
    return run_dir, train(cfg)


def test_a_run_learns_the_tiny_dataset(finished_run):
    _, metrics = finished_run
    assert metrics["test_acc"] > 0.5 and metrics["val_acc_best"] > 0.5


def test_run_directory_holds_checkpoints_metrics_and_event_files(finished_run):
    run_dir, _ = finished_run
    written = json.loads((run_dir / "metrics.json").read_text())
    assert {"test_acc", "test_loss", "val_acc_best", "epochs", "train_seconds"} <= set(written)
    assert written["epochs"] == 3 and written["global_step"] == 3 * 16  # 500 training images in batches of 32
    val_acc = list(tensorboard_scalars(run_dir, "val/acc").values())
    assert len(val_acc) == 3 and written["val_acc_best"] == pytest.approx(max(val_acc))
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] == val_acc.index(max(val_acc)) and last["global_step"] == 48


def test_env_record_names_versions_seed_and_data_checksums(finished_run):
    run_dir, _ = finished_run
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["seed"] == 42
    import cnnlab.commands.run_record

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(cnnlab.commands.run_record.__file__).parent,
                          capture_output=True, text=True)  # fmt: skip
    assert env["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)  # this checkout's commit
    assert len(env["data_files_sha256"]) == 4 and all(len(v) == 64 for v in env["data_files_sha256"].values())


def test_env_record_names_the_git_commit_and_whether_the_checkout_had_uncommitted_changes(tmp_path, monkeypatch):
    import cnnlab.commands.run_record as run_record

    checkout = tmp_path / "checkout"
    (checkout / "cnnlab").mkdir(parents=True)
    (checkout / "cnnlab" / "run_record.py").write_text("")

    def git(*args: str) -> str:
        command = ["git", "-c", "user.name=cnnlab", "-c", "user.email=cnnlab@example.com", *args]
        return subprocess.run(command, cwd=checkout, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    monkeypatch.setattr(run_record, "__file__", str(checkout / "cnnlab" / "run_record.py"))  # where it looks
    env = run_record.environment(0, False, {})
    assert env["git_commit"] == git("rev-parse", "HEAD") and env["git_dirty"] is False
    (checkout / "cnnlab" / "edited.py").write_text("")
    assert run_record.environment(0, False, {})["git_dirty"] is True
    monkeypatch.setattr(run_record, "__file__", str(tmp_path / "no_git" / "run_record.py"))
    assert run_record.environment(0, False, {})["git_commit"] is None


def test_env_record_states_the_device_and_the_determinism_the_run_had(tiny_data, tmp_path, monkeypatch):
    import platform

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what Lightning sets for deterministic=true; restored
    cfg = compose_config(quick_run(tiny_data, "trainer.fast_dev_run=true", "trainer.deterministic=true"),
                         tmp_path)  # fmt: skip
    try:
        train(cfg)
    finally:
        torch.use_deterministic_algorithms(False)  # Lightning turned it on for this whole process
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["deterministic"] is True and env["deterministic_algorithms"] is True
    assert env["device"] == (platform.processor() or platform.machine()) and env["cudnn"] is None  # the CPU


def test_checkpoints_load_with_weights_only_and_hold_plain_hyperparameters(finished_run):
    run_dir, _ = finished_run
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = torch.load(run_dir / "checkpoints" / name, weights_only=True, map_location="cpu")
        assert ckpt["hyper_parameters"]["model"]["_target_"] == "cnnlab.models.LeNet5"
        assert ckpt["hyper_parameters"]["data"]["mean"] == [0.1307]


def test_hparams_tab_holds_a_curated_row_and_no_duplicate_scalars(finished_run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    from cnnlab.commands.run_record import HPARAMS_METRICS

    run_dir, metrics = finished_run
    events = tensorboard_events(run_dir)
    content = events.PluginTagToContent("hparams")
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    assert [m.name.tag for m in data.experiment.metric_infos] == list(HPARAMS_METRICS)
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    row = session.session_start_info.hparams
    assert set(row) == {
        "model", "parameters", "data", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "scheduler",
        "label_smoothing", "precision", "seed", "ema_decay", "tta", "init_from",
    }  # fmt: skip
    assert row["model"].string_value == "LeNet5" and row["parameters"].number_value == 61_706
    assert row["lr"].number_value == pytest.approx(0.05) and row["scheduler"].string_value == "OneCycleLR"
    scalars = events.Tags()["scalars"]
    assert not [tag for tag in scalars if tag.startswith("hp/") or tag == "epoch"]
    assert [e.value for e in events.Scalars("test/acc")] == pytest.approx([metrics["test_acc"]])  # one point


def test_compiled_model_keeps_its_checkpoint_keys(tiny_data, tmp_path):
    overrides = [
        *quick_run(tiny_data),
        "trainer.fast_dev_run=true",
        "compile.enabled=true",
        "compile.backend=eager",
    ]
    cfg = compose_config(overrides, tmp_path)
    classifier = build_classifier(cfg)
    plain_keys = set(build_classifier(compose_config(quick_run(tiny_data), tmp_path)).state_dict())
    assert set(classifier.state_dict()) == plain_keys
    assert train(cfg)["global_step"] == 1


def test_flip_test_time_augmentation_averages_an_image_and_its_mirror(tiny_data, tmp_path):
    cfg = compose_config(quick_run(tiny_data, "tta=flip", model="resnet8", data="cifar10"), tmp_path)
    classifier = build_classifier(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = (classifier(x) + classifier(x.flip(3))) / 2
        assert torch.allclose(classifier.predict_logits(x), expected)
        assert torch.allclose(classifier.predict_logits(x), classifier.predict_logits(x.flip(3)), atol=1e-6)


@pytest.fixture(scope="module")
def full_split_data(tmp_path_factory):
    """MNIST and CIFAR-10 with a few more training images than the shipped data.val_size=5000 holds out."""
    root = tmp_path_factory.mktemp("full_split")
    make_mnist(root, n_train=5600, n_test=200)  # 600 training images after the split
    make_cifar(root, n_train=5100, n_test=100)  # 100 training images after the split
    return root


class RecordWeights(Callback):
    """The trained (raw) weights after every optimizer step, by global step."""

    def __init__(self):
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.after_step[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


# The CIFAR recipes' full batches take tens of seconds per step on a CPU: they train a few small batches, enough for
# cifar10_fast's EMA (an update every 5 steps) to update twice.
def cifar_limits(steps: int) -> list[str]:
    return [
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={steps}",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "data.batch_size=8",
        "data.eval_batch_size=16",
    ]


@pytest.mark.parametrize(
    ("experiment", "limits", "steps"),
    [
        ("lenet5_mnist", [], 8 * 5),  # 8 epochs of 600 images in batches of 128
        ("mnist_fast", [], 2 * 44),  # 2 epochs of all 5,600 images (no validation split) in batches of 128
        ("resnet18_cifar10", cifar_limits(2), 2),
        ("cifar10_fast", cifar_limits(6), 6),
    ],
)
def test_every_shipped_experiment_trains_as_shipped_on_cpu(full_split_data, tmp_path, experiment, limits, steps):
    cfg = compose_config([f"experiment={experiment}", "trainer=cpu", f"data.data_dir={full_split_data}", *limits],
                         tmp_path)  # fmt: skip
    weights = RecordWeights()
    metrics = train(cfg, extra_callbacks=[weights])
    assert metrics["status"] == "finished" and metrics["global_step"] == steps
    assert metrics["epochs"] == cfg.trainer.max_epochs
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == steps
    assert last["hyper_parameters"]["model"] == OmegaConf.to_container(cfg.model, resolve=True)
    if experiment.startswith("mnist") or experiment.startswith("lenet5"):
        assert round(200 * metrics["test_acc"]) >= 180  # the tiny digits' patterns are learnt: 180 of 200 at least
    if experiment != "cifar10_fast":
        assert all(torch.equal(last["state_dict"][k], v) for k, v in weights.after_step[steps].items())
        return
    # The recipe's EMA, as shipped (an update every 5 steps, warm-up 10): the average took the weights after step 1
    # (update 0 copies them), then after step 6 with decay min(0.99, 2 / 11). Checkpoints hold that average, and the
    # raw weights beside it.
    assert cfg.trainer.precision == "bf16-mixed" and cfg.tta == "flip"
    first, sixth = weights.after_step[1], weights.after_step[6]
    for key, value in last["state_dict"].items():
        if value.is_floating_point():
            assert torch.equal(value, first[key].lerp(sixth[key], 1 - 2 / 11)), key
        else:  # BatchNorm's step counters are copied
            assert torch.equal(value, sixth[key]), key
    assert all(torch.equal(last["current_model_state"][k], v) for k, v in sixth.items())
    assert not torch.equal(last["state_dict"]["model.fc.weight"], sixth["model.fc.weight"])


class CountValidationSteps(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_validation_batch_end(self, *args) -> None:
        self.steps += 1


def test_the_record_recipe_trains_as_shipped_on_real_images_without_a_validation_split(real_small, tmp_path, capsys):
    """experiment=cifar10_record as shipped (only the batch shortened to fit 600 images): all training images, no
    validation step, last.ckpt at the end, the test stage on the final weights, whitening from the real images."""
    from hydra.utils import instantiate

    from cnnlab.training.classifier import build_model

    cfg = compose_config(
        ["experiment=cifar10_record", "trainer=cpu", f"data.data_dir={real_small}", "data.batch_size=64",
         "trainer.max_epochs=3"],
        tmp_path,
    )  # fmt: skip
    validation = CountValidationSteps()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = train(cfg, extra_callbacks=[validation])
    # no validation split is what the recipe asks for, not a mistake to warn of
    assert not [w for w in caught if "length" in str(w.message) and "zero" in str(w.message)]
    shown = capsys.readouterr().out
    assert f"python scripts/eval.py ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}" in shown
    assert metrics["status"] == "finished" and metrics["global_step"] == 3 * 10  # 600 images in batches of 64
    assert validation.steps == 0 and metrics["val_acc_best"] is None and metrics["best_checkpoint"] is None
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    assert metrics["test_acc"] > 0.2  # 10 classes; three short epochs on 600 images already learn something
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    images = datamodule.batch_transform(augment=False)(datamodule.splits["train"][0])
    expected = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    expected.init_whitening(images, eps=cfg.callbacks.whitening.eps)
    assert torch.allclose(last["state_dict"]["model.whiten.weight"], expected.whiten.weight, atol=1e-5)


def test_the_record_recipe_whitens_on_5000_real_images_steps_in_batches_of_1024_and_pulls_back_after_step_5(
    real_data, tmp_path
):
    """experiment=cifar10_record with its shipped whitening (5,000 images, eps 5e-4), batch 1024 and Lookahead
    (0.95, every 5 steps, power 3), on 7,168 real training images for one epoch: 7 steps, one Lookahead update
    after step 5 with decay 0.95^5 (5/7)^3, and fast weights apart from the slow ones at the end."""
    from hydra.utils import instantiate

    data_dir = real_subset(real_data, tmp_path / "data", n_train=7 * 1024, n_test=200)
    cfg = compose_config(["experiment=cifar10_record", "trainer=cpu", f"data.data_dir={data_dir}",
                          "trainer.max_epochs=1"], tmp_path / "run")  # fmt: skip
    fast = FastWeights()
    metrics = train(cfg, extra_callbacks=[fast])
    assert metrics["status"] == "finished" and metrics["global_step"] == len(fast.after_step) == 7  # batches of 1024
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    slow, current = last["state_dict"], last["current_model_state"]
    expected = lookahead_slow_weights(fast, 7, total_steps=7, decay=0.95, every=5, power=3.0)
    for key, value in expected.items():
        assert torch.allclose(slow[key], value, rtol=1e-5, atol=1e-6), key
    assert all(torch.equal(current[k], v) for k, v in fast.after_step[-1].items())  # the fast weights of step 7
    assert not torch.allclose(slow["model.fc.weight"], current["model.fc.weight"], atol=1e-4)
    # the whitening: the first 5,000 images of the training split, normalized here, at eps 5e-4
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    images = datamodule.splits["train"][0].double()
    assert len(images) == 7 * 1024  # no validation split
    mean, std = (torch.tensor(cfg.data[key], dtype=torch.float64).view(1, 3, 1, 1) for key in ("mean", "std"))
    normalized = (images / 255 - mean) / std
    assert torch.equal(slow["model.whiten.weight"], current["model.whiten.weight"])
    assert_filters_match_up_to_sign(slow["model.whiten.weight"], eigen_whitening(normalized[:5000], 5e-4), 1e-4)
    with pytest.raises(AssertionError):  # all 7,168 images give other filters: the count is checked
        assert_filters_match_up_to_sign(slow["model.whiten.weight"], eigen_whitening(normalized, 5e-4), 1e-4)
    assert metrics["test_acc"] > 0.2  # 10 classes: seven steps already learn something


def test_progress_bar_reads_metrics_only_every_refresh_rate_steps(tiny_data, tmp_path, monkeypatch):
    from cnnlab.training.progress import SparseRichProgressBar

    reads = []
    monkeypatch.setattr(SparseRichProgressBar, "_update_metrics", lambda self, *args, **kwargs: reads.append(1))
    overrides = quick_run(
        tiny_data,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=12",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "callbacks.progress_bar.refresh_rate=5",
        "test=false",
        progress_bar=True,
    )
    train(compose_config(overrides, tmp_path))
    # training steps 5, 10 and 12 (the epoch's last), then once each at the epoch's end and validation's end;
    # Lightning's own bar reads after all 12 steps (14 reads)
    assert len(reads) == 5


FREED_20MB = """
import ctypes, sys
import torch
from cnnlab.cli import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keep")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
x = torch.ones(20 * 2**20, dtype=torch.uint8)  # a 20 MB activation, freed as a training step frees its own
del x
print(applied, libc.mallinfo2().fordblks)  # fordblks: bytes free inside the heap, ready for reuse
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator setting exists on Linux only")
def test_keep_freed_memory_keeps_a_freed_activation_in_the_heap_for_the_next_step():
    def run(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", FREED_20MB, mode], capture_output=True, text=True, check=True)
        applied, free_bytes = out.stdout.split()
        return applied, int(free_bytes)

    assert run("default")[1] < 10 * 2**20  # glibc's default hands the 20 MB back to the kernel
    applied, free_bytes = run("keep")
    assert applied == "True" and free_bytes >= 20 * 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator setting exists on Linux only")
def test_the_train_command_keeps_freed_memory_but_train_as_a_library_call_leaves_the_allocator_alone(
    tiny_data, tmp_path
):
    probe = ["+callbacks.probe._target_=tests.ddp_helpers.AllocatorProbe", "trainer.max_epochs=1", "test=false"]
    kept = {}
    for setting in ("true", "false"):
        out = tmp_path / f"{setting}.txt"
        args = quick_run(tiny_data, *probe, f"+callbacks.probe.output={out}", f"keep_freed_memory={setting}")
        run_script("train", *args, f"hydra.run.dir={tmp_path / setting}", cwd=tmp_path, check=True)
        kept[setting] = int(out.read_text())
    assert kept["true"] >= 20 * 2**20 and kept["false"] < 10 * 2**20
    # train() called from another program, with the setting on: that program's allocator is its own business
    library_call = (
        "import sys; from tests.conftest import compose_config; from cnnlab.commands.train import train;"
        "train(compose_config(sys.argv[1:-1], sys.argv[-1]))"
    )
    out = tmp_path / "library.txt"
    args = quick_run(tiny_data, *probe, f"+callbacks.probe.output={out}", "keep_freed_memory=true")
    subprocess.run([sys.executable, "-c", library_call, *args, str(tmp_path / "lib")], cwd=tmp_path,
                   env=script_env(), check=True, capture_output=True, timeout=300)  # fmt: skip
    assert int(out.read_text()) < 10 * 2**20


class AdvanceClock(Callback):
    """Moves a fake clock on by fixed amounts: 1 s per training step, 100 s per validation batch, 1000 s per test
    batch, 10,000 s at each epoch's end after validation (where best.ckpt and last.ckpt are written)."""

    def __init__(self) -> None:
        self.now = 0.0

    def on_train_batch_end(self, *args) -> None:
        self.now += 1

    def on_validation_batch_end(self, *args) -> None:
        self.now += 100

    def on_test_batch_end(self, *args) -> None:
        self.now += 1000

    def on_train_epoch_end(self, *args) -> None:
        self.now += 10_000


def test_train_seconds_counts_the_training_steps_alone(tiny_data, tmp_path, monkeypatch):
    """metrics.json's train_seconds is the steps' time, as the speed records count it: validation, epoch-end
    checkpoints and the test stage are left out; wall_seconds runs from the process start to the test score."""
    clock = AdvanceClock()
    monkeypatch.setattr("cnnlab.training.step_clock.clock", lambda: clock.now)
    cfg = compose_config(quick_run(tiny_data, "trainer.max_epochs=2", "trainer.limit_train_batches=5"), tmp_path)
    metrics = train(cfg, extra_callbacks=[clock])
    assert metrics["global_step"] == 10 and clock.now > 20_000  # the other work moved the clock too
    assert metrics["train_seconds"] == 10  # 1 s for each of the 10 steps, nothing else
    assert metrics["train_images_per_second"] == 10 * 32 / 10
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["train_seconds"] == 10 and 0 < written["wall_seconds"] < 3600


@pytest.mark.parametrize(
    ("flags", "expected"),
    [("fpu avx2 avx512f avx512_bf16 avx512_vnni", "bf16-mixed"), ("fpu avx2 amx_bf16 amx_tile", "bf16-mixed"),
     ("fpu avx2 avx512f avx512_vnni", "32-true"), (None, "32-true")],
)  # fmt: skip
def test_cpu_precision_is_bfloat16_only_where_the_cpu_has_bfloat16_instructions(flags, expected, tmp_path):
    from cnnlab.config_files import cpu_precision

    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_precision(cpuinfo) == expected


def test_mnist_fast_trains_in_the_precision_this_cpu_runs_fastest(tmp_path):
    from cnnlab.commands.train import build_trainer
    from cnnlab.config_files import cpu_precision

    cfg = compose_config(["experiment=mnist_fast", "trainer=cpu"], tmp_path)
    assert cfg.trainer.precision == cpu_precision()
    assert build_trainer(cfg).precision == cpu_precision()


@pytest.mark.parametrize("flags", ["fpu avx2 avx512_bf16", "fpu avx2"])
def test_mnist_fast_on_a_gpu_keeps_trainer_gpus_precision_whatever_the_host_cpu(flags, tmp_path, monkeypatch):
    """The CPU's bfloat16 instructions say nothing of a GPU run: trainer=gpu's bf16-mixed stands."""
    import cnnlab.config_files as config_files

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    read_flags = config_files.cpu_precision
    monkeypatch.setattr(config_files, "cpu_precision", lambda: read_flags(cpuinfo))
    gpu = compose_config(["trainer=gpu"], tmp_path).trainer.precision
    assert compose_config(["experiment=mnist_fast", "trainer=gpu"], tmp_path).trainer.precision == gpu
    on_cpu = "bf16-mixed" if "bf16" in flags else "32-true"
    assert compose_config(["experiment=mnist_fast", "trainer=cpu"], tmp_path).trainer.precision == on_cpu


RUN_AND_LIST_MODULES = """
import runpy, sys
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(sys.argv.pop(1), run_name="__main__")
print(" ".join(sorted(sys.modules)))
"""


def test_a_training_run_imports_no_tracking_export_or_search_library(tiny_data, tmp_path):
    """MLflow, ONNX, Optuna and W&B cost seconds of import; a run that logs to TensorBoard uses none of them."""
    args = quick_run(tiny_data, "experiment=mnist_fast", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}")
    result = subprocess.run(
        [sys.executable, "-c", RUN_AND_LIST_MODULES, script_path("train"), *args],
        capture_output=True, text=True, env=script_env(), cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = set(result.stdout.split())
    assert "lightning" in loaded  # the run did run here
    assert not loaded & {"mlflow", "optuna", "onnx", "onnxruntime", "onnxscript", "wandb"}
