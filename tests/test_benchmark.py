"""scripts/benchmark.py runs and reports what it promises (never a time: timings belong to the benchmark itself)."""

import json
import re
import subprocess
import sys

import pytest
import torch

from cnnlab.tools.benchmark import benchmark
from tests.conftest import compose_config, quick_run
from tests.launch import run_script, script_env


def bench_config(tiny_data, tmp_path, *extra):
    overrides = quick_run(tiny_data, "steps=4", "warmup_steps=2", "repeats=1", *extra)
    return compose_config(overrides, tmp_path, config_name="benchmark")


def test_throughput_mode_reports_every_path_and_both_ratios_in_json(tiny_data, tmp_path):
    result = benchmark(bench_config(tiny_data, tmp_path, "device=cpu"))
    written = json.loads((tmp_path / "benchmark.json").read_text())
    for path in ("lightning", "plain", "torchvision"):
        assert written[f"{path}_images_per_second"] > 0
    # The ratios are of the unrounded rates; the rates are reported to 0.1 image/s.
    lightning = result["lightning_images_per_second"]
    for other in ("plain", "torchvision"):
        ratio = lightning / result[f"{other}_images_per_second"]
        # Rates rounded to 0.1 image/s move the ratio computed from them by up to 0.05 / rate, each.
        slack = 0.05 / lightning + 0.05 / result[f"{other}_images_per_second"]
        assert written[f"lightning_over_{other}"] == pytest.approx(ratio, rel=1e-3 + slack, abs=1e-3)
    assert written["device"] == "cpu"
    lightning, plain = result["lightning_images_per_second"], result["plain_images_per_second"]
    rounding = 1000 * 32 * 0.05 * (1 / lightning**2 + 1 / plain**2)  # the rates are reported to 0.1 image/s
    overhead = 1000 * 32 * (1 / lightning - 1 / plain)
    assert written["lightning_overhead_ms_per_step"] == pytest.approx(overhead, abs=rounding + 1e-3)
    assert written["peak_memory_mb"] > 0 and written["config"]["model"]["_target_"] == "cnnlab.models.LeNet5"


def test_time_to_accuracy_mode_stops_at_the_first_epoch_reaching_the_target(tiny_data, tmp_path):
    result = benchmark(bench_config(tiny_data, tmp_path, "target_acc=0.3", "trainer.max_epochs=6"))
    assert result["reached"] and result["epoch_reached"] == len(result["history"])
    accuracies = [h["test_acc"] for h in result["history"]]
    assert accuracies[-1] >= 0.3 and all(a < 0.3 for a in accuracies[:-1])
    assert result["seconds_to_target"] > 0


def test_unreachable_target_is_reported_as_not_reached(tiny_data, tmp_path):
    result = benchmark(bench_config(tiny_data, tmp_path, "target_acc=1.01", "trainer.max_epochs=1"))
    assert not result["reached"] and result["seconds_to_target"] is None and len(result["history"]) == 1


def test_plain_loop_transforms_every_batch_as_the_projects_path_does(tiny_data, tmp_path, monkeypatch):
    """Like for like: the plain loop gets the same uint8 images and crops, flips and normalizes each batch with the
    data config's transform (here CIFAR-10's shipped augmentation), so a/b compares the framework alone."""
    from cnnlab.data.tensor_loader import BatchTransform

    calls = []
    original = BatchTransform.__call__

    def recording(self, x, generator=None, flips=None):
        calls.append((x.dtype, self.crop_padding, self.augments))
        return original(self, x, generator, flips)

    monkeypatch.setattr(BatchTransform, "__call__", recording)
    extra = ["data=cifar10", "model=resnet8", "compare=[plain]", "count_ops_steps=0"]  # the timed loop's calls only
    cfg = bench_config(tiny_data, tmp_path, "device=cpu", *extra)
    result = benchmark(cfg)
    assert len(calls) == cfg.warmup_steps + cfg.steps  # one transform per step, none before the loop
    assert set(calls) == {(torch.uint8, cfg.data.crop_padding, True)}  # uint8 in, cropped and flipped
    assert result["same_work"]["augment"] is True and result["same_work"]["cudnn_benchmark"] is False


