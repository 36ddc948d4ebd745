"""Checks of a composed config before any work starts: each mistake becomes one UserError paragraph naming the key."""

import importlib.util
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from cnnlab.checkpoints.resume import check_checkpoint_fits, resume_command
from cnnlab.errors import UserError
from cnnlab.training.pretrained import check_weights_file, model_weights
from cnnlab.training.tta import TTA_LEVELS
from cnnlab.writable_folders import writable_folder


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_numbers(cfg: DictConfig) -> None:
    lr = cfg.optimizer.get("lr")
    if lr is None or not lr > 0:
        raise UserError(f"optimizer.lr={lr} must be a positive number (the peak learning rate), e.g. 0.05.")
    for key in ("batch_size", "eval_batch_size"):
        value = cfg.data.get(key)
        if not isinstance(value, int) or value < 1:
            raise UserError(f"data.{key}={value} must be a whole number of images of at least 1, e.g. data.{key}=128.")
    epochs, steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps")
    if steps in (None, -1) and (not isinstance(epochs, int) or epochs < 1):
        raise UserError(f"trainer.max_epochs={epochs} must be at least 1 (the number of passes over the training set).")
    val_size = cfg.data.get("val_size")
    if not isinstance(val_size, int) or val_size < 0:
        raise UserError(f"data.val_size={val_size} must be a whole number of images, 0 or more.")


def training_set_size(cfg: DictConfig) -> int | None:
    """The number of training images, from the MNIST label file's 8-byte header; None where that is not cheap."""
    labels = Path(cfg.data.data_dir).expanduser() / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    if not cfg.data._target_.endswith(".MNISTDataModule") or not labels.is_file():  # not FashionMNISTDataModule
        return None
    header = labels.read_bytes()[:8] if labels.stat().st_size >= 8 else b""
    return int.from_bytes(header[4:8], "big") if len(header) == 8 else None


def check_split(cfg: DictConfig) -> None:
    n = training_set_size(cfg)
    if n is not None and cfg.data.val_size >= n:
        raise UserError(
            f"data.val_size={cfg.data.val_size} leaves no training images: the training set in {cfg.data.data_dir} "
            f"has {n}. Choose data.val_size below {n} (5000 is the usual MNIST split)."
        )


def check_model_fits_data(cfg: DictConfig) -> None:
    """Build the model on the meta device (no memory, no weights) and push a batch of the data's shape through it."""
    from cnnlab.training.classifier import build_model

    shape, num_classes = tuple(cfg.data.image_shape), cfg.data.num_classes
    model_cfg = _plain(cfg.model)
    for key, expected, what in (("in_channels", shape[0], "channel(s)"), ("image_size", shape[1], "pixels per side")):
        if key in model_cfg and model_cfg[key] != expected:
            raise UserError(
                f"model.{key}={model_cfg[key]} does not fit the data: {cfg.data._target_} images have shape "
                f"{list(shape)}, i.e. {expected} {what}. Leave model.{key} at its default, which follows "
                "data.image_shape, or pick the data config that matches."
            )
    try:
        with torch.device("meta"):
            model = build_model(model_cfg).eval()
    except (InstantiationException, ValueError, TypeError) as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        raise UserError(
            f"The model config cannot be built: {model_cfg['_target_']} rejects it ({_first_line(cause)}). "
            "Fix the model.* value you overrode."
        ) from None
    try:
        with torch.device("meta"):
            out = model(torch.zeros(2, *shape))
    except RuntimeError as err:
        settings = ", ".join(f"model.{k}={v}" for k, v in model_cfg.items() if k != "_target_")
        raise UserError(
            f"The model does not fit the data: {model_cfg['_target_']} with {settings} fails on {cfg.data._target_} "
            f"images of shape {list(shape)} ({_first_line(err)}). Fix the model.* value you overrode."
        ) from None
    if tuple(out.shape) != (2, num_classes):
        raise UserError(
            f"The model gives {out.shape[1]} outputs per image but the data has data.num_classes={num_classes}; "
            "leave model.num_classes to follow the data config."
        )


def check_paths(cfg: DictConfig) -> None:
    output = Path(cfg.paths.output_dir)
    if not writable_folder(output):
        raise UserError(f"paths.output_dir={output} cannot be written (no permission). Point it at a writable folder.")
    data_dir = Path(cfg.data.data_dir).expanduser()
    if cfg.data.get("download") and not data_dir.is_dir() and not writable_folder(data_dir):
        raise UserError(
            f"data.data_dir={data_dir} does not exist and cannot be created to download into (no permission). "
            "Point data.data_dir at a folder holding the dataset, or at a writable one."
        )
    run_dir = Path(cfg.run_dir)
    if not writable_folder(run_dir):
        raise UserError(f"The run folder {run_dir} cannot be written (no permission). Set hydra.run.dir elsewhere.")


