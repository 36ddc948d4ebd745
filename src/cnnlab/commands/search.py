"""search(cfg): an Optuna hyperparameter search whose trials are ordinary training runs.

Each trial composes train.yaml with the search's own overrides plus the sampled values (`optimizer.lr=0.0123`,
`model=resnet8`), and runs `train(cfg)` into `<search dir>/<trial number>/`, like a job of a `-m` sweep, so
`scripts/summarize.py` ranks trials too. The trial's score is its best val/acc. A trial whose val/acc falls behind
the others' at the same epoch is pruned: it stops training and is recorded as pruned. A trial that raises is recorded
as failed (failed.json) and the study goes on.

The study is kept in `<search dir>/study.db` (SQLite) with its search space and base overrides, so a search that was
stopped continues where it stopped when run again with the same hydra.run.dir; a trial that was running when the
process died is marked failed and interrupted, and its parameters are tried again.
"""

import json
from pathlib import Path
from typing import Any

import lightning as L
import optuna
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, Trial, TrialState
from rich.console import Console
from rich.table import Table

from cnnlab.commands.run_record import write_json
from cnnlab.commands.sweep import is_distributed, record_failure
from cnnlab.data.prepare_once import prepare_once_per_machine
from cnnlab.errors import UserError

MONITOR = "val/acc"
STUDY_FILE = "study.db"
SEARCH_KEYS = ("n_trials", "search_space", "sampler", "pruner")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class PruneOnValAcc(L.Callback):
    """Reports val/acc to the trial after every validation and stops training when the pruner says so."""

    def __init__(self, trial: Trial, monitor: str = MONITOR) -> None:
        self.trial, self.monitor = trial, monitor
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        self.trial.report(float(value), step=trainer.current_epoch)
        if self.trial.should_prune():
            self.pruned_at = trainer.current_epoch
            trainer.should_stop = True  # the run ends normally (tested, metrics.json) and is then marked pruned


def parameters(space: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Flatten a nested search space into {dotted config key: distribution spec}."""
    found: dict[str, dict[str, Any]] = {}
    for name, node in space.items():
        key = f"{prefix}{name}"
        if isinstance(node, dict) and "type" in node:
            found[key] = node
        elif isinstance(node, dict):
            found.update(parameters(node, f"{key}."))
        else:
            raise UserError(
                f"search_space.{key} is {node!r}, not a distribution. Give {{type: float, low: ..., high: ...}}, "
                "{type: int, low: ..., high: ...} or {type: categorical, choices: [...]}."
            )
    return found


def suggest(trial: Trial, key: str, spec: dict[str, Any]) -> Any:
    """One value for config key from its spec, through Optuna's suggest API."""
    kind, args = spec["type"], {k: v for k, v in spec.items() if k != "type"}
    try:
        if kind == "float":
            return trial.suggest_float(key, **args)
        if kind == "int":
            return trial.suggest_int(key, **args)
        if kind == "categorical":
            return trial.suggest_categorical(key, **args)
    except TypeError as err:
        raise UserError(f"search_space.{key}={spec} has a field Optuna does not take ({err}); fix it.") from err
    raise UserError(f"search_space.{key}.type={kind!r} is not known; use float, int or categorical.")


def open_study(cfg: DictConfig, search_dir: Path) -> optuna.Study:
    """Create the study in search_dir/study.db, or load it (the search continues)."""
    storage = f"sqlite:///{(search_dir / STUDY_FILE).resolve()}"
    previous = (
        [s.study_name for s in optuna.get_all_study_summaries(storage)] if (search_dir / STUDY_FILE).is_file() else []
    )
    sampler_cfg = OmegaConf.to_container(cfg.sampler, resolve=True)
    if previous and sampler_cfg.get("seed") is not None:  # a continued search must not propose the first trials again
        sampler_cfg["seed"] += len(optuna.load_study(study_name="search", storage=storage).trials)
    study = optuna.create_study(
        storage=storage,
        study_name="search",
        direction="maximize",
        sampler=instantiate(sampler_cfg),
        pruner=instantiate(cfg.pruner),
        load_if_exists=True,
    )
    if not previous:
        study.set_user_attr("overrides", base_overrides())
        study.set_user_attr("search_space", OmegaConf.to_container(cfg.search_space, resolve=True))
    return study


def base_overrides() -> list[str]:
    """This command's overrides, less those that configure the search itself: what every trial starts from."""
    overrides = HydraConfig.get().overrides.task
    return [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] not in SEARCH_KEYS]


def recover_interrupted(study: optuna.Study) -> int:
    """Mark trials left running by a killed search as failed and interrupted, and queue their parameters again."""
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for trial in stale:
        study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    return len(stale)


