"""The loggers' project-specific parts: TensorBoard without an `epoch` chart, and what MLflow and Weights & Biases get
once a training run is over.

Lightning's loggers (configs/logger/mlflow.yaml, wandb.yaml) open one tracker run per training run and log every
epoch's metrics under the names TensorBoard shows (`train/loss`, `val/acc`, ...). The whole config, the
metrics.json values and the best checkpoint are added here, at the end.
"""

from typing import Any

import lightning as L
from lightning.pytorch import loggers
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf


class TensorBoardLogger(loggers.TensorBoardLogger):
    """Lightning's TensorBoardLogger without the `epoch` value Lightning adds to every logged row.

    In TensorBoard that value becomes a chart of its own, the first in the SCALARS tab, saying only that epochs
    follow steps; every curve here is drawn against the training step already.
    """

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)


def finish_tracking(trainer: L.Trainer, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """Give each MLflow and W&B logger's run the resolved config and metrics.json's values, and MLflow's best.ckpt."""
    config = OmegaConf.to_container(cfg, resolve=True)
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}  # bools count as 0 or 1
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            logger.log_hyperparams(flat_config(config))
            logger.log_metrics(numbers, step=trainer.global_step)
            for key, value in metrics.items():
                if isinstance(value, str):  # status, best_checkpoint: MLflow metrics are numbers, tags are text
                    logger.experiment.set_tag(logger.run_id, key, value)
            if metrics.get("best_checkpoint"):
                logger.experiment.log_artifact(logger.run_id, metrics["best_checkpoint"], artifact_path="checkpoints")
        elif isinstance(logger, WandbLogger):
            logger.log_hyperparams(config)  # nested: W&B shows it as a tree
            logger.experiment.summary.update({k: v for k, v in metrics.items() if v is not None})
            logger.experiment.finish()  # see FinishingWandbLogger


def flat_config(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as one level of keys joined with "/" (optimizer/lr), every leaf kept.

    Lightning flattens nested dicts the same way but drops empty lists and dicts, so `freeze: []` would go missing.
    """
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, f"{name}/"))
        else:
            flat[name] = value if isinstance(value, bool | int | float | str) or value is None else str(value)
    return flat


class FinishingWandbLogger(WandbLogger):
    """Lightning's WandbLogger, whose W&B run ends with the training run that opened it.

    Lightning leaves a W&B run open until the process exits, and the next WandbLogger in the same process (the next
    job of a -m sweep, the next trial of a search) would log into it. finish_tracking ends the run of a finished
    training run; this ends it when fitting fails or is interrupted.
    """

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status == "failed":
            import wandb

            wandb.finish(exit_code=1)
