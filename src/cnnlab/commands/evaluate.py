"""evaluate(cfg): score one or more checkpoints on the test (or validation) split and write reports and figures.

Each checkpoint rebuilds its own model and data configuration from its stored hyper_parameters; keys set under
`data:` in the eval config (data_dir, eval_batch_size, ...) replace the stored ones. Everything is checked and
computed before the first output file is written, and every file is written atomically, so a failed evaluation
leaves no partial report behind.
"""

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import Tensor

from cnnlab.atomic_files import write_text_atomic
from cnnlab.checkpoints.load import data_config, file_sha256, load_checkpoint
from cnnlab.checkpoints.run_folder import run_folder_checkpoints, why
from cnnlab.commands.devices import pick_device
from cnnlab.commands.path_patterns import expand_paths
from cnnlab.data.prepare_once import prepare_once_per_machine
from cnnlab.errors import UserError
from cnnlab.training.classifier import classifier_from_checkpoint

SPLITS = ("test", "val")


@dataclass
class Evaluation:
    """What one checkpoint's evaluation produced, held in memory until every checkpoint has been scored."""

    path: Path
    metrics: dict[str, Any]
    confusion: np.ndarray
    class_names: list[str]
    errors: tuple[np.ndarray, list[str], list[str], list[float]]  # images, true names, predicted names, confidence


def resolve_checkpoints(spec: str | list[str]) -> list[Path]:
    """Checkpoint files from a path, a glob, a run or multirun directory (each run's checkpoint, by
    cnnlab.checkpoints.run_folder's rule: best.ckpt where the run has one, else last.ckpt; each printed)."""

    def runs_below(folder: Path) -> list[Path]:
        found = run_folder_checkpoints(folder)
        for checkpoint in found:
            print(f"ckpt_path={folder} -> {why(checkpoint)}")
        return found

    return list(dict.fromkeys(p.resolve() for p in expand_paths(spec, "ckpt_path", "Checkpoint", runs_below)))


def build_datamodule(ckpt: dict[str, Any], overrides: dict[str, Any], source: Path):
    """The DataModule the checkpoint was trained with, overrides applied; its files are checked, not yet read."""
    from hydra.utils import instantiate

    stored = ckpt["hyper_parameters"]["data"]
    config = data_config(ckpt, overrides, str(source))
    for key in ("image_shape", "num_classes"):
        if list(np.atleast_1d(config[key])) != list(np.atleast_1d(stored[key])):
            raise UserError(
                f"data.{key}={config[key]} does not fit the model in checkpoint {source}, which was trained on "
                f"{key}={stored[key]}. Evaluate it on data of that shape (drop the data.{key} override)."
            )
    datamodule = instantiate(config, _convert_="all")
    prepare_once_per_machine(datamodule)
    return datamodule


PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def run_precision(ckpt: dict[str, Any], asked: str) -> str:
    """The precision to evaluate in: asked, or for `auto` the one the run was tested in (32-true if unknown)."""
    return str(ckpt.get("precision", "32-true")) if asked == "auto" else asked


