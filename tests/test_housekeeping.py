"""CI in three places runs the same commands: .ci/run, the GitHub workflow and the pre-commit hooks."""

import importlib.metadata
import re

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
    assert readme_setup_commands() == ('pip install -e ".[dev]"', "pytest")


def test_workflow_and_ci_run_install_lint_and_test_with_readmes_commands_in_that_order():
    install, test = readme_setup_commands()
    for name, commands in ((".github/workflows/ci.yml", workflow_commands()), (".ci/run", ci_run_commands())):
        expected = [install, *LINT, test]
        assert all(commands.count(c) == 1 for c in expected), f"{name} runs {commands}"
        assert sorted(expected, key=commands.index) == expected, f"{name} runs {commands}"


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
