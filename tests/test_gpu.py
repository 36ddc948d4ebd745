"""The GPU path on a CUDA GPU: `pytest -m gpu` (scripts/gpu_check.py runs these and reports each outcome).

Without a GPU every test here skips with one reason. Each one trains on the tiny generated datasets through the
project's own path (cnnlab.commands.train.train and the configs), so each takes seconds once CUDA is up; the CPU-side
counterparts of several of them are in tests/test_device_path.py.
"""

import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from torch import Tensor, nn
from torch._dynamo.utils import counters

from cnnlab.checkpoints.load import data_config, load_checkpoint
from cnnlab.cli import config_dir
from cnnlab.commands.evaluate import evaluate, logits_and_labels
from cnnlab.commands.export import export
from cnnlab.commands.predict import predict
from cnnlab.commands.train import train
from cnnlab.data.tensor_loader import BatchTransform, EpochSampler, TensorLoader
from cnnlab.training.classifier import classifier_from_checkpoint
from tests.conftest import MODELS, compose_config, quick_run
from tests.step_window import ForbidCudaSync

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (run `pytest -m gpu` on a machine with one)"
    ),
]

# A short run: 8 full batches of 32, one validation batch, no test stage.
SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=8", "trainer.limit_val_batches=1", "test=false"]


def data_for(model: str) -> str:
    return "mnist" if model == "lenet5" else "cifar10"


def gpu_overrides(tiny_data: Path, model: str, *extra: str, trainer: str = "gpu", progress_bar: bool = False) -> list:
    """quick_run on a GPU trainer (trainer=gpu: bf16-mixed, cuDNN autotuning) instead of trainer=cpu."""
    # progress_bar: the configured bar (redrawn every 20 steps), as a user's run has it
    return quick_run(tiny_data, *extra, model=model, data=data_for(model), trainer=trainer, progress_bar=progress_bar)


def compose_plain(config_name: str, *overrides: str):
    """A config without a run directory (predict.yaml, export.yaml), composed as its script would."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def last_weights(run_dir: Path) -> dict[str, Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


class Probe(L.Callback):
    """Records what a check needs from inside a run: fn(trainer, pl_module, batch) at every training batch's start."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.seen: list[Any] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(self.fn(trainer, pl_module, batch))


class ForwardHooks(L.Callback):
    """Calls record(module, inputs, output) after every training-mode forward of the modules select() picks.

    Validation and the conv-images callback run the model in eval mode, outside training steps: not recorded.
    """

    def __init__(self, select, record) -> None:
        self.select, self.record, self.handles = select, record, []

    def _hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if module.training:
            self.record(module, inputs, output)

    def on_train_start(self, trainer, pl_module) -> None:
        modules = [m for m in pl_module.model.modules() if self.select(m)]
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def on_train_end(self, trainer, pl_module) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("model", MODELS)
def test_bf16_mixed_training_learns_the_tiny_data_with_float32_weights(tiny_data, tmp_path, model):
    outputs: set[tuple[torch.dtype, str]] = set()
    hooks = ForwardHooks(lambda m: isinstance(m, nn.Linear), lambda m, i, o: outputs.add((o.dtype, o.device.type)))
    # 10 epochs: the ResNets' global pooling makes the tiny data's position-coded classes slow to learn (measured on
    # the CPU in float32: test accuracy 0.75 for ResNet-8, 0.95 for ResNet-20, 0.90 for ResNet-18, 1.0 for ResNet-9)
    cfg = compose_config(gpu_overrides(tiny_data, model, "trainer.max_epochs=10", "optimizer.lr=0.1"), tmp_path)
    assert cfg.trainer.precision == "bf16-mixed"
    metrics = train(cfg, extra_callbacks=[hooks])
    assert outputs == {(torch.bfloat16, "cuda")}  # every linear layer of every step ran under bf16 autocast
    weights = last_weights(tmp_path)
    assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())
    assert metrics["test_acc"] > 0.5


