"""predict(cfg): classify image files (PNG, JPEG; any size and mode) with a checkpoint or an ONNX export of one.

Each image is converted the way the model's dataset was: to grayscale or RGB by the stored image_shape[0], resized
to image_shape[1:], and normalized by the DataModule's own evaluation transform with the stored mean and std. A
checkpoint runs through the classifier's evaluation path (`predict_logits`); an ONNX file, written by
scripts/export.py from that same path, runs in onnxruntime and brings its image shape, mean, std and class names in
its metadata. Files are decoded and classified batch by batch, so memory does not grow with the folder; the table
and the CSV are written only once every file has decoded, so a bad file leaves nothing half written.
"""

import contextlib
import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import Tensor

from cnnlab.atomic_files import write_text_atomic
from cnnlab.checkpoints.load import data_config, load_checkpoint
from cnnlab.checkpoints.run_folder import checkpoint_file
from cnnlab.commands.devices import parse_device, pick_device
from cnnlab.commands.export import SUFFIXES
from cnnlab.commands.path_patterns import expand_paths
from cnnlab.data.datamodule import ImageDataModule
from cnnlab.data.images import IMAGE_SUFFIXES, load_image
from cnnlab.data.tensor_loader import BatchTransform
from cnnlab.errors import UserError
from cnnlab.training.classifier import classifier_from_checkpoint

PROGRESS_MIN_BATCHES = 5  # fewer batches finish before a bar would say anything


def resolve_inputs(spec: str | list[str]) -> list[Path]:
    """Image files from a file, a directory (its .png/.jpg/.jpeg files) or a glob, in sorted order."""

    def images_in(folder: Path) -> list[Path]:
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise UserError(f"inputs={folder} is a directory without image files ({', '.join(IMAGE_SUFFIXES)}).")
        return images

    return expand_paths(spec, "inputs", "Image", images_in)


@dataclass
class Predictor:
    """What prediction needs of a model: the images it takes, its class names, and logits for a uint8 batch."""

    image_shape: tuple[int, int, int]  # channels, height, width
    class_names: list[str]
    normalize: BatchTransform  # the DataModule's evaluation transform: uint8 batch -> the network's input
    logits: Callable[[Tensor], Tensor]  # normalized batch -> logits (on the CPU or the device)
    device: torch.device  # where batches are normalized before logits()
    runs_on: str  # for the table's title: "cuda", "cpu", "onnxruntime CPUExecutionProvider", ...


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Top-k classes and probabilities for every input image; writes cfg.output as CSV when set."""
    if not cfg.ckpt_path:
        raise UserError("ckpt_path is not set: give ckpt_path=<run dir>/checkpoints/best.ckpt (or an exported .onnx).")
    if not cfg.inputs:
        raise UserError("inputs is not set: give inputs=<image file>, inputs=<folder> or inputs='<glob>'.")
    if int(cfg.batch_size) < 1:
        raise UserError(f"batch_size={cfg.batch_size} must be at least 1.")
    device = str(cfg.device)
    parse_device(device)  # a mistyped device stops here, before any file is read
    if str(cfg.ckpt_path).endswith(SUFFIXES["torchscript"]):
        raise UserError(
            f"ckpt_path={cfg.ckpt_path} is a TorchScript export, which predict does not run (it is for torch.jit.load "
            "in other programs). Give the checkpoint it came from, or an ONNX export (scripts/export.py format=onnx)."
        )
    is_onnx = Path(str(cfg.ckpt_path)).suffix.lower() == SUFFIXES["onnx"]
    predictor = onnx_predictor(cfg.ckpt_path, device) if is_onnx else checkpoint_predictor(cfg.ckpt_path, device)
    inputs = OmegaConf.to_container(cfg.inputs) if OmegaConf.is_config(cfg.inputs) else cfg.inputs
    files = resolve_inputs(inputs)
    class_names = predictor.class_names
    top_k = min(int(cfg.top_k), len(class_names))
    if top_k < 1:
        raise UserError(f"top_k={cfg.top_k} must be at least 1.")

    batches = [files[start : start + cfg.batch_size] for start in range(0, len(files), cfg.batch_size)]
    rows = []
    advance = progress_bar(Console(stderr=True), len(batches), f"Classifying {len(files)} images")
    with torch.inference_mode(), advance as batch_done:
        for batch_files in batches:
            # A file that does not decode stops here with its UserError, before anything is written.
            images = torch.from_numpy(np.stack([load_image(path, predictor.image_shape) for path in batch_files]))
            logits = predictor.logits(predictor.normalize(images.to(predictor.device)))
            top = logits.float().softmax(dim=1).topk(top_k, dim=1)
            for path, indices, probs in zip(batch_files, top.indices.tolist(), top.values.tolist()):
                rows.append(
                    {
                        "file": str(path),
                        "classes": [class_names[i] for i in indices],
                        "probabilities": [round(p, 6) for p in probs],
                    }
                )
            batch_done()
    if cfg.output:
        write_text_atomic(Path(cfg.output), predictions_csv(rows, top_k))
    print_predictions(Console(), rows, top_k, f"{cfg.ckpt_path} ({predictor.runs_on})")
    return {"predictions": rows, "output": str(cfg.output) if cfg.output else None, "runs_on": predictor.runs_on}


def checkpoint_predictor(ckpt_path: str, device: str) -> Predictor:
    """A checkpoint's classifier on the device, through its evaluation path (predict_logits)."""
    from hydra.utils import instantiate

    ckpt = load_checkpoint(checkpoint_file(ckpt_path))
    datamodule = instantiate(data_config(ckpt), _convert_="all")  # only its settings and transforms are used
    where = pick_device(device)
    classifier = classifier_from_checkpoint(ckpt, str(ckpt_path)).to(where)
    return Predictor(
        image_shape=datamodule.image_shape,
        class_names=datamodule.class_names,
        normalize=datamodule.batch_transform(augment=False),
        logits=classifier.predict_logits,
        device=where,
        runs_on=where.type,
    )


