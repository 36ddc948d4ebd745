"""The parts of the airbench94-style CIFAR-10 recipe: reflect-padded translation, alternating flip, six-view
test-time augmentation and Lookahead averaging of the weights."""

import json
import os
import signal
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch import nn

from cnnlab.checkpoints.load import load_checkpoint
from cnnlab.checkpoints.resume import resume_arguments
from cnnlab.commands.export_metadata import describe, description_from_onnx
from cnnlab.commands.train import build_classifier, train
from cnnlab.data.tensor_loader import BatchTransform
from cnnlab.errors import UserError
from cnnlab.training.classifier import InferenceNet, classifier_from_checkpoint
from cnnlab.training.lookahead import Lookahead
from cnnlab.training.stopping import RunInterrupted
from cnnlab.training.tta import tta_logits
from tests.conftest import compose_config, quick_run
from tests.inference_path import assert_one_inference_path
from tests.launch import tensorboard_scalars

LOOKAHEAD = "+callbacks.lookahead._target_=cnnlab.training.lookahead.Lookahead"


def cifar_datamodule(tiny_data: Path, tmp_path: Path, *extra: str):
    """The tiny CIFAR-10's DataModule as a run with extra would build it, set up on the CPU."""
    datamodule = instantiate(compose_config(quick_run(tiny_data, *extra, data="cifar10"), tmp_path).data)
    datamodule.setup()
    return datamodule


