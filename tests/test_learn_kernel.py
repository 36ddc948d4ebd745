"""Gradient descent recovers the [1, -1] edge kernel, from Python and from scripts/learn_kernel.py."""

import re
from pathlib import Path

import pytest
import torch

from cnnlab.errors import UserError
from cnnlab.tools.learn_kernel import learn_edge_kernel
from tests.launch import run_script


def test_learn_edge_kernel_converges_to_plus_one_minus_one_and_zero_bias() -> None:
    result = learn_edge_kernel()
    torch.testing.assert_close(result["kernel"], torch.tensor([[1.0, -1.0]]), rtol=0, atol=0.05)
    assert abs(result["bias"]) < 0.05


def test_learn_edge_kernel_lowers_the_loss_by_orders_of_magnitude() -> None:
    steps, losses = zip(*learn_edge_kernel(steps=40, log_every=10)["losses"], strict=True)
    assert steps == (10, 20, 30, 40)
    assert losses[-1] < losses[0] / 100


def test_learn_edge_kernel_is_reproducible_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = learn_edge_kernel(steps=3, seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    assert torch.equal(learn_edge_kernel(steps=3, seed=5)["kernel"], first["kernel"])
    assert not torch.equal(learn_edge_kernel(steps=3, seed=6)["kernel"], first["kernel"])


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"log_every": 0}, {"lr": 0.0}])
def test_learn_edge_kernel_rejects_settings_that_cannot_train(kwargs: dict) -> None:
    with pytest.raises(UserError, match="must be at least 1"):
        learn_edge_kernel(**kwargs)


def test_learn_edge_kernel_reports_divergence_when_lr_is_too_large() -> None:
    with pytest.raises(UserError, match="lr=5.0 is too large"):
        learn_edge_kernel(steps=200, lr=5.0)


@pytest.mark.parametrize(("lr", "converges"), [(0.66, True), (0.69, False)])
def test_learn_edge_kernel_converges_only_for_lr_below_the_stability_limit(lr: float, converges: bool) -> None:
    # The mean squared error's Hessian in (kernel, bias) has largest eigenvalue 2.96, so SGD is stable for lr < 0.676.
    losses = [loss for _, loss in learn_edge_kernel(steps=200, lr=lr, log_every=100)["losses"]]
    assert (losses[-1] < losses[0]) == converges


def test_learn_kernel_script_prints_the_learned_kernel_and_writes_no_files(tmp_path: Path) -> None:
    proc = run_script("learn_kernel", "steps=40", "log_every=20", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "step   20  loss" in proc.stdout
    match = re.search(r"Learned kernel: \[\[([-+.\d]+), ([-+.\d]+)\]\]", proc.stdout)
    assert match, proc.stdout
    assert abs(float(match[1]) - 1) < 0.05 and abs(float(match[2]) + 1) < 0.05
    assert list(tmp_path.iterdir()) == []


def test_learn_kernel_script_reports_bad_settings_without_a_traceback(tmp_path: Path) -> None:
    proc = run_script("learn_kernel", "steps=0", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Error: steps and log_every must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr
