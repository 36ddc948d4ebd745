"""Console entry points: thin Hydra wrappers around the plain functions in cnnlab.train and friends."""

import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cnnlab.errors import UserError


def config_dir() -> str:
    """The directory holding train.yaml and the config groups.

    A wheel carries the configs inside the package; a source checkout (editable install) keeps them at its root.
    """
    packaged = Path(__file__).parent / "configs"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "configs")


def run_reporting_user_errors(fn: Callable[[DictConfig], dict], cfg: DictConfig) -> dict:
    """Call fn(cfg); a UserError becomes one paragraph on stderr and exit code 2 instead of a traceback."""
    try:
        return fn(cfg)
    except UserError as err:
        print(f"\nError: {err}\n", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    """`cnnlab-train` / `python scripts/train.py`: train, test, and write the run directory."""
    from cnnlab.train import train

    metrics = run_reporting_user_errors(train, cfg)
    return metrics.get("val_acc_best")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def eval_main(cfg: DictConfig) -> None:
    """`cnnlab-eval` / `python scripts/eval.py`: score checkpoints and write reports, figures and a ranking."""
    from cnnlab.evaluate import evaluate

    run_reporting_user_errors(evaluate, cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def predict_main(cfg: DictConfig) -> None:
    """`cnnlab-predict` / `python scripts/predict.py`: classify image files with a checkpoint."""
    from cnnlab.predict import predict

    run_reporting_user_errors(predict, cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def export_main(cfg: DictConfig) -> None:
    """`cnnlab-export` / `python scripts/export.py`: write a checkpoint's model as ONNX or TorchScript, verified."""
    from cnnlab.export import export

    run_reporting_user_errors(export, cfg)
