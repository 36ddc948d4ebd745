"""What keeps the GPU path fast and repeatable, checked on the CPU: tests/test_gpu.py checks the same on a GPU.

A training step must never make the host wait for the device; every operation it runs must have a deterministic
CUDA kernel, so that trainer.deterministic=true works; a compiled run builds one graph for training and one for
evaluation.
"""

import lightning as L
import pytest
import torch
from torch._dynamo.utils import counters

from cnnlab.commands.train import build_trainer, train
from cnnlab.data.tensor_loader import BatchTransform, EpochSampler, TensorLoader
from cnnlab.training.stopping import StopOnNonFiniteLoss
from tests.conftest import MODELS, compose_config, quick_run
from tests.step_window import OpRecorder, RecordOps

# ATen operations whose CUDA kernels are nondeterministic with no deterministic variant: under
# torch.use_deterministic_algorithms(True) (trainer.deterministic=true) they raise. Taken from the list "will throw a
# RuntimeError when mode=True" in the docstring of torch.use_deterministic_algorithms (PyTorch 2.11-2.14). Some raise
# only in the cases the list names (bincount with weights, median with indices, ...); listed whole, to be strict.
NONDETERMINISTIC_ON_CUDA = {
    "avg_pool3d_backward",
    "_adaptive_avg_pool2d_backward",
    "_adaptive_avg_pool3d_backward",
    "adaptive_max_pool2d_backward",
    "fractional_max_pool2d_backward",
    "fractional_max_pool3d_backward",
    "max_unpool2d",
    "max_unpool3d",
    "upsample_linear1d_backward",
    "upsample_bilinear2d_backward",
    "upsample_bicubic2d_backward",
    "upsample_trilinear3d_backward",
    "reflection_pad1d_backward",
    "reflection_pad2d_backward",
    "reflection_pad3d_backward",
    "nll_loss2d_forward",
    "_ctc_loss_backward",
    "_embedding_bag_backward",
    "put_",
    "histc",
    "bincount",
    "median",
    "grid_sampler_2d_backward",
    "scatter_reduce",
}


def data_for(model: str) -> str:
    return "mnist" if model == "lenet5" else "cifar10"


@pytest.fixture(scope="module", params=MODELS)
def recorded_steps(request, tiny_data, tmp_path_factory):
    """The ATen operations of four training steps (batches 2-5) of a run with the default callbacks and logger."""
    model = request.param
    overrides = quick_run(
        tiny_data,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=7",
        "trainer.limit_val_batches=1",
        "test=false",
        model=model,
        data=data_for(model),
        progress_bar=True,
    )
    window = RecordOps(first=2, last=5)
    with pytest.MonkeyPatch.context() as patch:
        # The NaN check reads the loss every step only where reads are free (the CPU); this run takes the path it
        # takes on a GPU, where it keeps the check on the device and reads it every 50 steps.
        patch.setattr(StopOnNonFiniteLoss, "reads_are_free", staticmethod(lambda device: False))
        train(compose_config(overrides, tmp_path_factory.mktemp(model)), extra_callbacks=[window])
    assert window.steps_seen == 4
    return window.recorder


def test_training_steps_read_no_value_back_from_the_device(recorded_steps):
    assert "convolution" in recorded_steps.ops  # the recorder saw the steps
    assert recorded_steps.reads == []


def test_training_steps_use_only_operations_with_deterministic_cuda_kernels(recorded_steps):
    assert "convolution_backward" in recorded_steps.ops
    assert not NONDETERMINISTIC_ON_CUDA & recorded_steps.ops


def test_tensor_loader_keeps_its_normalization_constants_on_its_device():
    # The meta device stands in for a GPU: a copy of the constants to it would show up as a copy between devices.
    images = torch.zeros(100, 3, 8, 8, dtype=torch.uint8, device="meta")
    labels = torch.zeros(100, dtype=torch.int64, device="meta")
    transform = BatchTransform(mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    loader = TensorLoader(images, labels, 16, EpochSampler(100, shuffle=True), transform)
    mean, std = loader.transform.mean, loader.transform.std
    assert mean.device.type == "meta" and std.device.type == "meta"
    batches = iter(loader)
    next(batches)  # the epoch's start copies its permutation to the device, once
    recorder = OpRecorder()
    with recorder:
        x, y = next(batches)
        next(batches)
    assert x.device.type == "meta" and x.dtype == torch.float32
    assert recorder.device_copies == []
    assert loader.transform.mean is mean and loader.transform.std is std


def test_batch_transform_built_apart_from_a_loader_moves_its_constants_once():
    transform = BatchTransform(mean=(0.5,), std=(0.25,))
    x = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8, device="meta")
    transform(x)
    mean = transform.mean
    assert mean.device.type == "meta"
    transform(x)
    assert transform.mean is mean
    cpu = BatchTransform(mean=(0.5,), std=(0.25,))(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(cpu, torch.full((1, 1, 2, 2), 2.0))  # (1 - 0.5) / 0.25


def test_compiled_run_builds_one_training_graph_and_one_evaluation_graph(tiny_data, tmp_path):
    # 500 training images in batches of 32 leave a last batch of 20, which a compiled run drops; evaluation batches
    # of 56 leave last batches of 44 (validation) and 32 (test), which one graph serves. (On a CPU the convolution
    # algorithm depends on whether a batch holds at least 16 images, so smaller last batches would compile apart.)
    overrides = [
        *quick_run(tiny_data),
        "trainer.max_epochs=2",
        "data.eval_batch_size=56",
        "compile.enabled=true",
        "compile.backend=eager",
    ]
    torch._dynamo.reset()
    counters.clear()
    metrics = train(compose_config(overrides, tmp_path))
    assert metrics["global_step"] == 2 * (500 // 32)  # the partial batch was dropped in both epochs
    assert metrics["test_acc"] > 0.5
    assert dict(counters["graph_break"]) == {}
    # graphs: training (grad enabled, train-mode BatchNorm) and evaluation (no grad, any batch size); conv_images
    # runs the model uncompiled
    assert counters["stats"]["unique_graphs"] == 2


def test_uncompiled_run_keeps_every_training_batch(tiny_data, tmp_path):
    metrics = train(compose_config(quick_run(tiny_data, "trainer.max_epochs=1", "test=false"), tmp_path))
    assert metrics["global_step"] == -(-500 // 32)


def test_deterministic_run_goes_without_cudnn_autotuning(tiny_data, tmp_path):
    overrides = quick_run(tiny_data, "trainer.deterministic=true", "trainer.benchmark=true")
    try:
        build_trainer(compose_config(overrides, tmp_path))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.use_deterministic_algorithms(False)


def test_progress_bar_shows_the_loss_of_the_last_step_it_redrew_at(tiny_data, tmp_path):
    from cnnlab.training.progress import SparseRichProgressBar

    class Shown(L.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.shown: list[float | None] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(outputs["loss"].item())
            self.shown.append(bar.get_metrics(trainer, pl_module).get("loss"))

    bar, shown = SparseRichProgressBar(refresh_rate=5), Shown()
    extra = ["callbacks.progress_bar=null", "trainer.max_epochs=1", "trainer.limit_train_batches=12", "test=false"]
    overrides = quick_run(tiny_data, *extra, progress_bar=True)  # only the bar given to train() below
    train(compose_config(overrides, tmp_path), extra_callbacks=[bar, shown])
    losses = shown.losses
    assert shown.shown == [None] * 4 + [losses[4]] * 5 + [losses[9]] * 2 + [losses[11]]
