"""A dataset's files checked and, where missing, downloaded once per machine, however many processes ask at once."""

from pathlib import Path

import lightning as L

from cnnlab.machine_lock import machine_lock


def prepare_once_per_machine(datamodule: L.LightningDataModule) -> None:
    """Run datamodule.prepare_data() under a lock per data folder on this machine: the first process to get there
    downloads what is missing, the others wait for it and then find the files in place.

    Lightning calls prepare_data in each machine's first process inside fit() and holds the others at a barrier
    until it returns. The commands need the files earlier: train() reads what a dataset says about itself (CIFAR-100's
    class names, a folder's classes) to build the model before fit(), in every process, when no process group exists
    yet to wait at; eval and search read them without a Trainer. cnnlab.machine_lock gives each of them the same
    guarantee without a process group, and covers two commands started at once on one data folder too.
    """
    with machine_lock("prepare", Path(getattr(datamodule, "data_dir", "."))):
        datamodule.prepare_data()
