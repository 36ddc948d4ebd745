"""Every command that README.md and docs/*.md show runs here on tiny data, is covered by CI or by another test, or is
marked as needing what CI lacks; and every relative link of those pages leads to a file and a heading.

What counts as a command. Code blocks only (indented or fenced, as GitHub renders them: markdown-it's CommonMark
parser finds them, so a line indented by 3 spaces is prose, not code). In a block, a line is a command when, past
leading `VAR=value` settings and a `$ ` prompt, it starts with python, pytest, pip, tensorboard, mlflow, torchrun,
srun, wandb or cnnlab-; a line ending in `\\` continues on the next; `#` outside quotes starts its comment; `a && b`
is two commands. A `$ ` line is a transcript: the lines below it, up to the next `$ `, are its output, and output
that starts with `Error:` is a failure the command must reproduce (exit code 2, the same paragraph). A code block
that starts with `import` or `from`, or is fenced as python, is a Python program to run (each one in these pages is
shown as something to run or save and run).

What happens to each command:
- marked: its comment ends with `(needs a GPU)`, `(needs several GPUs)`, `(needs SLURM)`, `(needs several machines)`
  or `(needs a W&B account)`: not run. Exactly the commands that need it carry the marker (needed_hardware).
- covered by CI: `pip install ...` and `pytest ...`. CI (.ci/run, the workflow, pre-commit) runs README's install
  and test command (tests/test_housekeeping.py keeps them the same), which holds every test the narrower pytest
  lines select; here they are checked to name extras, files and tests that exist.
- covered by the server tests: `tensorboard --logdir ...` by tests/test_cli.py and `mlflow ui ...` by
  tests/test_tracking.py, which start that server on a run and read a metric back over HTTP; here the programs and
  options are checked to exist.
- run: every other command, in a sandbox folder laid out as the pages assume (data/ with tiny MNIST, Fashion-MNIST,
  CIFAR-10 and CIFAR-100; my_images/, digits/, photos/, runA, runB), with each placeholder standing for a real run
  made by an earlier command (SANDBOX_PATHS, PRODUCERS) and overrides appended that make the run tiny and offline
  (tiny_overrides: a later override of a key wins in Hydra). Commands run in this process through the function their
  script's hydra.main calls, with the config composed from the same overrides, unless the process matters
  (needs_own_process): those run as the scripts themselves, one after another in one subprocess
  (tests/script_runner.py). Each must exit 0 (or reproduce its transcript's error), and CHECKS asserts, where cheap,
  that it did what its comment says.
"""

import ast
import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from markdown_it import MarkdownIt  # installed with rich, a dependency of the project
from PIL import Image

from cnnlab.cli import config_dir, run_reporting_user_errors
from cnnlab.data.formats import read_idx
from tests.conftest import REPO, make_cifar, make_cifar100, make_image_folder, make_mnist, pyproject
from tests.test_pretrained import write_weights

# docs/_*.md are drafts of README text, written where README's links do not resolve; they are checked once merged.
PAGES = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if not p.name.startswith("_"))]
PROGRAM = re.compile(r"^(python|pytest|pip|tensorboard|mlflow|torchrun|srun|wandb)(\s|$)|^cnnlab-")
ENV_SETTINGS = re.compile(r"^([A-Z_][A-Z0-9_]*=\S*\s+)+")
MARKER = re.compile(r"\(needs ([^()]+)\)$")
HARDWARE = ("a GPU", "several GPUs", "several machines", "SLURM", "a W&B account")


# ---------------------------------------------------------------------------------------------------------------
# Finding the commands


@dataclass(frozen=True)
class Command:
    page: str  # "README.md", "docs/running.md"
    line: int  # of its first line, counted from 1
    section: str  # the heading above it
    text: str  # as shown, without prompt, continuations and comment; a Python block's code
    comment: str = ""
    output: str = ""  # what a transcript shows below its `$ ` line
    python: bool = False

    def __str__(self) -> str:
        return f"{self.page}:{self.line} `{self.text if not self.python else 'python block'}`"

    @property
    def words(self) -> list[str]:
        """A shell command's words, past leading VAR=value settings; none for a Python block."""
        return [] if self.python else shlex.split(ENV_SETTINGS.sub("", self.text))


