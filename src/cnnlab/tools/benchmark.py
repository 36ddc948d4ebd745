"""benchmark(cfg): training throughput of the project's path against a plain PyTorch loop, and time to accuracy.

All paths run in one process on the same model config, optimizer, batch size and device, so the ratios compare
framework and data-path cost, not machines. Timed windows are taken in turn (a, b, c, a, b, c, ...) and the best of
each path is kept, which keeps a busy machine from favouring whichever path ran while it was quiet.
"""

import copy
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch.utils._python_dispatch import TorchDispatchMode

from cnnlab.commands.devices import pick_device
from cnnlab.commands.run_record import environment, process_start_time, write_json
from cnnlab.commands.train import build_classifier, build_datamodule, build_trainer, plain
from cnnlab.data.tensor_loader import BatchTransform, first_epoch_flips
from cnnlab.errors import UserError
from cnnlab.training.classifier import build_model, make_scheduler
from cnnlab.training.param_groups import make_optimizer
from cnnlab.training.step_clock import wait_for

PATHS = ("lightning", "plain", "torchvision")


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while it is active: on a GPU each is about one kernel launch, and on any
    device each costs host time, so the count per step shows a path's per-step work without a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class StepOps(L.Callback):
    """Counts the operations of `steps` steady training steps: from the start of batch `first` to that of batch
    `first + steps` (everything a step does, the loader's work for its batch and the per-step callbacks included)."""

    def __init__(self, first: int, steps: int) -> None:
        self.first, self.steps, self.counter = first, steps, OpCounter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.first:
            self.counter.__enter__()
        elif trainer.global_step == self.first + self.steps:
            self.counter.__exit__(None, None, None)
            trainer.should_stop = True

    @property
    def per_step(self) -> float:
        return self.counter.count / self.steps


