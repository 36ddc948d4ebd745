"""The MLflow record of a training run: its whole config, its metrics.json values and its best checkpoint.

Lightning's MLFlowLogger (configs/logger/mlflow.yaml) opens one MLflow run per training run, logs the classifier's
hyperparameters when fitting starts and every epoch's metrics under the names TensorBoard shows (`train/loss`,
`val/acc`, ...). What only exists once the run is over is added here.
"""

from typing import Any

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf


def record_in_mlflow(trainer: L.Trainer, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """Add the flattened config, metrics.json's values and the best checkpoint to the run of each MLflow logger."""
    for logger in trainer.loggers:
        if not isinstance(logger, MLFlowLogger):
            continue
        # Flattened with "/" as Lightning flattened the classifier's hyperparameters at the start, so those keys come
        # again with the same values: MLflow accepts a parameter logged twice only if its value is unchanged.
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}  # bools count as 0 or 1
        logger.log_metrics(numbers, step=trainer.global_step)
        for key, value in metrics.items():
            if isinstance(value, str):  # status, best_checkpoint: MLflow metrics are numbers, tags are text
                logger.experiment.set_tag(logger.run_id, key, value)
        if metrics.get("best_checkpoint"):
            logger.experiment.log_artifact(logger.run_id, metrics["best_checkpoint"], artifact_path="checkpoints")
