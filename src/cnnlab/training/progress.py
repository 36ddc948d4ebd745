"""Lightning's Rich progress bar, redrawn only every `refresh_rate` training steps.

Lightning's RichProgressBar reads the logged values back from the device and re-renders after every training step
(a device synchronization per step on a GPU, and about 0.3 ms of Python per step on a CPU); for small models that is
a visible share of the step. This bar does both every `refresh_rate` steps and at the end of each epoch, and shows
the training loss of the step it redraws at, read from that step's output.
"""

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from torch import Tensor


class SparseRichProgressBar(RichProgressBar):
    """RichProgressBar whose training bar and metrics refresh every `refresh_rate` steps instead of every step."""

    train_loss: Tensor | None = None  # the loss of the last step the bar was redrawn at, still on the device

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        done = batch_idx + 1
        if done % max(self.refresh_rate, 1) == 0 or done == self.total_train_batches:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            self.train_loss = loss.detach() if isinstance(loss, Tensor) else None
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        else:  # what the parent does besides drawing: the next evaluation starts a fresh bar
            self.val_progress_bar_id = self.test_progress_bar_id = self.predict_progress_bar_id = None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float | dict]:
        items = super().get_metrics(trainer, pl_module)
        if self.train_loss is not None:
            items["loss"] = self.train_loss.item()  # the redraw's read from the device
        return items
