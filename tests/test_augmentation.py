"""Training augmentation for own images, as torchvision's classification reference has it: policies, random-resized
crops, random erasing and cutout, MixUp and CutMix; and the settings its recipes use beside them (weight decay apart
for normalization layers and biases, gradient clipping, a warm-up then cosine schedule). Each transform is checked
against an expectation the test computes itself or against torchvision's own per-image transform."""

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from torch import nn
from torchvision.transforms import v2

from cnnlab.commands.train import build_classifier, train
from cnnlab.commands.validation import check_scheduler
from cnnlab.data.erasing import cutout, random_erasing
from cnnlab.data.mixing import BatchMixing
from cnnlab.data.policies import POLICIES
from cnnlab.errors import UserError
from cnnlab.training.classifier import TrainingSums
from cnnlab.training.param_groups import NORM_LAYERS, make_optimizer
from cnnlab.training.schedules import WarmupCosine
from tests.conftest import REPO, compose_config, make_image_folder, quick_run


def cifar_datamodule(tiny_data: Path, tmp_path: Path, *extra: str):
    """The tiny CIFAR-10's DataModule as a run with extra would build it, set up on the CPU."""
    datamodule = instantiate(compose_config(quick_run(tiny_data, *extra, data="cifar10"), tmp_path).data)
    datamodule.setup()
    return datamodule


