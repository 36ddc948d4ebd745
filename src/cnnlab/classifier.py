"""The LightningModule: loss, metrics, optimizer and scheduler set-up, logging. Nothing else.

It is built from plain config dictionaries (the model's, the optimizer's, the scheduler's and the data config), which
`save_hyperparameters` stores in every checkpoint: a checkpoint alone rebuilds the model, and it loads with
`torch.load(weights_only=True)` because it holds no pickled objects.
"""

import inspect
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

MIN_SCHEDULE_STEPS = 16


def build_model(model: dict[str, Any]) -> nn.Module:
    """Instantiate a model from its config dictionary (a `_target_` node)."""
    return instantiate(model, _convert_="all")


class ImageClassifier(L.LightningModule):
    """Trains any image classifier with cross-entropy and reports accuracy per stage.

    Args:
        model: the model's `_target_` config, e.g. {"_target_": "cnnlab.models.LeNet5", "num_classes": 10, ...}.
        optimizer: a `_partial_` optimizer config, called with the parameters.
        scheduler: a `_partial_` LR scheduler config or None; `total_steps` / `T_max` are filled in when absent.
        data: the data config the model was trained with (its `_target_` DataModule, image_shape, num_classes,
            mean, std, class_names), so evaluation and prediction can rebuild the data path from a checkpoint alone.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        channels_last: run the model and its inputs in channels-last memory format (faster convolutions).
    """

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(model)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        num_classes = model.get("num_classes", (data or {}).get("num_classes", 10))
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.train_acc(logits, y)
        # Epoch means accumulate on the device; only the progress bar's refresh reads a value back. Under DDP the
        # epoch means are averaged across ranks (sync_dist); torchmetrics metrics gather their own states.
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("loss", loss, prog_bar=True, logger=False)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        metric(logits, y)
        self.log(f"{stage}/loss", self.criterion(logits, y), on_epoch=True, prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=stage == "val")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: tuple[Tensor, Tensor] | Tensor, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self(x).softmax(dim=1)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = instantiate(self.hparams.optimizer)(self.parameters())
        if not self.hparams.scheduler:
            return {"optimizer": optimizer}
        make_scheduler = instantiate(self.hparams.scheduler)
        params = inspect.signature(make_scheduler.func).parameters
        filled = {}
        for name in ("total_steps", "T_max"):  # a per-step schedule spans the whole run
            if name in params and name not in make_scheduler.keywords:
                # OneCycleLR divides by zero on a few steps; a run that short (a smoke test) stops early instead.
                filled[name] = max(int(self.trainer.estimated_stepping_batches), MIN_SCHEDULE_STEPS)
        scheduler = make_scheduler(optimizer, **filled)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
