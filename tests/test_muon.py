"""optimizer=muon: Muon's orthogonalized updates on the convolution filters, Nesterov SGD on the rest, one optimizer;
and experiment=cifar10_muon, airbench94_muon's recipe, as shipped on real images."""

import copy
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from torch import nn

from cnnlab.commands.train import train
from cnnlab.errors import UserError
from cnnlab.models import AirbenchNet
from cnnlab.training.classifier import build_model
from cnnlab.training.muon import muon_sgd, orthogonalized
from cnnlab.training.param_groups import make_optimizer
from tests.conftest import compose_config, quick_run, real_subset

COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic Newton-Schulz coefficients


def newton_schulz(matrix: torch.Tensor, steps: int) -> torch.Tensor:
    """The quintic Newton-Schulz iteration X <- aX + (bA + cA^2)X, A = XX^T, from X = M / |M|, in float64."""
    a, b, c = COEFFICIENTS
    x = matrix.double() / matrix.double().norm()
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    return float((value.double() - expected.double()).norm() / expected.double().norm())


@pytest.mark.parametrize("shape", [(32, 8, 3, 3), (8, 16, 3, 3), (6, 1, 5, 5)])
def test_a_filter_bank_is_orthogonalized_as_its_out_by_in_kh_kw_matrix(shape):
    """torch's bfloat16 Newton-Schulz of the (out, in x kh x kw) matrix, against the iteration in float64 here, and
    the singular values near 1 that make it an orthogonalization (within airbench's 0.5-1.5 after 5 steps)."""
    filters = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    result = orthogonalized(filters, ns_steps=5)
    assert result.shape == filters.shape and result.dtype == filters.dtype
    matrix = filters.reshape(shape[0], -1)
    assert relative_error(result.reshape(shape[0], -1), newton_schulz(matrix, 5)) < 0.02
    singular = torch.linalg.svdvals(result.reshape(shape[0], -1).double())
    assert len(singular) == min(matrix.shape) and singular.min() > 0.5 and singular.max() < 1.5
    u, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    polar = (u @ vh).reshape(shape)  # the exact orthogonalization, UV^T
    cosine = float((result.double() * polar).sum() / (result.double().norm() * polar.norm()))
    assert cosine > 0.95
    with pytest.raises(AssertionError):  # another matrix of the same numbers is orthogonalized otherwise: checked
        assert relative_error(result.reshape(shape[0], -1), newton_schulz(filters.reshape(-1, shape[-1]).T.reshape(
            shape[0], -1), 5)) < 0.02  # fmt: skip


def conv_and_head() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 16, 3), nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(16 * 36, 3))


def test_a_muon_step_is_nesterov_momentum_orthogonalized_after_the_filters_are_normalized():
    """Two steps of the Muon rule on a conv layer, against the update written out here: momentum buffer
    B = m B + (1 - m) g, update g + m (B - g), filters rescaled to norm sqrt(out), decoupled decay, then lr x the
    orthogonalized update of the (16, 36) matrix (rate unadjusted: 16 rows <= 36 columns)."""
    model = conv_and_head()
    lr, m, decay = 0.2, 0.6, 0.1
    optimizer = muon_sgd(list(model.parameters()), lr=lr, momentum=m, weight_decay=decay, ns_steps=5,
                         normalize_filters=True, sgd_lr=0.0)  # fmt: skip
    weight = model[0].weight
    expected, buf = weight.detach().double().clone(), torch.zeros_like(weight, dtype=torch.float64)
    for seed in (1, 2):
        grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        weight.grad = grad.clone()
        optimizer.step()
        buf = m * buf + (1 - m) * grad.double()
        update = grad.double() + m * (buf - grad.double())
        expected = expected * math.sqrt(16) / expected.norm() * (1 - lr * decay)
        expected = expected - lr * newton_schulz(update.reshape(16, -1), 5).reshape(weight.shape)
        assert relative_error(weight.detach(), expected) < 1e-2  # bfloat16 iterations in torch
    # the biases and the head at rate 0: their SGD rule leaves them as they were
    assert torch.equal(model[3].weight, conv_and_head()[3].weight)


