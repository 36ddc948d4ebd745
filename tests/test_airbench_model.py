"""model=airbench: its patch whitening, the network, the normalization-bias groups, the linear schedule, and runs."""

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch import nn
from torch.nn import functional as F

from cnnlab.commands.evaluate import evaluate
from cnnlab.commands.train import build_classifier, train
from cnnlab.models import AirbenchNet
from cnnlab.tools.inspect_model import layer_table
from cnnlab.training.classifier import build_model, replanned_scheduler
from cnnlab.training.schedules import LinearWarmupDecay
from tests.conftest import DATASETS, DDP_ON_CPU, compose_config, make_cifar, quick_run
from tests.launch import run_script

BN_BIASES = [f"layer{i}.bn{j}.bias" for i in (1, 2, 3) for j in (1, 2)]


def recipe(data_dir, *extra: str) -> list[str]:
    """model=airbench with its whitening callback, grouped SGD and linear schedule, narrow enough for a CPU test."""
    parts = ["callbacks/whitening=default", "optimizer=sgd_norm_bias", "scheduler=linear_warmup_decay"]
    small = ["model.widths=[8,16,16]", "optimizer.lr=0.05", "trainer.limit_train_batches=4"]
    return quick_run(data_dir, *parts, *small, *extra, model="airbench", data="cifar10")


def correlated_images(n: int = 64) -> torch.Tensor:
    """Images whose neighbouring pixels and channels are strongly correlated, as natural images' are."""
    g = torch.Generator().manual_seed(0)
    x = F.avg_pool2d(torch.randn(n, 3, 34, 34, generator=g), 3, stride=1)  # (n, 3, 32, 32), smooth
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.6, 0.5], [0.0, 0.0, 0.4]])
    return torch.einsum("dc,nchw->ndhw", mix, x)


def patch_second_moment(features: torch.Tensor) -> torch.Tensor:
    flat = features.transpose(0, 1).reshape(len(features[0]), -1)  # (N, D, H, W) -> (D, N*H*W)
    return flat @ flat.T / flat.shape[1]


def eigen_whitening(images: torch.Tensor, eps: float, k: int = 2) -> torch.Tensor:
    """The whitening filters airbench94 sets, computed here from their definition and not by init_whitening: the
    eigenvectors of the k x k patches' covariance about zero (the images are normalized), largest eigenvalue first,
    each divided by sqrt(eigenvalue + eps), as (C*k*k, C, k, k) filters (a patch flattened channel, row, column)."""
    n, c, h, w = images.shape
    windows = images.double().unfold(2, k, 1).unfold(3, k, 1)  # (n, C, H, W) -> (n, C, H-k+1, W-k+1, k, k)
    patches = windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)  # one patch per row, channel-major
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    order = eigenvalues.argsort(descending=True)
    filters = eigenvectors[:, order].T / (eigenvalues[order] + eps).sqrt()[:, None]  # row i: i-th direction, scaled
    return filters.reshape(c * k * k, c, k, k)


def assert_filters_match_up_to_sign(weight: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """weight holds expected's filters (each up to its sign: an eigenvector's is arbitrary), then their negatives."""
    positive, negative = weight.double().chunk(2)
    assert torch.equal(negative, -positive)
    signs = (positive * expected).flatten(1).sum(1).sign().view(-1, 1, 1, 1)
    error = (positive - signs * expected).flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1)
    assert error.max() < rtol, error


# --- the network ----------------------------------------------------------------------------------------------------
def test_whitening_layer_outputs_are_uncorrelated_with_unit_variance_on_the_training_patches():
    images = correlated_images()
    model = AirbenchNet()
    model.init_whitening(images, eps=1e-8)
    patches = F.unfold(images, 2).transpose(1, 2).reshape(-1, 12, 1, 1)  # every 2x2 patch as a 12-vector
    assert (patch_second_moment(patches) - torch.eye(12)).abs().max() > 0.5  # far from white before
    positive, negative = model.whiten.weight.chunk(2)
    white = patch_second_moment(F.conv2d(images, positive))
    assert torch.allclose(white, torch.eye(12), atol=1e-3), white
    assert torch.equal(negative, -positive)
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad


def test_whitening_filters_are_the_patch_eigenvectors_scaled_by_one_over_root_eigenvalue_plus_eps():
    images = correlated_images()
    eps = 0.1  # far above the smallest eigenvalues (about 1e-3): sqrt(eigenvalue + eps) is not sqrt(eigenvalue) + eps
    model = AirbenchNet()
    model.init_whitening(images, eps=eps)
    assert_filters_match_up_to_sign(model.whiten.weight, eigen_whitening(images, eps), rtol=1e-5)