def split_comment(line: str) -> tuple[str, str]:
    """`code  # comment` -> (code, comment); a # inside quotes or a word is not a comment."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def block_commands(page: str, section: str, content: str, first_line: int, python: bool) -> list[Command]:
    if python or re.match(r"(import|from) \w", content):
        return [Command(page, first_line, section, content, python=True)]
    lines, found, i = content.splitlines(), [], 0
    while i < len(lines):
        start, line = i, lines[i].strip()
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1].rstrip() + " " + lines[i].strip()
        i += 1
        transcript = line.startswith("$ ")
        code, comment = split_comment(line.removeprefix("$ "))
        if not PROGRAM.match(ENV_SETTINGS.sub("", code)):
            continue
        output = []
        while transcript and i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        for part in code.split(" && "):
            found.append(Command(page, first_line + start, section, part.strip(), comment, "\n".join(output).strip()))
    return found


def doc_commands() -> list[Command]:
    commands = []
    for path in PAGES:
        page, section = str(path.relative_to(REPO)), ""
        tokens = MarkdownIt("commonmark").parse(path.read_text())
        for i, token in enumerate(tokens):
            if token.type == "heading_open":
                section = tokens[i + 1].content
            elif token.type in ("code_block", "fence"):
                first = token.map[0] + 1 + (token.type == "fence")  # a fence's code starts below its ``` line
                commands += block_commands(page, section, token.content, first, token.info.strip() == "python")
    return commands


COMMANDS = doc_commands()


def normalized(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------------------------
# Which commands need what CI lacks, and which are covered elsewhere


def needed_hardware(command: Command) -> str | None:
    """What a command needs that CI lacks, judged from the command itself; None when a CPU runner can run it."""
    words = command.words
    if not words:
        return None
    settings = dict(w.lstrip("-").split("=", 1) for w in words[1:] if "=" in w)
    if words[0] == "srun" or "slurm" in settings.get("hydra/launcher", ""):
        return "SLURM"
    if max(int(settings.get("trainer.num_nodes", 1)), int(settings.get("nnodes", 1))) > 1:
        return "several machines"
    gpu = settings.get("trainer.accelerator", "gpu") != "cpu"
    if settings.get("trainer") == "ddp" and gpu and settings.get("trainer.devices", "1") != "1":
        return "several GPUs"
    if settings.get("trainer") == "gpu" or settings.get("device") == "cuda" or "trainer.accelerator=gpu" in words:
        return "a GPU"
    if any(w.endswith("gpu_check.py") for w in words):  # stops with exit code 2 where PyTorch sees no CUDA GPU
        return "a GPU"
    if words[:2] == ["wandb", "sync"]:  # uploads to the W&B service
        return "a W&B account"
    return None


def marker(command: Command) -> str | None:
    found = MARKER.search(command.comment)
    return found.group(1) if found else None


# pip and pytest lines: CI runs README's install and test command (tests/test_housekeeping.py), which runs every
# test a narrower pytest line selects; test_pip_install_lines_... and test_pytest_lines_... check what they name.
# The server commands: the named tests start that server on a run and read a metric back over HTTP.
COVERED_BY_CI = ("pip", "pytest")
SERVER_TESTS = {
    "tensorboard": "tests/test_cli.py::test_tensorboard_serves_val_acc_of_a_finished_run",
    "mlflow": (
        "tests/test_tracking.py::test_mlflow_tracking_server_serves_val_acc_of_a_run_logged_from_the_command_line"
    ),
}


def disposition(command: Command) -> str:
    """marked, covered (by CI or a server test), subprocess or in-process; unknown: none of these applies."""
    if marker(command):
        return "marked"
    if command.words[:1] and command.words[0] in (*COVERED_BY_CI, *SERVER_TESTS):
        return "covered"
    if command.python:
        return "in-process"
    if command.words[0] != "python" or not (REPO / command.words[1]).is_file() or "scripts/" not in command.words[1]:
        return "unknown"
    return "in-process" if needs_own_process(step_for(command)) is None else "subprocess"


# ---------------------------------------------------------------------------------------------------------------
# The sandbox: what stands for the pages' placeholders, and how each command is made tiny

SANDBOX_PATHS = [  # a placeholder as the pages write it -> what stands for it in the sandbox
    ("outputs/train/<time>", "outputs/train/quickstart"),
    ("outputs/multirun/<time>", "outputs/multirun/lr-model"),
    ("outputs/search/<time>", "outputs/search/first"),
    ("<run>", "outputs/train/quickstart"),
    ("<...>", "outputs/train/quickstart/checkpoints"),
    ("<folder>", "my_images"),
    ("<data>", "data"),
    ("/data/mnist", "data"),
    ("/tmp/cifar10-png", "cifar10-png"),
]
SECTION_PATHS = {  # where a page's placeholder means the run of an example in that section
    ("docs/own-images.md", "End to end: a small generated folder"): [("outputs/train/<time>", "outputs/train/shapes")],
    ("README.md", "Your own images, end to end"): [("outputs/train/<time>", "outputs/train/shapes")],
}
PRODUCERS = {  # the commands whose runs stand for the placeholders above, told where to write
    "python scripts/train.py": "hydra.run.dir=outputs/train/quickstart",
    "python scripts/train.py -m optimizer.lr=0.01,0.1 model=lenet5,resnet8": (
        "hydra.sweep.dir=outputs/multirun/lr-model"
    ),
    "python scripts/search.py n_trials=20 trainer.max_epochs=4": "hydra.run.dir=outputs/search/first",
    "python scripts/train.py data=folder data.data_dir=shapes data.val_size=60 data.batch_size=32 model=resnet8 "
    "trainer=cpu trainer.max_epochs=6": "hydra.run.dir=outputs/train/shapes",
}
TINY_RUN = [  # appended to training commands: one epoch of two small batches, on the CPU, offline
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "data.batch_size=16",
    "data.val_size=50",
    "trainer.accelerator=cpu",
]
TINY_SCRIPT = {
    "train.py": [],
    "search.py": ["n_trials=2"],
    "benchmark.py": ["warmup_steps=1", "steps=2", "repeats=1"],
    "benchmark_folder.py": ["warmup_steps=1", "steps=2", "repeats=1"],
}
TINY_COMMAND = {  # beyond the rules: continuing the 2-trial search runs one more trial
    "python scripts/search.py n_trials=20 trainer.max_epochs=4 hydra.run.dir=outputs/search/<time>": ["n_trials=3"],
}
PYTHON_BLOCKS = {  # (page, section) -> the folder a block runs in, and the replacements that make it tiny
    ("docs/evaluation.md", "Export"): ("outputs/train/quickstart/checkpoints", []),  # reads best.onnx there
    # 23 s on 2 cores at a batch of 128; its claims (no allocation in place, the same memory kept) hold at any batch.
    ("docs/convolution.md", "ReLU(inplace=True)"): (".", [("randn(128, 3, 32, 32)", "randn(8, 3, 32, 32)")]),
}


def reads_a_folder(args: list[str]) -> bool:
    """Whether a command trains on data=folder, given on its command line or by the experiment it names."""
    if "data=folder" in args:
        return True
    experiments = [a.split("=", 1)[1] for a in args if a.startswith("experiment=")]
    return any(
        "override /data: folder" in (REPO / "configs" / "experiment" / f"{e}.yaml").read_text() for e in experiments
    )


def tiny_overrides(script: str, args: list[str]) -> list[str]:
    keys = {a.split("=", 1)[0] for a in args}
    if script == "train.py" and keys & {"resume", "ckpt_path"}:
        return []  # the run's own (tiny) overrides are replayed
    if script not in TINY_SCRIPT or "--cfg" in args:
        return []
    offline = [] if reads_a_folder(args) else ["data.download=false"]  # the folder config has no download key
    return [*TINY_RUN, *offline, *TINY_SCRIPT[script]]


@dataclass
class Step:
    """One run standing for one or more commands of the pages (the same command shown in several places)."""

    script: str  # "train.py"; "" for a Python block
    args: list[str]  # the command's arguments with placeholders replaced, then the appended overrides
    cwd: str = "."  # relative to the sandbox
    code: str = ""  # a Python block's code

    @property
    def key(self) -> tuple:
        return (self.script, self.code, self.cwd, tuple(self.args))


def step_for(command: Command) -> Step:
    if command.python:
        cwd, replacements = PYTHON_BLOCKS.get((command.page, command.section), (".", []))
        code = command.text
        for old, new in replacements:
            assert old in code, f"{command}: the block no longer holds {old!r}"
            code = code.replace(old, new)
        return Step("", [], cwd, code)
    text = command.text
    for placeholder, path in [*SECTION_PATHS.get((command.page, command.section), []), *SANDBOX_PATHS]:
        text = text.replace(placeholder, path)
    words = shlex.split(ENV_SETTINGS.sub("", text))
    script, args = Path(words[1]).name, words[2:]
    unique_keys = len({a.split("=", 1)[0] for a in args}) == len(args)
    if unique_keys and not any(a.startswith("-") for a in args):  # the same command twice runs once, in any order
        args = sorted(args)
    extra = [*tiny_overrides(script, args), *TINY_COMMAND.get(normalized(command.text), [])]
    producer = PRODUCERS.get(normalized(command.text))
    return Step(script, [*args, *extra, *([producer] if producer else [])])


def needs_own_process(step: Step) -> str | None:
    """Why a command must run as the script itself, or None when the function its hydra.main calls is enough."""
    keys = {a.split("=", 1)[0] for a in step.args}
    if step.code or step.script not in ("train.py", "search.py"):
        return None
    if any(a.startswith("-") for a in step.args):
        return "Hydra's flags (-m, --cfg) act in hydra.main"
    if step.script == "search.py":
        return "each trial composes from Hydra's record of the command line (HydraConfig)"
    if keys & {"resume", "ckpt_path"}:
        return "cli.train_main rewrites resume= and a run's ckpt_path= into the run's own overrides"
    if "trainer=ddp" in step.args:
        return "Lightning starts the other processes by running the command again"
    if "hydra.run.dir=outputs/train/quickstart" in step.args:
        return "resume= continues this run from the .hydra/ record that Hydra writes"
    return None


def build_sandbox(root: Path) -> None:
    """The folder the commands run from, holding what the pages assume is there."""
    data = root / "data"
    make_mnist(data, n_train=300, n_test=100)
    make_mnist(data, n_train=300, n_test=100, folder="FashionMNIST")
    make_cifar(data, n_train=300, n_test=100)
    make_cifar100(data, n_train=300, n_test=100)
    make_image_folder(root / "my_images", n_train=100, n_test=30)
    (root / "digits").mkdir()
    for i, digit in enumerate(read_idx(data / "MNIST" / "raw" / "t10k-images-idx3-ubyte")[:4]):
        Image.fromarray(digit).save(root / "digits" / f"{i}.png")
    (root / "photos").mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(64, 48), (40, 90), (33, 33)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "photos" / f"photo{i}.jpg")
    (root / "runA").symlink_to("outputs/train/quickstart")  # docs/evaluation.md's list of two runs' checkpoints
    (root / "runB").symlink_to("outputs/multirun/lr-model/0")


# ---------------------------------------------------------------------------------------------------------------
# Running the steps


@dataclass
class Result:
    exit_code: int
    output: str
    created: list[str]  # what the command made under outputs/ (subprocess), or the run folder it was given
    value: Any = None  # in-process: what the function returned; a Python block: its namespace


ENTRY = {  # script -> (its config, the function its hydra.main passes the config to)
    "train.py": ("train", "cnnlab.commands.train:train"),
    "eval.py": ("eval", "cnnlab.commands.evaluate:evaluate"),
    "predict.py": ("predict", "cnnlab.commands.predict:predict"),
    "export.py": ("export", "cnnlab.commands.export:export"),
    "inspect_model.py": ("inspect_model", "cnnlab.tools.inspect_model:inspect_model"),
    "learn_kernel.py": ("learn_kernel", "cnnlab.tools.learn_kernel:run"),
    "benchmark.py": ("benchmark", "cnnlab.tools.benchmark:benchmark"),
    "benchmark_folder.py": ("benchmark_folder", "cnnlab.tools.folder_benchmark:benchmark_folder"),
}


def call_in_process(step: Step, sandbox: Path, number: int) -> tuple[Any, list[str]]:
    if step.code:
        namespace = {"__name__": "__main__"}
        exec(compile(step.code, "<docs block>", "exec"), namespace)
        return namespace, []
    if step.script in ("summarize.py", "make_shapes.py"):  # argparse commands, called with their arguments
        from cnnlab import cli

        getattr(cli, step.script.removesuffix(".py") + "_main")(step.args)
        return None, []
    if step.script == "plain_mnist.py":  # the plain loop has its own argparse main, outside the CLI and its imports
        from cnnlab.tools.plain_mnist import main

        main(step.args)
        return None, []
    config, target = ENTRY[step.script]
    module, name = target.split(":")
    run_dir = next((a.split("=", 1)[1] for a in step.args if a.startswith("hydra.run.dir=")), None)
    cfg = compose(config_name=config, overrides=[a for a in step.args if not a.startswith("hydra.")])
    created = []
    if "run_dir" in cfg:  # where Hydra would have put the run: outputs/<task>/<time>, or hydra.run.dir
        cfg.run_dir = str(sandbox / (run_dir or f"{cfg.paths.output_dir}/{cfg.task}/step-{number:02d}"))
        created = [cfg.run_dir]
    return run_reporting_user_errors(getattr(importlib.import_module(module), name), cfg), created


def run_in_process(step: Step, sandbox: Path, number: int) -> Result:
    output, value, created, code = io.StringIO(), None, [], 0
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            value, created = call_in_process(step, sandbox, number)
        except SystemExit as stop:  # run_reporting_user_errors: a UserError is exit code 2
            code = stop.code if isinstance(stop.code, int) else 1
        except Exception:
            traceback.print_exc()
            code = 1
    return Result(code, output.getvalue(), created, value)


def run_as_scripts(steps: list[Step], sandbox: Path, folder: Path) -> list[Result]:
    plan, results = folder / "plan.json", folder / "results.json"
    plan.write_text(json.dumps([[str(REPO / "scripts" / s.script), *s.args] for s in steps]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "script_runner.py"), str(plan), str(results)],
        cwd=sandbox, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(results.read_text())
    return [Result(r["exit_code"], Path(r["log"]).read_text(), r["created"]) for r in results]


def subprocess_order(step: Step) -> int:
    if any(a in PRODUCERS.values() for a in step.args):
        return 0
    if "trainer=ddp" in step.args:
        return 3  # last: its process group stays behind in the runner's process
    return 2 if {a.split("=", 1)[0] for a in step.args} & {"resume", "ckpt_path"} else 1


def in_process_order(step: Step) -> int:
    if step.script == "make_shapes.py":
        return 0  # it writes the folder the examples train on
    if step.script == "eval.py" and any("*" in a for a in step.args):
        return 1  # before the in-process runs: the glob then matches the runs the subprocess made
    return {"": 5, "train.py": 2, "export.py": 3}.get(step.script, 4)  # Python blocks read exports and stores


RUN = [c for c in COMMANDS if disposition(c) in ("subprocess", "in-process")]


@pytest.fixture(scope="module")
def stand_in_weights(tmp_path_factory) -> Iterator[Path]:
    """A TORCH_HOME holding stand-ins for the ImageNet files the pages' model=torchvision commands read: no download."""
    home = tmp_path_factory.mktemp("torch-home")
    for arch in ("resnet18", "efficientnet_b0"):
        write_weights(home, arch)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(home))  # inherited by the commands run as scripts
        yield home


