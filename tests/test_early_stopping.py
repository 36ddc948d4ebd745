"""Early stopping on val/acc (callbacks/early_stopping=default): off by default, recorded in metrics.json."""

import json

import pytest

from cnnlab.commands.train import train
from tests.conftest import compose_config, quick_run

# A learning rate of 1e-9 leaves the weights, and so every validation prediction, as they were: val/acc stalls.
STALLED = ["optimizer.lr=1e-9", "scheduler=none", "trainer.max_epochs=8", "trainer.limit_train_batches=2"]


def test_early_stopping_ends_a_run_whose_val_acc_stalls_and_records_the_epoch(tiny_data, tmp_path):
    cfg = compose_config([*quick_run(tiny_data), *STALLED, "callbacks/early_stopping=default",
                          "callbacks.early_stopping.patience=2"], tmp_path)  # fmt: skip
    metrics = train(cfg)
    # Epoch 0 sets the best val/acc; epochs 1 and 2 do not beat it, which exhausts a patience of 2.
    assert metrics["stopped_early"] is True and metrics["stopped_epoch"] == 2
    assert metrics["epochs"] == 3 < cfg.trainer.max_epochs
    assert json.loads((tmp_path / "metrics.json").read_text())["stopped_early"] is True
    assert "test_acc" in metrics  # the run still tests its best checkpoint


@pytest.mark.parametrize("early_stopping", [[], ["callbacks/early_stopping=default"]], ids=["off", "patient"])
def test_a_run_that_early_stopping_did_not_end_records_stopped_early_false(tiny_data, tmp_path, early_stopping):
    cfg = compose_config(quick_run(tiny_data, *STALLED, "trainer.max_epochs=3", *early_stopping), tmp_path)
    assert ("early_stopping" in cfg.callbacks) == bool(early_stopping)  # off unless chosen
    metrics = train(cfg)
    assert metrics["epochs"] == 3 and metrics["stopped_early"] is False and metrics["stopped_epoch"] is None
