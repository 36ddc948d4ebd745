"""Where a run's weights come from, settled once before anything is built: one plain value that train(cfg) reads.

A run starts in exactly one of four ways, the first that applies: `resume=` / `ckpt_path=` (the same run continued:
weights, optimizer, schedule, step, data order, from its checkpoint), `init_from=<checkpoint>` (that checkpoint's
matching weights into a new run), `model.weights=<name>` of `model=torchvision` (torchvision's ImageNet backbone), or
from scratch. Data-dependent initialization (the patch whitening of `model=airbench`) happens only in a run whose
start did not bring those weights along (cnnlab.training.whitening).
"""

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cnnlab.checkpoints.resume import load_resume_checkpoint
from cnnlab.training.pretrained import model_weights, start_from_weights

KINDS = ("resume", "init_from", "weights", "scratch")


@dataclass(frozen=True)
class RunStart:
    """How the run starts (one of KINDS), from what (a checkpoint path or a weights name), and the checkpoint read."""

    kind: str
    source: str | None = None
    checkpoint: dict[str, Any] | None = None  # resume's or init_from's, loaded safely (weights_only)

    @property
    def resume_step(self) -> int | None:
        """The step a resumed run continues from; None for a new run."""
        return int(self.checkpoint["global_step"]) if self.kind == "resume" else None


SCRATCH = RunStart("scratch")


def settle_start(cfg: DictConfig) -> RunStart:
    """The run's start from cfg, its checkpoint loaded and checked (a bad file is a UserError, before any data)."""
    if cfg.get("ckpt_path"):
        return RunStart("resume", str(cfg.ckpt_path), load_resume_checkpoint(cfg.ckpt_path))
    if cfg.get("init_from"):
        from cnnlab.training.finetune import checkpoint_for_init

        model = OmegaConf.to_container(cfg.model, resolve=True)
        return RunStart("init_from", str(cfg.init_from), checkpoint_for_init(cfg.init_from, model))
    weights = model_weights(cfg.model)
    if weights is not None:
        return RunStart("weights", str(weights))
    return SCRATCH


def finetune_settings(cfg: DictConfig, start: RunStart) -> dict[str, Any] | None:
    """The classifier's `finetune` hyperparameters for a run whose weights partly come from elsewhere (init_from,
    torchvision's weights) or with frozen layers; None for an ordinary run. A resumed run keeps its own record."""
    if start.kind == "resume":
        return start.checkpoint["hyper_parameters"].get("finetune")
    if start.kind == "scratch" and not cfg.get("freeze"):
        return None
    return {
        "init_from": start.source if start.kind == "init_from" else None,
        "freeze": list(cfg.get("freeze") or []),
        "backbone_lr_scale": float(cfg.get("backbone_lr_scale", 1.0)),
        "fresh": [],  # filled in by load_start once the weights are carried over
    }


def load_start(classifier: Any, start: RunStart, cfg: DictConfig) -> str | None:
    """Put the start's weights into a new run's model and record its new layers in hparams["finetune"]["fresh"];
    returns the line the run header prints. A resumed run's weights come back in Trainer.fit, from its checkpoint."""
    if start.kind == "init_from":
        from cnnlab.training.finetune import transfer_weights

        transfer = transfer_weights(classifier.model, start.checkpoint, start.source)
        classifier.hparams["finetune"]["fresh"] = transfer.fresh_parameters
        return transfer.report()
    if start.kind == "weights":
        return start_from_weights(classifier, cfg)
    if start.kind == "resume":
        return f"resumed  from step {start.resume_step:,} of {start.source}"
    return None
