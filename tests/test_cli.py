"""The command line as users run it: scripts/train.py in a subprocess, errors, TensorBoard, and installs."""

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tests.conftest import REPO, quick_run
from tests.launch import free_port, run_script

# The scripts' own output is under test here: the shipped trainer and progress bar, one short epoch.
QUICK = quick_run(None, "trainer.max_epochs=1", "trainer.limit_train_batches=4", trainer=None, progress_bar=True)


def test_train_script_writes_a_run_dir_under_the_working_directory(tiny_data, tmp_path):
    (tmp_path / "data").symlink_to(tiny_data)  # the default data_dir, relative to where the command runs
    result = run_script("train", *QUICK, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "train").iterdir()
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train.log").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"test_acc", "test_loss", "val_acc_best", "epochs", "train_seconds"} <= set(metrics)
    out = result.stdout
    assert "model    LeNet5, 61,706 parameters" in out and "500 train / 100 val / 200 test images of 1x28x28" in out
    assert "_target_" not in out and "litlogger" not in result.stdout + result.stderr  # no YAML, no advertisement
    assert "test accuracy" in out and " %" in out  # the final table, in percent
    best = run_dir / "checkpoints" / "best.ckpt"
    assert f"python scripts/eval.py ckpt_path={best.resolve()}" in out and f"resume={run_dir.resolve()}" in out


def test_hydra_run_dir_override_places_the_run_and_print_config_shows_the_config(tiny_data, tmp_path):
    args = [*QUICK, f"data.data_dir={tiny_data}", "hydra.run.dir=mine/run1", "print_config=true"]
    result = run_script("train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "mine" / "run1" / "metrics.json").is_file()
    assert "_target_: cnnlab.models.LeNet5" in result.stdout


def test_missing_data_gets_one_paragraph_exit_2_and_no_traceback(tmp_path):
    result = run_script("train", "data.data_dir=nowhere", "data.download=false", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "data.data_dir" in result.stderr and str(tmp_path / "nowhere") in result.stderr


def test_unknown_model_option_lists_the_available_ones(tmp_path):
    result = run_script("train", "model=lenet6", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "lenet5" in result.stderr and "resnet18" in result.stderr


def test_tensorboard_serves_val_acc_of_a_finished_run(tiny_data, tmp_path):
    result = run_script(
        "train", *QUICK, "trainer.max_epochs=2", f"data.data_dir={tiny_data}", "hydra.run.dir=run", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(tmp_path / "run"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    query = urllib.parse.urlencode({"tag": "val/acc", "run": "tensorboard"})
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?{query}"
    try:
        deadline, points = time.monotonic() + 90, None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    points = json.loads(response.read())
                if len(points) == 2:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert points is not None and len(points) == 2, f"TensorBoard returned {points}"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert max(value for _, _, value in points) == pytest.approx(metrics["val_acc_best"])
    assert [step for _, step, _ in points] == [3, 7]  # the last step of each epoch: 4 steps per epoch


def test_console_script_finds_its_configs_after_a_plain_install_from_any_directory(tiny_data, tmp_path):
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(REPO)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    assert (target / "cnnlab" / "configs" / "train.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def command(name: str, *overrides: str) -> subprocess.CompletedProcess:
        """The installed console script cnnlab-<name>, with the install alone on PYTHONPATH (not this checkout)."""
        return subprocess.run(
            [sys.executable, str(target / "bin" / f"cnnlab-{name}"), *overrides],
            cwd=elsewhere,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(target)},
        )

    result = command("train", *QUICK, f"data.data_dir={tiny_data}")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (elsewhere / "outputs" / "train").iterdir()
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert str(target) in (run_dir / ".hydra" / "hydra.yaml").read_text()  # configs came from the installed copy

    # cnnlab-eval, cnnlab-predict and cnnlab-export are the same commands as the scripts, from the install.
    best = run_dir / "checkpoints" / "best.ckpt"
    evaluated = command("eval", f"ckpt_path={best}", "hydra.run.dir=ev")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((elsewhere / "ev" / "metrics.json").read_text())["test_acc"] == trained["test_acc"]
    assert str(target) in (elsewhere / "ev" / ".hydra" / "hydra.yaml").read_text()
    from PIL import Image

    from cnnlab.data.formats import read_idx

    Image.fromarray(read_idx(tiny_data / "MNIST" / "raw" / "t10k-images-idx3-ubyte")[0]).save(elsewhere / "digit.png")
    predicted = command("predict", f"ckpt_path={best}", "inputs=digit.png", "output=preds.csv")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert (elsewhere / "preds.csv").read_text().splitlines()[1].startswith("digit.png,")
    exported = command("export", f"ckpt_path={best}", "format=torchscript", "output=model.pt")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "max abs difference from PyTorch" in exported.stdout and (elsewhere / "model.pt").is_file()
