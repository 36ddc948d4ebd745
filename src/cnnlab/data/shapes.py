"""A small image folder to try `data=folder` on: coloured circles, squares and triangles of random sizes.

Written in the layout `data=folder` reads (`<root>/train/<class>/<image>`, `<root>/test/...`), half PNG and half
JPEG, each image between 40 and 96 pixels wide and high, so that conversion, caching and prediction all have work.
"""

import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, rng: random.Random) -> Image.Image:
    """One RGB image of the shape, centred with a few pixels of jitter, in a light colour on a dark background."""
    w, h = rng.randint(40, 96), rng.randint(40, 96)
    image = Image.new("RGB", (w, h), tuple(rng.randint(0, 80) for _ in range(3)))
    s = rng.randint(min(w, h) // 3, min(w, h) // 2)  # half the shape's size
    x, y = w // 2 + rng.randint(-4, 4), h // 2 + rng.randint(-4, 4)
    colour = tuple(rng.randint(120, 255) for _ in range(3))
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((x - s, y - s, x + s, y + s), fill=colour)
    elif shape == "square":
        draw.rectangle((x - s, y - s, x + s, y + s), fill=colour)
    else:
        draw.polygon([(x, y - s), (x - s, y + s), (x + s, y + s)], fill=colour)
    return image


def write_shapes(root: Path, n_train: int = 300, n_test: int = 60, seed: int = 0) -> int:
    """Write n_train + n_test images under root/{train,test}/<shape>/; returns how many were written."""
    rng = random.Random(seed)
    for split, count in (("train", n_train), ("test", n_test)):
        for i in range(count):
            shape = SHAPES[i % len(SHAPES)]
            folder = Path(root) / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            draw_shape(shape, rng).save(folder / f"{i:03d}{'.jpg' if i % 2 else '.png'}")
    return n_train + n_test
