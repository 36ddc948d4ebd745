"""scripts/gpu_check.py on the CPU: its arithmetic, its reports, its refusals, and a rehearsal of every part.

The check itself needs a GPU; here its pieces run on made-up results, and `--device cpu --tiny` runs the whole
orchestration (subprocesses, JUnit parsing, run directories, both reports) on tiny data.
"""

import json
import os
import pickle
import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab.tools.gpu_check import (
    cifar_with_string_keys,
    parse_junit,
    parse_peer_epochs,
    parse_peer_output,
    parse_pytest_log,
    peak_bf16_tflops,
    peer_comparison,
    peer_steady_step_ms,
    problems,
    render_markdown,
    share_of_peak,
    training_flops_per_image,
)
from tests.conftest import REPO
from tests.launch import run_script

NEEDS_NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check runs for real")


@pytest.mark.parametrize(
    "name, row, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.5),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5),
        ("NVIDIA H200", "H200 SXM", 989.5),
        ("NVIDIA H200 NVL", "H200 NVL", 835.5),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ],
)
def test_peak_table_finds_known_gpus_by_their_device_names(name, row, tflops):
    assert peak_bf16_tflops(name) == (row, tflops)


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090", "NVIDIA GH200 480GB", "Tesla V100-SXM2-16GB"])
def test_peak_table_knows_nothing_of_other_gpus(name):
    assert peak_bf16_tflops(name) is None


def test_training_flops_are_six_per_multiply_accumulate():
    assert training_flops_per_image(555_422_720) == 3_332_536_320


