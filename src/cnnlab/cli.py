"""Console entry points: thin Hydra wrappers around the plain functions in cnnlab.commands.train and friends."""

import argparse
import ctypes
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from cnnlab.checkpoints.resume import resume_arguments, resume_command
from cnnlab.commands.validation import check_output_arguments, check_run_dir_argument
from cnnlab.config_files import config_dir
from cnnlab.errors import UserError
from cnnlab.training.stopping import RunInterrupted

# Lightning 2.6 calls a torch.utils._pytree API that torch 2.14 deprecates; it says nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


class NoAdvertisement(logging.Filter):
    """Drops Lightning's suggestion to install its cloud logger, printed before every run's progress bar."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(NoAdvertisement())


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; True where it took effect (Linux with glibc).

    By default, blocks above 128 kB come from fresh mmap()s and a heap with a few MB free at its top is trimmed,
    both handing memory back to the kernel, which then zero-fills new pages on first touch. A CPU training step
    allocates and frees its activations (10 MB per LeNet-5 layer at batch 512) every time, so each step paid page
    faults for all of them. Here blocks up to 32 MB (glibc's maximum threshold) come from the heap, which is trimmed
    only above 1 GB free.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**30))


def apply_process_settings(cfg: DictConfig) -> None:
    """What a training command sets for its whole process: the allocator (keep_freed_memory=true, the default).

    Applied here, in the commands, and not by train(cfg): a library call must not change the allocator of
    the program that calls it. Such a program can call keep_freed_memory() itself, or set glibc's tunables:
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824.
    """
    if cfg.get("keep_freed_memory"):
        keep_freed_memory()


def run_reporting_user_errors(fn: Callable[[DictConfig], dict], cfg: DictConfig) -> dict:
    """Call fn(cfg); a UserError becomes one paragraph on stderr and exit code 2 instead of a traceback."""
    try:
        try:
            return fn(cfg)
        except InstantiationException as err:  # a constructor's UserError arrives wrapped by Hydra
            if isinstance(err.__cause__, UserError):
                raise err.__cause__ from None
            raise
    except UserError as err:
        print(f"\nError: {err}\n", file=sys.stderr)
        if cfg is not None and cfg.get("run_dir") and cfg.get("paths") and not cfg.get("resume"):
            remove_unused_run_dir(Path(cfg.run_dir), Path(cfg.paths.output_dir))
        sys.exit(2)
    except RunInterrupted as stop:
        print(
            f"\nStopped on {stop.signal_name}; the run is saved in {stop.checkpoint}. Continue it with:\n\n"
            f"    {resume_command(stop.checkpoint.parent.parent)}\n",
            file=sys.stderr,
        )
        sys.exit(stop.exit_code)


def remove_unused_run_dir(run_dir: Path, output_dir: Path) -> None:
    """Remove the folder Hydra made for a run that stopped before writing anything (only .hydra/ and its log),
    and the folders above it up to output_dir that this leaves empty."""
    if not run_dir.is_dir() or any(p.name not in (".hydra", "train.log") for p in run_dir.iterdir()):
        return
    for path in sorted(run_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    run_dir.rmdir()
    output_dir = output_dir.resolve()
    for parent in run_dir.resolve().parents:
        if output_dir not in (parent, *parent.parents) or any(parent.iterdir()):
            break
        parent.rmdir()


def train_main() -> None:
    """`cnnlab-train` / `python scripts/train.py`; `resume=<run dir>` continues that run in its own folder."""
    try:
        sys.argv[1:] = resume_arguments(sys.argv[1:])
        check_output_arguments(sys.argv[1:])
        check_run_dir_argument(sys.argv[1:])
    except UserError as err:
        print(f"\nError: {err}\n", file=sys.stderr)
        sys.exit(2)
    hydra_train_main()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def hydra_train_main(cfg: DictConfig) -> float | None:
    """`cnnlab-train` / `python scripts/train.py`: train, test, and write the run directory."""
    from cnnlab.commands.sweep import in_multirun, refuse_local_distributed_sweep, run_recording_failure
    from cnnlab.commands.train import train

    apply_process_settings(cfg)
    if in_multirun():  # a failing job is recorded and the sweep goes on; the sweep's exit code reports it
        run_reporting_user_errors(refuse_local_distributed_sweep, cfg)
        metrics = run_recording_failure(train, cfg)
        return metrics.get("val_acc_best") if metrics else None
    metrics = run_reporting_user_errors(train, cfg)
    return metrics.get("val_acc_best")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="benchmark")
def benchmark_main(cfg: DictConfig) -> None:
    """`python scripts/benchmark.py`: images/s of the project's path against a plain loop, or time to accuracy."""
    from cnnlab.tools.benchmark import benchmark

    apply_process_settings(cfg)  # every path the benchmark times runs in this process, so all of them get it
    run_reporting_user_errors(benchmark, cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="benchmark_folder")