def onnx_predictor(onnx_path: str, device: str) -> Predictor:
    """An ONNX export in onnxruntime (CUDA execution provider when asked for and present), described by its metadata."""
    from cnnlab.commands.export_metadata import description_from_onnx

    try:
        import onnxruntime
    except ImportError:
        raise UserError(
            f"ckpt_path={onnx_path} is an ONNX file, which needs the onnxruntime package; install it with "
            '`pip install "cnnlab[onnx]"`, or give the checkpoint it was exported from.'
        ) from None
    path = Path(onnx_path).expanduser()
    if not path.is_file():
        raise UserError(f"ONNX file {path} does not exist. Check the path (relative paths start where you run).")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: a provider falling back is reported below, in one paragraph
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=onnx_providers(device, onnxruntime))
    except UserError:
        raise
    except Exception as err:  # onnxruntime raises its own types for unreadable and invalid models
        raise UserError(
            f"{path} cannot be loaded by onnxruntime ({type(err).__name__}: {str(err).splitlines()[0][:200]}). It "
            "is truncated or not an ONNX model; export the checkpoint again with scripts/export.py format=onnx."
        ) from None
    asked = parse_device(device)
    if asked is not None and asked.type == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise UserError(
            f"device={device}, but onnxruntime could not run {path} on a GPU (it fell back to "
            f"{', '.join(session.get_providers())}): no CUDA GPU is visible, or the CUDA libraries onnxruntime-gpu "
            "needs are missing. Use device=auto or device=cpu."
        )
    description = description_from_onnx(session.get_modelmeta().custom_metadata_map, path)
    image_shape = tuple(int(n) for n in description["image_shape"])
    stored = tuple(session.get_inputs()[0].shape[1:])
    if stored != image_shape:
        raise UserError(
            f"{path} takes images of shape {list(stored)}, but its metadata says image_shape={list(image_shape)}: "
            "the file was edited after export. Export the checkpoint again with scripts/export.py format=onnx."
        )
    # The base DataModule built from the stored values: the same evaluation transform as the checkpoint's own.
    datamodule = ImageDataModule(
        num_classes=len(description["class_names"]),
        image_shape=image_shape,
        mean=description["mean"],
        std=description["std"],
        class_names=description["class_names"],
    )
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name

    def logits(images: Tensor) -> Tensor:
        return torch.from_numpy(session.run([output_name], {input_name: images.numpy()})[0])

    return Predictor(
        image_shape=image_shape,
        class_names=list(description["class_names"]),
        normalize=datamodule.batch_transform(augment=False),
        logits=logits,
        device=torch.device("cpu"),  # onnxruntime takes host arrays and copies them to its device itself
        runs_on=f"onnxruntime {session.get_providers()[0]}",
    )


def onnx_providers(device: str, onnxruntime: Any) -> list[str | tuple[str, dict[str, int]]]:
    """onnxruntime's execution providers for device=: CUDA first (on the GPU asked for) for cuda[:<index>], and for
    auto when onnxruntime has it; otherwise the CPU's."""
    asked = parse_device(device)
    available = onnxruntime.get_available_providers()
    if asked is not None and asked.type == "mps":
        raise UserError(
            f"device={device}, but onnxruntime runs an ONNX file on the CPU or a CUDA GPU only. Use device=cpu, or "
            "give the checkpoint the file was exported from, which runs on mps."
        )
    wants_cuda = asked is not None and asked.type == "cuda"
    if wants_cuda and "CUDAExecutionProvider" not in available:
        raise UserError(
            f"device={device}, but the installed onnxruntime has no CUDA execution provider (it has "
            f"{', '.join(available)}). Install onnxruntime-gpu in place of onnxruntime, or use device=auto or "
            "device=cpu."
        )
    if wants_cuda or (asked is None and "CUDAExecutionProvider" in available):
        index = asked.index if wants_cuda and asked.index is not None else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@contextlib.contextmanager
def progress_bar(console: Console, total: int, description: str) -> Iterator[Callable[[], None]]:
    """A function to call once per finished batch, which advances a Rich progress bar on console when it is an
    interactive terminal and there are enough batches; otherwise it does nothing, so piped output stays clean.

    A context manager rather than a wrapped iterator, so that an error inside the loop (an undecodable file) stops
    the bar and shows the cursor again before the error is reported.
    """
    if total < PROGRESS_MIN_BATCHES or not console.is_interactive:
        yield lambda: None
        return
    with Progress(*Progress.get_default_columns(), console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


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
