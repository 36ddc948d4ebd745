"""Optimizers whose normalization-layer biases get a learning rate and weight decay of their own.

torch optimizers take parameter groups with their own `lr` and `weight_decay`; what they cannot know is which
tensors are the biases of normalization layers. make_optimizer finds them by module type (not by name, which
differs between models) and hands them to an optimizer factory that asks for `norm_biases`, as make_scheduler
fills in a schedule's `total_steps`.
"""

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.optim import Optimizer

NORM_LAYERS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


def norm_biases(model: nn.Module) -> list[Tensor]:
    """The bias (shift) parameters of every normalization layer of model."""
    return [m.bias for m in model.modules() if isinstance(m, NORM_LAYERS) and isinstance(m.bias, nn.Parameter)]


DECAY_KEYS = ("norm_weight_decay", "bias_weight_decay")  # optimizer settings make_optimizer reads, for every optimizer


def make_optimizer(optimizer: dict[str, Any], params: Iterable[Any], model: nn.Module) -> Optimizer:
    """The optimizer of a `_partial_` config over params (tensors or groups); model's normalization biases are
    passed as `norm_biases` to a factory that takes them and whose config leaves them out.

    An optimizer config's `norm_weight_decay` and `bias_weight_decay` (null: the optimizer's weight_decay) are read
    here, not passed on: they split the parameters into groups of their own (decay_groups), whichever optimizer it is.
    """
    optimizer = dict(optimizer)
    norm_decay, bias_decay = (optimizer.pop(key, None) for key in DECAY_KEYS)
    if norm_decay is not None or bias_decay is not None:
        params = decay_groups(params, model, norm_decay, bias_decay)
    # _convert_="all": plain lists (AdamW betas), so the optimizer state in a checkpoint loads with weights_only
    partial = instantiate(optimizer, _convert_="all")
    filled = {}
    if "norm_biases" in inspect.signature(partial.func).parameters and "norm_biases" not in partial.keywords:
        filled["norm_biases"] = norm_biases(model)
    return partial(params, **filled)


def as_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """params as parameter groups (copies of the dicts given, or one group of the tensors given)."""
    params = list(params)
    return [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": params}]


def decay_groups(
    params: Iterable[Any], model: nn.Module, norm_weight_decay: float | None, bias_weight_decay: float | None
) -> list[dict[str, Any]]:
    """Parameter groups in which every parameter of a normalization layer has weight decay norm_weight_decay and
    every other layer's bias bias_weight_decay (None: left to the optimizer's weight_decay).

    torchvision's classification reference offers the same two settings (--norm-weight-decay, --bias-weight-decay;
    its recipes use 0 for both): weight decay shrinks a normalization layer's scale or a bias towards 0, which
    regularizes nothing a following layer cannot undo. Each group keeps its other keys (a fine-tuning lr_scale).
    """
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    biases = {id(m.bias) for m in model.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)}
    kinds = [("norm", norm_weight_decay), ("bias", bias_weight_decay)]

    def kind(p: Tensor) -> str:
        return "norm" if id(p) in norm_params else "bias" if id(p) in biases else "rest"

    split = []
    for group in as_groups(params):
        tensors = list(group["params"])
        rest = [p for p in tensors if kind(p) == "rest" or dict(kinds)[kind(p)] is None]
        if rest:
            split.append({**group, "params": rest})
        for name, decay in kinds:
            chosen = [p for p in tensors if kind(p) == name and decay is not None]
            if chosen:
                split.append({**group, "params": chosen, "weight_decay": decay})
    return split


def split_norm_biases(
    params: Iterable[Any],
    norm_biases: Sequence[Tensor],
    lr: float,
    weight_decay: float,
    lr_scale: float,
    weight_decay_scale: float,
) -> list[dict[str, Any]]:
    """Parameter groups with the normalization biases of each group moved to a group of their own, whose rate and
    weight decay are the group's times lr_scale and weight_decay_scale.

    `lr_scale` (the factor make_scheduler applies to a one-cycle peak) is multiplied in too, so that a schedule that
    sets rates from its own peak keeps the ratio.
    """
    groups = as_groups(params)
    is_norm_bias = {id(p) for p in norm_biases}
    split = []
    for group in groups:
        tensors = list(group["params"])
        rest = [p for p in tensors if id(p) not in is_norm_bias]
        biases = [p for p in tensors if id(p) in is_norm_bias]
        if rest:
            split.append({**group, "params": rest})
        if biases:
            scaled = {
                "lr": group.get("lr", lr) * lr_scale,
                "lr_scale": group.get("lr_scale", 1.0) * lr_scale,
                "weight_decay": group.get("weight_decay", weight_decay) * weight_decay_scale,
            }
            split.append({**group, "params": biases, **scaled})
    return split


def norm_bias_sgd(
    params: Iterable[Any],
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    norm_bias_lr_scale: float = 1.0,
    norm_bias_weight_decay_scale: float = 1.0,
    foreach: bool | None = None,
    fused: bool | None = None,
    norm_biases: Sequence[Tensor] = (),
) -> torch.optim.SGD:
    """torch.optim.SGD whose normalization biases train at norm_bias_lr_scale x lr with norm_bias_weight_decay_scale x
    weight_decay (airbench94: 64 and 1/64, so their decay per step, rate x decay, is the other weights')."""
    groups = split_norm_biases(params, norm_biases, lr, weight_decay, norm_bias_lr_scale, norm_bias_weight_decay_scale)
    return torch.optim.SGD(
        groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, foreach=foreach, fused=fused
    )
