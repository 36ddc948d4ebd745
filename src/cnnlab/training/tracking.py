"""The loggers' project-specific parts: TensorBoard without an `epoch` chart, and what MLflow and Weights & Biases get
once a training run is over.

Lightning's loggers (configs/logger/mlflow.yaml, wandb.yaml) open one tracker run per training run and log every
epoch's metrics under the names TensorBoard shows (`train/loss`, `val/acc`, ...). The whole config, the
metrics.json values and the best checkpoint are added here, at the end. A training run continued with resume=
continues its MLflow run: the run's id travels in the checkpoints.
"""

from argparse import Namespace
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch import loggers
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

RUN_ID_KEY = "mlflow_run_id"  # the checkpoint entry holding the MLflow run's id


class TensorBoardLogger(loggers.TensorBoardLogger):
    """Lightning's TensorBoardLogger without the `epoch` value Lightning adds to every logged row.

    In TensorBoard that value becomes a chart of its own, the first in the SCALARS tab, saying only that epochs
    follow steps; every curve here is drawn against the training step already.
    """

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)


class MLFlowLogger(loggers.MLFlowLogger):
    """Lightning's MLFlowLogger, which can continue one MLflow run over the processes of a resumed training run.

    Lightning continues an MLflow run given its `run_id`, but MLflow refuses a parameter logged again with another
    value (trainer/max_epochs of an extended run, ckpt_path of a resumed one), and the run keeps the status its last
    process left: RUNNING after a kill, FAILED after Ctrl-C, FINISHED for a finished run being extended. Here a
    continued run is marked RUNNING again when fitting starts (MLflowRunInCheckpoints), a parameter keeps its first
    value and a new value goes into the tag `resumed/<name>`.
    """

    def __init__(self, *args: Any, run_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, run_id=run_id, **kwargs)
        self.continues = run_id is not None

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        flat = flat_config(vars(params) if isinstance(params, Namespace) else dict(params))
        logged = self.experiment.get_run(self.run_id).data.params
        super().log_hyperparams({k: v for k, v in flat.items() if k not in logged})
        for key, value in flat.items():
            text = str(value)[:250]  # as Lightning stores a parameter
            if key in logged and logged[key] != text:
                self.experiment.set_tag(self.run_id, f"resumed/{key}", text)


class MLflowRunInCheckpoints(L.Callback):
    """Stores the MLflow run's id in every checkpoint, so that resume= continues that run (continued_run_id), and
    marks a continued run RUNNING when fitting starts; Lightning's MLFlowLogger finishes it as FINISHED or FAILED."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in mlflow_loggers(trainer):
            if logger.continues and trainer.is_global_zero:
                logger.experiment.update_run(logger.run_id, status="RUNNING")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in mlflow_loggers(trainer):
            if trainer.is_global_zero:  # the other processes have no run; only this one writes the file
                checkpoint[RUN_ID_KEY] = logger.run_id


def mlflow_loggers(trainer: L.Trainer) -> list[loggers.MLFlowLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, loggers.MLFlowLogger)]


def is_mlflow(node: DictConfig) -> bool:
    """Whether a logger config builds an MLflow logger (this module's or Lightning's)."""
    return str(node.get("_target_", "")).endswith(".MLFlowLogger")


def build_mlflow_logger(node: DictConfig, run_id: str | None) -> loggers.MLFlowLogger:
    """The MLflow logger of node; it continues the run run_id (a resumed run's, from its checkpoint) when that run
    is in node's store and not deleted, and opens a new run otherwise (another store, or a run from before the id
    was kept)."""
    if run_id is not None and rank_zero_only.rank == 0:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            found = MlflowClient(node.get("tracking_uri")).get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            found = False
        run_id = run_id if found else None
    return instantiate(node, run_id=run_id) if run_id is not None else instantiate(node)


def continued_run_id(checkpoint: dict[str, Any] | None) -> str | None:
    """The MLflow run a checkpoint's training run logged to, or None."""
    return (checkpoint or {}).get(RUN_ID_KEY)


def finish_tracking(trainer: L.Trainer, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """Give each MLflow and W&B logger's run the resolved config and metrics.json's values, and MLflow's best.ckpt."""
    config = OmegaConf.to_container(cfg, resolve=True)
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}  # bools count as 0 or 1
    for logger in trainer.loggers:
        if isinstance(logger, loggers.MLFlowLogger):
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
