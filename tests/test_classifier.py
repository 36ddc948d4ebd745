"""The LightningModule: train/eval switching, BatchNorm statistics, logged names, and checkpoint contents."""

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from cnnlab.commands.train import build_classifier
from cnnlab.training.classifier import ImageClassifier
from tests.conftest import compose_config, quick_run


def setup_run(tiny_data, tmp_path, model="resnet8", data="mnist", **trainer_args):
    cfg = compose_config(quick_run(tiny_data, model=model, data=data), tmp_path)
    dm = instantiate(cfg.data)
    trainer_args = {"logger": False, **trainer_args}
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        limit_test_batches=2,
        limit_predict_batches=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        **trainer_args,
    )
    return build_classifier(cfg), dm, trainer


def bn_stats(module):
    return [
        b.clone()
        for m in module.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for b in (m.running_mean, m.running_var)
    ]


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluation_stages_leave_batchnorm_running_statistics_untouched(tiny_data, tmp_path, stage):
    classifier, dm, trainer = setup_run(tiny_data, tmp_path)
    before = bn_stats(classifier)
    getattr(trainer, stage)(classifier, datamodule=dm)
    assert all(torch.equal(a, b) for a, b in zip(before, bn_stats(classifier)))


def test_training_updates_batchnorm_running_statistics(tiny_data, tmp_path):
    classifier, dm, trainer = setup_run(tiny_data, tmp_path)
    before = bn_stats(classifier)
    trainer.fit(classifier, datamodule=dm)
    assert any(not torch.equal(a, b) for a, b in zip(before, bn_stats(classifier)))


class ModeRecorder(Callback):
    """Records whether any submodule (BatchNorm, Dropout, ...) is in training mode at each batch."""

    def __init__(self):
        self.modes: dict[str, set[bool]] = {}

    def _record(self, stage, pl_module):
        self.modes.setdefault(stage, set()).update(m.training for m in pl_module.modules())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record("train", pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record("val", pl_module)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record("test", pl_module)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record("predict", pl_module)


def test_every_module_is_in_eval_mode_outside_training_so_dropout_is_off(tiny_data, tmp_path):
    classifier, dm, trainer = setup_run(tiny_data, tmp_path)
    recorder = ModeRecorder()
    trainer.callbacks.append(recorder)
    trainer.fit(classifier, datamodule=dm)
    trainer.test(classifier, datamodule=dm)
    trainer.predict(classifier, datamodule=dm)
    assert recorder.modes["train"] == {True}
    assert recorder.modes["val"] == recorder.modes["test"] == recorder.modes["predict"] == {False}


def test_fit_logs_the_documented_metric_names(tiny_data, tmp_path):
    classifier, dm, trainer = setup_run(
        tiny_data,
        tmp_path,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        callbacks=[LearningRateMonitor(logging_interval="step")],
    )
    trainer.fit(classifier, datamodule=dm)
    logged = set(trainer.callback_metrics)
    trainer.test(classifier, datamodule=dm)
    logged |= set(trainer.callback_metrics)
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "test/acc", "test/loss", "lr"} <= logged


def test_hyperparameters_are_plain_values_that_rebuild_the_model(tiny_data, tmp_path):
    classifier, _, _ = setup_run(tiny_data, tmp_path, model="lenet5")
    hparams = dict(classifier.hparams)
    allowed = (dict, list, str, int, float, bool, type(None))

    def check(value):
        assert isinstance(value, allowed), f"{type(value)} is not a plain value"
        if isinstance(value, dict):
            for v in value.values():
                check(v)
        if isinstance(value, list):
            for v in value:
                check(v)

    check(hparams)
    rebuilt = ImageClassifier(**hparams)
    rebuilt.load_state_dict(classifier.state_dict())
    x = torch.randn(2, 1, 28, 28)
    classifier.eval(), rebuilt.eval()
    assert torch.equal(classifier(x), rebuilt(x))


def test_training_sums_agree_with_torchmetrics_mean_and_accuracy_and_reset_each_epoch():
    from torchmetrics import MeanMetric
    from torchmetrics.classification import MulticlassAccuracy

    from cnnlab.training.classifier import TrainingSums

    g = torch.Generator().manual_seed(0)
    sums, mean, acc = TrainingSums(), MeanMetric(), MulticlassAccuracy(10, average="micro")
    for n in (7, 32, 5):  # uneven batches: the loss mean is weighted by batch size
        logits, target, loss = torch.randn(n, 10, generator=g), torch.randint(0, 10, (n,), generator=g), torch.rand(1)
        sums.update(loss[0], logits, target)
        mean.update(loss[0], n)
        acc.update(logits, target)
    values = sums.compute()
    assert values["loss"].item() == pytest.approx(mean.compute().item(), rel=1e-6)
    assert values["acc"].item() == pytest.approx(acc.compute().item(), rel=1e-6)
    sums.reset()
    sums.update(torch.tensor(2.0), torch.eye(10)[:4], torch.tensor([0, 1, 2, 9]))
    assert sums.compute()["loss"].item() == 2.0 and sums.compute()["acc"].item() == 0.75


def test_optimizer_settings_reach_torch_as_plain_values_so_checkpoints_load_with_weights_only(
    tiny_data, tmp_path, monkeypatch
):
    from omegaconf import OmegaConf

    seen: dict = {}

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            seen.update(kwargs)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)  # what optimizer=adamw's _target_ resolves to
    cfg = compose_config(quick_run(tiny_data, "optimizer=adamw", "scheduler=none"), tmp_path)
    classifier = build_classifier(cfg)
    classifier.trainer = L.Trainer(max_steps=10, logger=False)  # the schedule's length comes from the trainer
    classifier.configure_optimizers()
    assert seen and not any(OmegaConf.is_config(v) for v in seen.values()), seen
    # torch before 2.6 kept a ListConfig `betas` in the optimizer state, which torch.load(weights_only=True) refuses
    assert isinstance(seen["betas"], list | tuple)