def benchmark_folder_main(cfg: DictConfig) -> None:
    """`python scripts/benchmark_folder.py`: decode rate, cache loading and training speed of data=folder."""
    from cnnlab.tools.folder_benchmark import benchmark_folder

    apply_process_settings(cfg)
    run_reporting_user_errors(benchmark_folder, cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="inspect_model")
def inspect_main(cfg: DictConfig) -> None:
    """`python scripts/inspect_model.py model=... data=...`: the layer table of a model on a dataset's images."""
    from cnnlab.tools.inspect_model import inspect_model

    run_reporting_user_errors(inspect_model, cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="search")
def search_main(cfg: DictConfig) -> float | None:
    """`cnnlab-search` / `python scripts/search.py`: an Optuna search whose trials are ordinary training runs."""

    def run_search(cfg: DictConfig) -> dict:
        try:
            from cnnlab.commands.search import search
        except ModuleNotFoundError as err:
            if err.name != "optuna":
                raise
            raise UserError('scripts/search.py needs Optuna: pip install -e ".[search]".') from err
        return search(cfg)

    apply_process_settings(cfg)
    best = run_reporting_user_errors(run_search, cfg)
    return best.get("value")


def summarize_main(argv: list[str] | None = None) -> None:
    """`cnnlab-summarize` / `python scripts/summarize.py [dir]`: rank the runs under a folder; table, CSV, plot."""
    parser = argparse.ArgumentParser(prog="cnnlab-summarize", description=summarize_main.__doc__)
    parser.add_argument("dir", nargs="?", default="outputs", help="a sweep, search or outputs folder (default outputs)")
    args = parser.parse_args(argv)
    from cnnlab.commands.summarize import summarize

    run_reporting_user_errors(lambda _: summarize(Path(args.dir)), None)


def make_shapes_main(argv: list[str] | None = None) -> None:
    """`python scripts/make_shapes.py <folder>`: circles, squares and triangles in the layout data=folder reads."""
    parser = argparse.ArgumentParser(prog="make_shapes", description=make_shapes_main.__doc__)
    parser.add_argument("folder", nargs="?", default="shapes", help="where to write train/ and test/ (default shapes)")
    parser.add_argument("--train", type=int, default=300, help="training images (default 300)")
    parser.add_argument("--test", type=int, default=60, help="test images (default 60)")
    args = parser.parse_args(argv)
    from cnnlab.data.shapes import write_shapes

    count = write_shapes(Path(args.folder), args.train, args.test)
    print(f"Wrote {count} images to {args.folder}/train and {args.folder}/test.")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def eval_main(cfg: DictConfig) -> None:
    """`cnnlab-eval` / `python scripts/eval.py`: score checkpoints and write reports, figures and a ranking."""
    from cnnlab.commands.evaluate import evaluate

    run_reporting_user_errors(evaluate, cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def predict_main(cfg: DictConfig) -> None:
    """`cnnlab-predict` / `python scripts/predict.py`: classify image files with a checkpoint."""
    from cnnlab.commands.predict import predict

    run_reporting_user_errors(predict, cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def export_main(cfg: DictConfig) -> None:
    """`cnnlab-export` / `python scripts/export.py`: write a checkpoint's model as ONNX or TorchScript, verified."""
    from cnnlab.commands.export import export

    run_reporting_user_errors(export, cfg)
