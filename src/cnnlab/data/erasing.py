"""Random erasing and cutout of whole batches, each image its own rectangle, on the batch's device.

Random erasing (Zhong et al., 2017) as torchvision's RandomErasing draws it: with probability p, a rectangle of
2-33% of the image's area (by default) and aspect ratio 0.3-3.3, from up to 10 tries the first that fits, placed
uniformly. Cutout (DeVries and Taylor, 2017) blanks a fixed size x size square of every image; as airbench96 uses
it, the square lies inside the image. torchvision's RandomErasing draws one rectangle per call, so a batch would
share it; here every image draws its own, from the caller's generator (the tensor loader's epoch stream), in a few
vectorized operations. Both fill with a colour the caller gives (the training mean: 0 after normalization, as
RandomErasing's default value=0 after Normalize).
"""

import math

import torch
from torch import Tensor

from cnnlab.errors import UserError

TRIES = 10  # RandomErasing's attempts at a rectangle that fits before it leaves the image as it is
ERASING_SCALE = (0.02, 0.33)  # fraction of the image's area (torchvision's default)
ERASING_RATIO = (0.3, 3.3)  # height / width (torchvision's default)


def rectangle_mask(top: Tensor, left: Tensor, height: Tensor, width: Tensor, h: int, w: int) -> Tensor:
    """(B, 1, h, w) bools: True inside each image's rectangle rows [top, top + height), cols [left, left + width)."""
    rows = torch.arange(h, device=top.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=top.device).view(1, 1, 1, w)
    top, left = top.view(-1, 1, 1, 1), left.view(-1, 1, 1, 1)
    height, width = height.view(-1, 1, 1, 1), width.view(-1, 1, 1, 1)
    return (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)


def random_erasing(x: Tensor, p: float, fill: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """x (B, C, H, W) with a random rectangle of each image set to fill (C values) with probability p."""
    b, _, h, w = x.shape
    device = x.device

    def uniform(*shape: int) -> Tensor:
        return torch.rand(shape, device=device, generator=generator)

    area = h * w * (ERASING_SCALE[0] + (ERASING_SCALE[1] - ERASING_SCALE[0]) * uniform(b, TRIES))
    log_low, log_high = math.log(ERASING_RATIO[0]), math.log(ERASING_RATIO[1])
    ratio = torch.exp(log_low + (log_high - log_low) * uniform(b, TRIES))
    heights = torch.sqrt(area * ratio).round().long()  # (B, TRIES)
    widths = torch.sqrt(area / ratio).round().long()
    fits = (heights < h) & (widths < w)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    height, width = heights.gather(1, first)[:, 0], widths.gather(1, first)[:, 0]
    top = (uniform(b) * (h - height + 1)).long()  # uniform over the h - height + 1 positions
    left = (uniform(b) * (w - width + 1)).long()
    erase = (uniform(b) < p) & fits.any(dim=1)
    mask = rectangle_mask(top, left, height, width, h, w) & erase.view(b, 1, 1, 1)
    return torch.where(mask, fill.view(1, -1, 1, 1).to(x.dtype), x)


def cutout(x: Tensor, size: int, fill: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """x (B, C, H, W) with a size x size square of each image, placed uniformly inside it, set to fill."""
    b, _, h, w = x.shape
    top = torch.randint(0, h - size + 1, (b,), device=x.device, generator=generator)
    left = torch.randint(0, w - size + 1, (b,), device=x.device, generator=generator)
    side = torch.full((b,), size, device=x.device)
    mask = rectangle_mask(top, left, side, side, h, w)
    return torch.where(mask, fill.view(1, -1, 1, 1).to(x.dtype), x)


def cutout_image(x: Tensor, size: int) -> Tensor:
    """One normalized image (C, H, W) with cutout's square set to 0 (the mean colour), from torch's global generator:
    the per-image form, for DataLoader workers."""
    return cutout(x[None], size, torch.zeros(len(x), device=x.device))[0]


def check_erasing(erasing: float, cutout_size: int, image_shape: tuple[int, int, int]) -> None:
    """Refuse an erasing probability outside [0, 1] or a cutout square that does not fit the images."""
    if not 0 <= erasing <= 1:
        raise UserError(
            f"data.erasing={erasing} is the probability that a training image has a rectangle erased; give a value "
            "in [0, 1] (the reference's --random-erase 0.25), 0 for off."
        )
    if not 0 <= cutout_size <= min(image_shape[1:]):
        raise UserError(
            f"data.cutout_size={cutout_size} is the side in pixels of the square cutout blanks in every training "
            f"image; give 0 (off) up to the image's {min(image_shape[1:])} pixels (airbench96 uses 12 on 32x32)."
        )
