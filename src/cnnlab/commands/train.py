"""train(cfg): build data, model and Trainer from a composed config, fit, test, and write the run directory."""

import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

from cnnlab.checkpoints.atomic_save import DiskFull
from cnnlab.commands.console import RunHeader, parameter_count, print_summary
from cnnlab.commands.run_record import (
    early_stopping_record,
    environment,
    hparams_row,
    job_start_time,
    log_hparams,
    write_json,
)
from cnnlab.commands.run_start import SCRATCH, RunStart, finetune_settings, load_start, settle_start
from cnnlab.commands.validation import check_splits, resumes_in_place, validate_config, validate_model
from cnnlab.data.prepare_once import prepare_once_per_machine
from cnnlab.training.classifier import ImageClassifier
from cnnlab.training.last_checkpoint import LastCheckpoint
from cnnlab.training.phase_clock import PhaseClock
from cnnlab.training.pretrained import preprocessing_from_weights
from cnnlab.training.step_clock import StepClock
from cnnlab.training.stopping import NonFiniteLoss, RunInterrupted
from cnnlab.training.tracking import (
    MLflowRunInCheckpoints,
    build_mlflow_logger,
    continued_run_id,
    finish_tracking,
    is_mlflow,
)

# What a run writes into its folder by these names (.hydra/ and train.log are Hydra's, rewritten by every run).
RUN_OUTPUTS = ("checkpoints", "tensorboard", "csv", "metrics.json", "env.json")


def plain(node: Any) -> Any:
    """A resolved config node as plain dicts and lists (what checkpoints may store)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def build_classifier(cfg: DictConfig, start: RunStart = SCRATCH) -> ImageClassifier:
    """The LightningModule for cfg, from plain values only; its model compiled in place when cfg.compile asks."""
    classifier = ImageClassifier(
        model=plain(cfg.model),
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.scheduler) or None,
        data=plain(cfg.data),
        label_smoothing=cfg.label_smoothing,
        channels_last=cfg.channels_last,
        tta=cfg.tta,
        finetune=finetune_settings(cfg, start),
    )
    if cfg.compile.enabled:
        # nn.Module.compile compiles in place: parameter names, and so checkpoint keys, stay the same.
        classifier.model.compile(backend=cfg.compile.backend, mode=cfg.compile.mode)
        classifier.dynamic_eval_batch = True  # one evaluation graph for every batch size, not one per size
    return classifier


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The DataModule for cfg. With compile.enabled its training loader drops each epoch's last, smaller batch:
    a batch of another size would make torch.compile build a second training graph."""
    return instantiate(cfg.data, drop_last=bool(cfg.data.get("drop_last") or cfg.compile.enabled))


def build_trainer(
    cfg: DictConfig,
    extra_callbacks: list[L.Callback] | None = None,
    resume_step: int | None = None,
    mlflow_run_id: str | None = None,
    validates: bool = True,
) -> L.Trainer:
    """The Trainer with the configured callbacks (and extra_callbacks, e.g. a search's pruning) and loggers.

    resume_step: the checkpoint's step when resuming; TensorBoard hides what the interrupted run logged after it.
    mlflow_run_id: the MLflow run a run resumed in place continues (its checkpoint keeps the id).
    validates: False for a run without a validation split: best.ckpt, chosen by a validation score, is left out
    (Lightning would warn at every epoch that the score is missing); last.ckpt holds the final weights.
    """
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not validates:
        callbacks = [c for c in callbacks if not (type(c) is ModelCheckpoint and str(c.monitor).startswith("val/"))]
    callbacks += extra_callbacks or []
    loggers = []
    for lg in (cfg.get("logger") or {}).values():
        if lg is None:
            continue
        if is_mlflow(lg):
            loggers.append(build_mlflow_logger(lg, mlflow_run_id))
        elif resume_step is not None and lg._target_.endswith("TensorBoardLogger"):
            loggers.append(instantiate(lg, purge_step=resume_step))
        else:
            loggers.append(instantiate(lg))
    if any(is_mlflow(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None):
        callbacks.append(MLflowRunInCheckpoints())
    overrides: dict[str, Any] = {}
    if cfg.trainer.get("deterministic") and cfg.trainer.get("benchmark"):
        # cuDNN autotuning times the candidate algorithms, so another process may pick another (deterministic) one
        # and get other numbers: a deterministic run goes without it (trainer=gpu turns it on).
        overrides["benchmark"] = False
    if cfg.get("compile") and cfg.compile.enabled:
        # Lightning validates under no_grad while fitting but tests under inference_mode, whose tensors a compiled
        # graph tells apart: the test stage would compile one more evaluation graph. no_grad costs nothing more here.
        overrides["inference_mode"] = False
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)