@pytest.mark.parametrize("model", MODELS)
def test_channels_last_training_keeps_weights_and_convolution_inputs_channels_last(tiny_data, tmp_path, model):
    inputs: list[bool] = []
    hooks = ForwardHooks(
        lambda m: isinstance(m, nn.Conv2d),
        lambda m, i, o: inputs.append(i[0].is_cuda and i[0].is_contiguous(memory_format=torch.channels_last)),
    )
    weights: list[bool] = []

    class Weights(L.Callback):
        def on_train_end(self, trainer, pl_module) -> None:
            for p in pl_module.model.parameters():
                if p.dim() == 4:
                    weights.append(p.is_cuda and p.is_contiguous(memory_format=torch.channels_last))

    train(compose_config(gpu_overrides(tiny_data, model, "channels_last=true", *SHORT), tmp_path), [hooks, Weights()])
    assert inputs and all(inputs)
    assert weights and all(weights)


@pytest.mark.parametrize("model", MODELS)
def test_training_steps_never_make_the_host_wait_for_the_gpu(tiny_data, tmp_path, model):
    # The GPU settings a user would pick (bf16, channels-last) with the default callbacks, logger and progress bar;
    # any synchronizing CUDA call inside steps 2-6 raises (torch.cuda.set_sync_debug_mode("error")).
    window = ForbidCudaSync(first=2, last=6)
    overrides = gpu_overrides(tiny_data, model, "channels_last=true", *SHORT, progress_bar=True)
    overrides = [o if o != "trainer.limit_train_batches=8" else "trainer.limit_train_batches=9" for o in overrides]
    train(compose_config(overrides, tmp_path), extra_callbacks=[window])
    assert window.steps_seen == 5