def counted(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that count toward n_trials: finished ones, less those interrupted by a dead process."""
    return [t for t in study.get_trials(deepcopy=False, states=FINISHED) if not t.user_attrs.get("interrupted")]


def make_objective(search_dir: Path, overrides: list[str], space: dict[str, dict[str, Any]]):
    """The function Optuna calls per trial: compose, train into <search dir>/<number>, return the best val/acc."""
    from cnnlab.commands.train import train

    def objective(trial: Trial) -> float:
        sampled = [f"{key}={suggest(trial, key, spec)}" for key, spec in space.items()]
        run_dir = search_dir / str(trial.number)
        trial_overrides = [*overrides, *sampled]
        trial.set_user_attr("overrides", trial_overrides)
        try:
            cfg = compose(config_name="search", overrides=[*trial_overrides, f"run_dir={run_dir}"])
            (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
            (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
            (run_dir / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(trial_overrides)))
            pruning = PruneOnValAcc(trial)
            metrics = train(cfg, extra_callbacks=[pruning])
        except Exception as error:
            record_failure(run_dir, error)
            raise
        state = "PRUNED" if pruning.pruned_at is not None else "COMPLETE"
        write_json(run_dir / "trial.json", {"number": trial.number, "state": state, "params": trial.params})
        if pruning.pruned_at is not None:
            raise optuna.TrialPruned(f"val/acc fell behind at epoch {pruning.pruned_at}")
        if metrics.get("val_acc_best") is None:
            raise RuntimeError(f"the run in {run_dir} recorded no val/acc")
        return float(metrics["val_acc_best"])

    return objective


def search(cfg: DictConfig) -> dict[str, Any]:
    """Run (or continue) the study until it holds n_trials finished trials; returns and writes best.json."""
    if is_distributed(cfg.trainer):
        raise UserError(
            "scripts/search.py runs its trials one after another in one process and cannot use a distributed "
            "trainer (trainer=ddp, several devices or nodes). Search with one device per trial."
        )
    search_dir = Path(cfg.run_dir)
    prepare_once_per_machine(instantiate(cfg.data))  # missing data stops the search now, not in every trial
    study = open_study(cfg, search_dir)
    overrides, space_cfg = study.user_attrs["overrides"], study.user_attrs["search_space"]
    console = Console()
    if overrides != base_overrides() or space_cfg != OmegaConf.to_container(cfg.search_space, resolve=True):
        console.print(f"Continuing the study in {search_dir} with its own search space and overrides: {overrides}")
    space = parameters(space_cfg)
    if not space:
        raise UserError(
            "search_space is empty: give at least one key, e.g. search_space.optimizer.lr={type: float,"
            " low: 0.001, high: 0.3, log: true}."
        )
    interrupted = recover_interrupted(study)
    remaining = cfg.n_trials - len(counted(study))
    console.print(
        f"Study {search_dir / STUDY_FILE}: {len(counted(study))} trials done"
        + (f", {interrupted} interrupted (queued again)" if interrupted else "")
        + f", {max(remaining, 0)} to run."
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if remaining > 0:
        study.optimize(make_objective(search_dir, overrides, space), n_trials=remaining, catch=(Exception,))
    return report_best(study, search_dir, console)


def report_best(study: optuna.Study, search_dir: Path, console: Console) -> dict[str, Any]:
    """Write best.json (the best trial's overrides, parameters and metrics) and print it."""
    trials = counted(study)
    states = {state.name.lower(): sum(t.state == state for t in trials) for state in FINISHED}
    if not states["complete"]:
        raise UserError(
            f"No trial of the search in {search_dir} completed ({states}). See the failed.json files in its trial "
            "folders for why."
        )
    best = study.best_trial
    run_dir = search_dir / str(best.number)
    metrics_path = run_dir / "metrics.json"
    result = {
        "number": best.number,
        "value": best.value,
        "params": best.params,
        "overrides": best.user_attrs.get("overrides", []),
        "run_dir": str(run_dir),
        "metrics": json.loads(metrics_path.read_text()) if metrics_path.is_file() else None,
        "trials": states,
    }
    write_json(search_dir / "best.json", result)
    table = Table(title=f"Best of {len(trials)} trials ({states}) in {search_dir}")
    table.add_column("key")
    table.add_column("value", overflow="fold")
    table.add_row("trial", str(best.number))
    table.add_row("val/acc (best epoch)", f"{best.value:.4f}")
    for key, value in best.params.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    table.add_row("run", str(run_dir))
    table.add_row("command", "python scripts/train.py " + " ".join(result["overrides"]))
    console.print(table)
    return result