def assert_same_steps_off_the_filters(model, twin, optimizer, reference) -> None:
    """Three steps of optimizer on model and reference on its twin, from the same random gradients: every parameter
    but the 4-D filters ends bit-identical."""
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if p.ndim != 4:
            assert torch.equal(p, q), name


def test_the_sgd_rule_steps_the_other_parameters_as_torch_sgd_does():
    """The 1-D parameters and the head follow torch.optim.SGD (Nesterov, coupled weight decay) bit for bit, each
    group at its own rate and decay."""
    model = conv_and_head()
    twin = copy.deepcopy(model)
    optimizer = muon_sgd(list(model.parameters()), lr=0.02, sgd_lr=0.1, sgd_bias_lr=0.3, sgd_momentum=0.85,
                         sgd_weight_decay=1e-3, sgd_bias_weight_decay=0.0)  # fmt: skip
    biases = [p for p in twin.parameters() if p.ndim == 1]
    reference = torch.optim.SGD([{"params": biases, "lr": 0.3, "weight_decay": 0.0},
                                 {"params": [twin[3].weight], "lr": 0.1, "weight_decay": 1e-3}],
                                momentum=0.85, nesterov=True)  # fmt: skip
    assert_same_steps_off_the_filters(model, twin, optimizer, reference)
    assert not torch.equal(model[0].weight, twin[0].weight)  # the filters followed Muon, not SGD


def test_the_adamw_rest_rule_steps_the_other_parameters_as_torch_adamw_does():
    """rest_rule=adamw: the 1-D parameters and the head follow torch.optim.AdamW (decoupled weight decay) bit for
    bit, each group at its own rate and decay, while the filters still follow Muon."""
    model = conv_and_head()
    twin = copy.deepcopy(model)
    rates = {"sgd_lr": 1e-3, "sgd_bias_lr": 3e-3, "sgd_weight_decay": 0.05, "sgd_bias_weight_decay": 0.0}
    adam = {"rest_rule": "adamw", "adamw_betas": (0.8, 0.95), "adamw_eps": 1e-6}
    optimizer = muon_sgd(list(model.parameters()), lr=0.02, **rates, **adam)
    biases = [p for p in twin.parameters() if p.ndim == 1]
    reference = torch.optim.AdamW([{"params": biases, "lr": 3e-3, "weight_decay": 0.0},
                                   {"params": [twin[3].weight], "lr": 1e-3, "weight_decay": 0.05}],
                                  betas=(0.8, 0.95), eps=1e-6, foreach=False)  # fmt: skip
    assert_same_steps_off_the_filters(model, twin, optimizer, reference)
    assert not torch.equal(model[0].weight, twin[0].weight)  # the filters followed Muon, not AdamW
    assert {len(optimizer.state[p]) for p in model.parameters() if p.ndim != 4} == {3}  # step, exp_avg, exp_avg_sq


def test_an_unknown_rest_rule_is_refused_in_one_paragraph():
    with pytest.raises(UserError, match="follow sgd .Nesterov SGD. or adamw"):
        muon_sgd(list(conv_and_head().parameters()), lr=0.02, rest_rule="adam")


