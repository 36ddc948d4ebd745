"""Sweeps (-m): a failing job is recorded and the sweep goes on; the summary ranks the jobs."""

import csv
import json

from tests.conftest import quick_run
from tests.launch import run_script


def test_sweep_records_a_failed_job_runs_the_rest_and_summarizes_them_ranked(tiny_data, tmp_path):
    # Job 0 asks for more validation images than there are training images (a UserError); job 1 trains.
    jobs = quick_run(tiny_data, "trainer.limit_train_batches=4", "trainer.max_epochs=2", "data.val_size=99999,100")
    sweep = run_script("train", "-m", *jobs, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert sweep.returncode == 1, sweep.stderr[-3000:]  # all jobs ran, and the exit code says one failed
    assert "1 job(s) of the sweep" in sweep.stderr and "data.val_size=99999" in sweep.stderr
    failed = json.loads((tmp_path / "sweep" / "0" / "failed.json").read_text())
    assert failed["status"] == "failed" and failed["error"] == "UserError" and "val_size" in failed["message"]
    assert not (tmp_path / "sweep" / "0" / "metrics.json").exists()
    assert json.loads((tmp_path / "sweep" / "1" / "metrics.json").read_text())["epochs"] == 2

    summary = run_script("summarize", "sweep", cwd=tmp_path, timeout=120)
    assert summary.returncode == 0, summary.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))
    assert [(r["rank"], r["run"], r["overrides"]) for r in rows] == [
        ("1", "1", "data.val_size=100"),
        ("2", "0", "data.val_size=99999"),
    ]
    job = json.loads((tmp_path / "sweep" / "1" / "metrics.json").read_text())
    assert rows[0]["status"] == "ok" and float(rows[0]["val_acc_best"]) == job["val_acc_best"]
    assert rows[1]["status"] == "failed: UserError" and rows[1]["val_acc_best"] == ""
    assert "| 1 | 1 | ok | data.val_size=100 |" in (tmp_path / "sweep" / "summary.md").read_text()
    assert (tmp_path / "sweep" / "val_acc.png").read_bytes()[:4] == b"\x89PNG"
    assert "(1 curves)" in summary.stdout


def test_a_job_that_fails_with_any_other_exception_is_recorded_with_its_traceback_and_the_sweep_goes_on(
    tiny_data, tmp_path
):
    # No config check knows that SGD refuses a negative momentum: a ValueError from inside training, not a UserError.
    jobs = quick_run(tiny_data, "trainer.limit_train_batches=4", "trainer.max_epochs=1", "optimizer.momentum=-1,0.9")
    sweep = run_script("train", "-m", *jobs, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert sweep.returncode == 1, sweep.stderr[-3000:]
    assert "1 job(s) of the sweep" in sweep.stderr and "ValueError" in sweep.stderr
    failed = json.loads((tmp_path / "sweep" / "0" / "failed.json").read_text())
    assert failed["error"] == "ValueError" and "momentum" in failed["message"]
    assert failed["traceback"].startswith("Traceback") and "configure_optimizers" in failed["traceback"]
    assert json.loads((tmp_path / "sweep" / "1" / "metrics.json").read_text())["status"] == "finished"


def test_summarize_without_runs_says_so_with_exit_2(tmp_path):
    result = run_script("summarize", "nothing", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "No runs under nothing" in result.stderr


def test_summarize_outputs_ranks_every_run_below_it_single_runs_sweep_jobs_and_trials_alike(tmp_path):
    from cnnlab.commands.summarize import summarize

    outputs = tmp_path / "outputs"
    runs = {
        "train/2026-01-01_10-00-00": ({"val_acc_best": 0.91, "test_acc": 0.9}, None),
        "multirun/2026-01-02_10-00-00/0": ({"val_acc_best": 0.95, "test_acc": 0.94}, None),
        "multirun/2026-01-02_10-00-00/1": (None, {"status": "failed", "error": "UserError", "message": "bad"}),
        "search/2026-01-03_10-00-00/3": ({"val_acc_best": 0.2, "test_acc": 0.1}, None),
    }
    for name, (metrics, failed) in runs.items():
        (outputs / name / ".hydra").mkdir(parents=True)
        (outputs / name / ".hydra" / "overrides.yaml").write_text(f"- seed={len(name)}\n")
        if metrics:
            (outputs / name / "metrics.json").write_text(json.dumps(metrics))
        if failed:
            (outputs / name / "failed.json").write_text(json.dumps(failed))
    (outputs / "search/2026-01-03_10-00-00/3/trial.json").write_text(json.dumps({"state": "PRUNED"}))
    result = summarize(outputs)
    assert [(r["run"], r["status"]) for r in result["rows"]] == [
        ("multirun/2026-01-02_10-00-00/0", "ok"),
        ("train/2026-01-01_10-00-00", "ok"),
        ("search/2026-01-03_10-00-00/3", "pruned"),
        ("multirun/2026-01-02_10-00-00/1", "failed: UserError"),
    ]
    assert len(list(csv.DictReader((outputs / "summary.csv").open()))) == 4
