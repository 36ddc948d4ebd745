"""Whether a folder can be written, asked before any long work that would write there."""

import tempfile
from pathlib import Path


def writable_folder(path: Path) -> bool:
    """Whether files can be written in folder path, creating it (and its parents) where it does not exist yet.

    Tried with a real temporary file in path, or in the nearest folder above it that exists: permission bits say
    nothing for root, nor on read-only and special filesystems. Nothing is created by asking.
    """
    path = Path(path).expanduser().resolve()
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        return False
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False
