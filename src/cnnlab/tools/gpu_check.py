"""gpu_check: check and measure the GPU path on a GPU machine in one command, and write one report of it.

    python scripts/gpu_check.py --data DIR --out DIR [--peer FILE] [--parts A,B] [--peak-tflops N]

In turn, each part in its own process and within its own time budget (the whole stays under 9 minutes on one H100):
1. `experiment=mnist_fast` trained on the GPU in float32 (scripts/train.py), seed 42;
2. `experiment=cifar10_record` trained on the GPU (`trainer=gpu`: bf16, cuDNN autotuning), seeds 42, 1 and 2;
3. with --peer <airbench94_gpu.py>, that reference program on the same data and GPU, 3 runs after its warm-up run
   and then once more in a fresh process without one, set beside the record recipe's seeds: both accuracies and
   both times in one table, and their ratios warm (a steady step after the first epoch, each) and cold (a fresh
   process, start to exit, each). The peer is not part of the project: its path is given, and the report says
   when it is not;
4. the benchmark (scripts/benchmark.py) of ResNet-18 on CIFAR-10 in bf16 with channels-last: images/s of the
   project's path (a) and of a plain PyTorch loop doing the same work (b), a/b, and the share of the GPU's peak
   bf16 FLOP/s they reach;
5. the GPU tests, `pytest -m gpu` (tests/test_gpu.py), each test's outcome read from their JUnit XML.
`--parts` runs some of them only (e.g. `--parts cifar10_record,peer`); the reports name the parts left out.
gpu_check.json and gpu_check.md in --out are rewritten after every part, so a part that fails or runs out of time
leaves the others' results. It needs no internet (the datasets must be in --data) and no installation: the scripts
run with this interpreter and this source tree's src/ put in front of PYTHONPATH, which is otherwise kept.
"""

import argparse
import json
import os
import pickle
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

from cnnlab.atomic_files import write_text_atomic
from cnnlab.commands.run_record import write_json
from cnnlab.data.cifar import TRAIN_BATCHES

REPO = Path(__file__).resolve().parents[3]
SRC, SCRIPTS, TESTS = REPO / "src", REPO / "scripts", REPO / "tests"

# Seconds each part may take, in the order they run (the measurements first, the tests last). Measured on one H200
# (docs/gpu.md): mnist_fast 22 s from process start, cifar10_record 25-31 s a seed (92 s for three in the machine's
# first call), the peer 25-29 s for its warm-up run and 3 runs, the benchmark 36 s, the tests 126 s. The
# budgets leave room and sum to 9 minutes, so that one call of 10 minutes on a GPU machine covers the check.
# The peer's part also runs it once more cold (a fresh process, no warm-up run): 30 s more; the tests keep 150 s.
BUDGETS = {"mnist_fast": 40, "cifar10_record": 180, "peer": 110, "benchmark": 60, "tests": 150}
TOTAL_BUDGET = sum(BUDGETS.values())

# Dense bf16 Tensor Core peaks in TFLOP/s: half the "with sparsity" bf16 figures of NVIDIA's datasheets ("NVIDIA
# H100 Tensor Core GPU": SXM 1,979, PCIe 1,513, NVL 1,671; "NVIDIA H200 Tensor Core GPU": SXM 1,979, NVL 1,671;
# "NVIDIA A100 Tensor Core GPU": 312 dense for SXM and PCIe). Checked in order against torch.cuda.get_device_name()
# (e.g. "NVIDIA H100 80GB HBM3" is the SXM part): every word of a row must appear in the name.
PEAK_BF16_TFLOPS = [
    ("H200 NVL", ("H200", "NVL"), 835.5),
    ("H200 SXM", ("H200",), 989.5),
    ("H100 NVL", ("H100", "NVL"), 835.5),
    ("H100 PCIe", ("H100", "PCIE"), 756.5),
    ("H100 SXM", ("H100",), 989.5),
    ("A100", ("A100",), 312.0),
]
PEAK_SOURCE = "NVIDIA datasheet, dense bf16 Tensor Core"

# The benchmark as README.md gives it for a GPU, timing only the two paths a/b compares.
BENCHMARK_MODEL = ["model=resnet18", "data=cifar10"]
BENCHMARK = ["trainer.precision=bf16-mixed", "channels_last=true", "compare=[lightning,plain]", "repeats=3"]

# --tiny, the CPU rehearsal the test suite runs: tiny datasets, narrow ResNets in float32 (bf16 is slow on most
# CPUs), one short epoch, small batches. It runs every part's code, but measures nothing.
TINY_TRAIN = [
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",  # a second epoch: the steady steps after the first
    "data.batch_size=32",
    "data.eval_batch_size=64",
]
TINY_RESNET = ["model.widths=[8,16,32,64]", "trainer.precision=32-true"]
TINY_AIRBENCH = ["model.widths=[8,16,16]", "trainer.precision=32-true"]
TINY_BENCHMARK = [
    "data.batch_size=8",
    "data.val_size=100",
    "warmup_steps=1",
    "steps=3",
    "repeats=1",
    "count_ops_steps=2",
]

