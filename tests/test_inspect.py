"""The model inspector and the TensorBoard pictures of convolution."""

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from cnnlab.commands.train import train
from cnnlab.models import LeNet5
from cnnlab.tools.inspect_model import layer_table
from cnnlab.training.conv_images import feature_map_grid, filter_grid, first_conv
from tests.conftest import DATASETS, MODELS, compose_config, quick_run
from tests.launch import run_script, tensorboard_events


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_inspector_shapes_match_a_real_forward_pass(model, data, tmp_path):
    cfg = compose_config([f"model={model}", f"data={data}"], tmp_path)
    net = instantiate(cfg.model).eval()
    shape = tuple(cfg.data.image_shape)
    real = {}

    def record(name):
        def hook(module, inputs, output):  # returns None, so the output passes through unchanged
            real.setdefault(name, tuple(output.shape[1:]))

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in net.named_modules() if not list(m.children())]
    with torch.no_grad():
        out = net(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    rows = layer_table(net, shape)
    assert {r.name for r in rows} == set(real)
    for row in rows:
        assert row.output_shape == real[row.name]
        assert row.agrees, f"{row.name}: formula {row.predicted_shape} vs forward {row.output_shape}"
    assert rows[-1].output_shape == tuple(out.shape[1:])
    assert sum(r.params for r in rows) == sum(p.numel() for p in net.parameters())


def test_inspector_counts_lenet5_macs_and_receptive_fields():
    rows = {r.name: r for r in layer_table(LeNet5(), (1, 28, 28))}
    assert rows["conv1"].macs == 6 * 28 * 28 * 25 and rows["conv2"].macs == 16 * 10 * 10 * 6 * 25
    assert (rows["conv1"].receptive_field, rows["pool1"].receptive_field, rows["conv2"].receptive_field) == (5, 6, 14)
    assert (rows["pool2"].receptive_field, rows["pool2"].stride) == (16, 4)
    assert rows["fc1"].receptive_field is None  # a fully connected unit sees the whole image


def test_inspector_flags_a_layer_whose_formula_disagrees(monkeypatch):
    import cnnlab.tools.inspect_model as inspector

    monkeypatch.setattr(inspector, "conv_output_size", lambda n, *a: tuple(v + 1 for v in n))
    rows = {r.name: r for r in layer_table(LeNet5(), (1, 28, 28))}
    assert not rows["conv1"].agrees


def test_inspect_script_prints_plain_text_when_piped(tmp_path):
    result = run_script("inspect_model", "model=resnet18", "data=cifar10", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[1].split()[:4] == ["layer", "type", "output", "formula"]
    assert "━" not in result.stdout and "│" not in result.stdout  # no Rich box drawing in a pipe
    assert lines[-1].split()[:2] == ["total", "11,173,962"]
    assert not list(tmp_path.iterdir())  # it writes nothing


def test_filter_and_feature_map_grids_are_images_in_unit_range():
    grid = filter_grid(LeNet5().conv1.weight)
    assert grid.shape[0] == 3 and grid.min() >= 0 and grid.max() <= 1
    maps = feature_map_grid(torch.randn(6, 28, 28))
    assert maps.shape[0] == 3 and maps.min() >= 0 and maps.max() <= 1
    with pytest.raises(ValueError, match="no convolution"):
        first_conv(nn.Linear(3, 3))


def test_training_logs_filters_and_feature_maps_every_epoch(tiny_data, tmp_path):
    overrides = [
        *quick_run(tiny_data),
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "callbacks.conv_images.every_n_epochs=1",
    ]
    train(compose_config(overrides, tmp_path))
    events = tensorboard_events(tmp_path)
    assert {"conv1/filters", "conv1/feature_maps"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("conv1/filters")] == [0, 1, 2]
