"""predict(cfg): classify image files (PNG, JPEG; any size and mode) with a checkpoint.

Each image is converted the way the model's dataset was: to grayscale or RGB by the stored image_shape[0], resized
to image_shape[1:], and normalized by the DataModule's own evaluation transform with the stored mean and std.
"""

import csv
import glob
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from cnnlab.atomic_files import write_text_atomic
from cnnlab.checkpoints import classifier_from_checkpoint, data_config, load_checkpoint
from cnnlab.data.images import load_image
from cnnlab.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
GLOB_CHARS = set("*?[")


def resolve_inputs(spec: str | list[str]) -> list[Path]:
    """Image files from a file, a directory (its .png/.jpg/.jpeg files) or a glob, in sorted order."""
    entries = [spec] if isinstance(spec, str | Path) else list(spec)
    found: list[Path] = []
    for entry in map(str, entries):
        matches = sorted(glob.glob(entry, recursive=True)) if GLOB_CHARS & set(entry) else [entry]
        if not matches:
            raise UserError(f"inputs={entry} matches no file. Check the pattern (relative paths start where you run).")
        for match in map(Path, matches):
            if match.is_dir():
                images = sorted(p for p in match.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
                if not images:
                    raise UserError(f"inputs={match} is a directory without .png, .jpg or .jpeg files.")
                found += images
            elif not match.is_file():
                raise UserError(f"Image {match} does not exist. Check the path given as inputs=.")
            else:
                found.append(match)
    return list(dict.fromkeys(found))


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Top-k classes and probabilities for every input image; writes cfg.output as CSV when set."""
    from hydra.utils import instantiate

    if not cfg.ckpt_path:
        raise UserError("ckpt_path is not set: give ckpt_path=<run dir>/checkpoints/best.ckpt.")
    if not cfg.inputs:
        raise UserError("inputs is not set: give inputs=<image file>, inputs=<folder> or inputs='<glob>'.")
    ckpt = load_checkpoint(cfg.ckpt_path)
    inputs = OmegaConf.to_container(cfg.inputs) if OmegaConf.is_config(cfg.inputs) else cfg.inputs
    files = resolve_inputs(inputs)
    datamodule = instantiate(data_config(ckpt), _convert_="all")  # only its settings and transforms are used
    class_names, image_shape = datamodule.class_names, datamodule.image_shape
    top_k = min(int(cfg.top_k), len(class_names))
    if top_k < 1:
        raise UserError(f"top_k={cfg.top_k} must be at least 1.")
    images = np.stack([load_image(path, image_shape) for path in files])  # every file decodes before any work

    classifier = classifier_from_checkpoint(ckpt, str(cfg.ckpt_path))
    normalize = datamodule.batch_transform(augment=False)
    probabilities = []
    with torch.inference_mode():
        for start in range(0, len(images), cfg.batch_size):
            batch = torch.from_numpy(images[start : start + cfg.batch_size])
            probabilities.append(classifier.predict_logits(normalize(batch)).softmax(dim=1))
    top = torch.cat(probabilities).topk(top_k, dim=1)

    rows = [
        {
            "file": str(path),
            "classes": [class_names[i] for i in indices],
            "probabilities": [round(p, 6) for p in probs],
        }
        for path, indices, probs in zip(files, top.indices.tolist(), top.values.tolist())
    ]
    if cfg.output:
        write_text_atomic(Path(cfg.output), predictions_csv(rows, top_k))
    print_predictions(Console(), rows, top_k, cfg.ckpt_path)
    return {"predictions": rows, "output": str(cfg.output) if cfg.output else None}


def predictions_csv(rows: list[dict[str, Any]], top_k: int) -> str:
    """One line per image: file, then class and probability for each of the top_k ranks."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", *[f"{kind}_{k}" for k in range(1, top_k + 1) for kind in ("class", "probability")]])
    for row in rows:
        pairs = [v for c, p in zip(row["classes"], row["probabilities"]) for v in (c, f"{p:.6f}")]
        writer.writerow([row["file"], *pairs])
    return buffer.getvalue()


def print_predictions(console: Console, rows: list[dict[str, Any]], top_k: int, source: str) -> None:
    table = Table(title=f"Predictions of {source}")
    table.add_column("file")
    for k in range(1, top_k + 1):
        table.add_column(f"top {k}", justify="right")
    for row in rows:
        table.add_row(row["file"], *[f"{c} {p:.1%}" for c, p in zip(row["classes"], row["probabilities"])])
    console.print(table)