class StepTimer(L.Callback):
    """Times training steps after warm-up: images per second over the timed steps."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps, self.start, self.images = warmup_steps, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup_steps and self.start is None:
            wait_for(pl_module.device)
            self.start = time.perf_counter()
        if self.start is not None:
            self.images += len(batch[1])

    def images_per_second(self, device: torch.device) -> float:
        wait_for(device)
        return self.images / (time.perf_counter() - self.start)


def _on_device(cfg: DictConfig) -> DictConfig:
    """A copy of cfg whose Trainer runs on cfg.device (auto: Lightning's choice)."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        if cfg.device != "auto":
            device = pick_device(cfg.device)
            cfg.trainer.accelerator = {"cuda": "gpu"}.get(device.type, device.type)
            if device.index is not None:
                cfg.trainer.devices = [device.index]  # cuda:1: the same GPU as the plain loop
    return cfg


def _accelerator(cfg: DictConfig, steps: int | None = None) -> DictConfig:
    """cfg on its device, training for warmup_steps + steps (cfg.steps unless given) without validation."""
    cfg = _on_device(cfg)
    with open_dict(cfg):
        cfg.steps = cfg.steps if steps is None else steps
        cfg.trainer.max_epochs = -1
        cfg.trainer.max_steps = cfg.warmup_steps + cfg.steps
        cfg.trainer.limit_val_batches = 0  # training throughput only
        cfg.trainer.num_sanity_val_steps = 0
    return cfg


def lightning_fit(cfg: DictConfig, loader: str, watch: L.Callback) -> L.LightningModule:
    """A Trainer.fit with the configured callbacks and loggers, fed by the given loader path, watched by watch."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.data.loader = loader
        if loader == "torchvision":
            cfg.data.num_workers = cfg.torchvision_workers
            cfg.data.augment_each = "batch"  # per image in its workers: the torchvision path has no epoch pass
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = build_datamodule(cfg)
    classifier = build_classifier(cfg)
    trainer = build_trainer(cfg)
    trainer.callbacks.append(watch)
    trainer.fit(classifier, datamodule=datamodule)
    return classifier


def lightning_rate(cfg: DictConfig, loader: str) -> float:
    """Images/s of the project's path (lightning_fit) after cfg.warmup_steps."""
    timer = StepTimer(cfg.warmup_steps)
    classifier = lightning_fit(cfg, loader, timer)
    return timer.images_per_second(classifier.device)


def lightning_ops(cfg: DictConfig) -> float:
    """Operations per steady training step of the project's path (tensor loader), after cfg.warmup_steps."""
    counter = StepOps(cfg.warmup_steps, cfg.count_ops_steps)
    lightning_fit(cfg, "tensor", counter)
    return counter.per_step


def plain_steps(
    cfg: DictConfig, images: torch.Tensor, labels: torch.Tensor, transform: BatchTransform, device: torch.device
) -> Iterator[int]:
    """A hand-written loop: the batch transform, forward, loss, backward, optimizer and scheduler step; yields each
    step's number before the step runs, for plain_rate and plain_ops to time or count the steps they want.

    Like for like with the project's path: the same uint8 images on the device, the same per-batch transform
    (normalization, and the crop and flip the data config asks for, per batch or per epoch as data.augment_each
    says), the same optimizer settings (its foreach
    update), precision, memory format and cuDNN autotuning (trainer.benchmark), so a/b measures the framework, not
    work only one path does.
    """
    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.benchmark = bool(cfg.trainer.get("benchmark"))  # as Lightning sets it for path (a)
    model = build_model(plain(cfg.model)).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if cfg.compile.enabled:
        model.compile(backend=cfg.compile.backend, mode=cfg.compile.mode)
    optimizer = make_optimizer(plain(cfg.optimizer), model.parameters(), model)  # the groups path (a) makes
    scheduler = make_scheduler(plain(cfg.scheduler), optimizer, cfg.warmup_steps + cfg.steps)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    bf16 = str(cfg.trainer.precision).startswith("bf16")
    batch_size, n = cfg.data.batch_size, len(labels)
    order = torch.randperm(n, device=device)
    first_flips = first_epoch_flips(cfg.seed, n, device) if transform.flip == "alternating" else None
    each_epoch = transform.augments and cfg.data.get("augment_each") == "epoch"
    augmented, augmented_epoch = None, -1
    for step in range(cfg.warmup_steps + cfg.steps):
        yield step
        i, epoch = (step * batch_size) % (n - batch_size + 1), step * batch_size // n
        if each_epoch:  # the epoch's images cropped and flipped at its first step, then sliced
            if epoch != augmented_epoch:
                flips = None if first_flips is None else first_flips[order] ^ bool(epoch % 2)
                augmented, augmented_epoch = transform.augment(images[order], flips=flips), epoch
            x = transform.normalize(augmented[i : i + batch_size]).contiguous(memory_format=memory_format)
        else:
            idx = order[i : i + batch_size]
            flips = None if first_flips is None else first_flips[idx] ^ bool(epoch % 2)
            x = transform(images[idx], flips=flips).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = criterion(model(x), labels[order[i : i + batch_size]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def plain_rate(
    cfg: DictConfig, images: torch.Tensor, labels: torch.Tensor, transform: BatchTransform, device: torch.device
) -> float:
    """Images/s of the plain loop (plain_steps) over cfg.steps after cfg.warmup_steps."""
    start = None
    for step in plain_steps(cfg, images, labels, transform, device):
        if step == cfg.warmup_steps:
            wait_for(device)
            start = time.perf_counter()
    wait_for(device)
    return cfg.steps * cfg.data.batch_size / (time.perf_counter() - start)


def plain_ops(
    cfg: DictConfig, images: torch.Tensor, labels: torch.Tensor, transform: BatchTransform, device: torch.device
) -> float:
    """Operations per steady step of the plain loop, counted as lightning_ops counts the project's."""
    counter = OpCounter()
    for step in plain_steps(cfg, images, labels, transform, device):
        if step == cfg.warmup_steps:
            counter.__enter__()
        elif step == cfg.warmup_steps + cfg.count_ops_steps:
            counter.__exit__(None, None, None)
            break
    return counter.count / cfg.count_ops_steps


def _device(cfg: DictConfig) -> torch.device:
    """The device of the plain loop: the one eval and predict would pick for the same `device=` value."""
    return pick_device(cfg.device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def throughput(cfg: DictConfig) -> dict[str, Any]:
    """Best-of-`repeats` images/s of each path, and the ratios lightning/plain and lightning/torchvision."""
    unknown = set(cfg.compare) - set(PATHS)
    if unknown:
        raise UserError(
            f"compare={list(cfg.compare)} names unknown paths {sorted(unknown)}; choose from {list(PATHS)}."
        )
    device = _device(cfg)
    cfg = _accelerator(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    train_images, train_labels = datamodule.splits["train"]
    images, labels = train_images.to(device), train_labels.to(device)  # uint8, as the tensor loader holds them
    transform = datamodule.batch_transform(augment=True).to(device)  # the training transform the config asks for
    best: dict[str, float] = {}
    for _ in range(cfg.repeats):
        for path in cfg.compare:
            if path == "plain":
                rate = plain_rate(cfg, images, labels, transform, device)
            else:
                rate = lightning_rate(cfg, "tensor" if path == "lightning" else "torchvision")
            best[path] = max(best.get(path, 0.0), rate)
    result: dict[str, Any] = {f"{p}_images_per_second": round(r, 1) for p, r in best.items()}
    if "lightning" in best and "plain" in best:
        result["lightning_over_plain"] = round(best["lightning"] / best["plain"], 3)
        # The framework's cost in absolute terms: the time per step it adds to the plain loop.
        seconds = cfg.data.batch_size / best["lightning"] - cfg.data.batch_size / best["plain"]
        result["lightning_overhead_ms_per_step"] = round(1000 * seconds, 3)
    if "lightning" in best and "torchvision" in best:
        result["lightning_over_torchvision"] = round(best["lightning"] / best["torchvision"], 3)
    if cfg.count_ops_steps:  # counted apart from the timed windows: counting slows every operation down
        counting = _accelerator(cfg, steps=cfg.count_ops_steps + 1)
        result["lightning_ops_per_step"] = lightning_ops(counting)
        result["plain_ops_per_step"] = plain_ops(counting, images, labels, transform, device)
    result["peak_memory_mb"] = round(peak_memory_mb(device), 1)
    result["device"] = str(device)
    result["same_work"] = {  # what (a) and (b) both do per step
        "augment": transform.augments,
        "augment_each": str(cfg.data.get("augment_each", "batch")),
        "normalize_on_device": True,
        "precision": str(cfg.trainer.precision),
        "channels_last": bool(cfg.channels_last),
        "cudnn_benchmark": bool(cfg.trainer.get("benchmark")),
        "compile": bool(cfg.compile.enabled),
    }
    return result


class TestAccuracyStop(L.Callback):
    """After every training epoch, measures test accuracy; stops training at the first epoch reaching the target."""

    def __init__(self, target: float, started_at: float) -> None:
        self.target, self.started_at = target, started_at
        self.history: list[dict[str, float]] = []
        self.reached: dict[str, float] | None = None

    @torch.no_grad()
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        was_training = pl_module.training
        pl_module.eval()
        correct = total = 0
        for x, y in trainer.datamodule.test_dataloader():
            x, y = x.to(pl_module.device), y.to(pl_module.device)
            correct += (pl_module(x).argmax(1) == y).sum().item()
            total += len(y)
        pl_module.train(was_training)
        entry = {
            "epoch": trainer.current_epoch + 1,
            "test_acc": correct / total,
            "seconds_from_process_start": time.time() - self.started_at,
        }
        self.history.append(entry)
        if entry["test_acc"] >= self.target and self.reached is None:
            self.reached = entry
            trainer.should_stop = True


def time_to_accuracy(cfg: DictConfig) -> dict[str, Any]:
    """Wall clock from process start to the first epoch whose test accuracy reaches cfg.target_acc."""
    started_at = process_start_time()
    device = _device(cfg)
    cfg = _on_device(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = build_datamodule(cfg)
    classifier = build_classifier(cfg)
    trainer = build_trainer(cfg)
    stop = TestAccuracyStop(cfg.target_acc, started_at)
    trainer.callbacks.append(stop)
    trainer.fit(classifier, datamodule=datamodule)
    return {
        "target_acc": cfg.target_acc,
        "reached": stop.reached is not None,
        "seconds_to_target": round(stop.reached["seconds_from_process_start"], 2) if stop.reached else None,
        "epoch_reached": stop.reached["epoch"] if stop.reached else None,
        "history": stop.history,
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "device": str(device),
    }


def benchmark(cfg: DictConfig) -> dict[str, Any]:
    """Run the throughput comparison, or the time-to-accuracy measurement when target_acc is set; write JSON."""
    with open_dict(cfg):  # as train.py does: a folder's class names and mean/std into cfg.data before building
        cfg.data.update(instantiate(cfg.data).discover())
    result = time_to_accuracy(cfg) if cfg.target_acc is not None else throughput(cfg)
    result["config"] = {key: plain(cfg[key]) for key in ("model", "data", "optimizer", "scheduler", "trainer")}
    result["config"].update(channels_last=cfg.channels_last, label_smoothing=cfg.label_smoothing)
    result["env"] = environment(cfg.seed, cfg.trainer.deterministic, {})
    write_json(Path(cfg.output), result)
    print_result(result)
    return result


def print_result(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="benchmark")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if key not in ("env", "config", "history"):
            table.add_row(key, str(value))
    Console().print(table)