@pytest.fixture(scope="module")
def ran(tmp_path_factory, stand_in_weights) -> tuple[Path, dict[tuple, Result]]:
    """Every runnable command's result, by step key; the sandbox they ran in."""
    sandbox = tmp_path_factory.mktemp("docs-sandbox")
    build_sandbox(sandbox)
    steps = {step.key: step for step in map(step_for, RUN)}  # a command shown twice runs once
    results = {}
    as_scripts = sorted((s for s in steps.values() if needs_own_process(s)), key=subprocess_order)
    for step, result in zip(as_scripts, run_as_scripts(as_scripts, sandbox, tmp_path_factory.mktemp("runner"))):
        results[step.key] = result
    in_process = sorted((s for s in steps.values() if not needs_own_process(s)), key=in_process_order)
    with pytest.MonkeyPatch.context() as patch, initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for number, step in enumerate(in_process):
            patch.chdir(sandbox / step.cwd)  # relative paths start where the command runs
            results[step.key] = run_in_process(step, sandbox, number)
    return sandbox, results


# ---------------------------------------------------------------------------------------------------------------
# What each command must have done, where cheap to tell


def metrics_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def new_run_folders(result: Result, task: str = "train") -> set[str]:
    return {"/".join(Path(p).parts[:3]) for p in result.created if Path(p).parts[:2] == ("outputs", task)}


