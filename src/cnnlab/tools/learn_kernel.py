"""Learn the 1x2 vertical-edge kernel back from an image and its edge map, by gradient descent on a conv layer."""

import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from cnnlab.errors import UserError
from cnnlab.ops.correlation import corr2d

EDGE_KERNEL = ((1.0, -1.0),)  # +1 where a light pixel is followed by a dark one, -1 for dark to light


def band_image() -> Tensor:
    """A 6x8 image of ones with a dark vertical band: columns 2 to 5 are zero."""
    image = torch.ones(6, 8)
    image[:, 2:6] = 0
    return image


def learn_edge_kernel(steps: int = 50, lr: float = 0.5, log_every: int = 5, seed: int = 0) -> dict:
    """Fit nn.Conv2d(1, 1, (1, 2)) to map band_image() to its edge map; it should recover [1, -1] and a zero bias.

    Args:
        steps: full-batch SGD steps on the mean squared error.
        lr: SGD step size. The loss's largest Hessian eigenvalue is 2.96, so steps above 2 / 2.96 = 0.67 diverge.
        log_every: record the loss every this many steps (and at the last step).
        seed: seeds the layer's random initial kernel and bias, without touching the global random state.

    Returns:
        A dict with image (6, 8), edges (6, 7), kernel (1, 2), bias (float) and losses, a list of (step, loss).
    """
    if steps < 1 or log_every < 1 or not lr > 0:
        raise UserError(f"steps and log_every must be at least 1 and lr above 0; got {steps=}, {log_every=}, {lr=}.")
    image = band_image()
    edges = corr2d(image, torch.tensor(EDGE_KERNEL))  # (6, 8) -> (6, 7)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        conv = nn.Conv2d(1, 1, kernel_size=(1, 2))
    optimizer = torch.optim.SGD(conv.parameters(), lr=lr)
    x = image[None, None]  # (6, 8) -> (1, 1, 6, 8)
    y = edges[None, None]  # (6, 7) -> (1, 1, 6, 7)

    losses = []
    for step in range(1, steps + 1):
        loss = F.mse_loss(conv(x), y)
        if not math.isfinite(loss.item()):
            raise UserError(f"the loss became {loss.item()} at step {step}: lr={lr} is too large; try lr=0.5 or less.")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            losses.append((step, loss.item()))

    return {
        "image": image,
        "edges": edges,
        "kernel": conv.weight.detach().view(1, 2).clone(),
        "bias": conv.bias.item(),
        "losses": losses,
    }


def _grid(t: Tensor) -> str:
    return "\n".join(" ".join(f"{v:2.0f}" for v in row.tolist()) for row in t)


def format_report(result: dict) -> str:
    """The image, its edge map, the logged losses and the learned kernel and bias, as printable text."""
    kernel = ", ".join(f"{v:+.4f}" for v in result["kernel"].flatten().tolist())
    lines = [
        "Image (ones with a dark band in columns 2-5):",
        _grid(result["image"]),
        "Edge map = corr2d(image, [[1, -1]]):",
        _grid(result["edges"]),
        *(f"step {step:4d}  loss {loss:.2e}" for step, loss in result["losses"]),
        f"Learned kernel: [[{kernel}]]  (target [[+1, -1]])",
        f"Learned bias: {result['bias']:+.4f}  (target 0)",
    ]
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict:
    """Learn the kernel with the settings in cfg (configs/learn_kernel.yaml) and print the report."""
    result = learn_edge_kernel(steps=cfg.steps, lr=cfg.lr, log_every=cfg.log_every, seed=cfg.seed)
    print(format_report(result))
    return result
