"""One lock per machine and job, so that what every process of a run would otherwise do at once (download a
dataset or a weights file, decode an image folder) is done by the first one, while the others wait and then find it
done."""

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


@contextmanager
def machine_lock(job: str, target: str | Path) -> Iterator[None]:
    """Hold the lock of `job` (a word: prepare, weights, decode) on `target` (a folder or file) on this machine.

    torchrun and srun start every process of a run at once, and the commands need their data and weights before
    fit() creates a process group to wait at; two commands started at once on one folder need the same guarantee.
    The lock (filelock, which torch itself depends on) is a file in the temporary folder named from the user, the
    job and the target's resolved path, so asking creates nothing beside the target. Whoever holds it re-checks for
    the finished work before doing it. One lock object per file in a process (is_singleton), so code that holds a
    lock and reaches the same lock again goes on instead of waiting for itself.
    """
    resolved = str(Path(target).expanduser().resolve())
    user = getattr(os, "getuid", lambda: 0)()  # one lock file per user: another user's file may not be writable
    name = f"cnnlab-{job}-{user}-{hashlib.sha256(resolved.encode()).hexdigest()[:16]}.lock"
    with FileLock(Path(tempfile.gettempdir()) / name, is_singleton=True):
        yield
