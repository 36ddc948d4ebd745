"""The LightningModule: loss, metrics, optimizer and scheduler set-up, logging. Nothing else.

It is built from plain config dictionaries (the model's, the optimizer's, the scheduler's and the data config), which
`save_hyperparameters` stores in every checkpoint: a checkpoint alone rebuilds the model, and it loads with
`torch.load(weights_only=True)` because it holds no pickled objects.
"""

import inspect
import warnings
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from cnnlab.errors import UserError
from cnnlab.training.param_groups import make_optimizer
from cnnlab.training.tta import stored_tta, tta_logits

MIN_SCHEDULE_STEPS = 16


def build_model(model: dict[str, Any]) -> nn.Module:
    """Instantiate a model from its config dictionary (a `_target_` node)."""
    return instantiate(model, _convert_="all")


def schedule_span(scheduler: dict[str, Any] | None, total_steps: int) -> dict[str, int]:
    """The arguments that stretch a per-step schedule over the run (`total_steps`, `T_max`) that its config leaves
    to be filled in, with their values for a run of total_steps optimizer steps."""
    if not scheduler:
        return {}
    partial = instantiate(scheduler, _convert_="all")
    params = inspect.signature(partial.func).parameters
    # OneCycleLR divides by zero on a few steps; a run that short (a smoke test) stops early instead.
    steps = max(total_steps, MIN_SCHEDULE_STEPS)
    return {name: steps for name in ("total_steps", "T_max") if name in params and name not in partial.keywords}


def make_scheduler(scheduler: dict[str, Any] | None, optimizer: Optimizer, total_steps: int) -> LRScheduler | None:
    """A per-step LR scheduler from its `_partial_` config; `total_steps` / `T_max` span the run unless given.

    Parameter groups with an `lr_scale` (fine-tuning's backbone_lr_scale) get their peak rate (`max_lr`) scaled too.
    """
    if not scheduler:
        return None
    partial = instantiate(scheduler, _convert_="all")
    filled: dict[str, Any] = schedule_span(scheduler, total_steps)
    scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    if "max_lr" in partial.keywords and any(scale != 1.0 for scale in scales):
        filled["max_lr"] = [partial.keywords["max_lr"] * scale for scale in scales]
    return partial(optimizer, **filled)


def replanned_scheduler(
    scheduler: dict[str, Any], optimizer: Optimizer, total_steps: int, done_steps: int
) -> LRScheduler:
    """The scheduler a run planned for total_steps from the start would have after done_steps optimizer steps.

    Built anew and stepped done_steps times from the optimizer's initial rates, so it holds for every scheduler,
    including those whose next rate is computed from the current one (cosine annealing).
    """
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", group["lr"])
    replanned = make_scheduler(scheduler, optimizer, total_steps)
    with warnings.catch_warnings():  # stepping a scheduler without optimizer steps is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(done_steps):
            replanned.step()
    return replanned


class InferenceNet(nn.Module):
    """The classifier's evaluation path as a plain module, for export: the model at a TTA level (tta.py)."""

    def __init__(self, model: nn.Module, tta: str) -> None:
        super().__init__()
        self.model, self.tta = model, tta

    def forward(self, images: Tensor) -> Tensor:
        return tta_logits(self.model, images, self.tta)


class TrainingSums(Metric):
    """Running training loss and accuracy of an epoch, as three sums kept on the device.

    One update of three in-place additions costs 40% of a MeanMetric plus a MulticlassAccuracy update (26 us, 67 us),
    which matters for small models whose whole step takes a millisecond. compute() sums the states across DDP ranks.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("loss_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, loss: Tensor, logits: Tensor, target: Tensor) -> None:
        """target: class indices (B,), or soft targets (B, K) of mixed images, whose largest share counts as the
        label: training accuracy under MixUp / CutMix is against each image's dominant label."""
        # A NaN loss passes through: StopOnNonFiniteLoss stops the run at the step it appears.
        if target.ndim == 2:
            target = target.argmax(dim=1)
        self.loss_sum += loss.detach() * len(target)
        self.correct += (logits.detach().argmax(dim=1) == target).sum()
        self.count += len(target)

    def compute(self) -> dict[str, Tensor]:
        count = self.count.clamp(min=1)
        return {"loss": self.loss_sum / count, "acc": self.correct / count}