# The recipes trained, with their seeds: the CIFAR-10 recipe over 3 seeds, as its accuracy is stated (a mean).
RECIPE_SEEDS = {"mnist_fast": (42,), "cifar10_record": (42, 1, 2)}
PEER_RECIPE = "cifar10_record"  # the project's recipe set beside the peer
PEER_RUNS = 3
# airbench94's steps, from its hyperparameters (batch 1024, 9.9 epochs, a training loader that drops the last partial
# batch): 50,000 // 1024 = 48 a epoch, ceil(48 x 9.9) = 476 in all; its epoch rows give cumulative seconds only.
PEER_STEPS_PER_EPOCH, PEER_TOTAL_STEPS = 48, 476

NO_GPU = (
    "No CUDA GPU is visible to PyTorch here ({build}), so there is nothing for scripts/gpu_check.py to check or "
    "measure: it runs the GPU tests (pytest -m gpu), trains experiment=mnist_fast and experiment=cifar10_record on the "
    "GPU and benchmarks ResNet-18 in bf16. Run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch "
    "(torch.cuda.is_available() must be True there); the CPU path is covered by the plain test suite (pytest)."
)


def peak_bf16_tflops(device_name: str) -> tuple[str, float] | None:
    """The table's row for a GPU name, as (row name, dense bf16 TFLOP/s), or None for a GPU the table lacks."""
    words = set(re.split(r"[^A-Z0-9]+", device_name.upper()))
    for row, needed, tflops in PEAK_BF16_TFLOPS:
        if all(word in words for word in needed):
            return row, tflops
    return None


def training_flops_per_image(macs_per_image: int) -> int:
    """FLOPs of one training step per image: 2 per multiply-accumulate, and the backward pass costs twice the
    forward (gradients for the inputs and for the weights), so 3 forward passes in all."""
    return 2 * 3 * macs_per_image


def share_of_peak(images_per_second: float, flops_per_image: int, peak_tflops: float) -> tuple[float, float]:
    """(achieved TFLOP/s, share of the peak) at a training throughput."""
    achieved = images_per_second * flops_per_image / 1e12
    return achieved, achieved / peak_tflops


def model_macs(overrides: list[str]) -> int:
    """Multiply-accumulates of one image's forward pass of the model the overrides (model=..., data=..., model.*)
    give, from the project's layer table (scripts/inspect_model.py)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from cnnlab.config_files import config_dir
    from cnnlab.tools.inspect_model import layer_table

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="inspect_model", overrides=overrides)
    return sum(row.macs for row in layer_table(instantiate(cfg.model), tuple(cfg.data.image_shape)))


def parse_junit(xml_text: str) -> list[dict[str, Any]]:
    """Each test case of a pytest JUnit XML report: name, outcome (passed, failed, error, skipped), seconds, message."""
    tests = []
    for case in ET.fromstring(xml_text).iter("testcase"):
        outcome, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                text = (found.get("message") or found.text or "").strip()
                outcome, message = name, text.splitlines()[0][:300] if text else ""
                break
        module = case.get("classname", "").rsplit(".", 1)[-1]
        tests.append(
            {
                "name": f"{module}::{case.get('name')}" if module else case.get("name"),
                "outcome": outcome,
                "seconds": round(float(case.get("time") or 0), 2),
                "message": message,
            }
        )
    return tests


PYTEST_LINE = re.compile(r"^(?:\S+/)?(\S+?)\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", re.MULTILINE)


def parse_pytest_log(log: str) -> list[dict[str, Any]]:
    """The outcomes `pytest -v` printed, for a run cut off before it wrote its JUnit XML (the XML comes at the end)."""
    return [
        {"name": f"{module}::{name}", "outcome": outcome.lower(), "seconds": None, "message": ""}
        for module, name, outcome in PYTEST_LINE.findall(log)
    ]


def parse_peer_output(text: str) -> list[dict[str, float]]:
    """Each timed run of airbench94's table (its warm-up run left out): the test accuracy with its test-time
    augmentation (`tta_val_acc`) and its seconds (`total_time_seconds`: training steps, whitening set-up and the
    final evaluation), from the row whose epoch column reads `eval`."""
    runs, label = [], ""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 7 or cells[1] in ("epoch", ""):
            continue
        label = cells[0] or label
        if cells[1] == "eval" and label != "warmup":
            runs.append({"test_acc": float(cells[5]), "seconds": float(cells[6])})
    return runs


def parse_peer_epochs(text: str) -> list[list[float]]:
    """Each finished timed run's epoch rows' cumulative seconds (total_time_seconds; the first row's include the
    whitening set-up), in order: its warm-up run and a run cut off before its final `eval` row left out (its steps
    would be fewer than the steady figure divides by)."""
    runs: list[list[float]] = []
    rows: list[float] | None = None  # the rows of the timed run being read
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 7 or cells[1] in ("epoch", ""):
            continue
        if cells[0]:
            rows = [] if cells[0] != "warmup" else None
        if rows is None:
            continue
        if cells[1] == "eval":
            runs.append(rows)
            rows = None
        else:
            rows.append(float(cells[6]))
    return runs


def peer_steady_step_ms(epoch_seconds: list[float]) -> float | None:
    """A steady step of the peer in ms: the seconds from its first epoch's end to its last one's over the steps
    between (PEER_TOTAL_STEPS less the first epoch's), as the project's steady_step_ms leaves out its first epoch."""
    if len(epoch_seconds) < 2:
        return None
    return 1000 * (epoch_seconds[-1] - epoch_seconds[0]) / (PEER_TOTAL_STEPS - PEER_STEPS_PER_EPOCH)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_tests(tests: list[dict[str, Any]]) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for test in tests:
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    return counts


def subprocess_env() -> dict[str, str]:
    """This environment, with this source tree's src/ first on PYTHONPATH (kept: it may hold the dependencies)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_logged(
    cmd: list[str], log: Path, timeout: float, cwd: Path = REPO, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run cmd (from the repository root unless cwd says otherwise), its output into log; on timeout its whole
    process group is killed. env: variables added to subprocess_env()."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as out:
        out.write("$ " + " ".join(cmd) + "\n\n")
        out.flush()
        process = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**subprocess_env(), **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode, timed_out = process.wait(timeout=max(timeout, 1)), False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            returncode, timed_out = process.wait(), True
    run = {
        "command": " ".join(cmd[1:]),
        "returncode": returncode,
        "timed_out": timed_out,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "log": str(log),
    }
    if returncode != 0 or timed_out:  # the end of the output says what went wrong
        run["log_tail"] = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    return run


def cifar_with_string_keys(source: Path, folder: Path) -> Path:
    """The CIFAR-10 folder to hand the peer: `source` itself when its six batches have string keys, as the official
    archive's do once read as latin-1; otherwise a copy of the six batches in `folder` with the keys made strings.

    The project reads either kind, but airbench94 looks its batches up by string keys only, and a copy rebuilt by
    Python 3 (`pickle.dumps({b"data": ...})`, as the project's own tiny datasets and some offline kits write it)
    has byte keys. The pixels and labels are copied unchanged; `source` is left as it is.
    """
    records = {}
    for name in [*TRAIN_BATCHES, "test_batch"]:
        try:
            with open(source / name, "rb") as f:
                records[name] = pickle.load(f, encoding="latin1")
        except Exception as error:
            raise ValueError(f"{source / name} is not a readable CIFAR-10 batch ({error!r})") from error
    if all(isinstance(key, str) for record in records.values() for key in record):
        return source
    folder.mkdir(parents=True, exist_ok=True)
    for name, record in records.items():
        keyed = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in record.items()}
        (folder / name).write_bytes(pickle.dumps(keyed, protocol=2))
    return folder