@pytest.mark.parametrize(
    ("model", "extra"),
    [("lenet5", []), ("resnet8", []), ("resnet9", []), ("resnet18", []), ("resnet20", []), ("airbench", []),
     ("torchvision", ["model.arch=resnet18", "model.weights=null"])],
)  # fmt: skip
def test_optimizer_muon_routes_every_parameter_by_shape_for_every_model(tiny_data, tmp_path, model, extra):
    """configs/optimizer/muon.yaml with sgd_bias_lr turned: every trainable 4-D parameter in a Muon group at lr 0.02,
    every 1-D one in an SGD group at 0.5 with the bias decay, the rest (heads) at sgd_lr 0.05; each exactly once."""
    cfg = compose_config(quick_run(tiny_data, "optimizer=muon", "optimizer.sgd_bias_lr=0.5",
                                   "optimizer.sgd_bias_weight_decay=0", *extra, model=model, data="cifar10"),
                         tmp_path)  # fmt: skip
    network = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = make_optimizer(OmegaConf.to_container(cfg.optimizer, resolve=True), trainable, network)
    placed = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(placed) == len(trainable) and {id(p) for p in placed} == {id(p) for p in trainable}
    expected = {4: ("muon", 0.02, 0.0), 1: ("sgd", 0.5, 0.0)}
    for group in optimizer.param_groups:
        for p in group["params"]:
            rule, lr, decay = expected.get(p.ndim, ("sgd", 0.05, 5e-4))
            assert (group["rule"], group["lr"], group["weight_decay"]) == (rule, lr, decay), p.shape
            assert group["lr_scale"] == pytest.approx(lr / 0.02)
    assert {group["rule"] for group in optimizer.param_groups} == {"muon", "sgd"}


def test_backbone_lr_scale_scales_both_rules_of_the_carried_layers():
    model = conv_and_head()
    backbone, head = list(model[:2].parameters()), list(model[3].parameters())
    groups = [{"params": backbone, "lr": 0.002, "lr_scale": 0.1}, {"params": head, "lr_scale": 1.0}]
    optimizer = muon_sgd(groups, lr=0.02, sgd_lr=0.05, sgd_bias_lr=0.3)
    rates = [(group["rule"], len(group["params"]), group["lr"]) for group in optimizer.param_groups]
    assert rates == [("muon", 1, pytest.approx(0.002)), ("sgd", 3, pytest.approx(0.03)), ("sgd", 1, 0.3),
                     ("sgd", 1, 0.05)]  # fmt: skip


def test_an_unknown_rate_adjustment_is_refused_in_one_paragraph():
    with pytest.raises(UserError, match="adjust_lr_fn='rms'.*match_rms_adamw"):
        muon_sgd(list(conv_and_head().parameters()), lr=0.02, adjust_lr_fn="rms")


def test_airbench_head_std_rescales_the_head_to_that_standard_deviation():
    torch.manual_seed(0)
    assert AirbenchNet(head_std=1.0).fc.weight.std().item() == pytest.approx(1.0, abs=1e-5)
    assert AirbenchNet(head_std=2.5).fc.weight.std().item() == pytest.approx(2.5, abs=1e-5)
    assert AirbenchNet().fc.weight.std().item() < 0.1  # torch's initialization, 1/sqrt(256) at most


