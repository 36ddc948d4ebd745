"""Crash-safe checkpoint files: written beside the target and renamed over it, so a kill never leaves half a file.

Lightning's TorchCheckpointIO (2.6) serializes to memory and writes through an fsspec transaction, whose local
temporary file lives in the system temp folder: when that is another filesystem than the run directory, the final
`shutil.move` is a copy straight into `last.ckpt`, and a kill during the copy leaves it truncated. Here the
temporary file is in the checkpoint's own folder, flushed to disk, then `os.replace`d, which is atomic on POSIX and
Windows; a reader sees the old checkpoint or the new one, never a mix. A write that fails for lack of space becomes
one paragraph (DiskFull) naming the file, the free space and the command that continues the run.
"""

import errno
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cnnlab.atomic_files import atomic_path
from cnnlab.errors import UserError

# torch.save reports a failed write inside its zip writer as a RuntimeError ("unexpected pos", "failed writing");
# with less than this much space left, such a failure is taken to be the disk running full.
NEARLY_FULL_BYTES = 64 * 2**20


class DiskFull(UserError):
    """A checkpoint could not be written because its filesystem is full; the previous file is intact."""


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def disk_full(path: Path, err: BaseException) -> DiskFull | None:
    """The DiskFull paragraph for a failed write of path, or None when err is not about space."""
    from cnnlab.checkpoints.resume import resume_command

    usage = shutil.disk_usage(path.parent)
    out_of_space = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    if not out_of_space and not (isinstance(err, RuntimeError) and usage.free < NEARLY_FULL_BYTES):
        return None
    previous = f"the previous {path.name} is intact" if path.exists() else f"no earlier {path.name} existed"
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return DiskFull(
        f"Could not write checkpoint {path}: the filesystem holding {path.parent} is full "
        f"({_megabytes(usage.free)} free of {_megabytes(usage.total)}). Nothing was half written and {previous}. "
        f"Free some space there (or move the run folder to a larger disk) and continue the run with: "
        f"{resume_command(run_dir)}"
    )


def atomic_torch_save(payload: Any, path: str | Path) -> None:
    """torch.save into a temporary file next to path, fsync it, then rename it over path, and fsync the folder.

    The temporary file comes from atomic_files.atomic_path, the one writer of every file a run leaves, which gives it
    the permissions open() would (0o666 less the umask) rather than mkstemp's owner-only 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:
        full = disk_full(path, err)
        if full is not None:
            raise full from None
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic (temporary file + rename); remote URLs go through Lightning.
    `seconds` sums the time its saves took (a run's `checkpoints` phase)."""

    seconds = 0.0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        started = time.perf_counter()
        try:
            if storage_options is not None or not _is_local_file_protocol(str(path)):
                return super().save_checkpoint(checkpoint, path, storage_options)
            atomic_torch_save(checkpoint, path)
        finally:
            self.seconds += time.perf_counter() - started