def test_airbench_convolutions_start_passing_their_input_channels_through():
    """airbench94's Dirac start: the first in_channels filters of every 3x3 convolution copy their input channel."""
    model = AirbenchNet()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "whiten"}
    assert len(convs) == 6
    for name, conv in convs.items():
        x = torch.randn(2, conv.in_channels, 6, 6)
        with torch.no_grad():
            y = conv(x)  # padding 1: the same size
        assert torch.allclose(y[:, : conv.in_channels], x, atol=1e-6), name
        if conv.out_channels > conv.in_channels:  # the other filters keep torch's random start
            assert y[:, conv.in_channels :].abs().mean() > 0.05, name


def test_airbench_classifies_a_batch_with_torchvision_style_parameter_names():
    model = AirbenchNet(in_channels=3, num_classes=7, widths=[8, 16, 32])
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 7)
    assert model.whiten.out_channels == 2 * 3 * 2 * 2  # eigenvector filters and their negatives
    per_block = ("conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight", "bn2.bias")
    blocks = [f"layer{i}.{name}" for i in (1, 2, 3) for name in per_block]
    assert [name for name, _ in model.named_parameters()] == ["whiten.weight", "whiten.bias", *blocks, "fc.weight"]
    assert AirbenchNet(in_channels=1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # MNIST-sized inputs too


@pytest.mark.parametrize("data", DATASETS)
def test_inspector_shows_the_airbench_layer_table_with_its_macs(data, tmp_path):
    cfg = compose_config(["model=airbench", f"data={data}"], tmp_path)
    rows = layer_table(instantiate(cfg.model), tuple(cfg.data.image_shape))
    assert all(row.agrees for row in rows), [r.name for r in rows if not r.agrees]
    if data == "cifar10":
        assert sum(r.macs for r in rows) == 118_147_360  # the figure configs/model/airbench.yaml states
        assert sum(r.params for r in rows) == 1_972_792


@pytest.mark.parametrize("trainable", [False, True])
def test_batchnorm_weights_stay_at_one_unless_configured_trainable(tmp_path, trainable):
    cfg = compose_config(["model=airbench", "data=cifar10", f"model.bn_weight_trainable={trainable}"], tmp_path)
    model = build_model(dict(cfg.model))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6
    assert all(m.weight.requires_grad is trainable and m.bias.requires_grad for m in norms)
    assert all(m.momentum == 0.4 and m.eps == 1e-12 for m in norms)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward()
    optimizer.step()
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) is not trainable for m in norms)


# --- optimizer groups and schedule ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["linear_warmup_decay", "onecycle"])
def test_normalization_biases_get_their_configured_rate_and_weight_decay(tiny_data, tmp_path, scheduler):
    overrides = quick_run(tiny_data, "optimizer=sgd_norm_bias", f"scheduler={scheduler}", model="airbench")
    cfg = compose_config([*overrides, "optimizer.lr=0.5", "optimizer.weight_decay=0.01"], tmp_path)
    classifier = build_classifier(cfg)
    classifier.trainer = L.Trainer(max_steps=10, logger=False)  # the schedule's length comes from the trainer
    optimizer = classifier.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in classifier.model.named_parameters()}
    rest, biases = optimizer.param_groups
    assert sorted(names[id(p)] for p in biases["params"]) == sorted(BN_BIASES)
    assert "whiten.bias" in [names[id(p)] for p in rest["params"]]  # the whitening bias is no norm bias
    peak = "initial_lr" if scheduler == "linear_warmup_decay" else "max_lr"  # one-cycle sets rates from its max_lr
    assert (rest[peak], biases[peak]) == pytest.approx((0.5, 0.5 * 64))
    assert (rest["weight_decay"], biases["weight_decay"]) == pytest.approx((0.01, 0.01 / 64))


@pytest.mark.parametrize(("knob", "nesterov"), [(None, True), ("optimizer.nesterov=false", False)])
def test_norm_bias_sgd_builds_nesterov_sgd_with_the_momentum_rates_and_decays_its_config_states(
    tiny_data, tmp_path, knob, nesterov
):
    """configs/optimizer/sgd_norm_bias.yaml as shipped: airbench94's Nesterov SGD at momentum 0.85, lr 1.5 and weight
    decay 1.3304e-3, BatchNorm biases at 64 x the rate and 1/64 x the decay; a turned knob reaches torch's SGD."""
    extra = ["scheduler=none", *([knob] if knob else [])]  # no schedule: the groups' rates are the optimizer's own
    cfg = compose_config(quick_run(tiny_data, "optimizer=sgd_norm_bias", *extra, model="airbench"), tmp_path)
    classifier = build_classifier(cfg)
    classifier.trainer = L.Trainer(max_steps=10, logger=False)
    optimizer = classifier.configure_optimizers()["optimizer"]
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.defaults["nesterov"] is nesterov and optimizer.defaults["momentum"] == 0.85
    rest, biases = optimizer.param_groups
    assert [g["nesterov"] for g in (rest, biases)] == [nesterov, nesterov]
    assert [g["momentum"] for g in (rest, biases)] == [0.85, 0.85]
    assert (rest["lr"], biases["lr"]) == pytest.approx((1.5, 1.5 * 64))
    assert (rest["weight_decay"], biases["weight_decay"]) == pytest.approx((1.3304e-3, 1.3304e-3 / 64))
    assert len(biases["params"]) == len(BN_BIASES)


