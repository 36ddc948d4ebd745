"""Command-line values that name files: a file, a folder, a glob pattern, or a list of these, expanded to files."""

import glob
import os
from collections.abc import Callable
from pathlib import Path

from cnnlab.errors import UserError

GLOB_CHARS = frozenset("*?[")


def expand_paths(spec: str | Path | list, key: str, what: str, in_folder: Callable[[Path], list[Path]]) -> list[Path]:
    """The files spec names, in order and each once: a file as it is, a folder as in_folder lists it, a glob
    pattern's matches sorted (`**` reaches into subfolders).

    Args:
        key: the setting spec came from (`inputs`, `ckpt_path`), named in errors.
        what: what one file is (`Image`, `Checkpoint`), named in errors.
        in_folder: the files a folder stands for; it raises a UserError when the folder holds none.
    """
    entries = [spec] if isinstance(spec, str | Path) else list(spec)
    found: list[Path] = []
    for entry in (os.path.expanduser(str(e)) for e in entries):
        matches = sorted(glob.glob(entry, recursive=True)) if GLOB_CHARS & set(entry) else [entry]
        if not matches:
            raise UserError(f"{key}={entry} matches no file. Check the pattern (relative paths start where you run).")
        for match in map(Path, matches):
            if match.is_dir():
                found += in_folder(match)
            elif not match.is_file():
                raise UserError(
                    f"{what} {match} does not exist. Check the path given as {key}= (relative paths start where you "
                    "run)."
                )
            else:
                found.append(match)
    return list(dict.fromkeys(found))
