"""CI in three places runs the same commands: .ci/run, the GitHub workflow and the pre-commit hooks; and what the
suite says where the real data is missing."""

import importlib.metadata
import os
import re
import subprocess
import sys

import yaml

from tests.conftest import REPO, pyproject

LINT = ["ruff check .", "ruff format --check ."]


def readme_setup_commands() -> tuple[str, str]:
    """README's install command and test command, from the code lines of its "Quick start" section."""
    section = re.search(r"^## Quick start\n(.*?)^## ", (REPO / "README.md").read_text(), re.S | re.M).group(1)
    lines = [line.strip() for line in section.splitlines() if line.startswith("    ") and "&&" in line]
    test_line = next(line for line in lines if "test" in line.split("#", 1)[1])  # "# the test suite"
    install, test = (part.strip() for part in test_line.split("#", 1)[0].split("&&"))
    assert all(line.startswith(install) for line in lines)  # both README lines install the same way
    return install, test


def workflow_commands() -> list[str]:
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "ci.yml").read_text())
    (job,) = workflow["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest" and job["strategy"]["matrix"]["python-version"] == ["3.10", "3.12"]
    return [line.strip() for step in job["steps"] if "run" in step for line in step["run"].splitlines()]


def ci_run_commands() -> list[str]:
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_readme_names_the_install_and_test_commands_the_checks_use():
    assert readme_setup_commands() == ('pip install -e ".[dev]"', "pytest -n auto --dist loadfile")


def test_workflow_and_ci_run_install_lint_and_test_with_readmes_commands_in_that_order():
    install, test = readme_setup_commands()
    for name, commands in ((".github/workflows/ci.yml", workflow_commands()), (".ci/run", ci_run_commands())):
        expected = [install, *LINT, test]
        assert all(commands.count(c) == 1 for c in expected), f"{name} runs {commands}"
        assert sorted(expected, key=commands.index) == expected, f"{name} runs {commands}"


def test_a_pytest_worker_runs_torch_on_one_thread_and_plain_pytest_leaves_the_default():
    import torch

    if os.environ.get("PYTEST_XDIST_WORKER"):  # README's test command: -n auto
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    else:
        fresh = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                               capture_output=True, text=True, check=True)  # fmt: skip
        assert torch.get_num_threads() == int(fresh.stdout)


def test_pre_commit_runs_the_two_ruff_checks_at_the_pinned_ruff_version():
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    (repo,) = config["repos"]
    assert repo["repo"] == "https://github.com/astral-sh/ruff-pre-commit"
    hooks = {hook["id"]: hook.get("args", []) for hook in repo["hooks"]}
    assert hooks == {"ruff-check": [], "ruff-format": ["--check"]}  # check only, as CI does: no --fix
    (pinned,) = [spec.removeprefix("ruff==") for spec in pyproject()["project"]["optional-dependencies"]["dev"]
                 if spec.startswith("ruff==")]  # fmt: skip
    assert pinned == importlib.metadata.version("ruff")  # the ruff that ran `ruff check .` here
    assert repo["rev"] == f"v{pinned}"


def test_pytest_without_the_real_data_says_once_which_tests_it_skipped_and_how_to_run_them():
    from tests.conftest import REAL_DATA_MISSING

    env = {k: v for k, v in os.environ.items() if k not in ("CNNLAB_REAL_DATA", "CI")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_real_data.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    collected = len(re.findall(r"^def test_", (REPO / "tests" / "test_real_data.py").read_text(), re.M))
    lines = [line for line in result.stdout.splitlines() if REAL_DATA_MISSING in line]
    assert len(lines) == 1 and re.fullmatch(rf"SKIPPED \[{collected}\] tests/conftest\.py:\d+: .*", lines[0]), lines
    assert f"{collected} skipped" in result.stdout
