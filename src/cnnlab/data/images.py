"""Image files to model input: the one conversion that folder datasets and scripts/predict.py share.

An image becomes a uint8 C x H x W array: EXIF rotation applied, transparency shown on white, 16-bit values scaled
to 8 bits, converted to grayscale (C=1) or RGB (C=3), then resized so that its shorter side is the target's and the
middle cropped to H x W. Cropping keeps shapes undistorted (a round object stays round whatever the photo's aspect
ratio), as torchvision's Resize + CenterCrop evaluation transform does; the cost is the border of an image whose
aspect ratio differs from the target's. Training and prediction convert alike, so a model sees predicted images as
it saw its training images.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnlab.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
WHITE = (255, 255, 255, 255)


class ImageDecodeError(UserError):
    """An image file that cannot be decoded; `reason` says why, without the path."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(
            f"Image {path} cannot be decoded ({reason}). Give PNG, JPEG, BMP or WebP files, and replace this one if "
            "it is truncated."
        )


def load_image(path: Path, image_shape: tuple[int, int, int]) -> np.ndarray:
    """An image file as a uint8 C x H x W array in the model's channels and size (see the module docstring)."""
    channels, height, width = image_shape
    try:
        with Image.open(path) as image:
            # JPEGs decode at 1/2, 1/4 or 1/8 scale when that still covers the target: a 12-megapixel photo shrunk
            # to 32x32 then costs a fraction of a full decode. Other formats ignore it.
            image.draft(None, (max(height, width), max(height, width)))
            ImageOps.exif_transpose(image, in_place=True)  # phone photos store their rotation in EXIF
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(path, f"{type(err).__name__}: {err}") from None
    return convert_image(image, image_shape)


def convert_image(image: Image.Image, image_shape: tuple[int, int, int]) -> np.ndarray:
    """A decoded image as a uint8 C x H x W array: 8 bits, on white, grayscale or RGB, shorter side scaled, cropped."""
    channels, height, width = image_shape
    if image.mode in SIXTEEN_BIT_MODES:  # 16-bit grayscale: scale to 8 bits rather than clip
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    if image.mode in ALPHA_MODES or "transparency" in image.info:  # as the image looks on a white page
        image = Image.alpha_composite(Image.new("RGBA", image.size, WHITE), image.convert("RGBA"))
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = ImageOps.fit(image, (width, height), Image.Resampling.BILINEAR)  # shorter side to size, crop middle
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)  # (H, W[, C]) -> (C, H, W)