def argument_values(args: list[str]) -> dict[str, str]:
    """The values a command line's key=value overrides set, by key: `+trainer.x=1` -> {"trainer.x": "1"}."""
    return {a.split("=", 1)[0].lstrip("+"): a.split("=", 1)[1] for a in args if "=" in a and not a.startswith("-")}


def check_output_arguments(args: list[str]) -> None:
    """Before Hydra makes the run folder: the output folders named on the command line must be writable."""
    values = argument_values(args)
    for key in ("hydra.run.dir", "paths.output_dir"):
        folder = values.get(key, "outputs" if key == "paths.output_dir" else None)
        if folder and not writable_folder(Path(folder)):
            raise UserError(f"{key}={folder} cannot be written (no permission). Point it at a writable folder.")


def previous_run(run_dir: Path) -> list[Path]:
    """What an earlier run left in run_dir: its checkpoints and metrics.json; [] for a new or unused folder."""
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt")) if (run_dir / "checkpoints").is_dir() else []
    return [*checkpoints, *[p for p in (run_dir / "metrics.json",) if p.is_file()]]


def resumes_in_place(run_dir: Path, ckpt_path: str | None) -> bool:
    """Whether ckpt_path is one of run_dir's own checkpoints, i.e. the run continues there."""
    return bool(ckpt_path) and Path(ckpt_path).expanduser().resolve().parent == (run_dir / "checkpoints").resolve()


def check_run_dir_unused(run_dir: Path, ckpt_path: str | None, overwrite: bool) -> None:
    """A new run into a folder that holds a run is refused, unless overwrite=true; a run resumed from that folder's
    own checkpoint continues there.

    Lightning's ModelCheckpoint would write best-v1.ckpt beside the old best.ckpt rather than overwrite it, and the
    TensorBoard files of both runs would mix.
    """
    found = previous_run(run_dir)
    if overwrite or not found or resumes_in_place(run_dir, ckpt_path):
        return
    names = ", ".join(str(p.relative_to(run_dir)) for p in found)
    raise UserError(
        f"The run folder {run_dir} already holds a run ({names}); a new run there would mix its checkpoints and "
        f"curves with the old ones. To continue that run, use {resume_command(run_dir)}; to start a new one, give "
        "it another folder (leave hydra.run.dir unset for a new dated folder, or set hydra.run.dir=<new folder>); "
        "to replace the old run, add overwrite=true."
    )


def check_run_dir_argument(args: list[str]) -> None:
    """Before Hydra writes its record of the run (.hydra/, which resume= reads) into a folder named on the command
    line: check_run_dir_unused for hydra.run.dir."""
    values = argument_values(args)
    folder = values.get("hydra.run.dir")
    resuming = values.get("resume") not in (None, "", "null")
    if not folder or "${" in folder or resuming or any(a in ("-m", "--multirun") for a in args):
        return
    overwrite = values.get("overwrite", "false").lower() == "true"
    check_run_dir_unused(Path(folder).expanduser(), values.get("ckpt_path"), overwrite)


# Loggers whose package is optional, and the pyproject.toml extra (named as the package) that installs it.
OPTIONAL_LOGGERS = {"MLFlowLogger": "mlflow", "WandbLogger": "wandb", "FinishingWandbLogger": "wandb"}


def check_logger_packages(cfg: DictConfig) -> None:
    """A logger whose package is missing stops the run now, not after the data is read and the model built."""
    for name, node in (cfg.get("logger") or {}).items():
        target = str(node.get("_target_", "")) if node is not None else ""
        package = OPTIONAL_LOGGERS.get(target.rsplit(".", 1)[-1])
        if package and importlib.util.find_spec(package) is None:
            raise UserError(
                f"logger.{name} ({target}) needs the {package} package, which is not installed. Install it with "
                f'pip install -e ".[{package}]" (or pip install {package}), or choose another logger, e.g. '
                "logger=tensorboard."
            )


