"""eval, predict and export given a run folder (or a folder of runs): best.ckpt where the run wrote one, else
last.ckpt, and the output says which."""

import json
import shutil
from pathlib import Path

import pytest

from cnnlab.commands.evaluate import evaluate
from cnnlab.commands.export import export
from cnnlab.commands.predict import predict
from cnnlab.commands.train import train
from cnnlab.errors import UserError
from tests.conftest import compose_config, quick_run
from tests.test_evaluate import eval_config
from tests.test_export import export_config
from tests.test_predict import predict_config, save_test_digits


@pytest.fixture(scope="module")
def mnist_fast_runs(tiny_data, tmp_path_factory) -> Path:
    """Two seeds of experiment=mnist_fast as shipped (no validation split: last.ckpt only), as a -m sweep lays them
    out: <multirun>/0/ and <multirun>/1/."""
    multirun = tmp_path_factory.mktemp("multirun")
    for job, seed in (("0", 42), ("1", 1)):
        overrides = ["experiment=mnist_fast", f"data.data_dir={tiny_data}", "data.download=false", "trainer=cpu"]
        train(compose_config([*overrides, f"seed={seed}", "callbacks.progress_bar=null"], multirun / job))
    return multirun


def test_eval_of_a_run_folder_without_best_ckpt_scores_its_last_ckpt_and_says_so(mnist_fast_runs, tmp_path, capsys):
    run_dir = mnist_fast_runs / "0"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    metrics = evaluate(eval_config(tmp_path, f"ckpt_path={run_dir}"))
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert abs(metrics["test_acc"] - trained["test_acc"]) <= 1e-6  # the final weights the test stage scored
    assert metrics["checkpoint"] == str((run_dir / "checkpoints" / "last.ckpt").resolve())
    shown = capsys.readouterr().out
    assert "last.ckpt" in shown and "no best.ckpt" in shown


def test_eval_of_a_folder_of_runs_scores_each_runs_own_checkpoint(mnist_fast_runs, trained_run, tmp_path):
    """A sweep whose jobs wrote last.ckpt only, with one job that also has best.ckpt: each job counts once, by its
    best.ckpt where it has one."""
    both = mnist_fast_runs.parent / f"{mnist_fast_runs.name}-mixed"
    shutil.copytree(mnist_fast_runs, both)
    shutil.copytree(trained_run[0] / "checkpoints", both / "2" / "checkpoints")  # best.ckpt and last.ckpt
    result = evaluate(eval_config(tmp_path, f"ckpt_path={both}"))
    scored = sorted(Path(m["checkpoint"]).relative_to(both.resolve()).as_posix() for m in result["checkpoints"])
    assert scored == ["0/checkpoints/last.ckpt", "1/checkpoints/last.ckpt", "2/checkpoints/best.ckpt"]


def test_eval_of_a_run_folder_with_best_ckpt_scores_best_ckpt(trained_run, tmp_path, capsys):
    run_dir, trained = trained_run
    metrics = evaluate(eval_config(tmp_path, f"ckpt_path={run_dir}"))
    assert metrics["checkpoint"] == str((run_dir / "checkpoints" / "best.ckpt").resolve())
    assert abs(metrics["test_acc"] - trained["test_acc"]) <= 1e-6
    assert "best.ckpt" in capsys.readouterr().out


def test_a_folder_without_any_run_is_refused_in_one_paragraph(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"ckpt_path=.*empty.*best\.ckpt.*last\.ckpt") as err:
        evaluate(eval_config(tmp_path / "eval", f"ckpt_path={tmp_path / 'empty'}"))
    assert "\n" not in str(err.value)


def test_predict_with_a_run_folder_uses_its_last_ckpt_and_says_so(mnist_fast_runs, tmp_path, capsys):
    run_dir = mnist_fast_runs / "0"
    expected = save_test_digits(run_dir / "checkpoints" / "last.ckpt", tmp_path / "digits", count=8).argmax(1)
    result = predict(predict_config(f"ckpt_path={run_dir}", f"inputs={tmp_path / 'digits'}"))
    assert [int(r["classes"][0]) for r in result["predictions"]] == expected.tolist()
    assert "last.ckpt" in capsys.readouterr().out


def test_export_of_a_run_folder_writes_beside_its_last_ckpt(mnist_fast_runs, tmp_path):
    run_dir = mnist_fast_runs / "1"
    result = export(export_config(f"ckpt_path={run_dir}", "format=torchscript"))
    assert Path(result["output"]) == run_dir / "checkpoints" / "last.torchscript.pt"
    assert Path(result["output"]).is_file()
    assert result["checkpoint"] == str(run_dir / "checkpoints" / "last.ckpt")


def test_the_next_commands_after_a_run_without_validation_name_what_eval_would_score(tiny_data, tmp_path, capsys):
    overrides = quick_run(tiny_data, "data.val_size=0", "trainer.max_epochs=1", "trainer.limit_train_batches=2")
    train(compose_config(overrides, tmp_path))
    assert f"python scripts/eval.py ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