def normalized(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images as the evaluation transform should give them: (x / 255 - mean) / std, computed here."""
    mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


# --- policies -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loader", ["tensor", "torchvision"])
@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "none"])
def test_each_policy_changes_most_images_and_keeps_their_shape_and_dtype(tiny_data, tmp_path, policy, loader):
    dm = cifar_datamodule(tiny_data, tmp_path, f"data.policy={policy}", "data.augment=false", f"data.loader={loader}")
    images = dm.splits["train"][0][:64]
    if loader == "tensor":
        out = dm.batch_transform(augment=True).augment(images, torch.Generator().manual_seed(0))
        assert out.dtype == torch.uint8 and out.shape == images.shape
        changed = (out != images).flatten(1).any(1)
    else:
        train_transform, plain = dm.image_transform(augment=True), dm.image_transform(augment=False)
        out = torch.stack([train_transform(image) for image in images])
        assert out.dtype == torch.float32 and out.shape == images.shape
        assert torch.allclose(torch.stack([plain(image) for image in images]), normalized(images, dm.mean, dm.std))
        changed = (out - normalized(images, dm.mean, dm.std)).abs().flatten(1).amax(1) > 1e-4
    # A policy leaves some images as they are (TrivialAugment's identity is 1 of 14 operations; AutoAugment applies
    # each operation of its sub-policy with a probability, and autocontrast or equalize may change nothing).
    assert changed.float().mean() > 0.3


def test_rand_augments_magnitude_sets_how_far_images_move(tiny_data, tmp_path):
    shifts = {}
    for magnitude in (0, 30):
        dm = cifar_datamodule(
            tiny_data, tmp_path / str(magnitude), "data.policy=rand_augment", f"data.policy_magnitude={magnitude}"
        )
        images = dm.splits["train"][0][:128]
        out = dm.batch_transform(augment=True).per_image(images, torch.Generator().manual_seed(0))
        shifts[magnitude] = (out.float() - images.float()).abs().mean()
    assert shifts[30] > 2 * shifts[0]


def test_a_policy_is_refused_with_a_magnitude_it_has_no_use_for(tiny_data, tmp_path):
    with pytest.raises(Exception) as raised:
        cifar_datamodule(tiny_data, tmp_path, "data.policy=trivial_augment_wide", "data.policy_magnitude=5")
    assert "only rand_augment (magnitude 0-30) and augmix" in str(raised.value.__cause__ or raised.value)


# --- random-resized crops --------------------------------------------------------------------------------------------
def ramp_images(n: int, size: int = 64) -> torch.Tensor:
    """Images whose channel 0 holds each pixel's column x 4 and channel 1 its row x 4: a crop's pixels say where
    it came from."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    image = torch.stack([cols * 4, rows * 4, torch.zeros_like(rows)]).to(torch.uint8)
    return image.expand(n, -1, -1, -1).contiguous()


@pytest.mark.parametrize(("scale", "ratio"), [((0.25, 0.5), (1.0, 1.0)), ((0.3, 0.3), (2.0, 2.0))])
def test_random_resized_crops_cover_the_configured_area_and_aspect_ratio_each_image_its_own(
    tiny_data, tmp_path, scale, ratio
):
    dm = cifar_datamodule(
        tiny_data,
        tmp_path,
        "data.augment=false",
        "data.random_resized_crop=true",
        f"data.crop_scale=[{scale[0]},{scale[1]}]",
        f"data.crop_ratio=[{ratio[0]},{ratio[1]}]",
        "data.interpolation=nearest",  # output pixels are source pixels: the crop's extent can be read off them
    )
    out = dm.batch_transform(augment=True).per_image(ramp_images(300), torch.Generator().manual_seed(0))
    assert out.shape == (300, 3, 32, 32)
    # Nearest sampling of a w-pixel span into 32 pixels reads columns from its first to within a pixel of its last.
    width = (out[:, 0].amax((1, 2)).float() - out[:, 0].amin((1, 2)).float()) / 4 + 1
    height = (out[:, 1].amax((1, 2)).float() - out[:, 1].amin((1, 2)).float()) / 4 + 1
    area = width * height / 64**2
    assert area.min() >= scale[0] * 0.85 and area.max() <= scale[1] * 1.02
    assert (width / height).median() == pytest.approx(ratio[0], rel=0.1)
    if scale[0] != scale[1]:  # drawn per image over the range, not once per batch
        assert area.min() < scale[0] * 1.15 and area.max() > scale[1] * 0.85


def test_nearest_interpolation_keeps_source_values_and_bilinear_blends_them(tiny_data, tmp_path):
    # Noise in multiples of 16: a blend of two values is mostly not one.
    noise = 16 * torch.randint(0, 16, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    blended = {}
    for mode in ("nearest", "bilinear"):
        dm = cifar_datamodule(tiny_data, tmp_path / mode, "data.augment=false", "data.random_resized_crop=true",
                              "data.crop_scale=[0.2,0.4]", f"data.interpolation={mode}")  # fmt: skip
        out = dm.batch_transform(augment=True).per_image(noise, torch.Generator().manual_seed(0))
        blended[mode] = float((out % 16 != 0).float().mean())
    assert blended["nearest"] == 0 and blended["bilinear"] > 0.5


def test_a_random_resized_crop_with_the_padded_crop_still_on_is_refused(tiny_data, tmp_path):
    with pytest.raises(Exception) as raised:
        cifar_datamodule(tiny_data, tmp_path, "data.random_resized_crop=true")  # CIFAR's augment=true, padding 4
    assert "Set data.crop_padding=0" in str(raised.value.__cause__ or raised.value)


# --- erasing and cutout ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(32, 32), (8, 32)])  # (8, 32): most tries do not fit, and are tried again
def test_random_erasing_of_a_batch_blanks_what_torchvisions_per_image_erasing_blanks_on_average(shape):
    n, generator = 4000, torch.Generator().manual_seed(0)
    ours = random_erasing(torch.zeros(n, 1, *shape), 0.5, torch.ones(1), generator)
    torch.manual_seed(0)
    theirs = torch.stack([v2.RandomErasing(p=0.5, value=1)(torch.zeros(1, *shape)) for _ in range(n)])
    ours_area, theirs_area = ours.mean((1, 2, 3)), theirs.mean((1, 2, 3))
    # About half the images erased, by 2-33% of their area: means within a few standard errors of torchvision's.
    assert float((ours_area > 0).float().mean()) == pytest.approx(float((theirs_area > 0).float().mean()), abs=0.04)
    assert float(ours_area.mean()) == pytest.approx(float(theirs_area.mean()), rel=0.06)
    erased = ours_area[ours_area > 0]
    assert erased.min() >= 0.015 and erased.max() <= 0.36  # round() of the sides can take the area past 2-33%
    # Each rectangle is one axis-aligned box (its rows x columns is its area), placed anywhere it fits: as
    # torchvision's, some touch each border of the image.
    rows, cols = ours.amax(3).sum((1, 2)), ours.amax(2).sum((1, 2))
    assert torch.equal(rows * cols, ours.sum((1, 2, 3)))
    for axis in (2, 3):
        touches = ours.amax(5 - axis)[:, 0]  # (n, length along axis): which rows (or columns) each box covers
        assert touches[:, 0].sum() > 20 and touches[:, -1].sum() > 20


def test_cutout_blanks_one_square_of_the_given_size_inside_every_image():
    out = cutout(torch.zeros(500, 3, 32, 32), 12, torch.tensor([1.0, 2.0, 3.0]), torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 1], 2 * out[:, 0]) and torch.equal(out[:, 2], 3 * out[:, 0])
    mask = out[:, 0]
    assert torch.equal(mask.sum((1, 2)), torch.full((500,), 144.0))
    rows, cols = mask.amax(2), mask.amax(1)  # (500, 32): which rows and columns the square covers
    assert torch.equal(rows.sum(1), torch.full((500,), 12.0)) and torch.equal(cols.sum(1), torch.full((500,), 12.0))
    tops = rows.argmax(1)
    assert tops.min() == 0 and tops.max() == 32 - 12  # every placement inside the image is drawn


@pytest.mark.parametrize("setting", ["data.erasing=1.0", "data.cutout_size=8"])
def test_the_tensor_loader_erases_with_the_mean_colour_which_normalizes_to_zero(tiny_data, tmp_path, setting):
    dm = cifar_datamodule(tiny_data, tmp_path, "data.augment=false", setting)
    x = dm.train_dataloader().transform(dm.splits["train"][0][:200], torch.Generator().manual_seed(0))
    blank = (x.abs() < 0.5 / 255 / min(dm.std)).all(1)  # (B, H, W): pixels at the mean colour, within rounding
    share = blank.flatten(1).float().mean(1)
    if setting == "data.cutout_size=8":
        assert (share >= 64 / 1024).all()  # the 8x8 square at least, in every image
    else:
        assert (share > 0).float().mean() > 0.9 and 0.12 < float(share[share > 0].mean()) < 0.22


@pytest.mark.parametrize("setting", ["data.erasing=1.0", "data.cutout_size=8"])
def test_the_torchvision_loader_erases_or_cuts_out_every_training_image_per_image(tiny_data, tmp_path, setting):
    dm = cifar_datamodule(tiny_data, tmp_path, "data.augment=false", "data.loader=torchvision", setting)
    transform = dm.image_transform(augment=True)
    out = torch.stack([transform(image) for image in dm.splits["train"][0][:200]])
    blank = (out == 0).all(1).flatten(1).float().mean(1)  # (B,): the share of each image set to 0, the mean colour
    if setting == "data.cutout_size=8":
        assert torch.equal(blank, torch.full((200,), 64 / 1024))
    else:  # torchvision's RandomErasing: 2-33% of the image where a rectangle fits (nearly always on 32x32)
        assert (blank > 0).float().mean() > 0.9 and blank.max() <= 0.36
        assert 0.12 < float(blank[blank > 0].mean()) < 0.22  # the mean of a uniform 2-33% area is 17.5%


# --- MixUp and CutMix ------------------------------------------------------------------------------------------------
def constant_batch(b: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """b images each filled with its own value 10 x (i + 1), labels 0..b-1."""
    values = 10.0 * torch.arange(1, b + 1)
    return values.view(b, 1, 1, 1).expand(b, 3, 32, 32).contiguous(), torch.arange(b)


def test_cutmix_targets_sum_to_one_and_give_each_label_its_share_of_the_pixels():
    images, labels = constant_batch()
    mixing = BatchMixing(0.0, 1.0, num_classes=10, seed=0)
    for before in range(20):
        mixed, targets = mixing(images, labels, before)
        assert targets.shape == (8, 10) and torch.allclose(targets.sum(1), torch.ones(8))
        for i in range(8):
            for j in range(8):  # the share of image i's pixels that came from image j is target i's weight on label j
                share = (mixed[i] == images[j, 0, 0, 0]).float().mean()
                assert float(share) == pytest.approx(float(targets[i, j]), abs=1e-6)


def test_mixup_targets_sum_to_one_and_weigh_each_label_by_its_images_weight_in_the_blend():
    images, labels = constant_batch()
    mixing = BatchMixing(0.2, 0.0, num_classes=10, seed=0)
    for before in range(20):
        mixed, targets = mixing(images, labels, before)
        assert torch.allclose(targets.sum(1), torch.ones(8))
        # Every image is constant, so a blend's value is the label weights times the images' values.
        values = images[:, 0, 0, 0]
        assert torch.allclose(mixed[:, 0, 0, 0], targets[:, :8] @ values, rtol=1e-5)
        assert torch.allclose(mixed, mixed[:, :1, :1, :1].expand_as(mixed))


def test_with_both_alphas_each_batch_is_mixed_one_way_about_half_the_time_each():
    images, labels = constant_batch()
    mixing = BatchMixing(0.2, 1.0, num_classes=10, seed=0)
    kinds = []
    for before in range(200):
        mixed, _ = mixing(images, labels, before)
        blended = not torch.isin(mixed, images[:, 0, 0, 0]).all()  # MixUp makes values no image had
        kinds.append(bool(blended))
    assert 70 < sum(kinds) < 130


def test_mixing_draws_the_same_for_the_same_batch_and_differently_on_another_rank():
    images, labels = constant_batch()
    mixing = BatchMixing(0.2, 1.0, num_classes=10, seed=3)
    first, again, other_rank = mixing(images, labels, 7), mixing(images, labels, 7), mixing(images, labels, 7, rank=1)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other_rank[1])


def test_training_accuracy_under_mixing_counts_each_images_dominant_label():
    sums = TrainingSums()
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    targets = torch.tensor([[0.7, 0.3, 0.0], [0.6, 0.4, 0.0], [0.0, 0.2, 0.8]])
    sums.update(torch.tensor(1.0), logits, targets)
    assert float(sums.compute()["acc"]) == pytest.approx(2 / 3)


# --- each DDP rank augments differently, every evaluation path not at all ---------------------------------------------
def test_ddp_ranks_draw_different_augmentations_of_the_same_images(tiny_data, tmp_path):
    batches = []
    for rank in (0, 1, 0):
        dm = cifar_datamodule(tiny_data, tmp_path, "data.policy=trivial_augment_wide", "data.erasing=0.5")
        images, labels = dm.splits["train"]
        dm.splits["train"] = (images[:1].expand(len(labels), -1, -1, -1).contiguous(), labels)  # one image, repeated
        dm.rank, dm.world_size = rank, 2
        batches.append(next(iter(dm.train_dataloader()))[0])
    assert torch.equal(batches[0], batches[2])  # rank 0 again: the same draws
    assert not torch.equal(batches[0], batches[1])
    assert dm.loader_seed(0) != dm.loader_seed(1)  # the torchvision loader's workers too


ALL_ON = [
    "data.policy=augmix",
    "data.erasing=1.0",
    "data.cutout_size=8",
    "data.mixup_alpha=0.2",
    "data.cutmix_alpha=1.0",
]


def test_validation_and_test_batches_are_only_normalized_with_every_augmentation_on(tiny_data, tmp_path):
    dm = cifar_datamodule(tiny_data, tmp_path, *ALL_ON)
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        images, labels = dm.splits[split]
        served = torch.cat([x for x, _ in loader])
        assert torch.allclose(served, normalized(images, dm.mean, dm.std), atol=1e-5)
    assert torch.allclose(
        dm.batch_transform(augment=False)(images), normalized(images, dm.mean, dm.std), atol=1e-5
    )  # what eval, predict and export apply


class RecordBatches(Callback):
    """Records the label tensors of the training and validation batches the model is given."""

    def __init__(self) -> None:
        self.train_labels: list[torch.Tensor] = []
        self.val_labels: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any) -> None:
        self.train_labels.append(batch[1])

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *a: Any) -> None:
        self.val_labels.append(batch[1])