def check_accelerator(cfg: DictConfig) -> None:
    """A GPU asked for where PyTorch sees none is a setting to change, not a crash inside Lightning."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise UserError(
            f"trainer.accelerator={accelerator} (trainer=gpu) asks for a GPU, but PyTorch ({build}) sees none on this "
            "machine. Use trainer=cpu, or trainer=default to take a GPU only when there is one."
        )
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if cfg.trainer.get("sync_batchnorm") and on_cpu:
        raise UserError(
            "trainer.sync_batchnorm=true needs GPUs: PyTorch's SyncBatchNorm does not run in CPU processes "
            f"(trainer.accelerator={accelerator} trains on the CPU here). Drop the setting, or train on GPUs."
        )


def check_finetune(cfg: DictConfig) -> None:
    """freeze names parts of the model, and backbone_lr_scale is a sane factor (init_from is checked where it is
    loaded, cnnlab.training.finetune.checkpoint_for_init)."""
    from cnnlab.training.classifier import build_model
    from cnnlab.training.finetune import frozen_modules

    scale = cfg.get("backbone_lr_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
        raise UserError(f"backbone_lr_scale={scale} must be a positive factor (e.g. 0.1), or 1 for no difference.")
    if scale != 1.0 and not cfg.get("init_from") and model_weights(cfg.model) is None:
        raise UserError(
            f"backbone_lr_scale={scale} scales the rate of the weights carried over by init_from (or model.weights "
            "of model=torchvision), but init_from is not set and the model has no weights. Give "
            "init_from=<checkpoint> or model=torchvision, or drop backbone_lr_scale."
        )
    if cfg.get("freeze"):
        with torch.device("meta"):
            frozen_modules(build_model(_plain(cfg.model)), list(cfg.freeze))


def check_tta(cfg: DictConfig) -> None:
    if cfg.get("tta") not in TTA_LEVELS:
        raise UserError(
            f"tta={cfg.get('tta')} is not a test-time augmentation level; choose one of {', '.join(TTA_LEVELS)} "
            "(flip: each image and its mirror image; flip_translate: those and four one-pixel translations)."
        )


def check_scheduler(cfg: DictConfig) -> None:
    """Refuse scheduler settings the chosen scheduler does not take: what an experiment set for its own scheduler
    is left behind when the command line picks another (experiment=folder_finetune scheduler=none)."""
    node = cfg.get("scheduler")
    if not node:
        return
    settings = {k for k in node if not str(k).startswith("_")}
    target = node.get("_target_")
    if target is None:
        taken: set[str] = set()
    else:
        try:
            taken = set(inspect.signature(get_class(target)).parameters)
        except Exception:  # a target that does not import is reported where it is built, with its own message
            return
    unknown = sorted(settings - taken - {"total_steps", "T_max"})
    if unknown:
        chosen = target.rsplit(".", 1)[-1] if target else "no scheduler (a constant rate)"
        keys = ", ".join(f"scheduler.{k}" for k in unknown)
        removal = " ".join(f"~scheduler.{k}" for k in unknown)
        raise UserError(
            f"The scheduler is {chosen}, which takes no {keys}: settings given for another scheduler (by an "
            "experiment, or on the command line) that the scheduler chosen on the command line replaced. Keep "
            f"the scheduler they belong to, or drop them: add {removal} to the command."
        )


@dataclass
class SplitPlan:
    """What a run does where its data has no validation split or no test images, known before any data is read."""

    validates: bool  # a validation split: val/acc each epoch, best.ckpt
    test_skipped: str | None = None  # why the test stage has nothing to score; None: it runs (if cfg.test)
    notes: list[str] = field(default_factory=list)  # lines for the run header


def check_splits(cfg: DictConfig, datamodule: Any) -> SplitPlan:
    """Refuse what needs a validation split the data will not have (early stopping on val/...), and plan the rest:
    no best.ckpt without validation, no test stage without test images. From the settings and folders alone."""
    has_split = getattr(datamodule, "has_split", lambda split: True)  # a DataModule of a user's own: assume both
    plan = SplitPlan(validates=has_split("val"))
    where = f"data.val_size={cfg.data.get('val_size')}"
    if str(cfg.data.get("_target_", "")).endswith("FolderDataModule"):
        where += f" and no val/ folder in {cfg.data.data_dir}"
    if not plan.validates:
        for name, node in (cfg.get("callbacks") or {}).items():
            if node is None:
                continue
            monitor = str(node.get("monitor", ""))
            if str(node.get("_target_", "")).endswith("EarlyStopping") and monitor.startswith("val/"):
                raise UserError(
                    f"callbacks.{name} stops the run when {monitor} stops improving, but this run has no validation "
                    f"split ({where}), so there is no {monitor} to watch. Hold images out for validation with "
                    "data.val_size=N (or add a val/ folder to an image folder), or leave early stopping out "
                    "(callbacks/early_stopping=null)."
                )
        plan.notes.append(f"val      none ({where}): no best.ckpt; last.ckpt holds the final weights")
    if cfg.get("test") and not has_split("test"):
        plan.test_skipped = f"{cfg.data.data_dir} has no test/ folder, and no validation images to score instead"
        plan.notes.append(f"test     the test stage is skipped: {plan.test_skipped}")
    return plan


def validate_config(cfg: DictConfig) -> None:
    """The checks that need no data read, cheapest first; raises the first UserError found."""
    check_logger_packages(cfg)
    check_numbers(cfg)
    check_tta(cfg)
    check_scheduler(cfg)
    check_accelerator(cfg)
    check_paths(cfg)
    check_run_dir_unused(Path(cfg.run_dir), cfg.get("ckpt_path"), bool(cfg.get("overwrite")))
    check_split(cfg)
    check_weights_file(cfg)  # last: it may download the model's weights


def validate_model(cfg: DictConfig, resumed: dict[str, Any] | None = None) -> None:
    """The checks of the model against the data (whose facts a folder dataset has found by now), the checkpoint
    being resumed (already loaded safely) and fine-tuning; raises the first UserError found."""
    check_model_fits_data(cfg)
    if resumed is not None:
        check_checkpoint_fits(resumed, cfg.ckpt_path, _plain(cfg.model))
    check_finetune(cfg)
