"""What an exported model needs beside its weights: input shape, normalization, class names, whether TTA is inside.

`describe` builds it from a checkpoint, once; ONNX files carry it in `metadata_props` (one entry per key, each value
JSON-encoded, as ONNX keeps strings only) and TorchScript files in an extra file `cnnlab.json` (the same values in
one JSON object). An export is then enough to prepare images for it and to name its outputs without the checkpoint:
the network's input is float32 N x C x H x W, `(pixel / 255 - mean) / std` per channel, its output one logit per
class in `class_names` order.
"""

import json
import warnings
from pathlib import Path
from typing import Any

from hydra.utils import instantiate

import cnnlab
from cnnlab.checkpoints.load import data_config, file_sha256
from cnnlab.errors import UserError
from cnnlab.training.tta import stored_tta

TORCHSCRIPT_FILE = "cnnlab.json"  # the name of the description inside a TorchScript file (_extra_files)
INPUT = "images: float32 N x C x H x W, (pixel / 255 - mean) / std per channel; grayscale (C=1) or RGB (C=3)"
# What a program reading an export must find to use it; the rest (version, checkpoint hash) is for people.
REQUIRED = ("image_shape", "mean", "std", "class_names")
# Every key describe() writes; other metadata an ONNX file carries (from other tools) is left out on reading.
DESCRIBED = (*REQUIRED, "tta", "input", "output", "cnnlab_version", "checkpoint_sha256")


def describe(ckpt: dict[str, Any], checkpoint_path: str | Path) -> dict[str, Any]:
    """The description of the network exported from ckpt (read from checkpoint_path): plain JSON values."""
    # The DataModule the run trained with holds the facts as training used them (class names filled in when the
    # config left them out), so an export is described exactly as predict and eval see the checkpoint.
    datamodule = instantiate(data_config(ckpt), _convert_="all")
    return {
        "image_shape": [int(n) for n in datamodule.image_shape],  # channels, height, width
        "mean": [float(m) for m in datamodule.mean],  # per channel, of pixels scaled to [0, 1]
        "std": [float(s) for s in datamodule.std],
        "class_names": [str(name) for name in datamodule.class_names],  # logit i is class_names[i]
        "tta": stored_tta(ckpt["hyper_parameters"]),  # the test-time augmentation in the graph
        "input": INPUT,
        "output": "logits: float32 N x num_classes (softmax gives probabilities)",
        "cnnlab_version": cnnlab.__version__,
        "checkpoint_sha256": file_sha256(checkpoint_path),
    }


def onnx_metadata(description: dict[str, Any]) -> dict[str, str]:
    """The description as ONNX metadata_props: one entry per key, its value JSON-encoded."""
    return {key: json.dumps(value) for key, value in description.items()}


def torchscript_extra_files(description: dict[str, Any]) -> dict[str, str]:
    """The description as the `_extra_files` of torch.jit.save: one JSON file."""
    return {TORCHSCRIPT_FILE: json.dumps(description, indent=2)}


def description_from_onnx(props: dict[str, str], path: str | Path) -> dict[str, Any]:
    """The description stored in an ONNX file's metadata_props (as onnxruntime's custom_metadata_map gives them)."""
    missing = [key for key in REQUIRED if key not in props]
    if missing:
        raise UserError(
            f"{path} has no cnnlab description (its metadata lacks {', '.join(missing)}), so the input size, "
            "normalization and class names it needs are unknown: it was not written by this version of "
            "scripts/export.py. Export the checkpoint again with `python scripts/export.py ckpt_path=<run dir>/"
            "checkpoints/best.ckpt format=onnx`, or predict with the checkpoint itself."
        )
    try:
        description = {key: json.loads(value) for key, value in props.items() if key in DESCRIBED}
        # Exports written before the TTA levels say tta_flip (true or false) instead.
        description.setdefault("tta", stored_tta({"tta_flip": json.loads(props.get("tta_flip", "false"))}))
        return description
    except json.JSONDecodeError as err:
        raise UserError(
            f"The cnnlab description in {path} is damaged ({err}); export the checkpoint again with scripts/export.py."
        ) from None


def read_torchscript_description(path: str | Path) -> dict[str, Any]:
    """The description stored in a TorchScript file written by scripts/export.py."""
    import torch

    files = {TORCHSCRIPT_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is marked deprecated; its files load as ever
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    if not files[TORCHSCRIPT_FILE]:
        raise UserError(
            f"{path} holds no {TORCHSCRIPT_FILE}: it was not written by this version of scripts/export.py. Export "
            "the checkpoint again with format=torchscript."
        )
    description = json.loads(files[TORCHSCRIPT_FILE])
    description.setdefault("tta", stored_tta(description))  # written before the TTA levels: tta_flip instead
    return description
