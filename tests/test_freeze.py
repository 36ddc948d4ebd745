"""freeze=[...]: frozen layers keep their weights and BatchNorm statistics and normalize with the stored statistics,
whatever the logger, callbacks or number of processes; freeze names match whole module names; backbone_lr_scale
scales the rate under every scheduler."""

import json
from pathlib import Path

import pytest
import torch

from cnnlab.commands.train import train
from cnnlab.errors import UserError
from tests import test_finetune
from tests.conftest import DDP_ON_CPU, compose_config, quick_run
from tests.launch import run_script

mnist_run = test_finetune.mnist_run  # LeNet-5 with BatchNorm briefly trained on the tiny MNIST
three_classes = test_finetune.three_classes
model_weights = test_finetune.model_weights
BN1 = ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked")


def probe(output: Path, module: str | None = None) -> list[str]:
    """Overrides adding tests.ddp_helpers.TrainingStateProbe, which writes output/rank<r>.json."""
    args = ["+callbacks.probe._target_=tests.ddp_helpers.TrainingStateProbe", f"+callbacks.probe.output={output}"]
    return args + ([f"+callbacks.probe.module={module}"] if module else [])


def probed(output: Path, rank: int = 0) -> dict:
    return json.loads((output / f"rank{rank}.json").read_text())


def assert_bn1_frozen(record: dict, source: dict[str, torch.Tensor]) -> None:
    """bn1 was in eval mode at every training step and holds the source's statistics and affine weights."""
    assert not any(s["training"] for s in record["steps"]), [s["training"] for s in record["steps"]]
    for name, value in record["buffers"].items():
        assert torch.equal(torch.tensor(value, dtype=source[f"bn1.{name}"].dtype), source[f"bn1.{name}"]), name


def mnist_finetune(tiny_data: Path, source: Path, *extra: str, trainer: str | None = "cpu") -> list[str]:
    """A run on the tiny MNIST starting from source's weights (the same 10 classes: every layer carried over)."""
    return quick_run(tiny_data, "model.batch_norm=true", f"init_from={source}", *extra, trainer=trainer)


@pytest.mark.parametrize(
    "setting", ["callbacks.conv_images=null", "logger=csv"], ids=["without_conv_images", "with_the_csv_logger"]
)
def test_frozen_batchnorm_keeps_its_statistics_and_normalizes_with_them(tiny_data, mnist_run, tmp_path, setting):
    overrides = mnist_finetune(tiny_data, mnist_run, "freeze=[conv1,bn1]", "trainer.max_epochs=2", setting)
    train(compose_config([*overrides, *probe(tmp_path / "probe", "bn1")], tmp_path))
    tuned, source = model_weights(tmp_path / "checkpoints" / "last.ckpt"), model_weights(mnist_run)
    for name in ("conv1.weight", *BN1):
        assert torch.equal(tuned[name], source[name]), name
    for name in ("conv2.weight", "bn2.running_mean", "fc1.weight"):
        assert not torch.equal(tuned[name], source[name]), name  # the rest trains
    assert_bn1_frozen(probed(tmp_path / "probe"), source)