class ImageClassifier(L.LightningModule):
    """Trains any image classifier with cross-entropy and reports accuracy per stage.

    Args:
        model: the model's `_target_` config, e.g. {"_target_": "cnnlab.models.LeNet5", "num_classes": 10, ...}.
        optimizer: a `_partial_` optimizer config, called with the parameters.
        scheduler: a `_partial_` LR scheduler config or None; `total_steps` / `T_max` are filled in when absent.
        data: the data config the model was trained with (its `_target_` DataModule, image_shape, num_classes,
            mean, std, class_names), so evaluation and prediction can rebuild the data path from a checkpoint alone.
        label_smoothing: cross-entropy label smoothing in [0, 1) of the training loss (evaluation losses are plain).
        channels_last: run the model and its inputs in channels-last memory format (faster convolutions).
        tta: test-time augmentation level of evaluation (tta.py): none, flip (each image and its mirror image,
            logits averaged; for flip-invariant data) or flip_translate (six views).
        finetune: for a run started from another run's weights (finetune.py): `freeze`, the names of modules
            whose parameters and BatchNorm statistics stay fixed while fitting (finetune.FreezeModules);
            `backbone_lr_scale`, the learning-rate factor of the carried-over weights; `fresh`, the names of the
            freshly initialized ones (filled in by train()).
    """

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        tta: str = "none",
        finetune: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(model)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        num_classes = model.get("num_classes", (data or {}).get("num_classes", 10))
        self.train_sums = TrainingSums()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # build_classifier (commands/train.py) sets this when it compiles the model: evaluation batches are then
        # marked as of any size, so one compiled graph serves the full batches and the smaller last one alike.
        self.dynamic_eval_batch = False

    def forward(self, x: Tensor) -> Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dynamic_eval_batch and not self.training and len(x) > 1:  # size 1 is always compiled apart
            torch._dynamo.mark_dynamic(x, 0)
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        # Per-step self.log costs about a millisecond of Python, as much as a whole LeNet-5 step on a GPU: sums stay
        # on the device and are logged once per epoch (torchmetrics reduces them across DDP ranks). The progress bar
        # takes the loss from this step's output when it redraws: a value logged with prog_bar=True would be read
        # back from the device by Lightning after every step, however seldom it was logged.
        self.train_sums.update(loss, logits, y)
        return loss

    def on_train_epoch_end(self) -> None:
        values = self.train_sums.compute()  # already summed over DDP ranks: the same on each
        self.log_dict({"train/loss": values["loss"], "train/acc": values["acc"]})
        self.train_sums.reset()

    def predict_logits(self, x: Tensor) -> Tensor:
        """Logits for evaluation: of the images, or averaged over their views at the TTA level (tta.py).

        The one inference path: validation, the test stage, eval, predict and export (commands/export.py) all run it.
        """
        return tta_logits(self, x, self.hparams.get("tta", "none"))

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self.predict_logits(x)
        metric(logits, y)
        # Plain cross-entropy, whatever the training's label smoothing: evaluation losses compare across runs.
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=stage == "val")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: tuple[Tensor, Tensor] | Tensor, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self.predict_logits(x).softmax(dim=1)

    def on_train_start(self) -> None:
        # A resumed run whose length changed (resume=<run dir> trainer.max_epochs=<more>) restored a schedule laid
        # out over the old length, which would end early (OneCycleLR refuses to step past its end; cosine annealing
        # rises again). Lay it out over the new length instead, at the step the run has reached.
        configs = self.trainer.lr_scheduler_configs
        if not configs or self.trainer.global_step == 0:
            return
        total = int(self.trainer.estimated_stepping_batches)
        config = configs[0]
        span = schedule_span(self.hparams.scheduler, total)
        if any(getattr(config.scheduler, name, value) != value for name, value in span.items()):
            config.scheduler = replanned_scheduler(
                self.hparams.scheduler, config.scheduler.optimizer, total, self.trainer.global_step
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What the test stage ran under, so that eval (precision=auto) scores the checkpoint the same way.
        checkpoint["precision"] = str(self.trainer.precision)

    def configure_callbacks(self) -> list[L.Callback]:
        # The frozen layers follow this run's own record (a resumed run's comes from its checkpoint); they are frozen
        # before configure_optimizers, which leaves them out. Fitting only: the test stage would find the one attached
        # for fitting and say it replaced it.
        freeze = (self.hparams.get("finetune") or {}).get("freeze")
        if not freeze or self.trainer.state.fn != TrainerFn.FITTING:
            return []
        from cnnlab.training.finetune import FreezeModules

        return [FreezeModules(freeze)]

    def parameter_groups(self) -> list[Tensor] | list[dict[str, Any]]:
        """The trainable parameters; under fine-tuning with backbone_lr_scale, the carried-over ones in a group of
        their own whose rate is scaled (`lr_scale`, which make_scheduler applies to the schedule's peak too)."""
        finetune = self.hparams.get("finetune") or {}
        scale = finetune.get("backbone_lr_scale", 1.0)
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        if scale == 1.0:
            return [p for _, p in named]
        fresh = set(finetune.get("fresh", []))
        lr = self.hparams.optimizer["lr"] * scale
        groups = [
            {"params": [p for n, p in named if n not in fresh], "lr": lr, "lr_scale": scale},
            {"params": [p for n, p in named if n in fresh], "lr_scale": 1.0},
        ]
        return [group for group in groups if group["params"]]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = make_optimizer(self.hparams.optimizer, self.parameter_groups(), self.model)
        scheduler = make_scheduler(self.hparams.scheduler, optimizer, int(self.trainer.estimated_stepping_batches))
        if scheduler is None:
            return {"optimizer": optimizer}
        # "name" is the key LearningRateMonitor logs the rate under.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}


def classifier_from_checkpoint(ckpt: dict[str, Any], source: str = "") -> ImageClassifier:
    """The ImageClassifier a checkpoint (loaded by cnnlab.checkpoints.load) describes, with its trained weights, in
    eval mode on the CPU."""
    hparams = ckpt["hyper_parameters"]
    keys = ("model", "optimizer", "scheduler", "data", "label_smoothing", "channels_last", "finetune")
    try:  # tta: the level, or the one a checkpoint written before the levels meant by tta_flip
        classifier = ImageClassifier(**{k: hparams[k] for k in keys if k in hparams}, tta=stored_tta(hparams))
    except Exception as err:  # a stored config naming a class or argument this version does not have
        raise UserError(
            f"The model stored in checkpoint {source} cannot be rebuilt ({type(err).__name__}: {err}). It may come "
            "from another version of cnnlab; evaluate it with that version."
        ) from None
    try:
        classifier.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise UserError(
            f"The weights in checkpoint {source} do not fit the model its hyper_parameters describe "
            f"({str(err).splitlines()[0]}). The file was edited or is damaged; use another checkpoint."
        ) from None
    return classifier.eval()
