"""The networks: shapes, parameter counts, the residual block's shortcut, and the config-built models."""

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from cnnlab.models import LeNet5, ResBlk, ResNet, ResNet9
from tests.conftest import DATASETS, MODELS, compose_config


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_lenet5_classic_mnist_configuration_has_61706_parameters():
    assert n_params(LeNet5(in_channels=1, num_classes=10, image_size=28)) == 61_706


def test_lenet5_pads_28x28_inputs_to_the_classic_32x32_geometry():
    model = LeNet5(image_size=28)
    assert model.conv1.padding == (2, 2)
    assert model.fc1.in_features == 16 * 5 * 5
    assert LeNet5(in_channels=3, image_size=32).conv1.padding == (0, 0)


@pytest.mark.parametrize("activation,pooling,batch_norm", [("tanh", "avg", False), ("relu", "max", True)])
def test_lenet5_variants_classify_a_batch(activation, pooling, batch_norm):
    model = LeNet5(
        in_channels=3, num_classes=7, image_size=32, activation=activation, pooling=pooling, batch_norm=batch_norm
    )
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 7)


def test_lenet5_rejects_an_unknown_activation_by_name():
    with pytest.raises(ValueError, match="activation='gelu'"):
        LeNet5(activation="gelu")


def test_resblk_keeps_identity_shortcut_when_shape_is_kept():
    block = ResBlk(16, 16, stride=1)
    assert isinstance(block.shortcut, nn.Identity)
    assert block(torch.randn(2, 16, 8, 8)).shape == (2, 16, 8, 8)


@pytest.mark.parametrize("in_ch,out_ch,stride", [(16, 32, 1), (16, 32, 2), (16, 16, 2)])
def test_resblk_projects_shortcut_when_channels_or_stride_change(in_ch, out_ch, stride):
    block = ResBlk(in_ch, out_ch, stride=stride)
    conv, bn = block.shortcut
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (stride, stride)
    assert isinstance(bn, nn.BatchNorm2d)
    # conv2 maps out_ch to out_ch: the course-notes block built it from in_ch, which only works when they agree
    assert block.conv2.in_channels == out_ch
    out = block(torch.randn(2, in_ch, 8, 8))
    assert out.shape == (2, out_ch, 8 // stride, 8 // stride)
    assert (out >= 0).all(), "ReLU comes after the sum"


def test_resblk_gradient_reaches_input_through_both_paths():
    block = ResBlk(8, 16, stride=2)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    block(x).sum().backward()
    assert block.shortcut[0].weight.grad.abs().sum() > 0 and block.conv1.weight.grad.abs().sum() > 0


def test_resnet18_has_the_cifar_parameter_count():
    assert n_params(ResNet(3, 10)) == 11_173_962


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (2, 20, 24), (3, 64, 64)])
def test_resnet_works_for_any_channels_classes_and_image_size(shape):
    model = ResNet(shape[0], 5, widths=[8, 16], depths=[1, 1], strides=[1, 2])
    assert model(torch.randn(2, *shape)).shape == (2, 5)


def resnet9_with_adaptive_max_pool() -> ResNet9:
    """ResNet-9 as it was first written, with nn.AdaptiveMaxPool2d(1) (no deterministic CUDA backward)."""
    model = ResNet9(widths=[8, 16, 16, 32])
    model.pool = nn.AdaptiveMaxPool2d(1)
    return model


def test_resnet9_global_max_pool_keeps_the_checkpoint_keys_of_adaptive_max_pooling():
    assert list(ResNet9().state_dict()) == list(resnet9_with_adaptive_max_pool().state_dict()) != []


def test_resnet9_global_max_pool_gives_the_outputs_and_gradients_of_adaptive_max_pooling():
    torch.manual_seed(0)
    old = resnet9_with_adaptive_max_pool()
    new = ResNet9(widths=[8, 16, 16, 32])
    new.load_state_dict(old.state_dict())
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(new.pool(x), old.pool(x))
    assert torch.equal(new(x), old(x))
    x_old, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    old(x_old).square().sum().backward()
    new(x_new).square().sum().backward()  # random activations do not tie for a maximum: one gradient for both
    assert torch.allclose(x_new.grad, x_old.grad, atol=1e-6)


def test_resnet9_trains_under_deterministic_algorithms():
    model = ResNet9(widths=[8, 16, 16, 32])
    try:
        torch.use_deterministic_algorithms(True)
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
        loss.backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert model.prep[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("model", ["airbench", "resnet9"])
def test_logit_scale_multiplies_the_logits_exactly(model, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    weights, logits = None, {}
    for scale in (1.0, 0.25):  # a power of two: scaling is exact in floating point
        cfg = compose_config([f"model={model}", "data=cifar10", f"model.logit_scale={scale}"], tmp_path)
        net = instantiate(cfg.model).eval()
        weights = weights or net.state_dict()
        net.load_state_dict(weights)  # the same weights at both scales
        with torch.no_grad():
            logits[scale] = net(x)
    assert logits[1.0].abs().max() > 1e-3  # the logits are not all zero
    assert torch.equal(logits[0.25], 0.25 * logits[1.0])


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_model_config_builds_a_model_for_the_data_config(model, data, tmp_path):
    cfg = compose_config([f"model={model}", f"data={data}"], tmp_path)
    net = instantiate(cfg.model)
    c, h, w = cfg.data.image_shape
    net.eval()
    with torch.no_grad():
        assert net(torch.zeros(2, c, h, w)).shape == (2, cfg.data.num_classes)


@pytest.mark.parametrize("experiment", ["lenet5_mnist", "resnet18_cifar10", "mnist_fast", "cifar10_fast"])
def test_experiment_recipes_compose_and_build_their_model(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    assert cfg.task == experiment
    c, h, w = cfg.data.image_shape
    assert instantiate(cfg.model).eval()(torch.zeros(1, c, h, w)).shape == (1, cfg.data.num_classes)