class BiasSteps(Callback):
    """The whitening bias and its SGD momentum buffer after each optimizer step, and the group's rate of that step."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, torch.Tensor, torch.Tensor | None, float]] = []
        self.before: torch.Tensor | None = None
        self.rate = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.before = pl_module.model.whiten.bias.detach().clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        bias = pl_module.model.whiten.bias
        self.rate = next(g["lr"] for g in optimizer.param_groups if any(p is bias for p in g["params"]))

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        bias = pl_module.model.whiten.bias
        buffer = trainer.optimizers[0].state[bias].get("momentum_buffer")
        after = bias.detach().clone()
        self.rows.append((trainer.global_step, after - self.before, None if buffer is None else buffer.clone(),
                          self.rate))  # fmt: skip
        self.before = after


@pytest.mark.parametrize("bias_rate", ["schedule", "to_zero"])
def test_the_whitening_bias_moves_at_its_own_falling_rate_or_its_groups(tiny_data, tmp_path, bias_rate):
    """Each step moves the bias by -rate x its momentum buffer (plain momentum, so the buffer is the update): rate
    the group's under bias_rate=schedule; under to_zero the base rate x (1 - t / bias steps), whatever the warm-up
    schedule does to the group; nothing after bias_epochs (13 steps an epoch, 3 epochs, bias_epochs 2)."""
    overrides = quick_run(
        tiny_data, "optimizer=muon", "optimizer.sgd_nesterov=false", "optimizer.sgd_bias_lr=0.4",
        "scheduler=linear_warmup_decay", "callbacks/whitening=default", "callbacks.whitening.bias_epochs=2",
        f"callbacks.whitening.bias_rate={bias_rate}", "trainer.max_epochs=3", "test=false", model="airbench",
        data="cifar10",
    )  # fmt: skip
    probe = BiasSteps()
    train(compose_config(overrides, tmp_path), extra_callbacks=[probe])
    assert [row[0] for row in probe.rows] == list(range(1, 3 * 13 + 1))
    for step, moved, buffer, group_rate in probe.rows:
        if step > 2 * 13:
            assert torch.equal(moved, torch.zeros_like(moved)), step
            continue
        rate = group_rate if bias_rate == "schedule" else 0.4 * (1 - (step - 1) / (2 * 13))
        assert torch.allclose(moved, -rate * buffer, rtol=1e-4, atol=1e-7), step
    rates = [row[3] for row in probe.rows[:26]]
    assert rates[0] < rates[10]  # the group warms up meanwhile: the two rates differ


def test_an_unknown_whitening_bias_rate_is_refused_in_one_paragraph():
    from cnnlab.training.whitening import PatchWhitening

    with pytest.raises(UserError, match="bias_rate='linear'.*to_zero"):
        PatchWhitening(bias_rate="linear")


class GroupRates(Callback):
    def __init__(self) -> None:
        self.first: list[tuple[str, int, float]] | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.first is None:
            dims = [{p.ndim for p in g["params"]} for g in optimizer.param_groups]
            self.first = [(g["rule"], d.pop(), g["lr"]) for g, d in zip(optimizer.param_groups, dims, strict=True)]


def test_the_muon_recipe_trains_as_shipped_on_real_images(real_data, tmp_path):
    """experiment=cifar10_muon as shipped on 4,000 real training images for 4 epochs (2 steps of 2000 each): Muon at
    0.24 on the filters, SGD at 106 (biases) and 1340 (the head) at the first step, all falling linearly to 0 over
    the run; the whitening bias fixed after epoch 3; last.ckpt only; the test stage on the final weights."""
    data_dir = real_subset(real_data, tmp_path / "data", n_train=4000, n_test=200)
    cfg = compose_config(["experiment=cifar10_muon", "trainer=cpu", f"data.data_dir={data_dir}",
                          "trainer.max_epochs=4"], tmp_path / "run")  # fmt: skip
    rates, probe = GroupRates(), BiasSteps()
    metrics = train(cfg, extra_callbacks=[rates, probe])
    assert metrics["status"] == "finished" and metrics["global_step"] == 8
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["last.ckpt"]
    assert rates.first == [("muon", 4, 0.24), ("sgd", 1, 106.0), ("sgd", 2, 1340.0)]
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    groups = last["optimizer_states"][0]["param_groups"]
    # one linear decay for all three (a run this short is stretched over 16 steps: half-way after 8)
    assert [g["lr"] for g in groups] == pytest.approx([0.12, 53.0, 670.0])
    assert [(g["momentum"], g["nesterov"]) for g in groups] == [(0.6, True), (0.85, True), (0.85, True)]
    assert groups[0]["ns_steps"] == 3 and groups[0]["normalize_filters"] is True
    moved = [bool(row[1].abs().sum() > 0) for row in probe.rows]
    assert moved == [True] * 6 + [False] * 2  # 3 epochs of 2 steps: the sixth still at 106 x (1 - 5 / 6)
    assert metrics["test_acc"] > 0.2  # 10 classes: eight steps already learn something
