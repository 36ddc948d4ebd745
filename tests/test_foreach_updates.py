"""The multi-tensor (torch._foreach_*) updates that cut a step's dispatched operations compute what the per-tensor
loops they replaced computed, bit for bit on the CPU, and the cached crop indices change no batch."""

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from cnnlab.data.tensor_loader import BatchTransform
from cnnlab.tools.benchmark import OpCounter
from cnnlab.training.foreach_average import move_average
from cnnlab.training.param_groups import make_optimizer
from tests.conftest import compose_config


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def trained_copy(net: nn.Module, steps: int = 3) -> nn.Module:
    """A copy of net moved by a few SGD steps (weights and BatchNorm statistics), so it differs from net."""
    moved = copy.deepcopy(net)
    optimizer = torch.optim.SGD(moved.parameters(), lr=0.1)
    for step in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        moved(x).square().mean().backward()
        optimizer.step()
    return moved


@pytest.mark.parametrize("restart", [False, True])
def test_move_average_equals_the_per_tensor_lerp_loop_bit_for_bit(restart):
    average, model = small_net(), trained_copy(small_net())
    expected_average, expected_model = copy.deepcopy(average), copy.deepcopy(model)
    with torch.no_grad():  # the loop EMA and Lookahead ran before
        for avg, now in zip([*expected_average.parameters(), *expected_average.buffers()],
                            [*expected_model.parameters(), *expected_model.buffers()]):  # fmt: skip
            if avg.is_floating_point():
                avg.lerp_(now, 0.3)
                if restart:
                    now.copy_(avg)
            else:
                avg.copy_(now)
    move_average(average, model, 0.3, restart=restart)
    for got, want in ((average, expected_average), (model, expected_model)):
        for (name, a), b in zip(got.state_dict().items(), want.state_dict().values()):
            assert torch.equal(a, b), name
    counter = average[1].num_batches_tracked
    assert counter == 3 and counter.dtype == torch.int64  # copied, not averaged


@pytest.mark.parametrize("optimizer", ["sgd", "sgd_norm_bias"])
def test_the_shipped_sgd_configs_update_by_foreach_exactly_as_the_per_tensor_loop(optimizer, tmp_path):
    cfg = compose_config([f"optimizer={optimizer}"], tmp_path).optimizer
    assert cfg.foreach is True
    results = []
    for foreach in (True, False):
        net = small_net()
        config = {**OmegaConf.to_container(cfg, resolve=True), "foreach": foreach}
        opt = make_optimizer(config, net.parameters(), net)
        for step in range(4):
            x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
        assert all(g["foreach"] is foreach for g in opt.param_groups)
        results.append(net.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_cached_crop_indices_give_the_batches_a_fresh_transform_gives():
    images = torch.randint(0, 256, (6, 3, 10, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reused = BatchTransform([0.5] * 3, [0.25] * 3, crop_padding=2, crop_pad_mode="reflect")
    for batch in (images, images[:4], images[:, :, :8, :9], images):  # sizes change, and come back
        fresh = BatchTransform([0.5] * 3, [0.25] * 3, crop_padding=2, crop_pad_mode="reflect")
        want = fresh(batch, torch.Generator().manual_seed(1))
        assert torch.equal(reused(batch, torch.Generator().manual_seed(1)), want)
    assert len(reused.positions) == 2  # one entry per image size
    counts = []
    for _ in range(2):
        with OpCounter() as counter:
            reused(images, torch.Generator().manual_seed(1))
        counts.append(counter.count)
    assert counts[1] == counts[0] and counts[0] <= 15  # no index built again: randint x2, the gathers, normalize
