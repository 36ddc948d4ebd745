"""How the tests start the project's commands and read what runs leave.

scripts/<name>.py runs in a subprocess, as a user runs it, with this checkout's package first on the path; servers
and DDP rendezvous get a free port; a run's TensorBoard files are read back with TensorBoard's own reader.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tests.conftest import REPO

if TYPE_CHECKING:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def script_path(name: str) -> str:
    """scripts/<name>.py of this checkout (for launchers such as torchrun that take the script themselves)."""
    return str(REPO / "scripts" / f"{name}.py")


def script_argv(name: str, *args: str) -> list[str]:
    """The command line that runs scripts/<name>.py with this interpreter."""
    return [sys.executable, script_path(name), *args]


def script_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ with this checkout's src/ and the repo root first on PYTHONPATH, then env's entries, which win.

    src/ makes a subprocess import this checkout's cnnlab even where another copy is installed; the repo root makes
    the test doubles in tests/ddp_helpers.py importable for configs that name them by `_target_`.
    """
    inherited = os.environ.get("PYTHONPATH")
    path = os.pathsep.join([str(REPO / "src"), str(REPO), *([inherited] if inherited else [])])
    return {**os.environ, "PYTHONPATH": path, **(env or {})}


def run_script(
    name: str,
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float | None = 300,
    **kwargs,
) -> subprocess.CompletedProcess:
    """scripts/<name>.py run to its end in cwd, its stdout and stderr captured as text."""
    return subprocess.run(
        script_argv(name, *args),
        cwd=cwd,
        env=script_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def start_script(name: str, *args: str, cwd: Path, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """scripts/<name>.py started in cwd and left running (to be signalled or killed); stdout and stderr are pipes of
    text unless kwargs say otherwise."""
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kwargs}
    return subprocess.Popen(script_argv(name, *args), cwd=cwd, env=script_env(env), **options)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a server or a DDP rendezvous to take."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensorboard_events(run_dir: Path) -> "EventAccumulator":
    """The run's tensorboard/ folder as TensorBoard reads it, every scalar and image kept (none sampled away)."""
    # Imported here: about 0.35 s that the modules which only start scripts need not pay.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def tensorboard_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """The points TensorBoard shows for tag, {step: value} in the order written; a step shown twice fails.

    Points that a resumed run's new event file replaced (TensorBoard purges them) are not shown.
    """
    points = tensorboard_events(run_dir).Scalars(tag)
    values = {point.step: point.value for point in points}
    assert len(values) == len(points), f"{tag} shows a step twice: {[point.step for point in points]}"
    return values
