"""A dataset's files checked and, where missing, downloaded once per machine, however many processes ask at once."""

import hashlib
import os
import tempfile
from pathlib import Path

import lightning as L
from filelock import FileLock


def prepare_once_per_machine(datamodule: L.LightningDataModule) -> None:
    """Run datamodule.prepare_data() under a lock per data folder on this machine: the first process to get there
    downloads what is missing, the others wait for it and then find the files in place.

    Lightning calls prepare_data in each machine's first process inside fit() and holds the others at a barrier
    until it returns. The commands need the files earlier: train() reads what a dataset says about itself (CIFAR-100's
    class names, a folder's classes) to build the model before fit(), in every process, when no process group exists
    yet to wait at; eval and search read them without a Trainer. The lock (filelock, which torch itself depends on)
    gives each of them the same guarantee without a process group, and covers two commands started at once on one
    data folder too. It lives in the temporary folder, so asking creates nothing in the data folder.
    """
    folder = str(Path(getattr(datamodule, "data_dir", ".")).expanduser().resolve())
    user = getattr(os, "getuid", lambda: 0)()  # one lock file per user: another user's file may not be writable
    name = f"cnnlab-prepare-{user}-{hashlib.sha256(folder.encode()).hexdigest()[:16]}.lock"
    with FileLock(Path(tempfile.gettempdir()) / name):
        datamodule.prepare_data()
