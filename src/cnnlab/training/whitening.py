"""Patch whitening of a model's first layer from the training images, set once when a run starts."""

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor
from torch.optim import Optimizer

from cnnlab.errors import UserError


class PatchWhitening(L.Callback):
    """Sets the model's whitening layer (AirbenchNet.init_whitening) from training images at the start of a run, and
    trains that layer's bias for the first bias_epochs epochs only.

    Lightning has no hook for data-dependent initialization; this callback adds it. The images are the first
    num_images of the DataModule's training split, normalized by its batch transform without augmentation, as
    airbench94 does with 5000 images. A resumed run (fit with a checkpoint) keeps the whitening its checkpoint holds:
    Lightning restores the weights before on_fit_start, so it is not computed again. So does a run whose filters
    init_from carried over (cnnlab.commands.run_start): the layers after them were trained on those filters' channels,
    and filters recomputed on other images could come out with channels swapped or negated (eigenvectors have no
    fixed sign or order among equal eigenvalues).

    From epoch bias_epochs on, the bias's gradient is dropped (set to None) in on_before_optimizer_step, which
    Lightning calls after the backward pass (and so after DDP's all-reduce) and before the optimizer step and gradient
    clipping; torch's optimizers skip a parameter without a gradient, so neither SGD's momentum nor its weight decay
    moves it, and the bias stays bit-identical. The epoch number decides, so a run resumed after bias_epochs keeps it
    fixed too. Turning the bias's requires_grad off instead (as airbench94 does) breaks DDP, which registered the
    parameter when wrapping the model: the next step stops with "parameters that were not used in producing the
    loss". find_unused_parameters would search the graph every step for this one tensor, and a param group at rate 0
    would have to survive every scheduler's rewrite of the rates; the dropped gradient costs only its own reduction.
    Lookahead's next pull-back after bias_epochs sets the bias to its slow average, once, as airbench94's does (its
    slow copy still lags the last trained steps); from then on both stay fixed.

    bias_rate="to_zero" gives the bias a rate of its own, airbench94_muon's: falling linearly from its group's base
    rate at the first step to 0 at the end of bias_epochs, whatever the schedule does to the rest of its group. torch
    sets rates per parameter group, and the bias shares its group with the other 1-D parameters; so the callback
    rescales the bias's update after each step by (its own rate) / (the group's rate at that step). For torch's SGD
    that is exact: the momentum buffer does not depend on the rate, so a step of rate r moves the bias by r x buffer.
    """

    def __init__(
        self, num_images: int = 5000, eps: float = 5e-4, bias_epochs: int = 3, bias_rate: str = "schedule"
    ) -> None:
        if bias_rate not in ("schedule", "to_zero"):
            raise UserError(
                f"callbacks.whitening.bias_rate={bias_rate!r} is not 'schedule' (the bias follows its parameter "
                "group's rate) or 'to_zero' (its rate falls linearly to 0 at the end of bias_epochs). Fix it in "
                "configs/callbacks/whitening or on the command line."
            )
        self.num_images, self.eps, self.bias_epochs, self.bias_rate = num_images, eps, bias_epochs, bias_rate
        self._before_step: tuple[Tensor, float] | None = None  # the bias before this step, and its update's factor

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = pl_module.model
        if not hasattr(model, "init_whitening"):
            raise UserError(
                f"callbacks.whitening sets a patch-whitening layer, which {type(model).__name__} does not have. Use "
                "model=airbench, or leave the callback out (callbacks.whitening=null)."
            )
        if stage == "fit" and not hasattr(trainer.datamodule, "splits"):
            raise UserError(
                "callbacks.whitening reads the training images from a cnnlab DataModule (data=cifar10, mnist, "
                "folder, ...); this run's data has none. Leave the callback out (callbacks.whitening=null)."
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None:
            return  # resumed: the whitening came back with the checkpoint's weights
        finetune = pl_module.hparams.get("finetune") or {}
        if finetune.get("init_from") and "whiten.weight" not in finetune["fresh"]:
            return  # carried over from init_from's checkpoint
        datamodule = trainer.datamodule
        images, _ = datamodule.splits["train"]
        normalized = datamodule.batch_transform(augment=False)(images[: self.num_images])
        pl_module.model.init_whitening(normalized.to(pl_module.device), self.eps)
        # Lightning's WeightAveraging (EMA, Lookahead) copied the model in its setup, before this hook: its average
        # would keep mixing in the random filters the whitening replaced. It gets the same filters (there is no
        # public accessor of the average; tests/test_train.py checks the filters of a Lookahead run's checkpoint).
        for callback in trainer.callbacks:
            average = getattr(callback, "_average_model", None) if isinstance(callback, WeightAveraging) else None
            if average is not None:
                average.module.model.whiten.weight.data.copy_(pl_module.model.whiten.weight.data)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        bias = pl_module.model.whiten.bias
        if trainer.current_epoch >= self.bias_epochs:
            bias.grad = None  # the optimizer skips it: no momentum, no weight decay
        elif self.bias_rate == "to_zero" and bias.grad is not None:
            group = next(g for g in optimizer.param_groups if any(p is bias for p in g["params"]))
            bias_steps = self.bias_epochs * trainer.estimated_stepping_batches / trainer.max_epochs
            own_rate = group.get("initial_lr", group["lr"]) * max(0.0, 1 - trainer.global_step / bias_steps)
            self._before_step = (bias.detach().clone(), own_rate / group["lr"] if group["lr"] else 0.0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if self._before_step is None:
            return  # no step in this batch (gradient accumulation), or the bias follows the schedule
        before, factor = self._before_step
        bias = pl_module.model.whiten.bias
        with torch.no_grad():
            bias.copy_(before + (bias - before) * factor)
        self._before_step = None
