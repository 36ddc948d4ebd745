"""Test-time augmentation (TTA): logits averaged over views of each image, at one of three levels.

- none: the image.
- flip: the image and its mirror image, averaged.
- flip_translate: six views, as airbench94 (Keller Jordan, cifar10-airbench) weighs them: half the weight on the
  flip average of the image, half on the mean flip average of the image translated by one pixel up-left and by one
  pixel down-right (reflect padding, so no zeros enter); airbench94's 94.01% mean CIFAR-10 accuracy (1,000 runs) is
  scored with it.

The LightningModule's predict_logits and the exported InferenceNet both call tta_logits: one inference path.
"""

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.nn import functional as F

TTA_LEVELS = ("none", "flip", "flip_translate")


def flip_averaged(net: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Logits averaged over the images and their mirror images; x is N x C x H x W."""
    return (net(x) + net(x.flip(3))) / 2


def translated(x: Tensor) -> tuple[Tensor, Tensor]:
    """x translated by one pixel down-right and by one up-left, the uncovered border filled by reflection."""
    h, w = x.shape[2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")  # (N, C, H, W) -> (N, C, H+2, W+2)
    return padded[:, :, :h, :w], padded[:, :, 2:, 2:]


def tta_logits(net: Callable[[Tensor], Tensor], x: Tensor, level: str) -> Tensor:
    """The logits of net on x at a TTA level (TTA_LEVELS)."""
    if level == "none":
        return net(x)
    if level == "flip":
        return flip_averaged(net, x)
    if level == "flip_translate":
        down_right, up_left = translated(x)
        shifted = (flip_averaged(net, down_right) + flip_averaged(net, up_left)) / 2
        return (flip_averaged(net, x) + shifted) / 2
    raise ValueError(f"tta={level!r} is not a TTA level; choose one of {', '.join(TTA_LEVELS)}.")


def stored_tta(hparams: dict[str, Any]) -> str:
    """The TTA level of a checkpoint's hyper_parameters; those written before the levels hold tta_flip (a bool)."""
    if hparams.get("tta") is not None:
        return str(hparams["tta"])
    return "flip" if hparams.get("tta_flip") else "none"