def test_share_of_peak_is_images_per_second_times_flops_over_the_peak():
    achieved, share = share_of_peak(10_000, 3_332_536_320, 989.5)
    assert achieved == pytest.approx(33.325, abs=1e-3)
    assert share == pytest.approx(33.32536 / 989.5, rel=1e-6)


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_gpu" name="test_a[lenet5]" time="1.25"/>
<testcase classname="tests.test_gpu" name="test_b" time="0.5"><failure message="assert 3 == 2">long trace</failure>
</testcase>
<testcase classname="tests.test_gpu" name="test_c" time="0.0"><skipped type="pytest.skip" message="needs a GPU"/>
</testcase>
<testcase classname="tests.test_gpu" name="test_d" time="0.1"><error message="fixture failed"/></testcase>
</testsuite></testsuites>"""


def test_junit_report_gives_each_tests_outcome_time_and_message():
    assert parse_junit(JUNIT) == [
        {"name": "test_gpu::test_a[lenet5]", "outcome": "passed", "seconds": 1.25, "message": ""},
        {"name": "test_gpu::test_b", "outcome": "failed", "seconds": 0.5, "message": "assert 3 == 2"},
        {"name": "test_gpu::test_c", "outcome": "skipped", "seconds": 0.0, "message": "needs a GPU"},
        {"name": "test_gpu::test_d", "outcome": "error", "seconds": 0.1, "message": "fixture failed"},
    ]


def test_a_cut_off_pytest_log_still_gives_the_outcomes_printed_so_far():
    log = (
        "tests/test_gpu.py::test_a[lenet5] PASSED                  [  4%]\n"
        "tests/test_gpu.py::test_b FAILED                          [  8%]\n"
        "tests/test_gpu.py::test_c "
    )
    assert [(t["name"], t["outcome"]) for t in parse_pytest_log(log)] == [
        ("test_gpu::test_a[lenet5]", "passed"),
        ("test_gpu::test_b", "failed"),
    ]


def fake_result() -> dict:
    """What a check of an H100 could produce: one failed test, two recipes, the benchmark."""
    tests = parse_junit(JUNIT)[:3]
    run = {"returncode": 0, "timed_out": False, "log": "logs/x.log"}
    return {
        "status": "failed",
        "started": "2026-01-01 12:00:00",
        "device": {"name": "NVIDIA H100 80GB HBM3", "detail": "compute capability 9.0, 79.1 GiB", "count": 1},
        "simulation": False,
        "versions": {"torch": "2.11.0", "cuda": "12.8", "cudnn": 91000, "lightning": "2.6.6", "python": "3.11"},
        "data": "/data",
        "budget_seconds": {"total": 450},
        "total_seconds": 301.0,
        "tests": {**run, "returncode": 1, "wall_seconds": 150.0, "tests": tests, "counts": {"passed": 1, "failed": 1}},
        "recipes": {
            "mnist_fast": {
                **run,
                "command": "scripts/train.py experiment=mnist_fast seed=42",
                "seeds": [42],
                "wall_seconds": 21.0,
                "test_acc": 0.9921,
                "train_seconds": 6.5,
                "train_images_per_second": 99000.0,
            },
        },
        "benchmark": {
            **run,
            "command": "scripts/benchmark.py model=resnet18",
            "wall_seconds": 35.0,
            "batch_size": 128,
            "macs_per_image": 555_422_720,
            "flops_per_image": 3_332_536_320,
            "lightning_over_plain": 0.93,
            "peak_bf16_tflops": 989.5,
            "peak_source": "H100 SXM, NVIDIA datasheet, dense bf16 Tensor Core",
            "paths": {
                "lightning": {"images_per_second": 9300.0, "achieved_tflops": 30.99, "share_of_peak": 0.0313},
                "plain": {"images_per_second": 10000.0, "achieved_tflops": 33.33, "share_of_peak": 0.0337},
            },
        },
    }


def test_markdown_report_gives_device_each_test_recipes_and_benchmark():
    text = render_markdown(fake_result())
    assert text.startswith("# GPU check: NVIDIA H100 80GB HBM3\n")
    assert "Status **failed**" in text and "- test_gpu::test_b: failed assert 3 == 2" in text
    assert "| `test_gpu::test_a[lenet5]` | passed | 1.2 | - |" in text
    assert "| mnist_fast | 42 | 0.9921 |" in text
    assert "| (a) lightning: the project's path | 9,300 | 31.0 | 3.1% |" in text
    assert "a/b = 0.930" in text and "555,422,720 MACs" in text and "3.33 GFLOP" in text
    assert "989.5 TFLOP/s (H100 SXM, NVIDIA datasheet" in text


def test_problems_name_failed_tests_failed_parts_and_tests_skipped_on_a_gpu():
    result = fake_result()
    result["recipes"]["mnist_fast"].update(returncode=None, timed_out=True)
    result["tests"]["counts"]["skipped"] = 1
    found = problems(result)
    assert "test_gpu::test_b: failed assert 3 == 2" in found
    assert "mnist_fast: timed out (see logs/x.log)" in found
    assert "tests: 1 skipped on a GPU machine" in found
    result["simulation"] = True
    assert "tests: 1 skipped on a GPU machine" not in problems(result)


def test_problems_name_a_cold_peer_run_that_failed_or_was_left_out():
    result = fake_result()
    peer = {"returncode": 0, "timed_out": False, "log": "logs/peer.log", "runs": [{"test_acc": 0.9, "seconds": 3.0}]}
    cold = {"returncode": 1, "timed_out": False, "log": "logs/peer_cold.log", "test_acc": None}
    result["peer"] = {**peer, "cold": cold}
    assert "peer, cold run: exit code 1, no result (see logs/peer_cold.log)" in problems(result)
    result["peer"]["cold"] = {"not_run": "4 s of the peer's budget left"}
    assert "peer, cold run: not run (4 s of the peer's budget left)" in problems(result)
    result["peer"]["cold"] = {**cold, "returncode": 0, "test_acc": 0.9}
    assert not [line for line in problems(result) if line.startswith("peer")]


def run_check(*args: str) -> subprocess.CompletedProcess:
    """scripts/gpu_check.py as a GPU machine runs it: not installed, the package found through PYTHONPATH=src.

    This PYTHONPATH replaces run_script's, which adds the repo root too: the GPU machine has src/ alone on it.
    """
    not_installed = {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return run_script("gpu_check", *args, cwd=REPO, env=not_installed, timeout=None)


@NEEDS_NO_GPU
def test_without_a_gpu_the_check_says_so_in_one_paragraph_and_exits_2(tmp_path):
    done = run_check("--data", str(tmp_path), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    message = done.stderr.strip()
    assert message.startswith("No CUDA GPU is visible to PyTorch here") and "\n" not in message
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_missing_datasets_stop_the_check_naming_the_folder(tmp_path):
    done = run_check("--data", str(tmp_path), "--out", str(tmp_path / "out"), "--device", "cpu", "--tiny")
    assert done.returncode == 2
    message = done.stderr.strip()
    assert str(tmp_path) in message and "MNIST" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


@NEEDS_NO_GPU
def test_tiny_rehearsal_runs_every_part_and_writes_both_reports(tiny_data, tmp_path):
    out = tmp_path / "check"
    peer = write_fake_peer(tmp_path / "peer.py", acc=0.93, seconds=4.0)
    done = run_check(
        "--data", str(tiny_data), "--out", str(out), "--device", "cpu", "--tiny", "--peak-tflops", "2", "--peer", peer
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["status"] == "passed" and result["simulation"] is True
    tests = result["tests"]["tests"]
    assert len(tests) >= 20 and {t["outcome"] for t in tests} == {"skipped"}  # no GPU: every GPU test skips
    assert {t["message"] for t in tests} == {"needs a CUDA GPU (run `pytest -m gpu` on a machine with one)"}
    for recipe, seeds in (("mnist_fast", [42]), ("cifar10_record", [42, 1])):
        run = result["recipes"][recipe]
        assert run["returncode"] == 0 and run["seeds"] == seeds
        written = [json.loads((out / "runs" / recipe / f"seed{s}" / "metrics.json").read_text()) for s in seeds]
        assert [r["test_acc"] for r in run["runs"]] == [w["test_acc"] for w in written]  # each run's own numbers
        assert run["test_acc"] == pytest.approx(sum(w["test_acc"] for w in written) / len(seeds))  # their mean
        assert run["test_acc_min"] == min(w["test_acc"] for w in written)
        assert run["train_seconds"] == pytest.approx(sum(w["train_seconds"] for w in written) / len(seeds))
    bench = result["benchmark"]
    measured = json.loads((out / "runs" / "benchmark" / "benchmark.json").read_text())
    assert bench["lightning_over_plain"] == measured["lightning_over_plain"]
    assert bench["flops_per_image"] == 6 * bench["macs_per_image"] > 0
    lightning = bench["paths"]["lightning"]
    assert lightning["images_per_second"] == measured["lightning_images_per_second"]
    share = lightning["images_per_second"] * bench["flops_per_image"] / 1e12 / 2
    assert lightning["share_of_peak"] == pytest.approx(share, abs=1e-4)
    peer_run = result["peer"]
    assert peer_run["returncode"] == 0 and peer_run["runs"] == [{"test_acc": 0.93, "seconds": 4.0}]
    assert not list(REPO.glob("cifar10")) and (out / "runs" / "peer" / "saw_data").is_file()  # run in its own folder
    assert not (out / "runs" / "peer_data").exists()  # the peer's string-keyed copy goes once the peer has run
    assert peer_run["steady_step_ms"] == pytest.approx(5.0)  # its second epoch row: 2.14 s over 428 steps
    cold = peer_run["cold"]
    assert cold["returncode"] == 0 and cold["test_acc"] == 0.93
    assert "warmup" not in Path(cold["log"]).read_text() and (out / "runs" / "peer_cold" / "saw_data").is_file()
    record = result["recipes"]["cifar10_record"]
    written = [json.loads((out / "runs" / "cifar10_record" / f"seed{s}" / "metrics.json").read_text()) for s in (42, 1)]
    assert all(w["warmup_steps"] > 0 and w["steady_step_ms"] > 0 for w in written)
    assert record["steady_step_ms"] == pytest.approx(sum(w["steady_step_ms"] for w in written) / 2)
    assert record["cold_wall_seconds"] == record["runs"][0]["wall_seconds"]
    versus = peer_comparison(result)
    assert versus["warm_step_ratio"] == pytest.approx(record["steady_step_ms"] / 5.0, abs=1e-3)
    assert versus["cold_ratio"] == pytest.approx(record["cold_wall_seconds"] / cold["wall_seconds"], abs=1e-3)
    assert versus["points_behind_peer"] == pytest.approx(100 * (0.93 - result["recipes"]["cifar10_record"]["test_acc"]))
    assert versus["time_ratio"] == pytest.approx(result["recipes"]["cifar10_record"]["train_seconds"] / 4.0, abs=1e-3)
    text = (out / "gpu_check.md").read_text()
    assert "a CPU rehearsal" in text and "## Benchmark" in text and "| cifar10_record | 42, 1 |" in text
    assert "## Beside the peer" in text and "time ratio project/peer" in text
    assert "Warm, a steady step after the first epoch" in text and "Cold, a fresh process" in text


@NEEDS_NO_GPU
def test_parts_runs_only_the_parts_asked_for_and_the_report_names_the_others(tiny_data, tmp_path):
    out = tmp_path / "check"
    peer = write_fake_peer(tmp_path / "peer.py", acc=0.93, seconds=4.0)
    done = run_check(
        "--data", str(tiny_data), "--out", str(out), "--device", "cpu", "--tiny", "--peer", peer, "--parts", "peer"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["status"] == "passed" and result["peer"]["runs"] == [{"test_acc": 0.93, "seconds": 4.0}]
    assert result["recipes"] == {} and result["tests"] is None and result["benchmark"] is None
    assert result["not_asked"] == ["mnist_fast", "cifar10_record", "benchmark", "tests"]
    assert not (out / "runs" / "cifar10_record").exists() and "not asked (--parts)" in done.stdout
    report = (out / "gpu_check.md").read_text()
    assert "Parts left out by `--parts`: mnist_fast, cifar10_record, benchmark, tests." in report


@pytest.mark.parametrize(
    "parts, why",
    [
        ("peer,cifar10_fast", "cifar10_fast is not a part"),
        ("peer, tests,gpu,plain,gpu", "gpu, plain are not parts"),
        (",", "it names no part"),
    ],
)
def test_parts_that_name_no_part_stop_the_check_in_one_paragraph(tiny_data, tmp_path, parts, why):
    done = run_check("--data", str(tiny_data), "--out", str(tmp_path / "out"), "--device", "cpu", "--parts", parts)
    assert done.returncode == 2
    message = done.stderr.strip()
    assert message.startswith(f"--parts '{parts}': {why} of the check.") and "\n" not in message
    assert "mnist_fast, cifar10_record, peer, benchmark, tests" in message and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_parts_asking_for_the_peer_without_its_path_stop_the_check_in_one_paragraph(tiny_data, tmp_path):
    done = run_check("--data", str(tiny_data), "--out", str(tmp_path / "out"), "--device", "cpu", "--parts", "peer")
    assert done.returncode == 2
    message = done.stderr.strip()
    assert message.startswith("--parts asks for the peer, but no --peer was given") and "\n" not in message
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


@NEEDS_NO_GPU
def test_a_cifar_batch_the_peer_copy_cannot_read_fails_the_peer_part_alone(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    out = tmp_path / "check"
    peer = write_fake_peer(tmp_path / "peer.py", acc=0.93, seconds=4.0)
    done = run_check(
        "--data", str(data), "--out", str(out), "--device", "cpu", "--tiny", "--peer", peer, "--parts", "peer,tests"
    )
    assert done.returncode == 1, done.stdout + done.stderr
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["status"] == "failed" and result["tests"]["counts"]["skipped"] > 0  # the check went on
    assert result["peer"]["returncode"] != 0 and "test_batch" in result["peer"]["log_tail"]
    assert any(line.startswith("peer: exit code") for line in problems(result))
    assert "Traceback" not in done.stderr


def test_the_peer_copy_holds_the_six_batches_alone(tiny_data, tmp_path):
    source = tmp_path / "cifar"
    shutil.copytree(tiny_data / "cifar-10-batches-py", source)
    (source / "data_batch_1.bak").write_bytes(b"a stray file, not a pickle")
    copy = cifar_with_string_keys(source, tmp_path / "peer_data")
    assert sorted(f.name for f in copy.iterdir()) == sorted([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])


def write_fake_peer(path: Path, acc: float, seconds: float) -> str:
    """A stand-in for airbench94: reads the data folder it is given as airbench94 does (pickles decoded as latin-1,
    string keys, as in the official archive) and prints its table's rows, warm-up first."""
    head = "|  run   |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |"
    epoch = "|  {run:>6}  |      0  |      2.0000  |     0.3000  |   0.2000  |               |    1.0000  |"
    # the second epoch's row: 428 steps of 5 ms after the first
    second = "|          |      1  |      2.0000  |     0.3000  |   0.2000  |               |    3.1400  |"
    final = f"|        |   eval  |      1.0000  |     0.6000  |   0.5000  |       {acc:.4f}  |    {seconds:.4f}  |"
    path.write_text(
        textwrap.dedent(
            f"""
            import os, pathlib, pickle
            for name in ["data_batch_1", "test_batch"]:
                with open(pathlib.Path(os.environ["CIFAR_ROOT"], name), "rb") as f:
                    batch = pickle.load(f, encoding="latin1")
                assert len(batch["data"]) == len(batch["labels"]) > 0
            pathlib.Path("saw_data").touch()
            print({head!r})
            runs = ["warmup"] * (os.environ.get("WARMUP", "1") == "1") + list(range(int(os.environ["RUNS"])))
            for run in runs:
                print({epoch!r}.format(run=run))
                print({second!r})
                print({final!r})
            print("Mean: {acc:.4f}    Std: 0.0000")
            """
        )
    )
    return str(path)