def epoch_batches(datamodule, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of training images as the loader serves them, and the dataset index of each."""
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(epoch)  # as Lightning does at each epoch start
    images = torch.cat([x for x, _ in loader])
    return images, loader.sampler.indices()


# --- training augmentation -------------------------------------------------------------------------------------------
AUGMENT_EACH = pytest.mark.parametrize("each", ["batch", "epoch"])  # data.augment_each: the same augmentation


@AUGMENT_EACH
def test_alternating_flip_mirrors_each_image_in_exactly_one_of_two_consecutive_epochs(tiny_data, tmp_path, each):
    dm = cifar_datamodule(
        tiny_data, tmp_path, "data.flip=alternating", "data.crop_padding=0", f"data.augment_each={each}"
    )
    train_images = dm.splits["train"][0]
    plain = dm.batch_transform(augment=False)
    mirrored_per_epoch = []
    for epoch in range(4):
        images, order = epoch_batches(dm, epoch)
        as_is = (images == plain(train_images[order])).flatten(1).all(1)
        mirrored = (images == plain(train_images[order]).flip(3)).flatten(1).all(1)
        assert torch.all(as_is ^ mirrored)  # every image served whole, either way round (none is symmetric)
        by_index = torch.empty(len(order), dtype=torch.bool)
        by_index[order] = mirrored
        mirrored_per_epoch.append(by_index)
    assert 0.4 < mirrored_per_epoch[0].float().mean().item() < 0.6  # a coin per image in the first epoch
    for this, following in zip(mirrored_per_epoch, mirrored_per_epoch[1:]):
        assert torch.all(this ^ following)


@AUGMENT_EACH
def test_reflect_translation_fills_the_border_with_the_mirrored_image_within_the_padding(tiny_data, tmp_path, each):
    dm = cifar_datamodule(
        tiny_data, tmp_path, "data.crop_pad_mode=reflect", "data.flip=none", f"data.augment_each={each}"
    )
    assert dm.crop_padding == 4
    images, order = epoch_batches(dm, 0)
    source = dm.splits["train"][0][order].numpy()
    # numpy's reflect padding, by which the border is the image mirrored about its edge pixels
    padded = np.pad(source, ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect")
    plain = dm.batch_transform(augment=False)
    shifts = torch.full((len(order), 2), 99)
    for dy in range(9):
        for dx in range(9):
            crop = torch.from_numpy(np.ascontiguousarray(padded[:, :, dy : dy + 32, dx : dx + 32]))
            matches = (images == plain(crop)).flatten(1).all(1)
            shifts[matches] = torch.tensor([dy - 4, dx - 4])
    assert (shifts != 99).all()  # every image is a translation of itself with a reflected border, none zero-padded
    assert shifts.abs().max() == 4 and (shifts == 0).all(1).float().mean() < 0.1  # up to the padding, rarely none


def test_torchvision_reflect_crop_is_a_translation_the_tensor_path_makes(tiny_data, tmp_path):
    dm = cifar_datamodule(
        tiny_data, tmp_path, "data.loader=torchvision", "data.crop_pad_mode=reflect", "data.flip=none"
    )
    source = dm.splits["train"][0][:20]
    padded = np.pad(source.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect")
    candidates = BatchTransform(dm.mean, dm.std)(
        torch.from_numpy(np.stack([padded[:, :, y : y + 32, x : x + 32] for y in range(9) for x in range(9)], 1))
        .flatten(0, 1)
        .contiguous()
    ).view(20, 81, 3, 32, 32)
    transform = dm.image_transform(augment=True)
    torch.manual_seed(0)
    for i in range(20):
        image = transform(Image.fromarray(source[i].permute(1, 2, 0).numpy()))
        assert (candidates[i] - image).abs().flatten(1).max(1).values.min() < 1e-5


@pytest.mark.parametrize("each", ["batch", "epoch"])
def test_an_epoch_resumed_after_some_batches_serves_the_batches_an_uninterrupted_epoch_would(tiny_data, tmp_path, each):
    # The record recipe's augmentation (reflect translation, alternating flip), epoch 1 of a run stopped after 3 of
    # its 13 batches: a fresh loader given the stopped one's state serves the other 10, bit for bit.
    settings = [
        "data.crop_pad_mode=reflect",
        "data.flip=alternating",
        "data.crop_padding=2",
        f"data.augment_each={each}",
    ]
    dm = cifar_datamodule(tiny_data, tmp_path, *settings)
    whole = dm.train_dataloader()
    whole.sampler.set_epoch(1)
    uninterrupted = list(whole)
    assert len(uninterrupted) == 13  # 400 training images in batches of 32
    stopped = cifar_datamodule(tiny_data, tmp_path / "stopped", *settings).train_dataloader()
    stopped.sampler.set_epoch(1)
    served = iter(stopped)
    for _ in range(3):
        next(served)
    resumed = cifar_datamodule(tiny_data, tmp_path / "resumed", *settings).train_dataloader()
    resumed.load_state_dict(stopped.state_dict())
    rest = list(resumed)
    assert len(rest) == 10
    for (x, y), (ux, uy) in zip(rest, uninterrupted[3:], strict=True):
        assert torch.equal(x, ux) and torch.equal(y, uy)


def test_augmenting_each_epoch_draws_other_crops_than_each_batch_from_the_same_stream(tiny_data, tmp_path):
    # The two modes are alternatives, not one computation: a mode that ignored the setting would pass the tests
    # above either way.
    images = {}
    for each in ("batch", "epoch"):
        dm = cifar_datamodule(tiny_data, tmp_path / each, "data.crop_pad_mode=reflect", f"data.augment_each={each}")
        images[each], _ = epoch_batches(dm, 0)
    assert images["batch"].shape == images["epoch"].shape
    assert not torch.equal(images["batch"][32:], images["epoch"][32:])


def test_augmenting_each_epoch_is_refused_on_the_torchvision_loader_before_any_data_is_read(tmp_path):
    with pytest.raises(InstantiationException) as raised:
        cifar_datamodule(tmp_path / "no data here", tmp_path, "data.loader=torchvision", "data.augment_each=epoch")
    assert isinstance(raised.value.__cause__, UserError)
    assert "data.augment_each=epoch needs data.loader=tensor" in str(raised.value.__cause__)
    assert "\n" not in str(raised.value.__cause__)


def test_alternating_flip_is_refused_on_the_torchvision_loader(tiny_data, tmp_path):
    with pytest.raises(InstantiationException) as raised:  # the command line prints the UserError it wraps
        cifar_datamodule(tiny_data, tmp_path, "data.loader=torchvision", "data.flip=alternating")
    assert isinstance(raised.value.__cause__, UserError)
    assert "data.flip=alternating needs data.loader=tensor" in str(raised.value.__cause__)


# --- test-time augmentation ------------------------------------------------------------------------------------------
def test_flip_translate_tta_is_the_weighted_mean_of_six_views():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randn(3, 3, 8, 8)
    rows = [1, *range(8), 6]  # reflect padding by one pixel: row -1 is row 1, row 8 is row 6
    padded = x[:, :, rows][:, :, :, rows]
    down_right, up_left = padded[:, :, :8, :8], padded[:, :, 2:, 2:]
    assert torch.equal(down_right[:, :, 1:, 1:], x[:, :, :-1, :-1]) and torch.equal(
        up_left[:, :, :-1, :-1], x[:, :, 1:, 1:]
    )
    views = [x, x.flip(3), down_right, down_right.flip(3), up_left, up_left.flip(3)]
    weights = [1 / 4, 1 / 4, 1 / 8, 1 / 8, 1 / 8, 1 / 8]  # half on the unshifted pair, half on the shifted pairs
    with torch.no_grad():
        expected = sum(w * net(v) for w, v in zip(weights, views, strict=True))
        assert torch.allclose(tta_logits(net, x, "flip_translate"), expected, atol=1e-6)
        assert torch.allclose(InferenceNet(net, "flip_translate")(x), expected, atol=1e-6)
        assert not torch.allclose(tta_logits(net, x, "flip"), expected, atol=1e-4)


@pytest.fixture(scope="module")
def flip_translate_run(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    """LeNet-5 with BatchNorm for one epoch of the tiny CIFAR-10 with tta=flip_translate and Lookahead: an update
    every 5 of the 13 steps, so the epoch ends between updates, with fast weights apart from the slow ones."""
    run_dir = tmp_path_factory.mktemp("flip_translate") / "run"
    extra = ("tta=flip_translate", LOOKAHEAD, "model.batch_norm=true", "trainer.max_epochs=1")
    return run_dir, train(compose_config(quick_run(tiny_data, *extra, data="cifar10"), run_dir))


def test_test_stage_eval_predict_and_export_score_the_same_slow_six_view_weights(flip_translate_run, tmp_path):
    run_dir, metrics = flip_translate_run
    best = run_dir / "checkpoints" / "best.ckpt"
    ckpt = load_checkpoint(best)
    slow, fast = ckpt["state_dict"], ckpt["current_model_state"]
    assert any(not torch.equal(slow[k], fast[k]) for k in slow)  # the two differ, so scoring the wrong one shows
    scored = assert_one_inference_path(best, metrics, tmp_path, tta="flip_translate")
    meta = scored["session"].get_modelmeta().custom_metadata_map
    assert description_from_onnx(meta, scored["export"]["output"])["tta"] == "flip_translate"
    with torch.inference_mode():  # the six views are in the graph: the flip level alone gives other logits
        flip_only = tta_logits(scored["classifier"], scored["batch"], "flip").numpy()
    assert np.abs(scored["onnx_logits"] - flip_only).max() > 1e-4


def test_checkpoints_and_exports_from_before_the_tta_levels_keep_their_meaning(flip_translate_run, tmp_path):
    from cnnlab.commands.evaluate import evaluate

    run_dir, _ = flip_translate_run
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    levels = {}
    for tta_flip in (True, False):  # what runs made before the levels stored
        old = {k: v for k, v in ckpt["hyper_parameters"].items() if k != "tta"} | {"tta_flip": tta_flip}
        path = tmp_path / f"tta_flip_{tta_flip}.ckpt"
        torch.save({**ckpt, "hyper_parameters": old}, path)
        stored = load_checkpoint(path)
        levels[tta_flip] = classifier_from_checkpoint(stored).hparams.tta, describe(stored, path)["tta"]
    assert levels == {True: ("flip", "flip"), False: ("none", "none")}
    evaluated = evaluate(compose_config([f"ckpt_path={tmp_path / 'tta_flip_True.ckpt'}"], tmp_path / "ev", "eval"))
    datamodule = instantiate(ckpt["hyper_parameters"]["data"])
    datamodule.setup()
    images, labels = datamodule.splits["test"]
    with torch.inference_mode():  # eval scored the mirror-image average, as the old checkpoint meant
        logits = tta_logits(classifier_from_checkpoint(ckpt), datamodule.batch_transform(augment=False)(images), "flip")
    assert evaluated["test_loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    # an ONNX file written before the levels says tta_flip in its metadata
    meta = {"image_shape": "[3, 32, 32]", "mean": "[0.5]", "std": "[0.5]", "class_names": '["a"]', "tta_flip": "true"}
    assert description_from_onnx(meta, "old.onnx")["tta"] == "flip"


def test_a_run_from_before_the_tta_levels_resumes_with_its_flip_tta(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["data=cifar10", "tta_flip=true"]))
    args = resume_arguments([f"resume={run_dir}"])
    assert "tta=flip" in args and not any(a.startswith("tta_flip") for a in args)
    cfg = compose_config(args[:-1], run_dir)  # composes: the old key is gone from train.yaml
    assert cfg.tta == "flip"


def test_an_unknown_tta_level_is_refused_before_the_run_starts(tiny_data, tmp_path):
    with pytest.raises(UserError, match="tta=mirror is not a test-time augmentation level"):
        train(compose_config(quick_run(tiny_data, "tta=mirror"), tmp_path))
    assert not (tmp_path / "checkpoints").exists()


# --- Lookahead -------------------------------------------------------------------------------------------------------
class TinyNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g))
        return torch.utils.data.DataLoader(data, batch_size=4)


class Snapshots(Callback):
    """The module's floating-point state after each training batch, as the callbacks before this one left it."""

    def __init__(self) -> None:
        self.steps: list[int] = []  # the optimizer steps taken by each batch's end
        self.states: dict[int, dict[str, torch.Tensor]] = {}  # by optimizer step: the state after its last batch
        self.history: list[dict[str, torch.Tensor]] = []  # one per batch

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        state = floats(pl_module)
        self.steps.append(trainer.global_step)
        self.states[trainer.global_step] = state
        self.history.append(state)


def floats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def test_lookahead_pulls_the_fast_weights_to_the_slow_ones_every_k_steps_and_ends_on_the_slow_ones():
    torch.manual_seed(0)
    model = TinyNet()
    start = floats(model)
    before, after = Snapshots(), Snapshots()
    lookahead = Lookahead(decay=0.9, update_every_n_steps=3, power=3.0)
    trainer = L.Trainer(
        max_steps=14, accumulate_grad_batches=1, callbacks=[before, lookahead, after], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model)
    slow = start
    for step in range(1, 15):
        fast = before.states[step]
        if step % 3 == 0:
            d = 0.9**3 * (step / 14) ** 3
            slow = {k: slow[k] + (1 - d) * (fast[k] - slow[k]) for k in slow}
            expected = slow
        else:
            expected = fast
        for k, v in after.states[step].items():
            assert torch.allclose(v, expected[k], atol=1e-6), (step, k)
    final = floats(model)
    assert all(torch.allclose(final[k], slow[k], atol=1e-6) for k in slow)  # the slow weights of step 12
    assert any(not torch.allclose(final[k], before.states[14][k], atol=1e-4) for k in slow)  # not step 14's fast


def test_lookahead_counts_optimizer_steps_under_gradient_accumulation():
    torch.manual_seed(0)
    lookahead = Lookahead(decay=0.9, update_every_n_steps=3)
    before, after = Snapshots(), Snapshots()
    trainer = L.Trainer(
        max_steps=6, accumulate_grad_batches=2, callbacks=[before, lookahead, after], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(TinyNet())
    assert lookahead.total_steps == 6 and len(after.steps) == 12  # 6 optimizer steps of 2 batches each
    pulled = [
        step
        for step, b, a in zip(after.steps, before.history, after.history, strict=True)
        if any(not torch.equal(b[k], a[k]) for k in a)
    ]
    assert pulled == [3, 6]  # after optimizer steps 3 and 6, once each, not after batches 3, 6, 9 and 12


class FastWeights(Callback):
    """The module's floating-point state when training starts and right after each optimizer step: the trained
    (fast) weights, read by torch's optimizer step hook before any callback's on_train_batch_end (Lookahead's)."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.after_step: list[dict[str, torch.Tensor]] = []  # [t - 1]: after optimizer step t

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = floats(pl_module)
        self.hook = trainer.optimizers[0].register_step_post_hook(lambda *_: self.after_step.append(floats(pl_module)))

    def on_train_end(self, trainer, pl_module) -> None:
        self.hook.remove()


def lookahead_slow_weights(fast: FastWeights, steps: int, total_steps: int, decay: float = 0.95, every: int = 5,
                           power: float = 3.0) -> dict[str, torch.Tensor]:  # fmt: skip
    """airbench94's Lookahead from its definition: slow <- slow + (1 - d_t) (fast - slow) after every `every`-th of
    the first `steps` optimizer steps, d_t = decay^every (t / total_steps)^power, from the weights at the start."""
    slow = fast.start
    for t in range(every, steps + 1, every):
        d = decay**every * (t / total_steps) ** power
        slow = {k: v + (1 - d) * (fast.after_step[t - 1][k] - v) for k, v in slow.items()}
    return slow


def test_validation_scores_lookahead_slow_weights_not_the_fast_ones(tiny_data, tmp_path):
    """One epoch of 13 steps on the tiny CIFAR-10 with Lookahead as cifar10_record sets it: updates after steps 5
    and 10, so validation at the epoch end (step 13) finds fast weights apart from the slow ones; val/acc and
    val/loss are what the slow weights score on the validation images, computed here."""
    lookahead = [LOOKAHEAD, *(f"+callbacks.lookahead.{k}={v}" for k, v in
                             (("decay", 0.95), ("update_every_n_steps", 5), ("power", 3.0)))]  # fmt: skip
    overrides = quick_run(tiny_data, *lookahead, "model.batch_norm=true", "trainer.max_epochs=1", "test=false",
                          data="cifar10")  # fmt: skip
    cfg = compose_config(overrides, tmp_path)
    fast = FastWeights()
    metrics = train(cfg, extra_callbacks=[fast])
    assert metrics["global_step"] == len(fast.after_step) == 13  # 400 training images in batches of 32
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    images, labels = datamodule.splits["val"]
    images = datamodule.batch_transform(augment=False)(images)
    classifier = build_classifier(cfg).eval()

    def scores(weights: dict[str, torch.Tensor]) -> tuple[float, float]:
        classifier.load_state_dict(classifier.state_dict() | weights)
        with torch.no_grad():
            logits = classifier(images)
        return (logits.argmax(1) == labels).float().mean().item(), nn.functional.cross_entropy(logits, labels).item()

    slow_acc, slow_loss = scores(lookahead_slow_weights(fast, 13, 13))
    _, fast_loss = scores(fast.after_step[-1])
    assert abs(fast_loss - slow_loss) > 1e-3  # scoring the fast weights would show
    (logged_loss,) = tensorboard_scalars(tmp_path, "val/loss").values()
    assert logged_loss == pytest.approx(slow_loss, rel=1e-5)
    assert metrics["val_acc_best"] == pytest.approx(slow_acc, abs=1e-6)  # 100 images: a hundredth apart at least


class SigtermAt(Callback):
    """Sends this process SIGTERM after the given optimizer step, as `kill` would: GracefulStop saves and stops."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_lookahead_run_stopped_mid_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tiny_data, tmp_path):
    overrides = quick_run(tiny_data, LOOKAHEAD, "model.batch_norm=true", "trainer.max_epochs=1", "test=false")
    whole = train(compose_config(overrides, tmp_path / "whole"))
    with pytest.raises(RunInterrupted):
        train(compose_config(overrides, tmp_path / "split"), extra_callbacks=[SigtermAt(6)])
    last = tmp_path / "split" / "checkpoints" / "last.ckpt"
    stopped = torch.load(last, weights_only=True)
    assert stopped["global_step"] == 7  # between the updates after steps 5 and 10: fast and slow differ
    assert any(not torch.equal(v, stopped["current_model_state"][k]) for k, v in stopped["state_dict"].items())
    resumed = train(compose_config([*overrides, f"ckpt_path={last}"], tmp_path / "split"))
    assert resumed["global_step"] == whole["global_step"] == 16
    ends = [
        torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (tmp_path / "whole", tmp_path / "split")
    ]
    for key in ("state_dict", "current_model_state"):
        assert all(torch.equal(v, ends[1][key][k]) for k, v in ends[0][key].items()), key
    assert resumed["val_acc_best"] == whole["val_acc_best"]
    assert json.loads((tmp_path / "whole" / "metrics.json").read_text())["status"] == "finished"
