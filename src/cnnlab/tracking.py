"""What experiment trackers get once a training run is over: MLflow and Weights & Biases.

Lightning's loggers (configs/logger/mlflow.yaml, wandb.yaml) open one tracker run per training run, log the
classifier's hyperparameters when fitting starts and every epoch's metrics under the names TensorBoard shows
(`train/loss`, `val/acc`, ...). The whole config, the metrics.json values and the best checkpoint only exist at the end,
and are added here.
"""

from typing import Any

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf


def finish_tracking(trainer: L.Trainer, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """Give each MLflow and W&B logger's run the resolved config and metrics.json's values, and MLflow's best.ckpt."""
    config = OmegaConf.to_container(cfg, resolve=True)
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}  # bools count as 0 or 1
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            # Flattened with "/" as Lightning flattened the classifier's hyperparameters at the start, so those keys
            # come again with the same values: MLflow accepts a parameter logged twice only if it is unchanged.
            logger.log_hyperparams(config)
            logger.log_metrics(numbers, step=trainer.global_step)
            for key, value in metrics.items():
                if isinstance(value, str):  # status, best_checkpoint: MLflow metrics are numbers, tags are text
                    logger.experiment.set_tag(logger.run_id, key, value)
            if metrics.get("best_checkpoint"):
                logger.experiment.log_artifact(logger.run_id, metrics["best_checkpoint"], artifact_path="checkpoints")
        elif isinstance(logger, WandbLogger):
            logger.log_hyperparams(config)
            logger.experiment.summary.update({k: v for k, v in metrics.items() if v is not None})
            logger.experiment.finish()  # see FinishingWandbLogger


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