def train(cfg: DictConfig, extra_callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
    """Fit, then test the best checkpoint; returns the metrics written to <run dir>/metrics.json."""
    started = job_start_time()
    phases = PhaseClock(start_up_seconds=time.time() - started)
    run_dir = Path(cfg.run_dir)
    validate_config(cfg)  # bad values stop here, before data is read or anything is written
    start = settle_start(cfg)  # scratch, resume, init_from or torchvision weights, the checkpoint read and checked
    if cfg.get("overwrite") and not resumes_in_place(run_dir, cfg.ckpt_path):
        remove_previous_run(run_dir)
    if start.kind == "resume":  # a folder's classes and mean/std are the ones the run was trained with
        stored = start.checkpoint["hyper_parameters"]["data"]
        with open_dict(cfg):
            cfg.data.update({k: v for k, v in stored.items() if k in cfg.data and cfg.data[k] is None})
    preprocessing_from_weights(cfg)  # model.weights: the input size, mean and std they expect, where left null

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    splits = check_splits(cfg, datamodule)  # what needs a validation split or test images, refused or skipped
    # A run resumed in its own folder continues its MLflow run; one resumed into another folder is a new run there.
    in_place = resumes_in_place(run_dir, cfg.ckpt_path)
    mlflow_run_id = continued_run_id(start.checkpoint) if in_place else None
    trainer = build_trainer(cfg, extra_callbacks, start.resume_step, mlflow_run_id, validates=splits.validates)
    # Missing files are reported (or downloaded) before the model is built or anything is written. The machine's
    # first process prepares, as Lightning's prepare_data_per_node does; the others wait at fit()'s barrier, or at
    # the lock inside if discover() needs the files sooner (CIFAR-100's class names).
    if trainer.local_rank == 0:
        prepare_once_per_machine(datamodule)
    # What the data finds in its files (a folder's classes, mean and std) goes into cfg.data before the model is
    # built and checked against it, so that the checkpoint stores it; {} for MNIST, CIFAR-10 and a resumed run.
    with open_dict(cfg):
        cfg.data.update(datamodule.discover())
    validate_model(cfg, start.checkpoint if start.kind == "resume" else None)

    classifier = build_classifier(cfg, start)
    notes = [note for note in (load_start(classifier, start, cfg), *splits.notes) if note]
    console = Console(stderr=False)
    if trainer.is_global_zero and cfg.get("print_config"):
        console.print(OmegaConf.to_yaml(cfg, resolve=True), markup=False, highlight=False)
    trainer.callbacks.append(RunHeader(run_dir, notes))
    clock = StepClock()
    trainer.callbacks += [clock, phases]

    phases.mark("data")  # fit() reads the splits and moves them to the device first
    try:
        trainer.fit(classifier, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    except (RunInterrupted, NonFiniteLoss, DiskFull) as stop:
        status = {RunInterrupted: "interrupted", NonFiniteLoss: "diverged"}.get(type(stop), "failed")
        progress = {"status": status, "epochs": trainer.current_epoch, "global_step": trainer.global_step}
        if trainer.is_global_zero:
            try:
                write_json(run_dir / "metrics.json", {**progress, **logged_so_far(trainer)})
            except OSError:  # a full disk may not take even this; the message says what happened
                pass
        raise

    best = (c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and not isinstance(c, LastCheckpoint))
    checkpoint = next(best, None)  # best.ckpt's; None where the config turns it off or there is no validation
    best_path = checkpoint.best_model_path if checkpoint else ""
    train_seconds = max(clock.seconds, 1e-9)  # every stretch of steps of the run, those before a resume too
    steady = clock.steady_step_ms()
    metrics: dict[str, Any] = {
        "status": "finished",
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "train_seconds": round(train_seconds, 3),  # the training steps alone (cnnlab.training.step_clock)
        # Every process takes data.batch_size images per step: the global batch is that times the world size.
        "global_batch_size": datamodule.batch_size * trainer.world_size,
        "train_images_per_second": round(clock.batches * datamodule.batch_size * trainer.world_size / train_seconds, 1),
        # A step's time after the first epoch, and how many steps that first epoch held (cnnlab.training.step_clock)
        "steady_step_ms": None if steady is None else round(steady, 3),
        "warmup_steps": clock.warmup_batches,
        "val_acc_best": float(checkpoint.best_model_score) if checkpoint and checkpoint.best_model_score else None,
        "best_checkpoint": best_path or None,
        **early_stopping_record(trainer),  # stopped_early, stopped_epoch
    }
    phases.mark("test")
    if cfg.test and splits.test_skipped:
        metrics["test_skipped"] = splits.test_skipped
    elif cfg.test:
        results = trainer.test(
            classifier, datamodule=datamodule, ckpt_path=best_path or None, verbose=False, weights_only=True
        )
        metrics["test_acc"] = results[0]["test/acc"]
        metrics["test_loss"] = results[0]["test/loss"]
    phases.mark("record")

    if trainer.is_global_zero:
        env = environment(cfg.seed, cfg.trainer.deterministic, datamodule.file_checksums())
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                row = hparams_row(cfg, parameter_count(classifier), metrics["global_batch_size"])
                log_hparams(logger, row)
    metrics["wall_seconds"] = round(time.time() - started, 3)  # this job's start to its record (before MLflow, W&B)
    if trainer.is_global_zero:
        finish_tracking(trainer, cfg, metrics)  # logger=mlflow or wandb: the config, these metrics, best.ckpt
        phases.mark("done")
        metrics["phases"] = phases.report(getattr(trainer.strategy.checkpoint_io, "seconds", 0.0))
        write_json(run_dir / "metrics.json", metrics)
        write_json(run_dir / "env.json", env)
        print_summary(console, run_dir, metrics)
    return metrics


@rank_zero_only  # once: the other processes of a distributed run start later, into the same folder
def remove_previous_run(run_dir: Path) -> None:
    """overwrite=true: remove what an earlier run wrote into run_dir, so that the new run's files replace it rather
    than sit beside it (Lightning's ModelCheckpoint would write best-v1.ckpt; TensorBoard would show both runs)."""
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def logged_so_far(trainer: L.Trainer) -> dict[str, float]:
    """The last logged value of every metric, e.g. {"val_acc": 0.97}, for the record of a run that stopped early."""
    return {k.replace("/", "_"): float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