def fresh_dir(path: Path) -> Path:
    """An empty run directory (a rerun into the same --out must not find an earlier run's checkpoints)."""
    shutil.rmtree(path, ignore_errors=True)
    return path


class Check:
    """The parts of one check, the results they gathered, and the reports written from them."""

    def __init__(
        self,
        data: Path,
        out: Path,
        device: str,
        tiny: bool,
        peak_tflops: float | None,
        peer: Path | None = None,
        parts: list[str] | None = None,
    ) -> None:
        self.data, self.out, self.device, self.tiny = data.resolve(), out.resolve(), device, tiny
        self.peer = peer.resolve() if peer else None
        self.parts = list(parts or BUDGETS)
        self.started = time.perf_counter()
        self.result: dict[str, Any] = {
            "status": "running",
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "device": describe_device(device),
            "simulation": tiny,  # --tiny: the CPU rehearsal the test suite runs, not a measurement
            "versions": versions(),
            "data": str(self.data),
            "budget_seconds": {**BUDGETS, "total": TOTAL_BUDGET},
            "not_asked": [part for part in BUDGETS if part not in (parts or BUDGETS)],  # left out by --parts
            "tests": None,
            "recipes": {},
            "benchmark": None,
            "peer": None,
        }
        self.peak = self._peak(peak_tflops)

    def _peak(self, given: float | None) -> dict[str, Any] | None:
        if given is not None:
            return {"tflops": given, "source": "--peak-tflops"}
        row = peak_bf16_tflops(self.result["device"]["name"]) if self.device == "cuda" else None
        return {"tflops": row[1], "source": f"{row[0]}, {PEAK_SOURCE}"} if row else None

    def time_left(self, part: str) -> float:
        return min(BUDGETS[part], TOTAL_BUDGET - (time.perf_counter() - self.started))

    def save(self) -> None:
        self.result["total_seconds"] = round(time.perf_counter() - self.started, 1)
        write_json(self.out / "gpu_check.json", self.result)
        write_text_atomic(self.out / "gpu_check.md", render_markdown(self.result))

    def run_tests(self) -> None:
        xml = self.out / "gpu_tests.xml"
        xml.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", str(TESTS / "test_gpu.py"), "-v", "-p", "no:cacheprovider"]
        run = run_logged([*cmd, f"--junitxml={xml}"], self.out / "logs" / "tests.log", self.time_left("tests"))
        if xml.is_file():
            tests = parse_junit(xml.read_text())
        else:  # cut off by the budget: what pytest had printed so far
            tests = parse_pytest_log(Path(run["log"]).read_text(errors="replace"))
        run.update(tests=tests, counts=summarize_tests(tests))
        self.result["tests"] = run

    def train_command(self, recipe: str, seed: int) -> list[str]:
        run_dir = fresh_dir(self.out / "runs" / recipe / f"seed{seed}")
        cmd = [sys.executable, str(SCRIPTS / "train.py"), f"experiment={recipe}", f"seed={seed}"]
        if recipe == PEER_RECIPE:
            cmd.append("trainer=gpu")  # as README.md runs the recipe: bf16, cuDNN autotuning
        elif not self.tiny:
            # mnist_fast on the GPU in float32 (its ${fast_precision:} would give trainer=gpu's bf16-mixed)
            cmd += ["trainer.accelerator=gpu", "trainer.precision=32-true"]
        cmd += [f"data.data_dir={self.data}", "data.download=false", f"hydra.run.dir={run_dir}"]
        if self.tiny:
            cmd += TINY_TRAIN + (TINY_AIRBENCH if recipe == PEER_RECIPE else [])
        return cmd

    def run_recipe(self, recipe: str) -> None:
        """Train the recipe once per seed; the recipe's row holds the means (and the minimum test accuracy)."""
        started, seeds = time.perf_counter(), RECIPE_SEEDS[recipe][: 2 if self.tiny else None]
        runs = []
        for seed in seeds:
            left = self.time_left(recipe) - (time.perf_counter() - started)
            log = self.out / "logs" / f"{recipe}-seed{seed}.log"
            run = run_logged(self.train_command(recipe, seed), log, left)
            run["seed"] = seed
            metrics_file = self.out / "runs" / recipe / f"seed{seed}" / "metrics.json"
            if run["returncode"] == 0 and metrics_file.is_file():
                metrics = json.loads(metrics_file.read_text())
                for key in ("status", "test_acc", "val_acc_best", "epochs", "train_seconds", "train_images_per_second",
                            "steady_step_ms", "warmup_steps"):  # fmt: skip
                    run[key] = metrics.get(key)
            runs.append(run)
            if run["returncode"] != 0 or run["timed_out"]:
                break
        done = [r for r in runs if r.get("test_acc") is not None]
        failed = next((r for r in runs if r["returncode"] != 0 or r["timed_out"]), None)
        summary: dict[str, Any] = {
            "command": runs[0]["command"],
            "seeds": [r["seed"] for r in runs],
            "runs": runs,
            "returncode": failed["returncode"] if failed else 0,
            "timed_out": bool(failed and failed["timed_out"]),
            "log": (failed or runs[-1])["log"],
            "wall_seconds": round(sum(r["wall_seconds"] for r in runs), 1),
        }
        if failed and failed.get("log_tail"):
            summary["log_tail"] = failed["log_tail"]
        for key in ("test_acc", "val_acc_best", "epochs", "train_seconds", "train_images_per_second", "steady_step_ms"):
            values = [r[key] for r in done if r.get(key) is not None]
            summary[key] = mean(values)
        # cold: the first seed's whole process, from its start (imports, data, warm-up, test) to its exit
        summary["cold_wall_seconds"] = runs[0]["wall_seconds"] if runs[0].get("test_acc") is not None else None
        summary["test_acc_min"] = min((r["test_acc"] for r in done), default=None)
        self.result["recipes"][recipe] = summary

    def run_peer(self) -> None:
        """The peer on the same data and device, PEER_RUNS runs after its own warm-up run, in a folder of its own
        (it writes a tensor copy of CIFAR-10 and a log where it runs)."""
        if self.peer is None:
            self.result["peer"] = {"not_run": "no --peer given (the path of airbench94_gpu.py)"}
            return
        folder = fresh_dir(self.out / "runs" / "peer")
        folder.mkdir(parents=True)
        log, copy = self.out / "logs" / "peer.log", fresh_dir(self.out / "runs" / "peer_data")
        started = time.perf_counter()
        try:
            cifar = cifar_with_string_keys(self.data / "cifar-10-batches-py", copy)
        except Exception as error:  # an unreadable batch or a full disk fails this part, not the whole check
            why = f"the peer was not run: no string-keyed copy of CIFAR-10 could be made for it: {error}"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(why + "\n")
            shutil.rmtree(copy, ignore_errors=True)
            wall = round(time.perf_counter() - started, 1)
            self.result["peer"] = {
                "command": str(self.peer), "returncode": 1, "timed_out": False, "wall_seconds": wall,
                "log": str(log), "log_tail": why, "file": str(self.peer), "runs": [], "test_acc": None, "seconds": None,
            }  # fmt: skip
            return
        env = {"CIFAR_ROOT": str(cifar), "RUNS": str(PEER_RUNS)}
        if self.tiny:
            env.update(RUNS="1", WARMUP="0")
        try:
            run = run_logged([sys.executable, str(self.peer)], log, self.time_left("peer"), cwd=folder, env=env)
            output = Path(run["log"]).read_text(errors="replace")
            runs = parse_peer_output(output)
            steady = [peer_steady_step_ms(epochs) for epochs in parse_peer_epochs(output)]
            run.update(
                file=str(self.peer),
                runs=runs,
                test_acc=mean([r["test_acc"] for r in runs]),
                seconds=mean([r["seconds"] for r in runs]),
                steady_step_ms=mean([ms for ms in steady if ms is not None]),
            )
            self.result["peer"] = run
            self.save()
            left = self.time_left("peer") - (time.perf_counter() - started)
            if run["returncode"] != 0 or run["timed_out"]:
                run["cold"] = None
            elif left < 10:
                run["cold"] = {"not_run": f"{left:.0f} s of the peer's budget left"}
            else:
                run["cold"] = self.run_peer_cold(cifar, left)
        finally:
            shutil.rmtree(copy, ignore_errors=True)  # 180 MB the peer no longer needs (it keeps its own tensor copy)

    def run_peer_cold(self, cifar: Path, seconds: float) -> dict[str, Any]:
        """The peer once in a fresh process without its warm-up run (WARMUP=0 RUNS=1), timed as a whole process, as
        the recipe's first seed is: start-up, data, cuDNN autotuning and its test pass included."""
        folder = fresh_dir(self.out / "runs" / "peer_cold")
        folder.mkdir(parents=True)
        env = {"CIFAR_ROOT": str(cifar), "RUNS": "1", "WARMUP": "0"}
        run = run_logged([sys.executable, str(self.peer)], self.out / "logs" / "peer_cold.log", seconds, folder, env)
        runs = parse_peer_output(Path(run["log"]).read_text(errors="replace"))
        run["test_acc"] = runs[0]["test_acc"] if runs else None
        return run

    def run_benchmark(self) -> None:
        run_dir = fresh_dir(self.out / "runs" / "benchmark")
        model = BENCHMARK_MODEL + (TINY_RESNET[:1] if self.tiny else [])
        cmd = [sys.executable, str(SCRIPTS / "benchmark.py"), *model, *BENCHMARK, f"device={self.device}"]
        cmd += [f"data.data_dir={self.data}", "data.download=false", f"hydra.run.dir={run_dir}"]
        cmd += TINY_RESNET[1:] + TINY_BENCHMARK if self.tiny else []
        run = run_logged(cmd, self.out / "logs" / "benchmark.log", self.time_left("benchmark"))
        result_file = run_dir / "benchmark.json"
        if run["returncode"] == 0 and result_file.is_file():
            measured = json.loads(result_file.read_text())
            macs = model_macs(model)
            flops = training_flops_per_image(macs)
            run.update(
                model="resnet18",
                data="cifar10",
                batch_size=measured["config"]["data"]["batch_size"],
                macs_per_image=macs,
                flops_per_image=flops,
                lightning_over_plain=measured.get("lightning_over_plain"),
                peak_bf16_tflops=self.peak["tflops"] if self.peak else None,
                peak_source=self.peak["source"] if self.peak else None,
                paths={},
            )
            for path in ("lightning", "plain"):
                rate = measured.get(f"{path}_images_per_second")
                if rate is None:
                    continue
                entry: dict[str, Any] = {"images_per_second": rate}
                if self.peak:
                    achieved, share = share_of_peak(rate, flops, self.peak["tflops"])
                    entry.update(achieved_tflops=round(achieved, 2), share_of_peak=round(share, 4))
                run["paths"][path] = entry
        self.result["benchmark"] = run

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        device = self.result["device"]
        print(f"gpu_check on {device['name']} ({device['detail']}); reports in {self.out}", flush=True)
        self.save()
        parts = [
            ("mnist_fast", "experiment=mnist_fast", lambda: self.run_recipe("mnist_fast")),
            ("cifar10_record", "experiment=cifar10_record", lambda: self.run_recipe("cifar10_record")),
            ("peer", "the peer, airbench94, beside the project's record recipe", self.run_peer),
            ("benchmark", "benchmark: ResNet-18, CIFAR-10, bf16, channels-last", self.run_benchmark),
            ("tests", "GPU tests (pytest -m gpu)", self.run_tests),
        ]
        for i, (part, title, run) in enumerate(parts, start=1):
            if part not in self.parts:
                print(f"[{i}/{len(parts)}] {title}: not asked (--parts)", flush=True)
                continue
            if self.time_left(part) < 10:
                print(f"[{i}/{len(parts)}] {title}: not run, the time budget is spent", flush=True)
                self.result.setdefault("not_run", []).append(part)
                continue
            print(f"[{i}/{len(parts)}] {title} (up to {self.time_left(part):.0f} s) ...", flush=True)
            run()
            self.save()
            print(f"    {part_line(part, self.result)}", flush=True)
        self.result["status"] = "failed" if problems(self.result) else "passed"
        self.save()
        print(f"{self.result['status']} in {self.result['total_seconds']:.0f} s: {self.out / 'gpu_check.md'}")
        for problem in problems(self.result):
            print(f"  - {problem}")
        return 0 if self.result["status"] == "passed" else 1


