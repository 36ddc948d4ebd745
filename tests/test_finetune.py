"""init_from=<checkpoint>: a new run starting from another run's weights; freeze; backbone_lr_scale; refusals."""

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from cnnlab.commands.train import train
from cnnlab.errors import UserError
from tests.conftest import compose_config, make_image_folder, quick_run

THREE = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def mnist_run(tiny_data, tmp_path_factory) -> Path:
    """LeNet-5 with BatchNorm, trained on the tiny MNIST: the weights the tests below start from."""
    run_dir = tmp_path_factory.mktemp("mnist_run")
    train(compose_config(quick_run(tiny_data, "model.batch_norm=true", "trainer.max_epochs=2"), run_dir))
    return run_dir / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory) -> Path:
    """A generated image folder of three classes, 28x28 grayscale."""
    return make_image_folder(tmp_path_factory.mktemp("three"), (1, 28, 28), n_train=300, n_test=90, classes=THREE)


def finetune_overrides(folder: Path, source: Path, *extra: str) -> list[str]:
    fit = ["data.image_shape=[1,28,28]", "data.val_size=60", "model.batch_norm=true", f"init_from={source}"]
    return quick_run(folder, *fit, *extra, data="folder")


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def test_lenet5_from_mnist_fine_tunes_to_a_three_class_folder(mnist_run, three_classes, tmp_path, capsys):
    cfg = compose_config(finetune_overrides(three_classes, mnist_run, "trainer.max_epochs=4"), tmp_path)
    metrics = train(cfg)
    printed = capsys.readouterr().out
    assert "freshly initialized, shape differs: fc.weight, fc.bias" in printed
    assert metrics["test_acc"] > 0.9
    ckpt = torch.load(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["data"]["class_names"] == THREE
    assert ckpt["hyper_parameters"]["finetune"]["fresh"] == ["fc.weight", "fc.bias"]
    tuned, source = model_weights(tmp_path / "checkpoints" / "best.ckpt"), model_weights(mnist_run)
    assert tuned["fc.weight"].shape == (3, 84) and source["fc.weight"].shape == (10, 84)
    assert set(tuned) == set(source)


def test_frozen_layers_keep_the_source_weights_and_batchnorm_statistics(mnist_run, three_classes, tmp_path):
    overrides = finetune_overrides(three_classes, mnist_run, "freeze=[conv1,bn1]", "trainer.max_epochs=2")
    train(compose_config(overrides, tmp_path))
    tuned, source = model_weights(tmp_path / "checkpoints" / "last.ckpt"), model_weights(mnist_run)
    for name in ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):
        assert torch.equal(tuned[name], source[name]), name
    for name in ("conv2.weight", "bn2.running_mean", "fc1.weight"):
        assert not torch.equal(tuned[name], source[name]), name  # the rest trains


def test_backbone_lr_scale_gives_the_carried_weights_a_smaller_peak_rate(mnist_run, three_classes, tmp_path):
    overrides = finetune_overrides(three_classes, mnist_run, "backbone_lr_scale=0.1", "trainer.max_epochs=1")
    train(compose_config([*overrides, "optimizer.lr=0.05"], tmp_path))
    groups = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "optimizer_states"
    ][0]["param_groups"]
    assert [g["max_lr"] for g in groups] == pytest.approx([0.005, 0.05])  # the one-cycle peak per group
    assert [len(g["params"]) for g in groups] == [10, 2]  # the carried tensors (convolutions, BatchNorms, fc1, fc2); fc
    # A resumed fine-tuning run rebuilds the same two groups, so its optimizer state loads.
    more = train(compose_config([*overrides, "optimizer.lr=0.05", f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}",
                                 "trainer.max_epochs=2"], tmp_path))  # fmt: skip
    assert more["epochs"] == 2


def test_a_checkpoint_of_another_architecture_is_refused_in_one_paragraph(mnist_run, tiny_data, tmp_path):
    overrides = quick_run(tiny_data, f"init_from={mnist_run}", model="resnet8", data="cifar10")
    with pytest.raises(UserError, match="holds a cnnlab.models.LeNet5 but this run builds a cnnlab.models.ResNet"):
        train(compose_config(overrides, tmp_path))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["freeze=[conv9]"], r"'conv9' names no part of LeNet5.*conv1"),
        (["backbone_lr_scale=0.1"], "init_from is not set"),
        (["backbone_lr_scale=0"], "must be a positive factor"),
    ],
)
def test_fine_tuning_settings_that_cannot_work_are_refused_before_training(tiny_data, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        train(compose_config(quick_run(tiny_data, *extra), tmp_path))
    assert not (tmp_path / "metrics.json").exists()


def test_eval_and_predict_name_the_fine_tuned_classes(mnist_run, three_classes, tmp_path):
    from cnnlab.commands.evaluate import evaluate
    from cnnlab.commands.predict import predict
    from tests.test_predict import predict_config

    train(compose_config(finetune_overrides(three_classes, mnist_run, "trainer.max_epochs=1"), tmp_path / "run"))
    best = tmp_path / "run" / "checkpoints" / "best.ckpt"
    evaluated = evaluate(compose_config([f"ckpt_path={best}"], tmp_path / "eval", config_name="eval"))
    assert set(evaluated["test_recall"]) == set(THREE)
    image = next((three_classes / "test" / "dog").iterdir())
    rows = predict(predict_config(f"ckpt_path={best}", f"inputs={image}"))["predictions"]
    assert set(rows[0]["classes"]) == set(THREE)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "finished"


class WhiteningAtFitStart(Callback):
    """The whitening filters as the run's first training step sees them."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.filters = pl_module.model.whiten.weight.detach().clone()


def test_init_from_a_whitened_run_keeps_its_whitening_filters_instead_of_recomputing_them(tiny_data, tmp_path):
    """The filters are set from the images of the run that made them; eigenvector signs are arbitrary, so recomputing
    them on other images could swap the paired channels that the carried layers after them were trained with."""
    from tests.conftest import make_cifar
    from tests.test_airbench_model import recipe

    source_dir = tmp_path / "source"
    train(compose_config(recipe(tiny_data, "trainer.max_epochs=1", "callbacks.whitening.num_images=50"), source_dir))
    source = torch.load(source_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    other = make_cifar(tmp_path / "other_images", seed=7)  # other images: recomputed filters would differ
    seen = WhiteningAtFitStart()
    overrides = recipe(other, "trainer.max_epochs=1", f"init_from={source_dir / 'checkpoints' / 'best.ckpt'}")
    train(compose_config(overrides, tmp_path / "fine_tuned"), [seen])
    assert torch.equal(seen.filters, source["state_dict"]["model.whiten.weight"])
    scratch = WhiteningAtFitStart()
    train(compose_config(recipe(other, "trainer.max_epochs=1"), tmp_path / "scratch"), [scratch])
    assert not torch.allclose(scratch.filters, seen.filters, atol=1e-3)  # a run from scratch computes its own