def test_frozen_batchnorm_keeps_its_statistics_on_every_ddp_process(tiny_data, mnist_run, tmp_path):
    two_epochs = ["trainer.max_epochs=2", "trainer.limit_train_batches=4", "freeze=[conv1,bn1]"]
    args = [*DDP_ON_CPU, *mnist_finetune(tiny_data, mnist_run, *two_epochs, trainer=None), *probe(tmp_path, "bn1")]
    result = run_script("train", *args, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    source = model_weights(mnist_run)
    for rank in (1, 0):
        assert len(probed(tmp_path, rank)["steps"]) == 8, rank
        assert_bn1_frozen(probed(tmp_path, rank), source)
    tuned = model_weights(tmp_path / "run" / "checkpoints" / "last.ckpt")
    for name in ("conv1.weight", *BN1):
        assert torch.equal(tuned[name], source[name]), name


def test_a_resumed_frozen_run_keeps_its_layers_frozen(tiny_data, mnist_run, tmp_path):
    overrides = mnist_finetune(tiny_data, mnist_run, "freeze=[conv1,bn1]", "callbacks.conv_images=null")
    train(compose_config([*overrides, "trainer.max_epochs=1"], tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    more = train(compose_config([*overrides, "trainer.max_epochs=2", f"ckpt_path={last}",
                                 *probe(tmp_path / "probe", "bn1")], tmp_path))  # fmt: skip
    assert more["epochs"] == 2
    tuned, source = model_weights(last), model_weights(mnist_run)
    for name in ("conv1.weight", *BN1):
        assert torch.equal(tuned[name], source[name]), name
    assert not torch.equal(tuned["conv2.weight"], source["conv2.weight"])
    assert_bn1_frozen(probed(tmp_path / "probe"), source)


def test_freeze_fc_freezes_the_last_layer_and_leaves_fc1_and_fc2_training(tiny_data, mnist_run, tmp_path):
    overrides = mnist_finetune(tiny_data, mnist_run, "freeze=[fc]", "trainer.max_epochs=1")
    train(compose_config([*overrides, "callbacks.conv_images=null"], tmp_path))
    tuned, source = model_weights(tmp_path / "checkpoints" / "last.ckpt"), model_weights(mnist_run)
    assert torch.equal(tuned["fc.weight"], source["fc.weight"]) and torch.equal(tuned["fc.bias"], source["fc.bias"])
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert not torch.equal(tuned[name], source[name]), name


def test_freezing_a_container_keeps_every_batchnorm_inside_it_in_eval_mode_with_its_statistics(tiny_data, tmp_path):
    # ResNet-8's layer1 is a Sequential of one residual block holding two BatchNorm layers: freeze names the
    # container, and each BatchNorm below it must normalize with its stored statistics at every step.
    resnet8 = ["data=cifar10", "model=resnet8", "callbacks.conv_images=null"]
    source = tmp_path / "source"
    train(compose_config(quick_run(tiny_data, *resnet8, "trainer.max_epochs=1"), source))
    start = model_weights(source / "checkpoints" / "best.ckpt")
    overrides = quick_run(tiny_data, *resnet8, f"init_from={source / 'checkpoints' / 'best.ckpt'}", "freeze=[layer1]",
                          "trainer.max_epochs=2", *probe(tmp_path / "probe", "layer1"))  # fmt: skip
    train(compose_config(overrides, tmp_path / "tuned"))
    steps = probed(tmp_path / "probe")["steps"]
    assert len(steps) == 2 * 13  # 400 training images in batches of 32, two epochs
    for step in steps:
        assert step["batchnorm_training"] == {"0.bn1": False, "0.bn2": False}, step
    tuned = model_weights(tmp_path / "tuned" / "checkpoints" / "last.ckpt")
    frozen = [name for name in start if name.startswith("layer1.")]
    assert len(frozen) == 12  # two convolutions, two BatchNorms (weight, bias, mean, var, step count)
    for name in frozen:
        assert torch.equal(tuned[name], start[name]), name
    for name in ("bn1.running_mean", "layer2.0.bn1.running_mean", "layer2.0.conv1.weight"):
        assert not torch.equal(tuned[name], start[name]), name  # the rest trains
    assert start["layer1.0.bn1.num_batches_tracked"] > 0  # statistics the source run gathered, not fresh ones


@pytest.mark.parametrize("name", ["f", "fc1.w", "fc."])
def test_a_freeze_name_that_is_no_whole_module_name_is_refused(tiny_data, tmp_path, name):
    with pytest.raises(UserError, match=rf"{name!r} names no part of LeNet5.*conv1, bn1"):
        train(compose_config(quick_run(tiny_data, "model.batch_norm=true", f"freeze=[{name}]"), tmp_path))
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("scheduler", ["onecycle", "cosine", "none"])
def test_backbone_lr_scale_scales_the_carried_weights_rate_under_every_scheduler(
    three_classes, mnist_run, tmp_path, scheduler
):
    extra = ["backbone_lr_scale=0.1", "optimizer.lr=0.05", f"scheduler={scheduler}", "trainer.max_epochs=1"]
    overrides = test_finetune.finetune_overrides(three_classes, mnist_run, *extra)  # a new 3-class head
    train(compose_config([*overrides, *probe(tmp_path / "probe")], tmp_path))
    steps = probed(tmp_path / "probe")["steps"]
    assert len(steps) == 8  # 240 training images in batches of 32
    for step in steps:
        assert step["sizes"] == [10, 2]  # the carried tensors (convolutions, BatchNorms, fc1, fc2); fc
        backbone, head = step["lrs"]
        assert backbone == pytest.approx(0.1 * head, rel=1e-9), step
    assert steps[0]["lrs"][1] == pytest.approx({"onecycle": 0.05 / 25, "cosine": 0.05, "none": 0.05}[scheduler])


def test_frozen_batchnorm_layers_that_sync_batchnorm_replaced_are_frozen_at_the_next_epoch(mnist_run):
    from lightning.pytorch.plugins import TorchSyncBatchNorm
    from torch import nn

    from cnnlab.training.classifier import ImageClassifier
    from cnnlab.training.finetune import FreezeModules

    # A DDP run refuses SyncBatchNorm on CPUs, so the replacement is made here as trainer.sync_batchnorm=true makes
    # it, between the callback's setup (freeze_before_training) and the first training epoch.
    ckpt = torch.load(mnist_run, map_location="cpu", weights_only=True)
    classifier = ImageClassifier(**ckpt["hyper_parameters"])
    classifier.load_state_dict(ckpt["state_dict"])
    freeze = FreezeModules(["conv1", "bn1"])
    freeze.freeze_before_training(classifier)
    classifier = TorchSyncBatchNorm().apply(classifier)
    classifier.train()
    freeze.finetune_function(classifier, 0, torch.optim.SGD(classifier.parameters(), lr=0.1))
    bn1 = classifier.model.bn1
    assert isinstance(bn1, nn.SyncBatchNorm) and not bn1.training and classifier.model.bn2.training
    assert not any(p.requires_grad for p in [*bn1.parameters(), *classifier.model.conv1.parameters()])
    classifier(torch.randn(8, 1, 28, 28))  # a training step's forward (one process: no statistics to gather)
    tuned, source = classifier.model.state_dict(), model_weights(mnist_run)
    for name in BN1:
        assert torch.equal(tuned[name], source[name]), name
