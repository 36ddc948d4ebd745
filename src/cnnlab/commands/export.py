"""export(cfg): write a checkpoint's model as ONNX or TorchScript and check it against PyTorch on a batch.

The exported network is the classifier's evaluation path as a plain module (no Lightning): the model, and the test-time
augmentation of the run's `tta` level too (training/tta.py), so an export computes what eval scored. Input `images`, a
float32 batch normalized as the data config says (N x C x H x W, any N), output `logits`. ONNX uses the
TorchScript-based exporter (`torch.onnx.export(dynamo=False)`): the newer torch.export-based one needs the separate
`onnxscript` package and gives nothing this network needs. Both formats carry the description that
cnnlab.commands.export_metadata builds (input shape, mean, std, class names, TTA), so an export is usable without its
checkpoint. The file is written beside its final name and renamed into place only once its outputs match PyTorch's
within the tolerance.
"""

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

from cnnlab.atomic_files import atomic_path
from cnnlab.checkpoints.load import data_config, load_checkpoint
from cnnlab.checkpoints.run_folder import checkpoint_file
from cnnlab.commands.export_metadata import describe, onnx_metadata, torchscript_extra_files
from cnnlab.errors import UserError
from cnnlab.training.classifier import InferenceNet, classifier_from_checkpoint

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


def sample_batch(ckpt: dict[str, Any], size: int, seed: int = 0) -> Tensor:
    """Random uint8 images of the stored shape, normalized by the DataModule's evaluation transform."""
    datamodule = instantiate(data_config(ckpt), _convert_="all")
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (size, *datamodule.image_shape), dtype=torch.uint8, generator=generator)
    return datamodule.batch_transform(augment=False)(images)


def export_onnx(model: nn.Module, example: Tensor, path: Path, opset: int, metadata: dict[str, str]) -> None:
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter is marked legacy
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, metadata)  # the exporter has no argument for metadata_props
    onnx.save(proto, str(path))


def run_onnx(path: Path, batch: Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": batch.numpy()})[0]


def export_torchscript(model: nn.Module, example: Tensor, path: Path, extra_files: dict[str, str]) -> None:
    with warnings.catch_warnings():
        # torch.jit is marked deprecated in favour of torch.export, but its files are what C++ and mobile load.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(model, example), str(path), _extra_files=extra_files)


def run_torchscript(path: Path, batch: Tensor) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return loaded(batch).numpy()


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export cfg.ckpt_path to cfg.format; returns the output path and the largest difference from PyTorch."""
    if cfg.format not in SUFFIXES:
        raise UserError(f"format={cfg.format!r} is not known; choose one of {', '.join(SUFFIXES)}.")
    if not cfg.ckpt_path:
        raise UserError("ckpt_path is not set: give ckpt_path=<run dir>/checkpoints/best.ckpt.")
    if cfg.format == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UserError(
                "format=onnx needs the onnx and onnxruntime packages (to write and to verify the file); install "
                'them with `pip install "cnnlab[onnx]"`, or use format=torchscript.'
            ) from None
    source = checkpoint_file(cfg.ckpt_path)
    ckpt = load_checkpoint(source)
    output = Path(cfg.output) if cfg.output else source.with_name(source.stem + SUFFIXES[cfg.format])
    classifier = classifier_from_checkpoint(ckpt, str(source))
    description = describe(ckpt, source)
    tta = description["tta"]
    model = InferenceNet(classifier.model.float().to(memory_format=torch.contiguous_format), tta).eval()
    # Traced at one batch size and checked at another, so a batch dimension baked in as a constant shows up.
    example, check = sample_batch(ckpt, 2, seed=0), sample_batch(ckpt, cfg.batch_size, seed=1)
    with torch.inference_mode():
        expected = model(check).numpy()

    with atomic_path(output) as tmp:  # renamed to output only if the export reproduces PyTorch
        if cfg.format == "onnx":
            export_onnx(model, example, tmp, cfg.opset, onnx_metadata(description))
            got = run_onnx(tmp, check)
        else:
            export_torchscript(model, example, tmp, torchscript_extra_files(description))
            got = run_torchscript(tmp, check)
        max_abs_diff = float(np.abs(got - expected).max())
        if got.shape != expected.shape or not max_abs_diff <= cfg.tolerance:
            raise UserError(
                f"The {cfg.format} export of {source} does not reproduce PyTorch: outputs of shape {got.shape} vs "
                f"{expected.shape}, largest difference {max_abs_diff:.3g} > tolerance={cfg.tolerance}. Nothing was "
                "written; try the other format."
            )
    result = {
        "output": str(output),
        "checkpoint": str(source),
        "format": cfg.format,
        "batch": cfg.batch_size,
        "max_abs_diff": max_abs_diff,
        "tolerance": cfg.tolerance,
        "tta": tta,
        "description": description,
    }
    where = {"onnx": "metadata_props", "torchscript": "the extra file cnnlab.json"}
    graph = {
        "none": "no TTA in the graph",
        "flip": "tta=flip in the graph (each image and its mirror image, logits averaged)",
        "flip_translate": "tta=flip_translate in the graph (6 views: each image and its mirror image, as they are "
        "and translated by one pixel up-left and down-right, logits averaged)",
    }[tta]
    print(
        f"Wrote {output} ({cfg.format}, input images: N x {' x '.join(map(str, check.shape[1:]))}, {graph}). "
        f"It carries its image shape, mean, std and class names in {where[cfg.format]}. "
        f"Checked on {cfg.batch_size} images: max abs difference from PyTorch {max_abs_diff:.2e} "
        f"(tolerance {cfg.tolerance:g})."
    )
    return result