@torch.inference_mode()
def logits_and_labels(classifier, loader, device: torch.device, precision: str = "32-true") -> tuple[Tensor, Tensor]:
    """The classifier's logits over every batch of loader, in the loader's (unshuffled) order, on the CPU.

    precision="bf16-mixed" / "16-mixed" runs under the same autocast as Lightning's mixed-precision Trainer.
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision={precision!r} is not known; choose one of {', '.join(PRECISIONS)}.")
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    classifier.to(device)
    logits, labels = [], []
    for x, y in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits.append(classifier.predict_logits(x.to(device)).float().cpu())
        labels.append(y.cpu())
    return torch.cat(logits), torch.cat(labels)


def score(logits: Tensor, labels: Tensor, class_names: list[str], split: str) -> tuple[dict[str, Any], np.ndarray]:
    """Accuracy (top-1, top-5), plain cross-entropy loss, per-class precision and recall, macro-F1, confusion matrix."""
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    n = len(class_names)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    metrics: dict[str, Any] = {
        f"{split}_acc": MulticlassAccuracy(n, average="micro")(logits, labels).item(),
        f"{split}_loss": loss.item(),
    }
    if n > 5:
        metrics[f"{split}_top5_acc"] = MulticlassAccuracy(n, top_k=5, average="micro")(logits, labels).item()
    metrics[f"{split}_macro_f1"] = MulticlassF1Score(n, average="macro")(logits, labels).item()
    precision = MulticlassPrecision(n, average=None)(logits, labels).tolist()
    recall = MulticlassRecall(n, average=None)(logits, labels).tolist()
    metrics[f"{split}_precision"] = dict(zip(class_names, precision))
    metrics[f"{split}_recall"] = dict(zip(class_names, recall))
    confusion = MulticlassConfusionMatrix(n)(logits, labels).numpy()
    return metrics, confusion


def most_confident_errors(
    images: Tensor, logits: Tensor, labels: Tensor, class_names: list[str], count: int
) -> tuple[np.ndarray, list[str], list[str], list[float]]:
    """The count misclassified images the model was surest of, with true and predicted names and confidence."""
    confidence, predicted = logits.softmax(dim=1).max(dim=1)
    wrong = (predicted != labels).nonzero().flatten()
    order = wrong[confidence[wrong].argsort(descending=True)][:count]
    return (
        images[order].cpu().numpy(),
        [class_names[i] for i in labels[order].tolist()],
        [class_names[i] for i in predicted[order].tolist()],
        confidence[order].tolist(),
    )


def evaluate_checkpoint(
    path: Path, ckpt: dict[str, Any], datamodule, cfg: DictConfig, device: torch.device
) -> Evaluation:
    """Score one checkpoint on cfg.split, on device."""
    datamodule.setup("test")
    classifier = classifier_from_checkpoint(ckpt, str(path))
    if not len(datamodule.splits[cfg.split][1]):
        raise UserError(
            f"split={cfg.split} holds no images for {path}: its data config has data.val_size=0, which trains on "
            "every training image and keeps none for validation. Score it with split=test, or pass data.val_size=N "
            "to hold N images out (they were trained on, so their score flatters the model)."
        )
    loader = datamodule.test_dataloader() if cfg.split == "test" else datamodule.val_dataloader()
    precision = run_precision(ckpt, str(cfg.precision))
    logits, labels = logits_and_labels(classifier, loader, device, precision)
    hparams = ckpt["hyper_parameters"]
    class_names = list(datamodule.class_names)
    metrics, confusion = score(logits, labels, class_names, cfg.split)
    metrics = {
        "split": cfg.split,
        "samples": len(labels),
        "checkpoint": str(path),
        "checkpoint_sha256": file_sha256(path),
        "model": hparams["model"]["_target_"],
        "precision": precision,
        "data": hparams["data"]["_target_"],
        **metrics,
    }
    images = datamodule.splits[cfg.split][0]
    errors = most_confident_errors(images, logits, labels, class_names, cfg.misclassified)
    datamodule.splits = {}  # the next checkpoint's data is read afresh; do not hold two datasets at once
    return Evaluation(path, metrics, confusion, class_names, errors)


def output_name(index: int, path: Path) -> str:
    """A folder name for one of several checkpoints: its index and its run folder (<run>/checkpoints/<name>)."""
    parts = [path.parent.parent.name, path.stem] if path.parent.name == "checkpoints" else [path.stem]
    return f"{index:02d}_" + re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))


def write_report(result: Evaluation, out_dir: Path) -> None:
    """metrics.json, confusion_matrix.png, misclassified.png, and the same numbers and figures in TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter

    from cnnlab.commands.figures import confusion_matrix_figure, figure_array, misclassified_figure, save_figure
    from cnnlab.commands.run_record import write_json

    split = result.metrics["split"]
    confusion_fig = confusion_matrix_figure(result.confusion, result.class_names)
    errors_fig = misclassified_figure(*result.errors)
    save_figure(confusion_fig, out_dir / "confusion_matrix.png")
    save_figure(errors_fig, out_dir / "misclassified.png")
    writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
    try:
        for key, value in result.metrics.items():
            if isinstance(value, float):
                writer.add_scalar(f"{split}/{key.removeprefix(split + '_')}", value, 0)
            elif isinstance(value, dict):
                for name, v in value.items():
                    writer.add_scalar(f"{split}/{key.removeprefix(split + '_')}/{name}", v, 0)
        writer.add_image(f"{split}/confusion_matrix", figure_array(confusion_fig), 0, dataformats="HWC")
        writer.add_image(f"{split}/misclassified", figure_array(errors_fig), 0, dataformats="HWC")
        writer.add_text("checkpoint", f"{result.path} (sha256 {result.metrics['checkpoint_sha256']})", 0)
    finally:
        writer.close()
    write_json(out_dir / "metrics.json", result.metrics)  # last: its presence marks a complete report