def peer_comparison(result: dict[str, Any]) -> dict[str, Any] | None:
    """The project's CIFAR-10 recipe against the peer on the same device: accuracy difference in points (project
    minus peer) and the time ratio (the project's training seconds over the peer's seconds); None until both ran."""
    peer, recipe = result.get("peer") or {}, (result.get("recipes") or {}).get(PEER_RECIPE) or {}
    if peer.get("test_acc") is None or recipe.get("test_acc") is None:
        return None
    ratio = recipe["train_seconds"] / peer["seconds"] if recipe.get("train_seconds") and peer["seconds"] else None
    cold = peer.get("cold") or {}
    peer_cold = cold.get("wall_seconds") if cold.get("test_acc") is not None else None  # a cold run that scored
    return {
        "recipe": PEER_RECIPE,
        "project_test_acc": recipe["test_acc"],
        "peer_test_acc": peer["test_acc"],
        "points_behind_peer": round(100 * (peer["test_acc"] - recipe["test_acc"]), 2),
        "project_train_seconds": recipe.get("train_seconds"),
        "peer_seconds": peer["seconds"],
        "time_ratio": round(ratio, 3) if ratio is not None else None,
        # warm: a steady step of each, after its first epoch; cold: a fresh process of each, start to exit
        "project_steady_step_ms": recipe.get("steady_step_ms"),
        "peer_steady_step_ms": peer.get("steady_step_ms"),
        "warm_step_ratio": _ratio(recipe.get("steady_step_ms"), peer.get("steady_step_ms")),
        "project_cold_wall_seconds": recipe.get("cold_wall_seconds"),
        "peer_cold_wall_seconds": peer_cold,
        "cold_ratio": _ratio(recipe.get("cold_wall_seconds"), peer_cold),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def describe_device(device: str) -> dict[str, Any]:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return {
            "name": props.name,
            "detail": f"compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.1f} GiB",
            "count": torch.cuda.device_count(),
        }
    return {"name": "CPU", "detail": f"{platform.machine()}, {os.cpu_count()} cores (simulation)", "count": 1}


def versions() -> dict[str, Any]:
    found: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
    }
    for package in ("lightning", "torchmetrics", "hydra", "torchvision"):
        try:
            found[package] = __import__(package).__version__
        except ImportError:
            found[package] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        found["git_commit"] = commit.stdout.strip() or None
    except OSError:
        found["git_commit"] = None
    return found


