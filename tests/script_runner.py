"""Run several command lines of scripts/*.py one after another in one process, each as `python <script> <args>` would.

Usage: python tests/script_runner.py <plan.json> <results.json>, from the directory the commands run in. The plan is a
list of argv lists ([script path, arg, ...]). Each command gets the script's own `__main__` (runpy), its own
sys.argv and its own log file (stdout and stderr, at the file-descriptor level, so that child processes and C code
write there too); a SystemExit is its exit code. One interpreter start serves them all: tests/test_docs.py runs the
commands whose process matters (Hydra's sweeps, --cfg and run records, resume= rewriting sys.argv, DDP re-running
the script) through this instead of paying a start per command.
"""

import json
import os
import runpy
import sys
import time
import traceback
from pathlib import Path


def entries(folder: Path, depth: int = 3) -> set[str]:
    """The paths under folder down to depth levels, relative to it: what a command created is the difference."""
    if not folder.is_dir():
        return set()
    found = set()
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if len(relative.parts) <= depth:
            found.add(str(relative))
    return found


def run_one(argv: list[str], log: Path) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        sys.argv = list(argv)
        try:
            runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:  # a crash is this command's failure, not the end of the others
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
    for fd in saved:
        os.close(fd)
    return code


def main(plan_file: str, results_file: str) -> None:
    plan = json.loads(Path(plan_file).read_text())
    results = []
    outputs = Path("outputs")
    for number, argv in enumerate(plan):
        log = Path(results_file).with_name(f"command-{number}.log")
        before = entries(outputs)
        start = time.perf_counter()
        code = run_one(argv, log)
        results.append(
            {
                "argv": argv,
                "exit_code": code,
                "seconds": round(time.perf_counter() - start, 2),
                "log": str(log),
                "created": sorted(str(outputs / p) for p in entries(outputs) - before),
            }
        )
        Path(results_file).write_text(json.dumps(results, indent=1))  # written after each: a hang still reports


if __name__ == "__main__":
    main(*sys.argv[1:])