COLUMNS = ("rank", "checkpoint", "model", "acc", "top5_acc", "macro_f1", "loss", "samples")


def comparison_rows(results: list[Evaluation]) -> list[dict[str, Any]]:
    """One row per checkpoint, ranked by accuracy (best first; ties by lower loss)."""
    split = results[0].metrics["split"]
    ranked = sorted(results, key=lambda r: (-r.metrics[f"{split}_acc"], r.metrics[f"{split}_loss"]))
    return [
        {
            "rank": rank,
            "checkpoint": str(r.path),
            "model": r.metrics["model"].rsplit(".", 1)[-1],
            "acc": r.metrics[f"{split}_acc"],
            "top5_acc": r.metrics.get(f"{split}_top5_acc"),
            "macro_f1": r.metrics[f"{split}_macro_f1"],
            "loss": r.metrics[f"{split}_loss"],
            "samples": r.metrics["samples"],
        }
        for rank, r in enumerate(ranked, start=1)
    ]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_comparison(rows: list[dict[str, Any]], run_dir: Path) -> None:
    """comparison.csv and comparison.md in the eval run directory."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(run_dir / "comparison.csv", buffer.getvalue())
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    write_text_atomic(run_dir / "comparison.md", "\n".join(lines) + "\n")


def print_results(console: Console, results: list[Evaluation], rows: list[dict[str, Any]]) -> None:
    if len(results) == 1:
        table = Table(title=f"Evaluation of {results[0].path}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in results[0].metrics.items():
            if not isinstance(value, dict):
                table.add_row(key, _cell(value))
    else:
        split = results[0].metrics["split"]
        table = Table(title=f"{len(rows)} checkpoints on the {split} split, ranked by accuracy")
        for column in COLUMNS:
            left = column in ("checkpoint", "model")
            table.add_column(column, justify="left" if left else "right", overflow="fold" if left else "ellipsis")
        for row in rows:
            table.add_row(*(_cell(row[c]) for c in COLUMNS))
    console.print(table)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate cfg.ckpt_path (one or many checkpoints); returns the metrics (for many: the ranked rows too)."""
    if str(cfg.precision) not in ("auto", *PRECISIONS):
        raise UserError(f"precision={cfg.precision!r} is not known; choose auto or one of {', '.join(PRECISIONS)}.")
    if cfg.split not in SPLITS:
        raise UserError(f"split={cfg.split!r} is not known; choose one of {', '.join(SPLITS)}.")
    if cfg.ckpt_path is None or cfg.ckpt_path == "":
        raise UserError("ckpt_path is not set: give ckpt_path=<run dir>/checkpoints/best.ckpt (or a run directory).")
    spec = OmegaConf.to_container(cfg.ckpt_path) if OmegaConf.is_config(cfg.ckpt_path) else cfg.ckpt_path
    overrides = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else {}
    run_dir = Path(cfg.run_dir)
    device = pick_device(cfg.device)

    # Every file is loaded and every data folder checked before any evaluation runs.
    paths = resolve_checkpoints(spec)
    prepared = []
    for path in paths:
        ckpt = load_checkpoint(path)
        prepared.append((path, ckpt, build_datamodule(ckpt, overrides, path)))
    results = [evaluate_checkpoint(path, ckpt, datamodule, cfg, device) for path, ckpt, datamodule in prepared]

    rows = comparison_rows(results)
    if len(results) == 1:
        write_report(results[0], run_dir)
    else:
        for index, result in enumerate(results):
            write_report(result, run_dir / output_name(index, result.path))
        write_comparison(rows, run_dir)
    print_results(Console(), results, rows)
    if len(results) == 1:
        return results[0].metrics
    return {"split": cfg.split, "checkpoints": [r.metrics for r in results], "ranking": rows}
