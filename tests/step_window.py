"""Callbacks that watch a window of training steps: what the device path must not do inside a step.

The window runs from the start of training batch `first` to the end of batch `last` of one epoch (the first unless
told), so it holds whole steps (and the loader's work for them) and none of the per-epoch work: the loader's start,
validation, checkpoints. With the default callbacks no interval feature fires in the default window, batches 2 to 5:
the progress bar redraws (and reads the loss) every 20 steps, the learning rate goes to the logger every 50, and the
NaN check reads the device every 50 steps.
"""

import traceback
from typing import Any

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class StepWindow(L.Callback):
    """Calls open() before training batch `first` of `epoch` and close() after batch `last` (and on an exception)."""

    def __init__(self, first: int = 2, last: int = 5, epoch: int = 0) -> None:
        self.first, self.last, self.epoch = first, last, epoch
        self.is_open = False
        self.steps_seen = 0

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.current_epoch == self.epoch and idx == self.first:
            self.open()
            self.is_open = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        idx = args[-1]
        if self.is_open:
            self.steps_seen += 1
        if self.is_open and idx == self.last:
            self.close()
            self.is_open = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.is_open:
            self.close()
            self.is_open = False


class OpRecorder(TorchDispatchMode):
    """Records the name of every ATen operation that runs while it is active, every copy between devices, and
    where each read of a tensor's value into Python (.item(), bool(tensor), ...) happened."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()
        self.device_copies: list[str] = []
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        self.ops.add(name)
        if name == "_local_scalar_dense":
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            self.reads.append(" <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in frames[::-1][:4]))
        if name == "_to_copy" and "device" in kwargs and torch.device(kwargs["device"]) != args[0].device:
            self.device_copies.append(f"{args[0].device} -> {kwargs['device']}: {tuple(args[0].shape)}")
        if name == "copy_" and args[0].device != args[1].device:
            self.device_copies.append(f"{args[1].device} -> {args[0].device}: {tuple(args[1].shape)}")
        return func(*args, **kwargs)


class RecordOps(StepWindow):
    """Records the ATen operations of the steps in the window (see OpRecorder)."""

    def __init__(self, first: int = 2, last: int = 5, epoch: int = 0) -> None:
        super().__init__(first, last, epoch)
        self.recorder = OpRecorder()

    def open(self) -> None:
        self.recorder.__enter__()

    def close(self) -> None:
        self.recorder.__exit__(None, None, None)


class ForbidCudaSync(StepWindow):
    """Makes every CUDA operation that would make the host wait for the GPU raise inside the window."""

    def open(self) -> None:
        torch.cuda.set_sync_debug_mode("error")

    def close(self) -> None:
        torch.cuda.set_sync_debug_mode("default")
