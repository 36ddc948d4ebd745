"""Starting a new run from another run's weights: `init_from=<checkpoint>` (fine-tuning); `freeze=[...]`.

A run starts in one of three ways: from scratch; `resume=<run dir>` / `ckpt_path=` (the same run continued: weights,
optimizer, schedule, step and data order); or `init_from=<checkpoint>` (the weights only, into a new run whose own
config applies: data, model, optimizer and schedule start fresh). Weights whose shapes differ (a new class count
changes the last layer) keep their fresh initialization, and every such layer is listed.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from cnnlab.checkpoints.load import load_checkpoint
from cnnlab.errors import UserError


@dataclass
class WeightTransfer:
    """What init_from did to each of the model's tensors (names as in model.state_dict())."""

    source: str
    carried: list[str] = field(default_factory=list)  # taken from the checkpoint
    reinitialized: list[str] = field(default_factory=list)  # in both, shapes differ: fresh initialization kept
    missing: list[str] = field(default_factory=list)  # in this model only: fresh initialization kept
    unused: list[str] = field(default_factory=list)  # in the checkpoint only

    @property
    def fresh_parameters(self) -> list[str]:
        """Parameters (and buffers) that start from their initialization: the new parts of the model."""
        return self.reinitialized + self.missing

    def report(self) -> str:
        lines = [f"init_from={self.source}: {len(self.carried)} tensors carried over"]
        for what, names in (
            ("freshly initialized, shape differs", self.reinitialized),
            ("freshly initialized, not in the checkpoint", self.missing),
            ("in the checkpoint, not in this model", self.unused),
        ):
            if names:
                lines.append(f"  {what}: {', '.join(names)}")
        return "\n".join(lines)


def checkpoint_for_init(path: str | Path, model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint to take weights from, refused when it holds another architecture than model_cfg's."""
    try:
        ckpt = load_checkpoint(path)  # safe loading: weights_only, allowed _target_s
    except UserError as err:
        raise UserError(f"init_from={path}: {err}") from None
    saved = ckpt["hyper_parameters"]["model"]["_target_"]
    if saved != model_cfg["_target_"]:
        raise UserError(
            f"init_from={path} holds a {saved} but this run builds a {model_cfg['_target_']}: weights carry over only "
            f"between models of the same architecture. Choose the model the checkpoint was trained with "
            f"(model=... matching {saved.rsplit('.', 1)[-1]}), or start from scratch without init_from."
        )
    return ckpt


def transfer_weights(model: nn.Module, ckpt: dict[str, Any], source: str) -> WeightTransfer:
    """Copy into model every tensor of the checkpoint's model whose name and shape match; report the rest."""
    stored = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    own = model.state_dict()
    transfer = WeightTransfer(source=source)
    for name, tensor in own.items():
        if name not in stored:
            transfer.missing.append(name)
        elif stored[name].shape != tensor.shape:
            transfer.reinitialized.append(name)
        else:
            transfer.carried.append(name)
    transfer.unused = [name for name in stored if name not in own]
    if not transfer.carried:
        raise UserError(
            f"init_from={source}: no weight of the checkpoint fits this model (names or shapes all differ), so "
            "nothing would carry over. Check model.* settings against the checkpoint's model, or start from scratch."
        )
    model.load_state_dict({name: stored[name] for name in transfer.carried}, strict=False)
    return transfer


def frozen_modules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The modules named by freeze (`conv1`, `layer1`, `layer2.0`: whole module names, so `fc` is not `fc1`)."""
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules or name == ""]
    if unknown:
        top = [n for n in modules if n and "." not in n]
        raise UserError(
            f"freeze={list(names)}: {unknown[0]!r} names no part of {type(model).__name__}. Give module names as "
            f"in the checkpoint keys without 'model.', e.g. {', '.join(top[:8])}."
        )
    return [modules[name] for name in names]


class FreezeModules(BaseFinetuning):
    """Keeps the classifier's modules named in `names` (and everything in them) fixed: weights and BatchNorm layers.

    Lightning's BaseFinetuning.freeze(modules, train_bn=False) turns their parameters' gradients off before the
    optimizer is built, and their BatchNorm layers' statistics updates off (track_running_stats=False). A BatchNorm
    layer in training mode without statistics updates still normalizes with each batch's statistics, so this class
    also puts the frozen BatchNorm layers in eval mode, where they normalize with their stored statistics. Both are
    done again at every training epoch start, on the modules found by name in the model as it is then: Lightning
    does not put the model back in training mode at each epoch start (evaluation restores every layer's own mode),
    and under trainer.sync_batchnorm it replaces the BatchNorm layers after the classifier was built.
    """

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = list(names)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        self.freeze(frozen_modules(pl_module.model, self.names), train_bn=False)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        frozen = frozen_modules(pl_module.model, self.names)
        self.freeze(frozen, train_bn=False)
        for module in self.flatten_modules(frozen):
            if isinstance(module, _BatchNorm):
                module.eval()
