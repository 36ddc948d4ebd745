"""Crash-safe checkpoint files: written beside the target and renamed over it, so a kill never leaves half a file.

Lightning's TorchCheckpointIO (2.6) serializes to memory and writes through an fsspec transaction, whose local
temporary file lives in the system temp folder: when that is another filesystem than the run directory, the final
`shutil.move` is a copy straight into `last.ckpt`, and a kill during the copy leaves it truncated. Here the
temporary file is in the checkpoint's own folder, flushed to disk, then `os.replace`d, which is atomic on POSIX and
Windows; a reader sees the old checkpoint or the new one, never a mix.
"""

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_torch_save(payload: Any, path: str | Path) -> None:
    """torch.save into a temporary file next to path, fsync it, then rename it over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic (temporary file + rename); remote URLs go through Lightning."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
