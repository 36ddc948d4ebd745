"""Muon for convolution filters and Nesterov SGD (or AdamW) for the other parameters, as one optimizer.

Muon (Keller Jordan, 2024) replaces a weight matrix's momentum update by its orthogonalization: the nearest matrix
whose singular values are all about 1, from a few Newton-Schulz iterations. airbench94_muon reaches airbench94's
94.01% CIFAR-10 accuracy in 200 steps instead of about 490 with it on the convolution filters and Nesterov SGD on
the biases and the head.

What torch.optim.Muon cannot do here, and so this class adds:
- 4-D filters. torch.optim.Muon takes 2-D parameters only; a filter bank (out, in, kh, kw) is orthogonalized here as
  its (out, in x kh x kw) matrix with torch's own Newton-Schulz iteration and learning-rate adjustment
  (torch.optim._muon's private functions; tests/test_muon.py checks them against a computation of its own, so a
  change in torch fails there, loudly).
- The other parameters in the same optimizer. Lightning's automatic optimization steps one optimizer; two would need
  manual optimization, and with it this project's gradient accumulation, clipping and precision plugins. The other
  groups are stepped by torch.optim.sgd.sgd or torch.optim.adamw.adamw, the functions torch.optim.SGD and
  torch.optim.AdamW themselves call.
- airbench94_muon's weight normalization (`normalize_filters`): before each step, each filter bank is rescaled to
  Frobenius norm sqrt(out), so the step length lr means the same throughout the run.
"""

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim._muon import EPS, _adjust_lr, _zeropower_via_newtonschulz
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

from cnnlab.errors import UserError
from cnnlab.training.param_groups import as_groups

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults (its DEFAULT_A, _B, _C)
RULES = ("muon", "sgd", "adamw")


def as_matrix(tensor: Tensor) -> Tensor:
    """A filter bank (out, in, kh, kw) as the (out, in x kh x kw) matrix Muon orthogonalizes; a matrix as itself."""
    return tensor.reshape(len(tensor), -1)


def orthogonalized(update: Tensor, ns_steps: int, eps: float = EPS) -> Tensor:
    """The Newton-Schulz orthogonalization of update's matrix, in update's shape and dtype."""
    matrix = _zeropower_via_newtonschulz(as_matrix(update), NS_COEFFICIENTS, ns_steps, eps)
    return matrix.reshape(update.shape).to(update.dtype)