def problems(result: dict[str, Any]) -> list[str]:
    """What went wrong in a check, one line each; none means it passed (GPU tests skipped on a GPU count too)."""
    found = [f"{part}: not run (time budget spent)" for part in result.get("not_run", [])]
    tests = result.get("tests")
    if tests:
        counts = tests["counts"]
        if tests["timed_out"]:
            found.append(f"tests: cut off after {tests['wall_seconds']} s")
        for test in tests["tests"]:
            if test["outcome"] in ("failed", "error"):
                found.append(f"{test['name']}: {test['outcome']} {test['message']}".rstrip())
        if not tests["tests"]:
            found.append(f"tests: none ran (pytest exit code {tests['returncode']}; see {tests['log']})")
        elif tests["returncode"] not in (0, 1) and not tests["timed_out"]:  # 1: some failed, listed above
            found.append(f"tests: pytest exit code {tests['returncode']} (see {tests['log']})")
        elif counts.get("skipped") and not result["simulation"]:
            found.append(f"tests: {counts['skipped']} skipped on a GPU machine")
    peer = result.get("peer")
    runs = [*result.get("recipes", {}).items(), ("benchmark", result.get("benchmark"))]
    runs += [("peer", peer)] if peer and "returncode" in peer else []
    if peer and "returncode" in peer and peer["returncode"] == 0 and not peer["runs"]:
        found.append(f"peer: no result found in its output (see {peer['log']})")
    cold = (peer or {}).get("cold") or {}
    if "not_run" in cold:
        found.append(f"peer, cold run: not run ({cold['not_run']})")
    elif cold and (cold["timed_out"] or cold["returncode"] != 0 or cold.get("test_acc") is None):
        why = "timed out" if cold["timed_out"] else f"exit code {cold['returncode']}, no result"
        found.append(f"peer, cold run: {why} (see {cold['log']})")
    for name, run in runs:
        if run and (run["timed_out"] or run["returncode"] != 0):
            why = "timed out" if run["timed_out"] else f"exit code {run['returncode']}"
            found.append(f"{name}: {why} (see {run['log']})")
    return found


