"""summarize(dir): one ranked table of the runs under a sweep, search or outputs folder, and their val/acc curves.

A run is a folder holding metrics.json (a finished run) or failed.json (a failed sweep job). Its overrides come from
.hydra/overrides.yaml, its numbers from metrics.json, its curve from the TensorBoard event files in tensorboard/.
Runs are ranked by their best validation accuracy, the number they were selected on (never by test accuracy).
"""

import csv
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from cnnlab.errors import UserError

COLUMNS = ["rank", "run", "status", "overrides", "val_acc_best", "test_acc", "epochs", "train_seconds", "images_per_s"]
CURVE = "val/acc"


def find_runs(root: Path) -> list[Path]:
    """Folders under root (root included) that hold a finished or a failed run."""
    marks = [*root.glob("**/metrics.json"), *root.glob("**/failed.json")]
    return sorted({p.parent for p in marks})


def read_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(path.read_text()) or []) if path.is_file() else []


def read_run(run_dir: Path, root: Path) -> dict[str, Any]:
    """One row: where, status, overrides and the numbers of metrics.json."""
    metrics_path, failed_path, trial_path = (run_dir / n for n in ("metrics.json", "failed.json", "trial.json"))
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    status = "ok"
    if trial_path.is_file():  # a search trial: complete or pruned
        status = json.loads(trial_path.read_text()).get("state", "ok").lower()
    if failed_path.is_file():
        status = "failed: " + json.loads(failed_path.read_text()).get("error", "")
    return {
        "run": run_dir.relative_to(root).as_posix() if run_dir != root else ".",
        "status": status,
        "all_overrides": read_overrides(run_dir),
        "val_acc_best": metrics.get("val_acc_best"),
        "test_acc": metrics.get("test_acc"),
        "epochs": metrics.get("epochs"),
        "train_seconds": metrics.get("train_seconds"),
        "images_per_s": metrics.get("train_images_per_second"),
    }


def rank_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows by best validation accuracy, highest first; runs without one last. Overrides shared by all are dropped."""
    shared = set.intersection(*(set(r["all_overrides"]) for r in rows)) if rows else set()
    ranked = sorted(rows, key=lambda r: (r["val_acc_best"] is None, -(r["val_acc_best"] or 0.0), r["run"]))
    for i, row in enumerate(ranked, start=1):
        row["rank"] = i
        row["overrides"] = " ".join(o for o in row["all_overrides"] if o not in shared)
    return ranked


DIGITS = {"val_acc_best": 4, "test_acc": 4, "train_seconds": 1, "images_per_s": 0}


def cell(row: dict[str, Any], column: str) -> str:
    value = row[column]
    if value is None:
        return ""
    return f"{value:.{DIGITS.get(column, 4)}f}" if isinstance(value, float) else str(value)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_markdown(rows: list[dict[str, Any]], shared: list[str], path: Path) -> None:
    lines = [f"Overrides shared by all runs: `{' '.join(shared)}`", ""] if shared else []
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, c).replace("|", "\\|") for c in COLUMNS) + " |" for r in rows]
    path.write_text("\n".join(lines) + "\n")


def read_curve(run_dir: Path, tag: str = CURVE) -> tuple[list[int], list[float]]:
    """(steps, values) of a scalar from a run's TensorBoard event files; empty when it has none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = run_dir / "tensorboard"
    if not folder.is_dir():
        return [], []
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags().get("scalars", []):
        return [], []
    scalars = events.Scalars(tag)
    return [s.step for s in scalars], [s.value for s in scalars]


def plot_curves(rows: list[dict[str, Any]], root: Path, path: Path) -> int:
    """Plot every run's val/acc against the training step into path; returns the number of curves drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for row in rows:
        steps, values = read_curve(root / row["run"])
        if steps:
            ax.plot(steps, values, marker="o", markersize=3, label=f"{row['run']} {row['overrides']}".strip())
            drawn += 1
    ax.set_xlabel("training step")
    ax.set_ylabel(CURVE)
    ax.set_title(f"{CURVE} of the runs in {root}")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def summarize(root: Path, console: Console | None = None) -> dict[str, Any]:
    """Rank the runs under root; print the table and write summary.csv, summary.md and val_acc.png into root."""
    root = Path(root)
    runs = find_runs(root) if root.is_dir() else []
    if not runs:
        raise UserError(
            f"No runs under {root}: no folder there holds a metrics.json or failed.json. Point the command at a "
            "sweep folder (outputs/multirun/<time>), a search folder (outputs/search/<time>) or outputs/."
        )
    rows = rank_rows([read_run(run, root) for run in runs])
    shared = [o for o in rows[0]["all_overrides"] if all(o in r["all_overrides"] for r in rows)]
    files = {"csv": root / "summary.csv", "markdown": root / "summary.md", "plot": root / "val_acc.png"}
    write_csv(rows, files["csv"])
    write_markdown(rows, shared, files["markdown"])
    curves = plot_curves(rows, root, files["plot"])

    table = Table(title=f"{len(rows)} runs in {root}, best val/acc first", caption=" ".join(shared) or None)
    for column in COLUMNS:
        table.add_column(column, justify="right" if column not in ("run", "status", "overrides") else "left")
    for row in rows:
        table.add_row(*(cell(row, c) for c in COLUMNS))
    console = console or Console(width=None if sys.stdout.isatty() else 200)  # a log file gets whole rows
    console.print(table)
    console.print(f"Wrote {files['csv']}, {files['markdown']} and {files['plot']} ({curves} curves).")
    return {"rows": rows, "shared_overrides": shared, **{k: str(v) for k, v in files.items()}}
