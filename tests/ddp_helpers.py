"""Test doubles that run inside the processes of a real run, one process or several (loaded by `_target_` from the
config)."""

import os
import shutil
import signal
import time
from pathlib import Path

import lightning as L

from cnnlab.data.cifar import CIFAR100DataModule
from cnnlab.data.folder import FolderDataModule
from cnnlab.data.mnist import MNISTDataModule


class NaNInputOnRank(L.Callback):
    """Turns one rank's batch into NaNs at one step, so only that rank's loss is non-finite."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            batch[0].fill_(float("nan"))


class CountingMNIST(MNISTDataModule):
    """MNIST whose "download" takes a second, copies files from `source`, and appends the process's rank to `log`."""

    def __init__(self, source: str, log: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.source, self.log = Path(source), Path(log)

    def fetch(self) -> None:
        with self.log.open("a") as f:
            f.write(f"{os.environ.get('LOCAL_RANK', '0')}\n")
        time.sleep(1.0)  # long enough for a second process started at the same time to find the files missing too
        shutil.copytree(self.source / "MNIST", self.data_dir / "MNIST", dirs_exist_ok=True)


class CountingCIFAR100(CIFAR100DataModule):
    """CIFAR-100 whose "download" copies files from `source` and appends the process's rank to `log`. The copy waits
    until every other process of the machine has reached discover(), which reads the class names from the downloaded
    meta file (or 15 s): a process that would download as well finds the files still missing then, at any start-up
    delay between the processes."""

    def __init__(self, source: str, log: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.source, self.log = Path(source), Path(log)
        self.rank = int(os.environ.get("LOCAL_RANK", "0"))

    def marker(self, rank: int) -> Path:
        return self.log.parent / f"discovering-{rank}"

    def discover(self) -> dict:
        self.marker(self.rank).touch()
        return super().discover()

    def fetch(self) -> None:
        with self.log.open("a") as f:
            f.write(f"{self.rank}\n")
        others = [self.marker(r) for r in range(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if r != self.rank]
        deadline = time.monotonic() + 15.0
        while not all(p.exists() for p in others) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # from reaching discover() to looking for the files takes a process well under this
        shutil.copytree(self.source / self.folder, self.batch_dir, dirs_exist_ok=True)


class KillAtStep(L.Callback):
    """SIGKILLs its own process after training step `step`, as `kill -9` would; once: `marker` records that it did,
    so the resumed run (which replays the same overrides) goes on."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


class SleepAtStep(L.Callback):
    """Writes `marker` and then sleeps for `seconds` after training step `step`: a step that takes a long time."""

    def __init__(self, step: int, marker: str, seconds: float = 120.0) -> None:
        self.step, self.marker, self.seconds = step, Path(marker), seconds

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step == self.step:
            self.marker.touch()
            time.sleep(self.seconds)


class AllocatorProbe(L.Callback):
    """At the end of training, frees a 20 MB tensor and writes how many bytes glibc kept in the heap to `output`."""

    def __init__(self, output: str) -> None:
        self.output = Path(output)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import ctypes

        import torch

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keep")]  # fmt: skip

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        x = torch.ones(20 * 2**20, dtype=torch.uint8)
        del x
        self.output.write_text(str(libc.mallinfo2().fordblks))


class TrainingStateProbe(L.Callback):
    """Writes `<output>/rank<r>.json` for each process: at every training step, whether the module named `module`
    (of the classifier's model) and each BatchNorm layer in it were in training mode, and each optimizer group's rate
    and size; at the end of training,
    that module's state_dict (weights, running statistics) as this process holds it."""

    def __init__(self, output: str, module: str | None = None) -> None:
        self.output, self.module, self.steps = Path(output), module, []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        from torch.nn.modules.batchnorm import _BatchNorm

        groups = trainer.optimizers[0].param_groups
        module = pl_module.model.get_submodule(self.module) if self.module else None
        self.steps.append({
            "step": trainer.global_step,
            "training": module.training if module else None,
            "batchnorm_training": {n: m.training for n, m in module.named_modules() if isinstance(m, _BatchNorm)}
            if module else {},
            "lrs": [group["lr"] for group in groups],
            "sizes": [len(group["params"]) for group in groups],
        })  # fmt: skip

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import json

        buffers = pl_module.model.get_submodule(self.module).state_dict() if self.module else {}
        record = {"steps": self.steps, "buffers": {k: v.tolist() for k, v in buffers.items()}}
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class ParameterProbe(L.Callback):
    """Saves `<output>/rank<r>.pt` for each process: one parameter of the classifier (`name`, as in its state_dict)
    at the start of training and at the end of each training epoch, with the global step at each epoch's end."""

    def __init__(self, output: str, name: str) -> None:
        self.output, self.name = Path(output), name
        self.record: dict = {"start": None, "ends": [], "steps": []}

    def value(self, pl_module: L.LightningModule):
        return pl_module.get_parameter(self.name).detach().clone()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["start"] = self.value(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["ends"].append(self.value(pl_module))
        self.record["steps"].append(trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import torch

        self.output.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.output / f"rank{trainer.global_rank}.pt")


def wait_for_markers(folder: Path, prefix: str, rank: int, seconds: float = 15.0) -> None:
    """Wait until every other process of the machine (LOCAL_WORLD_SIZE) has written folder/<prefix>-<rank>, then
    half a second more: long enough for each of them to look for what this process is about to write."""
    others = [folder / f"{prefix}-{r}" for r in range(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if r != rank]
    deadline = time.monotonic() + seconds
    while not all(p.exists() for p in others) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)


class CountingFolder(FolderDataModule):
    """An image folder whose decoded-image cache writes append the process's rank to `log`. A write waits until every
    other process of the machine has reached discover(), which reads the cache or decodes the folder: a process that
    would decode as well finds no cache then, at any start-up delay between the processes."""

    def __init__(self, log: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log = Path(log)
        self.rank = int(os.environ.get("LOCAL_RANK", "0"))

    def discover(self) -> dict:
        (self.log.parent / f"discovering-{self.rank}").touch()
        return super().discover()

    def write_cache(self, split: str, content: dict) -> None:
        with self.log.open("a") as f:
            f.write(f"{self.rank}:{split}\n")
        wait_for_markers(self.log.parent, "discovering", self.rank)
        super().write_cache(split, content)


def download_weights_as_a_rank(torch_home: str, log: str, rank: int) -> None:
    """One process of a run that needs resnet18's IMAGENET1K_V1 file: check_weights_file with torchvision's download
    replaced by one that appends the rank to `log`, waits for the other processes to be checking too, and writes a
    file in the cache."""
    os.environ.update(TORCH_HOME=torch_home, LOCAL_RANK=str(rank))
    import torch
    from omegaconf import OmegaConf
    from torchvision.models._api import WeightsEnum

    from cnnlab.training.pretrained import check_weights_file, weights_file

    def download(weights: WeightsEnum, *args, **kwargs) -> dict:
        with Path(log).open("a") as f:
            f.write(f"{rank}\n")
        wait_for_markers(Path(log).parent, "checking", rank)
        weights_file(weights).parent.mkdir(parents=True, exist_ok=True)
        torch.save({}, weights_file(weights))
        return {}

    WeightsEnum.get_state_dict = download
    model = {"_target_": "cnnlab.models.torchvision_net", "arch": "resnet18", "weights": "IMAGENET1K_V1"}
    (Path(log).parent / f"checking-{rank}").touch()
    check_weights_file(OmegaConf.create({"model": model}))


if __name__ == "__main__":  # python -m tests.ddp_helpers weights TORCH_HOME LOG RANK
    import sys

    download_weights_as_a_rank(sys.argv[2], sys.argv[3], int(sys.argv[4]))