def rates(total_steps: int, steps: int, **factors) -> list[float]:
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=2.0)
    scheduler = LinearWarmupDecay(optimizer, total_steps, **factors)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen + [optimizer.param_groups[0]["lr"]]


def test_linear_warmup_decay_starts_peaks_and_ends_at_its_configured_rates():
    lr = rates(100, 100, start_factor=0.2, peak_fraction=0.23, end_factor=0.07)
    assert lr[0] == pytest.approx(2.0 * 0.2)
    assert lr[10] == pytest.approx(2.0 * (0.2 + 0.8 * 10 / 23))
    assert max(lr) == pytest.approx(2.0) and lr.index(max(lr)) == 23  # int(0.23 * 100)
    assert lr[100] == pytest.approx(2.0 * 0.07)
    assert lr[60] == pytest.approx(2.0 * (1 - 0.93 * 37 / 77))


def test_linear_warmup_decay_resumes_from_its_saved_state_and_replans_over_a_longer_run(tmp_path):
    whole = rates(50, 50)
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    scheduler = LinearWarmupDecay(optimizer, 50)
    for _ in range(20):
        optimizer.step()
        scheduler.step()
    torch.save({"scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "s.pt")
    saved = torch.load(tmp_path / "s.pt", weights_only=True)  # plain numbers only, as a checkpoint needs
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    restored = LinearWarmupDecay(optimizer, 50)  # built first, then both states loaded, as Lightning resumes
    optimizer.load_state_dict(saved["optimizer"])
    restored.load_state_dict(saved["scheduler"])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(whole[20])
    optimizer.step()
    restored.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(whole[21])
    config = {"_target_": "cnnlab.training.schedules.LinearWarmupDecay", "_partial_": True}
    longer = replanned_scheduler(config, optimizer, total_steps=80, done_steps=20)
    assert longer.total_steps == 80
    assert optimizer.param_groups[0]["lr"] == pytest.approx(rates(80, 20)[20])


# --- runs -----------------------------------------------------------------------------------------------------------
class WhiteningRecord(L.Callback):
    """What the whitening layer's bias is at each epoch's end, and whether it changed in each epoch."""

    def __init__(self) -> None:
        self.changed: list[bool] = []
        self.bias_at_start: torch.Tensor | None = None
        self.bias_at_end: list[torch.Tensor] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.bias_at_start = pl_module.model.whiten.bias.detach().clone()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.bias_at_end.append(pl_module.model.whiten.bias.detach().clone())
        self.changed.append(not torch.equal(self.bias_at_start, self.bias_at_end[-1]))


RUN_EPS = 0.05  # not the shipped 5e-4: a run that ignored callbacks.whitening.eps would show


@pytest.fixture(scope="module")
def airbench_run(tiny_data, tmp_path_factory):
    """Two short epochs of the recipe with the whitening bias trained in the first only, and eps at RUN_EPS."""
    run_dir = tmp_path_factory.mktemp("airbench")
    overrides = recipe(tiny_data, "trainer.max_epochs=2", "callbacks.whitening.bias_epochs=1")
    whitening = ["callbacks.whitening.num_images=50", f"callbacks.whitening.eps={RUN_EPS}"]
    record = WhiteningRecord()
    metrics = train(compose_config([*overrides, *whitening], run_dir), [record])
    return run_dir, metrics, record


def checkpoint_state(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_a_short_airbench_run_trains_tests_and_eval_loads_its_checkpoint(airbench_run, tmp_path):
    run_dir, metrics, _ = airbench_run
    assert metrics["status"] == "finished" and metrics["global_step"] == 8
    scored = evaluate(compose_config([f"ckpt_path={run_dir}/checkpoints/best.ckpt"], tmp_path, config_name="eval"))
    assert abs(scored["test_acc"] - metrics["test_acc"]) <= 1e-6


def test_whitening_filters_decorrelate_the_first_training_patches_at_the_configured_eps(
    airbench_run, tiny_data, tmp_path
):
    run_dir, _, _ = airbench_run
    cfg = compose_config(recipe(tiny_data), tmp_path)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    images = datamodule.splits["train"][0][:50].double()  # the callback's num_images=50, as uint8 pixels
    mean, std = (torch.tensor(cfg.data[key], dtype=torch.float64).view(1, 3, 1, 1) for key in ("mean", "std"))
    normalized = (images / 255 - mean) / std
    stored = checkpoint_state(run_dir / "checkpoints" / "last.ckpt")["model.whiten.weight"]
    assert_filters_match_up_to_sign(stored, eigen_whitening(normalized, RUN_EPS), rtol=1e-4)
    # the shipped eps gives other filters: the configured one was used
    default = eigen_whitening(normalized, cfg.callbacks.whitening.eps)
    assert cfg.callbacks.whitening.eps != RUN_EPS
    assert not torch.allclose(stored.double().chunk(2)[0].abs(), default.abs(), rtol=1e-2)


def test_whitening_bias_trains_for_bias_epochs_only(airbench_run):
    _, _, record = airbench_run
    assert record.changed == [True, False]
    first, second = record.bias_at_end
    assert first.abs().sum() > 0  # it trained from zero in epoch 0
    assert torch.equal(first, second)  # and stayed in epoch 1


def test_a_resumed_run_keeps_its_checkpoint_whitening_and_fixed_bias(airbench_run, tiny_data, tmp_path):
    run_dir, _, _ = airbench_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["state_dict"]["model.whiten.weight"] *= 2  # unlike anything the images give: recomputing would show
    torch.save(ckpt, tmp_path / "edited.ckpt")
    overrides = recipe(tiny_data, "trainer.max_epochs=3", "callbacks.whitening.bias_epochs=1")
    record = WhiteningRecord()
    train(compose_config([*overrides, f"ckpt_path={tmp_path / 'edited.ckpt'}"], tmp_path / "run"), [record])
    resumed = checkpoint_state(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert torch.equal(resumed["model.whiten.weight"], ckpt["state_dict"]["model.whiten.weight"])
    assert torch.equal(resumed["model.whiten.bias"], ckpt["state_dict"]["model.whiten.bias"])
    assert record.changed == [False]


@pytest.fixture(scope="module")
def record_data(tmp_path_factory):
    """80 training images: 5 steps an epoch at a global batch of 16."""
    return make_cifar(tmp_path_factory.mktemp("record_data"), n_train=80, n_test=20)


def record_run(data_dir, probe, *extra: str, trainer: str | None = "cpu") -> list[str]:
    """experiment=cifar10_record as shipped (bias_epochs 3, Nesterov momentum, weight decay, Lookahead) for 4 epochs
    of 5 steps, one epoch past bias_epochs, with tests.ddp_helpers.ParameterProbe saving the whitening bias to probe.

    5 steps an epoch put one of Lookahead's pull-backs (every 5 steps) at the end of each epoch, so the bias's slow
    average equals it when it stops training. At any other length the next pull-back moves the fixed bias once, to
    that average, as airbench94's Lookahead does; from then on both stay fixed.
    """
    probed = ["+callbacks.probe._target_=tests.ddp_helpers.ParameterProbe", f"+callbacks.probe.output={probe}",
              "+callbacks.probe.name=model.whiten.bias"]  # fmt: skip
    shorter = ["data.val_size=0", "trainer.max_epochs=4", *probed, *extra]
    return quick_run(data_dir, "experiment=cifar10_record", *shorter, data="cifar10", trainer=trainer)


def assert_bias_trained_for_bias_epochs_only(record: dict, last_ckpt) -> None:
    """The bias changed in each of epochs 0-2 and is bit-identical from the end of epoch 2 on, in last.ckpt too."""
    assert record["steps"] == [5, 10, 15, 20]  # see record_run
    ends = record["ends"]
    assert [not torch.equal(a, b) for a, b in zip([record["start"], *ends], ends)] == [True, True, True, False]
    assert torch.equal(checkpoint_state(last_ckpt)["model.whiten.bias"], ends[2])


def test_the_record_recipe_keeps_the_whitening_bias_fixed_after_bias_epochs(record_data, tmp_path):
    overrides = record_run(record_data, tmp_path / "probe", "data.batch_size=16")
    train(compose_config(overrides, tmp_path / "run"))
    record = torch.load(tmp_path / "probe" / "rank0.pt", weights_only=True)
    assert_bias_trained_for_bias_epochs_only(record, tmp_path / "run" / "checkpoints" / "last.ckpt")


def test_the_record_recipe_trains_under_ddp_past_bias_epochs_with_the_bias_fixed(record_data, tmp_path):
    # The bias stays a parameter DDP reduces (PatchWhitening drops its gradient after the reduction instead of
    # turning requires_grad off, which stopped DDP at epoch 3: "parameters that were not used in producing the loss").
    overrides = record_run(record_data, tmp_path / "probe", *DDP_ON_CPU, "data.batch_size=8", trainer=None)
    result = run_script("train", *overrides, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / "probe" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_bias_trained_for_bias_epochs_only(ranks[0], tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert torch.equal(ranks[0]["ends"][-1], ranks[1]["ends"][-1])