def test_folder_finetune_runs_as_shipped_mixing_training_batches_only(tmp_path):
    folder = make_image_folder(tmp_path / "images", n_train=240, n_val=60, n_test=0)
    # Shortened, not changed: 2 epochs of 32x32 images; no download of ImageNet weights here (model.weights=null).
    cfg = compose_config(
        quick_run(
            folder,
            "experiment=folder_finetune",
            "trainer.max_epochs=2",
            "model.weights=null",
            "data.image_shape=[3,32,32]",
            data="folder",
        ),  # fmt: skip
        tmp_path / "run",
    )
    assert cfg.data.policy == "trivial_augment_wide" and cfg.data.mixup_alpha == 0.2 and cfg.data.cutmix_alpha == 1.0
    assert cfg.scheduler._target_.endswith("WarmupCosine") and "ema" in cfg.callbacks
    recorder = RecordBatches()
    metrics = train(cfg, extra_callbacks=[recorder])
    assert metrics["status"] == "finished" and metrics["test_acc"] > 0
    assert len(recorder.train_labels) == 2 * math.ceil(240 / 32)
    assert all(t.ndim == 2 and torch.allclose(t.sum(1), torch.ones(len(t))) for t in recorder.train_labels)
    shares = {round(float(t.amax(1).min()), 6) for t in recorder.train_labels}  # each batch's own mixing weights
    assert len(shares) > len(recorder.train_labels) // 2
    assert recorder.val_labels and all(t.ndim == 1 and t.dtype == torch.int64 for t in recorder.val_labels)