def check_quickstart(sandbox: Path, result: Result) -> None:
    run = sandbox / "outputs" / "train" / "quickstart"
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert metrics_of(run)["status"] == "finished" and (run / ".hydra" / "overrides.yaml").is_file()


def check_continues_in_place(sandbox: Path, result: Result) -> None:
    assert new_run_folders(result) <= {"outputs/train/quickstart"}, result.created  # no new run folder


def check_extends(sandbox: Path, result: Result) -> None:
    check_continues_in_place(sandbox, result)
    assert metrics_of(sandbox / "outputs" / "train" / "quickstart")["epochs"] == 12


def check_sweep(sandbox: Path, result: Result) -> None:
    sweep = sandbox / "outputs" / "multirun" / "lr-model"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]  # 2 rates x 2 models
    assert all(metrics_of(sweep / job)["status"] == "finished" for job in "0123")


def check_prints_config(sandbox: Path, result: Result) -> None:
    assert "_target_: cnnlab.models.LeNet5" in result.output and not result.created  # printed, nothing written


def check_run_written(sandbox: Path, result: Result) -> None:
    (run,) = result.created
    assert metrics_of(Path(run))["status"] == "finished"


def check_plain_loop(sandbox: Path, result: Result) -> None:
    accuracy = float(re.search(r"test accuracy (\d\.\d{4})", result.output).group(1))
    assert accuracy > 0.3  # 3 epochs on the sandbox's 300 MNIST-format images of ten learnable patterns


