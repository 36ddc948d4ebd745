"""train(cfg) end to end on tiny data: every model x data pair, the run directory, and checkpoint contents."""

import json
import subprocess
import sys

import pytest
import torch

from cnnlab.train import build_classifier, train
from tests.conftest import DATASETS, MODELS, compose_config, fast_overrides


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_fast_dev_run_passes_for_every_model_and_data_pair(tiny_data, tmp_path, model, data):
    cfg = compose_config([*fast_overrides(tiny_data, model, data), "trainer.fast_dev_run=true"], tmp_path)
    metrics = train(cfg)
    assert 0.0 <= metrics["test_acc"] <= 1.0 and metrics["global_step"] == 1


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_config([*fast_overrides(tiny_data), "trainer.max_epochs=3", "optimizer.lr=0.05"], run_dir)
    return run_dir, train(cfg)


def test_a_run_learns_the_tiny_dataset(finished_run):
    _, metrics = finished_run
    assert metrics["test_acc"] > 0.5 and metrics["val_acc_best"] > 0.5


def test_run_directory_holds_checkpoints_metrics_and_event_files(finished_run):
    run_dir, metrics = finished_run
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written == pytest.approx(metrics)
    assert {"test_acc", "test_loss", "val_acc_best", "epochs", "train_seconds"} <= set(written)
    assert written["epochs"] == 3


def test_env_record_names_versions_seed_and_data_checksums(finished_run):
    run_dir, _ = finished_run
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["seed"] == 42
    assert len(env["data_files_sha256"]) == 4 and all(len(v) == 64 for v in env["data_files_sha256"].values())


def test_checkpoints_load_with_weights_only_and_hold_plain_hyperparameters(finished_run):
    run_dir, _ = finished_run
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = torch.load(run_dir / "checkpoints" / name, weights_only=True, map_location="cpu")
        assert ckpt["hyper_parameters"]["model"]["_target_"] == "cnnlab.models.LeNet5"
        assert ckpt["hyper_parameters"]["data"]["mean"] == [0.1307]


def test_hparams_tab_holds_a_curated_row_and_no_duplicate_scalars(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from cnnlab.run_record import HPARAMS_METRICS

    run_dir, metrics = finished_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    assert [m.name.tag for m in data.experiment.metric_infos] == list(HPARAMS_METRICS)
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    row = session.session_start_info.hparams
    assert set(row) == {
        "model", "parameters", "data", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "scheduler",
        "label_smoothing", "precision", "seed", "ema_decay", "tta_flip", "init_from",
    }  # fmt: skip
    assert row["model"].string_value == "LeNet5" and row["parameters"].number_value == 61_706
    assert row["lr"].number_value == pytest.approx(0.05) and row["scheduler"].string_value == "OneCycleLR"
    scalars = events.Tags()["scalars"]
    assert not [tag for tag in scalars if tag.startswith("hp/") or tag == "epoch"]
    assert [e.value for e in events.Scalars("test/acc")] == pytest.approx([metrics["test_acc"]])  # one point


def test_compiled_model_keeps_its_checkpoint_keys(tiny_data, tmp_path):
    overrides = [
        *fast_overrides(tiny_data),
        "trainer.fast_dev_run=true",
        "compile.enabled=true",
        "compile.backend=eager",
    ]
    cfg = compose_config(overrides, tmp_path)
    classifier = build_classifier(cfg)
    plain_keys = set(build_classifier(compose_config(fast_overrides(tiny_data), tmp_path)).state_dict())
    assert set(classifier.state_dict()) == plain_keys
    assert train(cfg)["global_step"] == 1


def test_flip_test_time_augmentation_averages_an_image_and_its_mirror(tiny_data, tmp_path):
    cfg = compose_config([*fast_overrides(tiny_data, "resnet8", "cifar10"), "tta_flip=true"], tmp_path)
    classifier = build_classifier(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = (classifier(x) + classifier(x.flip(3))) / 2
        assert torch.allclose(classifier.predict_logits(x), expected)
        assert torch.allclose(classifier.predict_logits(x), classifier.predict_logits(x.flip(3)), atol=1e-6)


def test_cifar10_fast_recipe_runs_with_ema_weights_on_cpu(tiny_data, tmp_path):
    overrides = [
        *fast_overrides(tiny_data, "resnet9", "cifar10"),
        "experiment=cifar10_fast",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "data.batch_size=16",
        "callbacks.ema.update_every_n_steps=1",
    ]
    cfg = compose_config(overrides, tmp_path)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.tta_flip
    metrics = train(cfg)
    assert metrics["global_step"] == 3 and 0 <= metrics["test_acc"] <= 1


def test_progress_bar_reads_metrics_only_every_refresh_rate_steps(tiny_data, tmp_path, monkeypatch):
    from cnnlab.progress import SparseRichProgressBar

    reads = []
    monkeypatch.setattr(SparseRichProgressBar, "_update_metrics", lambda self, *args, **kwargs: reads.append(1))
    with_bar = [o for o in fast_overrides(tiny_data) if "progress_bar" not in o]
    overrides = [
        *with_bar,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=12",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "callbacks.progress_bar.refresh_rate=5",
        "test=false",
    ]
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
    import os

    from tests.conftest import REPO

    probe = ["+callbacks.probe._target_=tests.ddp_helpers.AllocatorProbe", "trainer.max_epochs=1", "test=false"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    kept = {}
    for setting in ("true", "false"):
        out = tmp_path / f"{setting}.txt"
        args = [*fast_overrides(tiny_data), *probe, f"+callbacks.probe.output={out}", f"keep_freed_memory={setting}"]
        command = [sys.executable, str(REPO / "scripts" / "train.py"), *args, f"hydra.run.dir={tmp_path / setting}"]
        subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
        kept[setting] = int(out.read_text())
    assert kept["true"] >= 20 * 2**20 and kept["false"] < 10 * 2**20
    # train() called from another program, with the setting on: that program's allocator is its own business
    library_call = (
        "import sys; from tests.conftest import compose_config; from cnnlab.train import train;"
        "train(compose_config(sys.argv[1:-1], sys.argv[-1]))"
    )
    out = tmp_path / "library.txt"
    args = [*fast_overrides(tiny_data), *probe, f"+callbacks.probe.output={out}", "keep_freed_memory=true"]
    subprocess.run([sys.executable, "-c", library_call, *args, str(tmp_path / "lib")], cwd=tmp_path, env=env,
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    assert int(out.read_text()) < 10 * 2**20