# --- weight decay apart for normalization layers and biases, for every optimizer --------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "muon", "sgd_norm_bias"])
def test_norm_and_bias_weight_decay_reach_those_parameters_under_every_optimizer(tiny_data, tmp_path, optimizer):
    apart = ["++optimizer.norm_weight_decay=0.0", "++optimizer.bias_weight_decay=0.125"]
    overrides = quick_run(tiny_data, f"optimizer={optimizer}", *apart, model="resnet8", data="cifar10")
    cfg = compose_config(overrides, tmp_path)
    classifier = build_classifier(cfg)

    def decay_by_parameter(settings: dict) -> dict[int, float]:
        optimizer = make_optimizer(settings, classifier.parameter_groups(), classifier.model)
        return {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}

    decay = decay_by_parameter(classifier.hparams.optimizer)
    plain = {k: v for k, v in classifier.hparams.optimizer.items() if not k.endswith("_weight_decay")}
    plain |= {k: v for k, v in classifier.hparams.optimizer.items() if k.startswith(("sgd_", "norm_bias_"))}
    own = decay_by_parameter(plain)  # the optimizer's own weight decay of each parameter, without the two settings
    model = classifier.model
    norm = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    biases = {id(m.bias) for m in model.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)} - norm
    assert norm and biases
    for p in model.parameters():
        if id(p) in norm:
            assert decay[id(p)] == 0.0
        elif id(p) in biases:
            assert decay[id(p)] == 0.125
        else:
            assert decay[id(p)] == own[id(p)]