def test_plain_mnist_loop_trains_lenet5_and_prints_its_test_accuracy(tiny_data, tmp_path):
    result = run_script("plain_mnist", "--data", str(tiny_data), "--epochs", "3", "--batch-size", "32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    accuracy = float(re.fullmatch(r"test accuracy (\d\.\d{4})\n", result.stdout).group(1))
    assert accuracy > 0.5  # ten learnable class patterns: chance is 0.1


def test_plain_mnist_loop_loads_no_framework():
    """The reference loop pays for torch alone, as a hand-written loop does: the comparison is fair to it."""
    code = "import sys, cnnlab.tools.plain_mnist; print(' '.join(sorted(sys.modules)))"
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=script_env()
        ).stdout.split()
    )
    assert "torch" in loaded
    assert not loaded & {"lightning", "hydra", "omegaconf", "torchvision", "torchmetrics", "tensorboard", "matplotlib"}


# airbench94's own training loop (cifar10-airbench, its CPU port reading the same data) dispatched 207 operations a
# step at batch 128, counted as the benchmark counts (a TorchDispatchMode over 10 steady steps), on 2026-12-05.
AIRBENCH94_OPS_PER_STEP = 207
FRAMEWORK_OPS = 25  # what the project's path adds to the plain loop's step: training sums, Lightning's loss
# clone and normalization, the weight average's multi-tensor update every few steps


@pytest.mark.parametrize(
    ("experiment", "most"),
    [("cifar10_record", AIRBENCH94_OPS_PER_STEP), ("mnist_fast", None)],
)
def test_the_shipped_recipes_dispatch_few_operations_a_step_beside_the_plain_loops_count(
    experiment, most, tiny_data, tmp_path
):
    """A count, not a time: each operation is about one kernel launch on a GPU and some host time anywhere."""
    extra = [f"experiment={experiment}", "data.batch_size=32", "compare=[plain]", "count_ops_steps=10"]
    extra += ["model.widths=[8,8,8]"] if experiment == "cifar10_record" else []
    result = benchmark(bench_config(tiny_data, tmp_path, "device=cpu", *extra))
    ours, plain = result["lightning_ops_per_step"], result["plain_ops_per_step"]
    assert 50 < plain <= ours <= plain + FRAMEWORK_OPS
    if most is not None:
        assert ours <= most


def test_augmenting_each_epoch_takes_a_dozen_operations_off_the_step_of_both_paths(tiny_data, tmp_path):
    """data.augment_each=epoch on the record recipe: the crop and flip leave the step (a slice remains), in the
    project's path and in the plain loop alike, and the project still adds no more than FRAMEWORK_OPS."""
    counts = {}
    for each in ("batch", "epoch"):
        extra = ["experiment=cifar10_record", "data.batch_size=32", "model.widths=[8,8,8]", "compare=[plain]"]
        extra += ["count_ops_steps=10", f"data.augment_each={each}"]
        result = benchmark(bench_config(tiny_data, tmp_path / each, "device=cpu", *extra))
        counts[each] = result["lightning_ops_per_step"], result["plain_ops_per_step"]
    (ours_batch, plain_batch), (ours_epoch, plain_epoch) = counts["batch"], counts["epoch"]
    assert ours_epoch <= ours_batch - 12 and plain_epoch <= plain_batch - 12, counts
    assert plain_epoch <= ours_epoch <= plain_epoch + FRAMEWORK_OPS, counts


def test_every_path_runs_with_augmentation_each_epoch_the_torchvision_one_per_image(tiny_data, tmp_path):
    """The torchvision path transforms each image in its workers: it runs data.augment_each=epoch's augmentation
    per image instead of refusing the setting midway through the benchmark."""
    extra = ["data=cifar10", "model=resnet8", "data.augment_each=epoch", "count_ops_steps=0"]
    result = benchmark(bench_config(tiny_data, tmp_path, "device=cpu", *extra))
    assert all(result[f"{path}_images_per_second"] > 0 for path in ("lightning", "plain", "torchvision"))
    assert result["same_work"]["augment_each"] == "epoch"
