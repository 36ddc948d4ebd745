"""A callback that shows convolution at work in TensorBoard: the first layer's filters and one image's feature maps.

Logged at the start of training and after every epoch (after its validation, where the run has a validation split),
so the IMAGES tab shows the kernels learning.
"""

import lightning as L
import torch
from torch import Tensor, nn
from torchvision.utils import make_grid

from cnnlab.ops import UnfoldConv2d


def first_conv(model: nn.Module) -> nn.Module:
    """The first convolution layer of a model, in registration order."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | UnfoldConv2d):
            return module
    raise ValueError(f"{type(model).__name__} has no convolution layer to show")


def filter_grid(weight: Tensor) -> Tensor:
    """(out, in, kh, kw) kernels -> one (3, H, W) image, each kernel scaled to [0, 1] on its own."""
    w = weight.detach().float().cpu()
    if w.shape[1] != 3:
        w = w.mean(dim=1, keepdim=True)  # (out, in, kh, kw) -> (out, 1, kh, kw): one gray tile per output channel
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    hi = w.amax(dim=(1, 2, 3), keepdim=True)
    w = (w - lo) / (hi - lo).clamp_min(1e-8)
    w = torch.nn.functional.interpolate(w, scale_factor=4, mode="nearest")  # 5x5 kernels are too small to see
    return make_grid(w, nrow=8, padding=1, pad_value=1.0)


def feature_map_grid(maps: Tensor) -> Tensor:
    """(C, H, W) activations of one image -> one (3, H', W') image, each channel scaled to [0, 1] on its own."""
    m = maps.detach().float().cpu().unsqueeze(1)  # (C, H, W) -> (C, 1, H, W)
    lo = m.amin(dim=(2, 3), keepdim=True)
    hi = m.amax(dim=(2, 3), keepdim=True)
    return make_grid((m - lo) / (hi - lo).clamp_min(1e-8), nrow=8, padding=1, pad_value=1.0)


class ConvImages(L.Callback):
    """Logs `conv1/filters` and `conv1/feature_maps` to TensorBoard each epoch: the maps of the first validation
    image, or the first test image, or for data with neither (an image folder of train/ alone) the first training
    image."""

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = every_n_epochs

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        writers = [lg.experiment for lg in trainer.loggers if hasattr(lg.experiment, "add_image")]
        if not writers or not trainer.is_global_zero:
            return
        conv = first_conv(pl_module.model)
        splits = trainer.datamodule.splits
        split = next(s for s in ("val", "test", "train") if s in splits and len(splits[s][1]))
        image = splits[split][0][:1]  # a fixed image every epoch
        x = trainer.datamodule.batch_transform(augment=False)(image).to(pl_module.device)
        captured: list[Tensor] = []
        handle = conv.register_forward_hook(lambda m, i, out: captured.append(out))
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            # The model's forward, not its __call__: compiled (compile.enabled), the call would compile one more
            # graph just for this one image.
            pl_module.model.forward(x)
        pl_module.train(was_training)
        handle.remove()
        for writer in writers:
            writer.add_image("conv1/filters", filter_grid(conv.weight), step)
            writer.add_image("conv1/feature_maps", feature_map_grid(captured[0][0]), step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, step=0)  # the initial kernels

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._after_epoch(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.limit_val_batches:  # no validation (data.val_size=0): no validation epoch end to log at
            self._after_epoch(trainer, pl_module)

    def _after_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._log(trainer, pl_module, step=trainer.current_epoch + 1)  # after this many epochs