# --- gradient clipping ---------------------------------------------------------------------------------------------
class RecordFirstStep(Callback):
    """The parameters before training and after the first optimizer step."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.before = torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not hasattr(self, "after"):
            self.after = torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()])


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_bounds_the_first_plain_sgd_step(tiny_data, tmp_path, algorithm):
    # Plain SGD at lr 1 (no momentum, decay or schedule): the first step is minus the clipped gradient itself.
    cfg = compose_config(quick_run(tiny_data, "trainer.gradient_clip_val=0.01",
                                   f"trainer.gradient_clip_algorithm={algorithm}", "optimizer.lr=1.0",
                                   "optimizer.momentum=0.0", "optimizer.nesterov=false", "optimizer.weight_decay=0.0",
                                   "scheduler=none", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                                   "test=false"), tmp_path)  # fmt: skip
    recorder = RecordFirstStep()
    train(cfg, extra_callbacks=[recorder])
    step = recorder.after - recorder.before
    if algorithm == "norm":
        assert float(step.norm()) == pytest.approx(0.01, rel=1e-3)
    else:
        assert float(step.abs().max()) == pytest.approx(0.01, rel=1e-4)
        assert (step.abs() <= 0.01 + 1e-6).all()


# --- warm-up then cosine ---------------------------------------------------------------------------------------------
def test_warmup_cosine_rises_linearly_then_falls_along_a_half_cosine():
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.5)
    total, start, end, warmup = 40, 0.01, 0.1, 8  # warmup_fraction 0.2 of 40 steps
    scheduler = WarmupCosine(optimizer, total, start_factor=start, warmup_fraction=0.2, end_factor=end)
    rates = []
    for _ in range(total + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.5 * (start + (1 - start) * t / warmup) for t in range(warmup)]
    expected += [0.5 * (end + (1 - end) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))) / 2)
                 for t in range(warmup, total + 1)]  # fmt: skip
    assert rates == pytest.approx(expected, abs=1e-12)


def test_a_warmup_past_the_whole_run_is_refused():
    with pytest.raises(UserError, match="warmup_fraction within"):
        WarmupCosine(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 10, warmup_fraction=1.0)


@pytest.mark.parametrize("scheduler", ["none", "cosine"])
def test_an_experiments_scheduler_settings_left_behind_by_another_scheduler_are_refused_before_data(
    tmp_path, scheduler
):
    cfg = compose_config(["experiment=folder_finetune", f"scheduler={scheduler}", "data.data_dir=/no/such/folder"],
                         tmp_path)  # fmt: skip
    with pytest.raises(UserError, match="~scheduler.start_factor ~scheduler.warmup_fraction") as raised:
        train(cfg)
    assert "which takes no scheduler.start_factor, scheduler.warmup_fraction" in str(raised.value)
    assert not list(tmp_path.iterdir())  # refused before the run wrote anything (or the missing folder was read)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml")))
def test_every_shipped_experiments_scheduler_takes_the_settings_it_is_given(tmp_path, experiment):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    check_scheduler(cfg)  # raises on a setting the scheduler does not take