def check_early_stopping(sandbox: Path, result: Result) -> None:
    check_run_written(sandbox, result)
    assert "stopped_early" in metrics_of(Path(result.created[0]))


def check_shapes_run(sandbox: Path, result: Result) -> None:
    import torch

    ckpt = torch.load(sandbox / "outputs/train/shapes/checkpoints/best.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["data"]["class_names"] == ["circle", "square", "triangle"]


def check_frozen(sandbox: Path, result: Result) -> None:
    import torch

    def conv_weights(path: Path) -> list:
        state = torch.load(path, weights_only=True)["state_dict"]
        return [state[f"model.{name}.weight"] for name in ("conv1", "conv2")]

    source = conv_weights(sandbox / "outputs/train/quickstart/checkpoints/best.ckpt")
    tuned = conv_weights(Path(result.created[0]) / "checkpoints" / "best.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(source, tuned))  # "the convolutions stay fixed"


def check_ddp(sandbox: Path, result: Result) -> None:
    (run,) = new_run_folders(result)
    assert metrics_of(sandbox / run)["global_batch_size"] == 2 * 16  # two processes of data.batch_size=16


def check_search(sandbox: Path, result: Result) -> None:
    assert json.loads((sandbox / "outputs/search/first/best.json").read_text())["trials"]["complete"] >= 1


def check_search_continued(sandbox: Path, result: Result) -> None:
    trials = json.loads((sandbox / "outputs/search/first/best.json").read_text())["trials"]
    assert sum(trials.values()) == 3 and (sandbox / "outputs/search/first/2").is_dir()  # one more, same study


def check_eval(key: str, count: int = 1):
    def check(sandbox: Path, result: Result) -> None:
        (run,) = result.created
        reports = [Path(run)] if count == 1 else sorted(p for p in Path(run).iterdir() if p.is_dir())
        assert len(reports) >= count, reports
        for report in reports:
            assert key in metrics_of(report) and (report / "confusion_matrix.png").is_file()
        if count > 1:
            assert (Path(run) / "comparison.csv").is_file()

    return check


def check_predictions(count: int, runs_on: str = "cpu", csv: str | None = None):
    def check(sandbox: Path, result: Result) -> None:
        assert len(result.value["predictions"]) == count and result.value["runs_on"].startswith(runs_on)
        if csv:
            assert len((sandbox / csv).read_text().splitlines()) == count + 1  # a header and a row per image

    return check


def check_file(path: str):
    def check(sandbox: Path, result: Result) -> None:
        assert (sandbox / path).is_file(), f"{path} was not written"

    return check


def check_shape_predictions(sandbox: Path, result: Result) -> None:
    files = [row["file"] for row in result.value["predictions"]]
    assert len(files) == 10 and all(re.fullmatch(r"shapes/test/\w+/00\d\.(png|jpg)", f) for f in files), files


def check_summary(sandbox: Path, result: Result) -> None:
    folder = sandbox / "outputs" / "multirun" / "lr-model"
    assert all((folder / name).is_file() for name in ("summary.csv", "summary.md", "val_acc.png"))


def check_resnet18_macs(sandbox: Path, result: Result) -> None:
    assert result.value["macs"] == 555_422_720  # the figure docs/gpu.md computes its FLOPs from


def check_edge_kernel(sandbox: Path, result: Result) -> None:
    assert result.value["kernel"].flatten().tolist() == pytest.approx([0.9995, -0.9995], abs=1e-4)  # as stated


def check_mlflow_store(sandbox: Path, result: Result) -> None:
    assert (sandbox / "outputs" / "mlflow.db").is_file()


def check_benchmark(name: str):
    def check(sandbox: Path, result: Result) -> None:
        (run,) = result.created
        assert (Path(run) / name).is_file()

    return check


def check_shapes_written(sandbox: Path, result: Result) -> None:
    counts = {split: len(list((sandbox / "shapes" / split).rglob("*.*"))) for split in ("train", "test")}
    assert counts == {"train": 300, "test": 60}


def check_onnx_metadata(sandbox: Path, result: Result) -> None:
    namespace = result.value
    assert namespace["mean"] == [0.1307] and namespace["class_names"] == [str(i) for i in range(10)]


def check_relu_memory(sandbox: Path, result: Result) -> None:
    lines = re.findall(r"inplace=(\w+): ReLUs allocate (\d+) MiB, kept for backward (\d+) MiB", result.output)
    found = {inplace: (int(allocated), int(kept)) for inplace, allocated, kept in lines}
    assert found["True"][0] == 0 and found["False"][0] > 0 and found["True"][1] == found["False"][1], found


def check_mlflow_listing(sandbox: Path, result: Result) -> None:
    assert len(result.output.strip().splitlines()) >= 3  # logger=mlflow, [tensorboard,mlflow], a 2-job sweep


CHECKS = {  # a command as shown (or a Python block's page and section) -> what it must have done
    "python scripts/train.py": check_quickstart,
    "python scripts/train.py resume=outputs/train/<time>": check_continues_in_place,
    "python scripts/train.py ckpt_path=outputs/train/<time>/checkpoints/last.ckpt": check_continues_in_place,
    "python scripts/train.py resume=outputs/train/<time> trainer.max_epochs=12": check_extends,
    "python scripts/train.py -m optimizer.lr=0.01,0.1 model=lenet5,resnet8": check_sweep,
    "python scripts/train.py --cfg job": check_prints_config,
    "python scripts/train.py model=resnet8 data=cifar10 trainer=cpu": check_run_written,
    "python scripts/train.py experiment=mnist_fast": check_run_written,
    "python scripts/train.py model.conv_impl=unfold": check_run_written,
    "python scripts/train.py callbacks/early_stopping=default": check_early_stopping,
    "python scripts/train.py data=folder data.data_dir=shapes data.val_size=60 data.batch_size=32 model=resnet8 "
    "trainer=cpu trainer.max_epochs=6": check_shapes_run,
    "python scripts/train.py data=folder data.data_dir=<folder> data.image_shape=[1,28,28] init_from=<...>/best.ckpt "
    "freeze=[conv1,conv2]": check_frozen,
    "python scripts/train.py trainer=ddp trainer.accelerator=cpu trainer.devices=2": check_ddp,
    "python scripts/search.py n_trials=20 trainer.max_epochs=4": check_search,
    "python scripts/search.py n_trials=20 trainer.max_epochs=4 hydra.run.dir=outputs/search/<time>": (
        check_search_continued
    ),
    "python scripts/train.py logger=mlflow": check_mlflow_store,
    "python scripts/eval.py ckpt_path=outputs/train/<time>/checkpoints/best.ckpt": check_eval("test_acc"),
    "python scripts/eval.py ckpt_path=outputs/train/<time>/checkpoints/best.ckpt split=val": check_eval("val_acc"),
    "python scripts/eval.py ckpt_path=outputs/multirun/<time>": check_eval("test_acc", count=4),
    "python scripts/eval.py 'ckpt_path=outputs/train/*/checkpoints/best.ckpt'": check_eval("test_acc", count=2),
    "python scripts/eval.py 'ckpt_path=[runA/checkpoints/best.ckpt,runB/checkpoints/last.ckpt]'": check_eval(
        "test_acc", count=2
    ),
    "python scripts/predict.py ckpt_path=<...>/best.ckpt inputs=digits/": check_predictions(4),
    "python scripts/predict.py ckpt_path=<...>/best.ckpt inputs=digits/ output=preds.csv": check_predictions(
        4, csv="preds.csv"
    ),
    "python scripts/predict.py ckpt_path=<...>/best.onnx inputs=digits/": check_predictions(4, "onnxruntime"),
    "python scripts/predict.py ckpt_path=<...>/best.ckpt inputs=photos/ device=cpu batch_size=64": check_predictions(3),
    "python scripts/predict.py ckpt_path=outputs/train/<time>/checkpoints/best.ckpt \"inputs='shapes/test/*/00?.*'\"": (
        check_shape_predictions
    ),
    "python scripts/export.py ckpt_path=<...>/best.ckpt format=onnx": check_file(
        "outputs/train/quickstart/checkpoints/best.onnx"
    ),
    "python scripts/export.py ckpt_path=<...>/best.ckpt format=torchscript output=lenet5.pt": check_file("lenet5.pt"),
    "python scripts/summarize.py outputs/multirun/<time>": check_summary,
    "python scripts/inspect_model.py model=resnet18 data=cifar10": check_resnet18_macs,
    "python scripts/learn_kernel.py": check_edge_kernel,
    "python scripts/benchmark.py model=lenet5 data=mnist device=cpu": check_benchmark("benchmark.json"),
    "python scripts/benchmark.py experiment=mnist_fast target_acc=0.99": check_benchmark("benchmark.json"),
    "python scripts/plain_mnist.py --data data": check_plain_loop,
    "python scripts/benchmark_folder.py data=folder data.data_dir=/tmp/cifar10-png data.val_size=5000 "
    "make_from=<data>/cifar-10-batches-py reference_data_dir=<data> model=lenet5 device=cpu repeats=8 steps=150": (
        check_benchmark("benchmark_folder.json")
    ),
    "python scripts/make_shapes.py shapes": check_shapes_written,
    "python scripts/predict.py ckpt_path=outputs/train/<time>/checkpoints/best.ckpt inputs=shapes/test/circle": (
        check_predictions(20)
    ),
    ("docs/evaluation.md", "Export"): check_onnx_metadata,
    ("docs/convolution.md", "ReLU(inplace=True)"): check_relu_memory,
    ("docs/tracking.md", "The UI"): check_mlflow_listing,
}


def check_key(command: Command) -> Any:
    return (command.page, command.section) if command.python else normalized(command.text)


def expected_exit_code(command: Command) -> int:
    if "logger=wandb" in command.words:  # the wandb extra is not in dev; without it, docs/tracking.md's transcript
        return 2 if importlib.util.find_spec("wandb") is None else 0
    return 2 if command.output.startswith("Error:") else 0


def appears_in_order(shown: str, actual: str) -> bool:
    """Whether the parts of shown between its `...` elisions appear in actual in that order, spacing aside."""
    position, actual = 0, normalized(actual)
    for part in (normalized(p) for p in shown.split("...")):
        position = actual.find(part, position)
        if position < 0:
            return False
        position += len(part)
    return True


# ---------------------------------------------------------------------------------------------------------------
# The tests


def test_every_command_is_run_here_covered_elsewhere_or_marked():
    unknown = [str(c) for c in COMMANDS if disposition(c) == "unknown"]
    assert not unknown, "neither a script of this project, nor covered elsewhere, nor marked:\n" + "\n".join(unknown)
    assert {disposition(c) for c in COMMANDS} == {"marked", "covered", "subprocess", "in-process"}
    assert len(COMMANDS) > 80  # the parser does find the pages' code blocks


def test_a_later_override_of_a_key_wins_as_the_appended_tiny_overrides_assume():
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", ["trainer=gpu", "trainer.max_epochs=12", "trainer=cpu", "trainer.max_epochs=1"])
        search = compose("search", ["n_trials=20", "n_trials=2"])
    assert (cfg.trainer.accelerator, cfg.trainer.max_epochs, search.n_trials) == ("cpu", 1, 2)


def test_hardware_markers_are_on_exactly_the_commands_that_need_that_hardware():
    wrong = [
        f"{c}: marked {marker(c)!r}, needs {needed_hardware(c)!r}" for c in COMMANDS if marker(c) != needed_hardware(c)
    ]
    assert not wrong, "\n".join(wrong)
    assert {marker(c) for c in COMMANDS} - {None} <= set(HARDWARE)


@pytest.mark.parametrize("command", RUN, ids=lambda c: f"{c.page}:{c.line}")
def test_command_runs_on_tiny_data_and_does_what_it_says(command, ran):
    sandbox, results = ran
    result = results[step_for(command).key]
    expected = expected_exit_code(command)
    assert result.exit_code == expected, f"{command} exited {result.exit_code}:\n{result.output[-4000:]}"
    if expected == 2:  # the paragraph the page shows (the transcript's, or docs/tracking.md's for wandb)
        shown = command.output or next(c.output for c in COMMANDS if c.text == command.text and c.output)
        assert appears_in_order(shown, result.output), f"{command} printed:\n{result.output[-3000:]}"
    if check_key(command) in CHECKS:
        CHECKS[check_key(command)](sandbox, result)


def test_every_check_and_producer_names_a_command_the_pages_show():
    shown = {check_key(c) for c in COMMANDS}
    assert set(CHECKS) - shown == set() and set(PRODUCERS) - shown == set() and set(TINY_COMMAND) - shown == set()
    assert set(PYTHON_BLOCKS) <= shown and set(SECTION_PATHS) <= {(c.page, c.section) for c in COMMANDS}


def extras() -> dict[str, list[str]]:
    return pyproject()["project"]["optional-dependencies"]


def test_pip_install_lines_name_extras_that_exist_and_say_truly_whether_dev_has_them():
    pip = [c for c in COMMANDS if c.words[:2] == ["pip", "install"]]
    assert pip
    for command in pip:
        (extra,) = re.findall(r"\.\[(\w+)\]", command.text)
        assert extra in extras(), f"{command}: pyproject.toml has no extra {extra!r}"
        if extra != "dev":  # README's own install: CI runs it (tests/test_housekeeping.py)
            in_dev = set(extras()[extra]) <= set(extras()["dev"])
            assert in_dev == ("not in dev" not in command.comment), f"{command}: dev has it: {in_dev}"


def test_pytest_lines_name_test_files_and_tests_that_exist():
    registered = re.findall(r'^\s+"(\w+): ', (REPO / "pyproject.toml").read_text(), re.M)
    for command in (c for c in COMMANDS if c.words[:1] == ["pytest"]):
        words = command.words[1:]
        files = [REPO / w for w in words if w.startswith("tests/")]
        assert all(f.is_file() for f in files), command
        names = " ".join(
            node.name.lower()
            for f in files or sorted((REPO / "tests").glob("test_*.py"))
            for node in ast.walk(ast.parse(f.read_text()))
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test")
        )
        for flag, value in zip(words, words[1:]):
            if flag == "-k":  # each name the expression combines selects some test
                missing = [w for w in re.findall(r"\w+", value) if w not in ("and", "or", "not") and w not in names]
                assert not missing, f"{command}: no test name contains {missing}"
            if flag == "-m":
                assert value in registered, f"{command}: marker {value} is not registered in pyproject.toml"


def test_server_commands_name_programs_and_options_that_exist_and_tests_that_start_them():
    import click
    from mlflow.cli import cli as mlflow_cli

    for command in (c for c in COMMANDS if c.words[:1] in (["tensorboard"], ["mlflow"])):
        path, test = SERVER_TESTS[command.words[0]].split("::")
        functions = {n.name: ast.unparse(n) for n in ast.walk(ast.parse((REPO / path).read_text()))
                     if isinstance(n, ast.FunctionDef)}  # fmt: skip
        options = [w.split("=")[0] for w in command.words if w.startswith("--")]
        assert test in functions and all(o in functions[test] for o in options), f"{command}: {path}::{test}"
        if command.words[0] == "mlflow":  # `mlflow ui` is MLflow's alias of the `mlflow server` the test starts
            context = click.Context(mlflow_cli)
            ui = mlflow_cli.get_command(context, command.words[1])
            assert ui is mlflow_cli.get_command(context, "server")
            assert set(options) <= {o for p in ui.params for o in p.opts}
        else:
            scripts = importlib.metadata.entry_points(group="console_scripts", name="tensorboard")
            assert scripts, "the tensorboard program is not installed"


def github_slug(text: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    tokens, found = MarkdownIt("commonmark").parse(path.read_text()), set()
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            text = "".join(c.content for c in tokens[i + 1].children if c.type in ("text", "code_inline"))
            slug, n = github_slug(text), 1
            while slug in found:  # a repeated heading gets -1, -2, ...
                slug, n = f"{github_slug(text)}-{n}", n + 1
            found.add(slug)
    return found


def relative_links(path: Path) -> list[str]:
    links = []
    for token in MarkdownIt("commonmark").parse(path.read_text()):
        for child in token.children or []:
            target = child.attrs.get("href") or child.attrs.get("src")
            if child.type in ("link_open", "image") and target and not re.match(r"^[a-z]+:", str(target)):
                links.append(str(target))
    return links


def test_every_relative_link_leads_to_a_file_and_a_heading_there():
    broken = []
    for page in PAGES:
        for link in relative_links(page):
            file, _, anchor = link.partition("#")
            target = (page.parent / file).resolve() if file else page
            if not target.exists():
                broken.append(f"{page.relative_to(REPO)}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in anchors(target):
                broken.append(f"{page.relative_to(REPO)}: {link} (no such heading in {target.name})")
    assert not broken, "\n".join(broken)
    assert sum(len(relative_links(p)) for p in PAGES) > 10  # the pages do link to each other