class MuonSGD(Optimizer):
    """One optimizer whose groups follow one of three rules, by the group's `rule`: "muon", "sgd" or "adamw".

    A "muon" group: momentum buffer B <- momentum x B + (1 - momentum) x g (torch.optim.Muon's), the update
    g + momentum x (B - g) with nesterov, else B, orthogonalized as a matrix; then p <- p x (1 - lr x weight_decay)
    - lr' x update, where lr' is lr adjusted for the matrix's shape by adjust_lr_fn (torch.optim.Muon's; None:
    "original", sqrt(max(1, rows / columns))). With normalize_filters, p is first rescaled to norm sqrt(rows).
    A "sgd" group: torch.optim.SGD's step, with its lr, momentum, nesterov and (coupled) weight_decay.
    An "adamw" group: torch.optim.AdamW's step, with its lr, betas, eps and (decoupled) weight_decay.

    Use muon_sgd (below) to build it from a model's parameters; every group states all of its settings.
    """

    def __init__(self, params: Iterable[dict[str, Any]], foreach: bool | None = None) -> None:
        groups = list(params)
        for group in groups:
            if group.get("rule") not in RULES:
                raise ValueError(f"MuonSGD: each parameter group needs a rule of {RULES}, not {group.get('rule')!r}")
        # a "momentum" default: scheduler=onecycle cycles each group's momentum (its check asks the defaults)
        super().__init__(groups, {"foreach": foreach, "momentum": 0.0})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["rule"] == "muon":
                self._muon_step(group, params)
            elif group["rule"] == "adamw":
                self._adamw_step(group, params)
            else:
                self._sgd_step(group, params)
        return loss

    def _muon_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        lr, momentum = group["lr"], group["momentum"]
        for p in params:
            grad = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(grad, 1 - momentum)
            update = grad.lerp(buf, momentum) if group["nesterov"] else buf
            if group["normalize_filters"]:
                p.mul_(math.sqrt(len(p)) / p.norm())
            p.mul_(1 - lr * group["weight_decay"])
            step_lr = _adjust_lr(lr, group["adjust_lr_fn"], as_matrix(p).shape)
            p.add_(orthogonalized(update, group["ns_steps"]), alpha=-step_lr)

    def _sgd_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        sgd(
            params,
            [p.grad for p in params],
            buffers,
            foreach=group["foreach"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=0.0,
            nesterov=group["nesterov"],
            maximize=False,
        )
        if group["momentum"] != 0:
            for p, buf in zip(params, buffers, strict=True):
                self.state[p]["momentum_buffer"] = buf  # sgd() fills in the buffers it created

    def _adamw_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for p in params:
            state = self.state[p]
            if "step" not in state:  # as torch.optim.AdamW lays out its state
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            foreach=group["foreach"],
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def muon_sgd(
    params: Iterable[Any],
    lr: float,
    momentum: float = 0.95,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    ns_steps: int = 5,
    normalize_filters: bool = False,
    adjust_lr_fn: str | None = None,
    sgd_lr: float = 0.05,
    sgd_bias_lr: float | None = None,
    sgd_momentum: float = 0.9,
    sgd_nesterov: bool = True,
    sgd_weight_decay: float = 5e-4,
    sgd_bias_weight_decay: float | None = None,
    rest_rule: str = "sgd",
    adamw_betas: tuple[float, float] = (0.9, 0.999),
    adamw_eps: float = 1e-8,
    foreach: bool | None = None,
) -> MuonSGD:
    """MuonSGD over params (tensors, or groups with an `lr_scale`), routed by shape: every 4-D parameter (a
    convolution's filters) to Muon at lr; the 1-D ones (biases, normalization weights) to SGD at sgd_bias_lr with
    sgd_bias_weight_decay (None: sgd_lr and sgd_weight_decay); the rest (a linear head) to SGD at sgd_lr.

    rest_rule "adamw" steps the 1-D parameters and the head with AdamW instead (adamw_betas, adamw_eps, its decay
    decoupled), at the same sgd_* rates and weight decays; sgd_momentum and sgd_nesterov then do not apply.
    Each group's `lr_scale` (fine-tuning's backbone_lr_scale) multiplies all three rates; a group's `lr_scale` is
    also set to its rate over lr, so a one-cycle schedule (whose max_lr follows optimizer.lr) keeps the ratios.
    """
    if rest_rule not in ("sgd", "adamw"):
        raise UserError(
            f"optimizer.rest_rule={rest_rule!r} is not known: the parameters Muon does not take (biases, normalization "
            "weights, the head) follow sgd (Nesterov SGD) or adamw. Fix it in configs/optimizer/muon.yaml or on the "
            "command line."
        )
    if adjust_lr_fn not in (None, "original", "match_rms_adamw", "spectral_unclamped"):
        raise UserError(
            f"optimizer.adjust_lr_fn={adjust_lr_fn!r} is not one of torch.optim.Muon's: null (the same as "
            "'original'), 'original', 'match_rms_adamw' or 'spectral_unclamped'. Fix it in configs/optimizer/muon.yaml "
            "or on the command line."
        )
    if lr <= 0 or ns_steps < 1:
        raise UserError(
            f"optimizer=muon: lr={lr} and ns_steps={ns_steps} must be positive. Fix them in "
            "configs/optimizer/muon.yaml or on the command line."
        )
    bias_lr = sgd_lr if sgd_bias_lr is None else sgd_bias_lr
    bias_decay = sgd_weight_decay if sgd_bias_weight_decay is None else sgd_bias_weight_decay
    muon = {"rule": "muon", "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay}
    muon |= {"ns_steps": ns_steps, "normalize_filters": normalize_filters, "adjust_lr_fn": adjust_lr_fn}
    if rest_rule == "adamw":
        other = {"rule": "adamw", "betas": list(adamw_betas), "eps": adamw_eps}
    else:
        other = {"rule": "sgd", "momentum": sgd_momentum, "nesterov": sgd_nesterov}
    rules = [
        (lambda p: p.ndim == 4, {**muon, "lr": lr}),
        (lambda p: p.ndim == 1, {**other, "lr": bias_lr, "weight_decay": bias_decay}),
        (lambda p: p.ndim not in (1, 4), {**other, "lr": sgd_lr, "weight_decay": sgd_weight_decay}),
    ]
    groups = []
    for group in as_groups(params):
        scale = group.get("lr_scale", 1.0)
        tensors = list(group["params"])
        for picks, settings in rules:
            chosen = [p for p in tensors if picks(p)]
            if chosen:
                rate = settings["lr"] * scale
                # A group's own weight decay (norm_weight_decay / bias_weight_decay, param_groups.decay_groups) wins.
                decay = {"weight_decay": group["weight_decay"]} if "weight_decay" in group else {}
                groups.append({**settings, "params": chosen, "lr": rate, "lr_scale": rate / lr, **decay})
    return MuonSGD(groups, foreach=foreach)