def test_the_peer_gets_cifar_batches_with_string_keys_and_the_data_folder_is_left_alone(tiny_data, tmp_path):
    source = tiny_data / "cifar-10-batches-py"
    before = {f.name: f.read_bytes() for f in source.iterdir()}
    copy = cifar_with_string_keys(source, tmp_path / "peer_data")
    assert copy == tmp_path / "peer_data" and {f.name: f.read_bytes() for f in source.iterdir()} == before
    assert sorted(f.name for f in copy.iterdir()) == sorted(n for n in before if "_batch" in n)
    for name in ("data_batch_1", "test_batch"):
        original = pickle.loads(before[name])
        keyed = pickle.loads((copy / name).read_bytes(), encoding="latin1")
        assert set(keyed) == {key.decode() for key in original} and all(isinstance(k, str) for k in keyed)
        assert np.array_equal(keyed["data"], original[b"data"]) and keyed["labels"] == original[b"labels"]
    assert cifar_with_string_keys(copy, tmp_path / "again") == copy and not (tmp_path / "again").exists()


def test_the_peers_table_gives_each_timed_run_without_its_warm_up_run():
    out = textwrap.dedent(
        """
        |  run   |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |
        |  warmup  |      0  |      2.0000  |     0.3000  |   0.2000  |               |              1.0000  |
        |        |   eval  |      1.0000  |     0.6000  |   0.5000  |       0.1000  |              9.0000  |
        |       0  |      0  |      2.0000  |     0.3000  |   0.2000  |               |              1.0000  |
        |        |      1  |      2.0000  |     0.3000  |   0.2000  |               |              2.0000  |
        |        |   eval  |      1.0000  |     0.6000  |   0.5000  |       0.9401  |              3.8300  |
        |       1  |      0  |      2.0000  |     0.3000  |   0.2000  |               |              1.0000  |
        |        |   eval  |      1.0000  |     0.6000  |   0.5000  |       0.9399  |              3.9000  |
        Mean: 0.9400    Std: 0.0001
        """
    )
    assert parse_peer_output(out) == [{"test_acc": 0.9401, "seconds": 3.83}, {"test_acc": 0.9399, "seconds": 3.9}]
    assert parse_peer_epochs(out) == [[1.0, 2.0], [1.0]]  # each timed run's epoch rows, cumulative seconds
    warm_up_later = out.replace("|  warmup  |", "|  spare  |").replace("|       1  |", "|  warmup  |")
    assert parse_peer_epochs(warm_up_later) == [[1.0], [1.0, 2.0]]  # a warm-up's rows join no timed run
    cut_off = out[: out.rindex("|       1  |")] + "|       1  |      0  |  2.0  |  0.3  |  0.2  |     |  1.0000  |\n"
    assert parse_peer_epochs(cut_off) == [[1.0, 2.0]]  # a run without its eval row: fewer steps than counted
    # the steps after the first epoch: ceil(48 x 9.9) = 476 in all, 48 in the first
    assert peer_steady_step_ms([1.0, 2.0]) == pytest.approx(1000 / 428) and peer_steady_step_ms([1.0]) is None


def test_a_peer_path_that_is_not_a_file_stops_the_check_naming_it(tiny_data, tmp_path):
    done = run_check(
        "--data",
        str(tiny_data),
        "--out",
        str(tmp_path / "o"),
        "--device",
        "cpu",
        "--tiny",
        "--peer",
        str(tmp_path / "airbench94_gpu.py"),
    )
    assert done.returncode == 2 and "airbench94_gpu.py is not a file" in done.stderr and "--peer" in done.stderr
    assert not (tmp_path / "o").exists()


def test_markdown_report_shows_the_end_of_a_failed_parts_output():
    result = fake_result()
    result["recipes"]["mnist_fast"].update(returncode=1, log_tail="Traceback ...\nRuntimeError: CUDA out of memory")
    text = render_markdown(result)
    assert "## Output of the parts that failed" in text
    assert (
        "`mnist_fast` (last lines of `logs/x.log`):\n\n```\nTraceback ...\nRuntimeError: CUDA out of memory\n```"
        in text
    )
