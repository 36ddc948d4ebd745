"""The Optuna search: unpromising trials pruned, failing ones recorded, a killed search resumed."""

import json
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from cnnlab.commands.search import PruneOnValAcc, search
from cnnlab.commands.train import train
from cnnlab.errors import UserError
from tests.conftest import compose_config, quick_run
from tests.launch import run_script, start_script


def test_pruning_callback_stops_a_trial_whose_val_acc_the_pruner_rejects(tiny_data, tmp_path):
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1.1))
    trial = study.ask()  # any accuracy is below 1.1: pruned after its first validation
    cfg = compose_config(quick_run(tiny_data, "trainer.max_epochs=3", "trainer.limit_train_batches=2"),
                         tmp_path / "run")  # fmt: skip
    pruning = PruneOnValAcc(trial)
    metrics = train(cfg, extra_callbacks=[pruning])
    assert pruning.pruned_at == 0 and metrics["epochs"] == 1
    assert list(study.trials[0].intermediate_values) == [0]


def search_args(tiny_data: Path, n_trials: int, *extra: str) -> list[str]:
    one_epoch = quick_run(tiny_data, "trainer.limit_train_batches=4", "trainer.max_epochs=1")
    return [f"n_trials={n_trials}", *one_epoch, "hydra.run.dir=search", *extra]


def trials_in(study_db: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="search", storage=f"sqlite:///{study_db}").trials


def test_the_shipped_median_pruner_stops_a_trial_that_falls_behind_the_others(tiny_data, tmp_path):
    # configs/search.yaml's pruner and sampler as shipped. Seeded with 44, the sampler's first (random) proposals are
    # the rates 0.05, 0.1, 0.2, then 1e-9, which learns nothing: by epoch 1 the first three lead it by far.
    space = "+search_space.optimizer={lr: {type: categorical, choices: [0.05, 0.1, 0.2, 1.0e-9]}}"
    args = search_args(tiny_data, 4, "seed=44", "trainer.max_epochs=3", "~search_space.optimizer", space)
    result = run_script("search", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = trials_in(tmp_path / "search" / "study.db")
    assert [t.params["optimizer.lr"] for t in trials] == [0.05, 0.1, 0.2, 1e-9]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED]
    # n_startup_trials=3, n_warmup_steps=1: pruned at epoch 1, its first chance, against the median of the three
    pruned = trials[3]
    median = sorted(t.intermediate_values[1] for t in trials[:3])[1]
    assert list(pruned.intermediate_values) == [0, 1] and pruned.intermediate_values[1] < median
    assert json.loads((tmp_path / "search" / "3" / "metrics.json").read_text())["epochs"] == 2  # of 3: it stopped
    assert json.loads((tmp_path / "search" / "3" / "trial.json").read_text())["state"] == "PRUNED"


def test_search_killed_during_a_trial_runs_its_parameters_again_and_finishes_its_trial_count(tiny_data, tmp_path):
    # A config group's options are a categorical choice too: each trial trains the model it drew.
    args = search_args(tiny_data, 3, "+search_space.model={type: categorical, choices: [lenet5, resnet8]}")
    first = start_script("search", *args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (tmp_path / "search" / "2" / ".hydra" / "config.yaml").exists():  # the third trial has started
        assert first.poll() is None and time.monotonic() < deadline, "the search ended before its third trial"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (tmp_path / "search" / "best.json").exists()
    first_trial = (tmp_path / "search" / "0" / "metrics.json").read_text()

    resumed = run_script("search", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = trials_in(tmp_path / "search" / "study.db")
    (cut_off,) = [t for t in trials if t.user_attrs.get("interrupted")]
    assert cut_off.number == 2 and cut_off.state == TrialState.FAIL
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == 2]
    assert retry.params == cut_off.params  # the interrupted trial's parameters, run again
    finished = [t for t in trials if t.state != TrialState.RUNNING and not t.user_attrs.get("interrupted")]
    assert len(finished) == 3 and all(t.state != TrialState.RUNNING for t in trials)
    assert (tmp_path / "search" / "0" / "metrics.json").read_text() == first_trial  # trial 0 was not run again
    targets = {"lenet5": "cnnlab.models.LeNet5", "resnet8": "cnnlab.models.ResNet"}
    for trial in finished:
        config = yaml.safe_load((tmp_path / "search" / str(trial.number) / ".hydra" / "config.yaml").read_text())
        assert config["model"]["_target_"] == targets[trial.params["model"]], trial.number
    best = json.loads((tmp_path / "search" / "best.json").read_text())
    assert best["value"] == max(t.value for t in finished if t.state == TrialState.COMPLETE)
    assert (
        any(o.startswith("optimizer.lr=") for o in best["overrides"])
        and f"model={best['params']['model']}" in (best["overrides"])
    )


def test_search_records_failing_trials_and_still_runs_all_of_them(tiny_data, tmp_path):
    args = search_args(tiny_data, 2, "+search_space.data.val_size={type: categorical, choices: [99999]}")
    result = run_script("search", *args, cwd=tmp_path)
    assert result.returncode == 2 and "No trial of the search" in result.stderr  # nothing to call best
    states = [t.state for t in trials_in(tmp_path / "search" / "study.db")]
    assert states == [TrialState.FAIL, TrialState.FAIL]
    for number in (0, 1):
        assert json.loads((tmp_path / "search" / str(number) / "failed.json").read_text())["error"] == "UserError"


def test_search_refuses_a_distributed_trainer_before_any_trial(tmp_path):
    with pytest.raises(UserError, match="cannot use a distributed trainer"):
        search(compose_config(["trainer=ddp"], tmp_path / "search", config_name="search"))
    assert not (tmp_path / "search").exists()