def part_line(part: str, result: dict[str, Any]) -> str:
    """One line on how a part went, printed as the check goes."""
    if part == "tests":
        run = result["tests"]
        counts = ", ".join(f"{n} {outcome}" for outcome, n in run["counts"].items() if n)
        return f"{counts or 'no tests'} in {run['wall_seconds']} s"
    if part == "peer":
        peer = result["peer"]
        if "not_run" in peer:
            return f"not run: {peer['not_run']}"
        if peer["returncode"] != 0 or peer["timed_out"]:
            why = "timed out" if peer["timed_out"] else "failed"
            return f"{why} after {peer['wall_seconds']} s; see {peer['log']}"
        versus = peer_comparison(result)
        line = f"{len(peer['runs'])} runs, test acc {_cell(peer['test_acc'])}, {_cell(peer['seconds'], 2)} s each"
        if versus:
            line += f"; project {versus['points_behind_peer']:+.2f} points behind, time ratio {versus['time_ratio']}"
        return line
    run = result["recipes"][part] if part in result["recipes"] else result["benchmark"]
    if run["returncode"] != 0 or run["timed_out"]:
        return f"{'timed out' if run['timed_out'] else 'failed'} after {run['wall_seconds']} s; see {run['log']}"
    if part == "benchmark":
        rates = ", ".join(f"{p} {v['images_per_second']:,.0f} img/s" for p, v in run["paths"].items())
        return f"{rates}; a/b {run['lightning_over_plain']}"
    seeds = f" (mean of {len(run['seeds'])} seeds)" if len(run.get("seeds", [])) > 1 else ""
    return (
        f"test acc {run['test_acc']:.4f}{seeds}, training {run['train_seconds']:.1f} s, {run['wall_seconds']} s in all"
    )


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def render_markdown(result: dict[str, Any]) -> str:
    """The report as Markdown: device and versions, each test's outcome, the recipes, the benchmark."""
    device, v = result["device"], result["versions"]
    lines = [
        f"# GPU check: {device['name']}"
        + (" (a CPU rehearsal with tiny data, not a measurement)" if result["simulation"] else ""),
        "",
        f"Status **{result['status']}**, {result.get('total_seconds', 0):.0f} s in all (budget "
        f"{result['budget_seconds']['total']} s), started {result['started']}; data from `{result['data']}`.",
        "",
        "| | |",
        "| --- | --- |",
        f"| device | {device['name']} ({device['detail']}), {device['count']} visible |",
        f"| torch | {v['torch']} (CUDA {v['cuda']}, cuDNN {v['cudnn']}) |",
    ]
    for package in ("lightning", "torchmetrics", "hydra", "torchvision", "python", "git_commit"):
        lines.append(f"| {package} | {_cell(v.get(package))} |")
    if result.get("not_asked"):
        lines += ["", f"Parts left out by `--parts`: {', '.join(result['not_asked'])}."]
    problem_lines = problems(result)
    if result["status"] != "running" and problem_lines:
        lines += ["", "Problems:", "", *[f"- {p}" for p in problem_lines]]

    tests = result.get("tests")
    lines += ["", "## GPU tests: `pytest -m gpu`", ""]
    if tests is None:
        lines.append("Not run.")
    else:
        counts = ", ".join(f"{n} {outcome}" for outcome, n in tests["counts"].items() if n) or "no tests"
        lines += [f"{counts}; {tests['wall_seconds']} s (log: `{tests['log']}`).", ""]
        lines += ["| test | outcome | seconds | message |", "| --- | --- | --- | --- |"]
        for t in tests["tests"]:
            lines.append(
                f"| `{t['name']}` | {t['outcome']} | {_cell(t['seconds'], 1)} | {_cell(t['message'] or None)} |"
            )

    lines += ["", "## Recipes", ""]
    recipes = result.get("recipes") or {}
    if not recipes:
        lines.append("Not run.")
    else:
        lines += [
            "Means over the seeds; `min` is the lowest test accuracy of them.",
            "",
            "| recipe | seeds | test acc | min | best val acc | epochs | training s | train images/s | wall s | exit |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, run in recipes.items():
            exit_note = "timed out" if run["timed_out"] else str(run["returncode"])
            seeds = ", ".join(str(seed) for seed in run.get("seeds", [])) or "-"
            lines.append(
                f"| {name} | {seeds} | {_cell(run.get('test_acc'))} | {_cell(run.get('test_acc_min'))} | "
                f"{_cell(run.get('val_acc_best'))} | "
                f"{_cell(run.get('epochs'))} | {_cell(run.get('train_seconds'), 1)} | "
                f"{_cell(run.get('train_images_per_second'), 0)} | {_cell(run['wall_seconds'], 1)} | {exit_note} |"
            )
        lines += ["", *[f"- `{name}`: `{run['command']}`" for name, run in recipes.items()]]

    bench = result.get("benchmark")
    lines += ["", "## Benchmark: ResNet-18 on CIFAR-10, bf16-mixed, channels-last", ""]
    if bench is None:
        lines.append("Not run.")
    elif "paths" not in bench:
        lines.append(
            f"Failed (exit code {bench['returncode']}, timed out: {bench['timed_out']}); log `{bench['log']}`."
        )
    else:
        lines += [
            "| path | images/s | TFLOP/s | share of peak bf16 |",
            "| --- | --- | --- | --- |",
        ]
        names = {"lightning": "(a) lightning: the project's path", "plain": "(b) plain PyTorch loop"}
        for path, entry in bench["paths"].items():
            share = entry.get("share_of_peak")
            lines.append(
                f"| {names[path]} | {_cell(entry['images_per_second'], 0)} | {_cell(entry.get('achieved_tflops'), 1)} "
                f"| {'-' if share is None else f'{100 * share:.1f}%'} |"
            )
        peak = bench.get("peak_bf16_tflops")
        lines += [
            "",
            f"a/b = {_cell(bench['lightning_over_plain'], 3)}; batch {bench['batch_size']}; FLOPs per image = "
            f"{bench['macs_per_image']:,} MACs (scripts/inspect_model.py) x 2 x 3 (forward and backward) = "
            f"{bench['flops_per_image'] / 1e9:.2f} GFLOP; peak "
            + (f"{peak:g} TFLOP/s ({bench['peak_source']})." if peak else "unknown for this device (--peak-tflops)."),
            "",
            f"`{bench['command']}`",
        ]
    peer = result.get("peer")
    lines += ["", "## Beside the peer: airbench94 on the same data and device", ""]
    if peer is None:
        lines.append("Not run.")
    elif "not_run" in peer:
        lines.append(f"Not run: {peer['not_run']}.")
    else:
        versus = peer_comparison(result)
        recipe = recipes.get(PEER_RECIPE) or {}
        lines += [
            "| program | runs | test acc (mean) | seconds (mean) | what the seconds cover |",
            "| --- | --- | --- | --- | --- |",
            f"| project: experiment={PEER_RECIPE} | {len(recipe.get('seeds', []))} | {_cell(recipe.get('test_acc'))} "
            f"| {_cell(recipe.get('train_seconds'), 2)} | training steps (metrics.json train_seconds) |",
            f"| peer: `{peer['file']}` | {len(peer['runs'])} | {_cell(peer['test_acc'])} | "
            f"{_cell(peer['seconds'], 2)} | training steps, whitening set-up and its final test pass |",
        ]
        if versus:
            lines += [
                "",
                f"Project minus peer: {-versus['points_behind_peer']:+.2f} points of test accuracy; time ratio "
                f"project/peer {_cell(versus['time_ratio'], 3)}.",
                "",
                f"Warm, a steady step after the first epoch: project {_cell(versus['project_steady_step_ms'], 2)} ms "
                f"(metrics.json steady_step_ms), peer {_cell(versus['peer_steady_step_ms'], 2)} ms (its epoch rows "
                f"after the first, over {PEER_TOTAL_STEPS - PEER_STEPS_PER_EPOCH} steps); ratio "
                f"{_cell(versus['warm_step_ratio'], 3)}.",
                f"Cold, a fresh process from start to exit: project {_cell(versus['project_cold_wall_seconds'], 1)} s "
                f"(its first seed), peer {_cell(versus['peer_cold_wall_seconds'], 1)} s (WARMUP=0 RUNS=1); ratio "
                f"{_cell(versus['cold_ratio'], 3)}.",
            ]
    failing = [("tests", tests), *recipes.items(), ("benchmark", bench)]
    failing += [("peer", peer)] if peer and "returncode" in peer else []
    failing = [(name, run) for name, run in failing if run and run.get("log_tail")]
    if failing:
        lines += ["", "## Output of the parts that failed", ""]
        for name, run in failing:
            lines += [f"`{name}` (last lines of `{run['log']}`):", "", "```", run["log_tail"], "```", ""]
    return "\n".join(lines) + "\n"


def missing_data(data: Path) -> list[Path]:
    from cnnlab.data import CIFAR10DataModule, MNISTDataModule

    return [
        *MNISTDataModule(data_dir=str(data)).missing_files(),
        *CIFAR10DataModule(data_dir=str(data)).missing_files(),
    ]


def main(argv: list[str] | None = None) -> int:
    """`python scripts/gpu_check.py --data DIR --out DIR`; returns the exit code (0 passed, 1 failed, 2 cannot run)."""
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding MNIST/raw/ and cifar-10-batches-py/")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.md, runs, logs")
    parser.add_argument(
        "--peak-tflops", type=float, help="the GPU's dense bf16 peak in TFLOP/s, for a GPU the built-in table lacks"
    )
    parser.add_argument(
        "--peer", type=Path, help="airbench94_gpu.py, run beside the project's CIFAR-10 recipe on the same data and GPU"
    )
    parser.add_argument(
        "--parts",
        help=f"the parts to run, comma-separated, of: {', '.join(BUDGETS)} (default: all)",
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help=argparse.SUPPRESS)  # tests only
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests only: tiny data and runs
    args = parser.parse_args(argv)
    parts = None if args.parts is None else [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = [part for part in parts or [] if part not in BUDGETS]
    if unknown or parts == []:
        unknown = list(dict.fromkeys(unknown))  # each name once
        what = "it names no part"
        if unknown:
            what = f"{unknown[0]} is not a part" if len(unknown) == 1 else f"{', '.join(unknown)} are not parts"
        print(
            f"--parts {args.parts!r}: {what} of the check. The parts are: {', '.join(BUDGETS)}; give one or "
            "more of them, comma-separated, or leave --parts out to run them all.",
            file=sys.stderr,
        )
        return 2
    if parts and "peer" in parts and args.peer is None:
        print(
            "--parts asks for the peer, but no --peer was given: give the path of the reference program to run "
            "(--peer <airbench94_gpu.py>; it is not part of the project), or leave peer out of --parts.",
            file=sys.stderr,
        )
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        build = f"PyTorch {torch.__version__}, " + (
            f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        )
        print(NO_GPU.format(build=build), file=sys.stderr)
        return 2
    missing = missing_data(args.data)
    if missing:
        names = ", ".join(str(p) for p in missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        print(
            f"The datasets are not complete in --data {args.data.resolve()} (missing: {names}); gpu_check does not "
            "download. Point --data at a folder holding MNIST/raw/ and cifar-10-batches-py/ in torchvision's layout.",
            file=sys.stderr,
        )
        return 2
    if args.peer is not None and not args.peer.is_file():
        print(
            f"--peer {args.peer} is not a file. Give the path of the reference program to run beside the project "
            "(airbench94_gpu.py; it is not part of the project), or leave --peer out to skip that part.",
            file=sys.stderr,
        )
        return 2
    return Check(args.data, args.out, args.device, args.tiny, args.peak_tflops, args.peer, parts).run()