@pytest.mark.parametrize("model", MODELS)
def test_deterministic_training_repeats_bit_for_bit(tiny_data, tmp_path, model):
    flags = Probe(
        lambda trainer, module, batch: (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    )
    overrides = gpu_overrides(tiny_data, model, *SHORT, "trainer.deterministic=true")
    try:
        for run in ("a", "b"):
            train(compose_config(overrides, tmp_path / run), extra_callbacks=[flags])
    finally:
        torch.use_deterministic_algorithms(False)
    assert set(flags.seen) == {(True, False)}  # deterministic kernels, no cuDNN autotuning (trainer=gpu asks for it)
    a, b = last_weights(tmp_path / "a"), last_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_tensor_loader_serves_batches_on_the_gpu_with_its_constants_there(tiny_data, tmp_path):
    def where(trainer, module, batch):
        transform = trainer.datamodule.train_loader.transform
        return {batch[0].device.type, batch[1].device.type, transform.mean.device.type, transform.std.device.type}

    probe = Probe(where)
    train(compose_config(gpu_overrides(tiny_data, "resnet8", *SHORT), tmp_path), extra_callbacks=[probe])
    assert len(probe.seen) == 8 and all(devices == {"cuda"} for devices in probe.seen)

    # A loader built on the GPU directly: after the epoch's start, serving batches never synchronizes.
    images = torch.randint(0, 256, (100, 3, 8, 8), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 10, (100,), device="cuda")
    transform = BatchTransform((0.5, 0.4, 0.3), (0.25, 0.25, 0.25), crop_padding=2, flip=True)
    loader = TensorLoader(images, labels, 16, EpochSampler(100, shuffle=True, seed=1), transform)
    assert loader.transform.mean.is_cuda and loader.transform.std.is_cuda
    batches = iter(loader)
    next(batches)  # the epoch's start: the permutation goes to the GPU
    served = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches:
            served.append(x.is_cuda and y.is_cuda and x.dtype == torch.float32)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert served == [True] * 6


def tensors_held(obj: Any, depth: int = 0) -> list[Tensor]:
    """Every tensor an object holds in its attributes, containers and modules (a few levels deep)."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, nn.Module):
        return list(obj.state_dict().values())
    if depth > 3 or isinstance(obj, L.Trainer | type):
        return []
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, list | tuple | set):
        items = list(obj)
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return []
    return [t for item in items for t in tensors_held(item, depth + 1)]


def test_ema_of_the_cifar10_fast_recipe_averages_on_the_gpu_without_waiting_for_it(tiny_data, tmp_path):
    # The recipe's EMA callback (config key callbacks.ema), whatever class implements it, built from the recipe's
    # config and handed to the run; its updates fall inside the second epoch's window of steps 1-11.
    overrides = [
        *gpu_overrides(tiny_data, "resnet9", progress_bar=True),
        "experiment=cifar10_fast",
        "trainer.max_epochs=2",
        "data.batch_size=32",
        "data.eval_batch_size=64",
    ]
    recipe = compose_config(overrides, tmp_path)
    assert recipe.callbacks.get("ema") is not None
    ema = instantiate(recipe.callbacks.ema)
    window = ForbidCudaSync(first=1, last=11, epoch=1)
    metrics = train(compose_config([*overrides, "callbacks.ema=null"], tmp_path), extra_callbacks=[ema, window])
    assert window.steps_seen == 11 and metrics["status"] == "finished"
    averaged = [t for t in tensors_held(ema) if t.is_floating_point() and t.numel() > 1]
    assert averaged and all(t.is_cuda for t in averaged)


def test_inductor_compiled_run_builds_one_training_graph_and_one_evaluation_graph(tiny_data, tmp_path):
    # 500 training images in batches of 32 (the last 20 dropped); evaluation batches of 64 with last batches of 36
    # (validation) and 8 (test), which the one evaluation graph serves.
    overrides = gpu_overrides(
        tiny_data, "lenet5", "trainer.max_epochs=2", "compile.enabled=true", "compile.backend=inductor"
    )
    torch._dynamo.reset()
    counters.clear()
    try:
        metrics = train(compose_config(overrides, tmp_path))
        graphs, breaks = counters["stats"]["unique_graphs"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert metrics["global_step"] == 2 * (500 // 32)
    assert breaks == {}
    assert graphs == 2
    assert metrics["test_acc"] > 0.5


def test_gpu_trained_checkpoint_evaluates_predicts_and_exports_on_the_cpu(tiny_data, tmp_path):
    run_dir = tmp_path / "train"
    overrides = gpu_overrides(tiny_data, "resnet9", "channels_last=true", "trainer.max_epochs=6", "optimizer.lr=0.1")
    train_metrics = train(compose_config(overrides, run_dir))
    best = run_dir / "checkpoints" / "best.ckpt"

    # The same float32 logits on the CPU as on the GPU (TF32 off, so both compute in full float32).
    ckpt = load_checkpoint(best)
    datamodule = instantiate(data_config(ckpt), _convert_="all")
    datamodule.setup("test")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        on_gpu, labels = logits_and_labels(
            classifier_from_checkpoint(ckpt), datamodule.test_dataloader(), torch.device("cuda")
        )
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    on_cpu, _ = logits_and_labels(classifier_from_checkpoint(ckpt), datamodule.test_dataloader(), torch.device("cpu"))
    assert torch.allclose(on_cpu, on_gpu, atol=1e-3)

    metrics = evaluate(compose_config([f"ckpt_path={best}", "device=cpu"], tmp_path / "eval", config_name="eval"))
    assert metrics["samples"] == 200
    assert metrics["test_acc"] == pytest.approx((on_cpu.argmax(dim=1) == labels).float().mean().item(), abs=1e-6)
    # the training run's test stage ran under bf16 autocast on the GPU: close, not equal
    assert abs(metrics["test_acc"] - train_metrics["test_acc"]) <= 0.05

    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(datamodule.splits["test"][0][:20]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:02d}.png")
    rows = predict(compose_plain("predict", f"ckpt_path={best}", f"inputs={folder}", "top_k=1"))["predictions"]
    names = datamodule.class_names
    assert [r["classes"][0] for r in rows] == [names[i] for i in on_cpu[:20].argmax(dim=1).tolist()]

    exported = export(compose_plain("export", f"ckpt_path={best}", "format=torchscript"))
    assert exported["max_abs_diff"] <= 1e-4 and Path(exported["output"]).is_file()


def test_ddp_trains_over_nccl_in_one_process(tiny_data, tmp_path):
    def group(trainer, module, batch):
        return (
            torch.distributed.get_backend(),
            trainer.world_size,
            type(trainer.strategy).__name__,
            batch[0].device.type,
        )

    probe = Probe(group)
    overrides = gpu_overrides(
        tiny_data, "lenet5", "trainer.accelerator=gpu", "trainer.devices=1", *SHORT, trainer="ddp"
    )
    environ = dict(os.environ)  # Lightning's launcher sets MASTER_PORT, LOCAL_RANK, WORLD_SIZE, ... for the run
    try:
        metrics = train(compose_config(overrides, tmp_path), extra_callbacks=[probe])
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    assert set(probe.seen) == {("nccl", 1, "DDPStrategy", "cuda")}
    assert metrics["status"] == "finished" and metrics["global_step"] == 8
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
