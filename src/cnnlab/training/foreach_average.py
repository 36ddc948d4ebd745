"""One update of a weight average (EMA, Lookahead) over all of a model's tensors at once, with torch's multi-tensor
(`torch._foreach_*`) operations: a few dispatched operations per update instead of a few per tensor.

airbench's net has 39 tensors: a per-tensor loop dispatched about 105 operations at each Lookahead update (every 5
steps), two multi-tensor calls dispatch 2. On the CPU each multi-tensor call runs the same per-tensor kernel, so the
result is bit-identical to the loop (tests/test_recipe_parts.py checks it).
"""

import itertools

import torch
from torch import Tensor, nn


def paired_tensors(
    average: nn.Module, model: nn.Module
) -> tuple[list[Tensor], list[Tensor], list[tuple[Tensor, Tensor]]]:
    """The average's parameters and buffers beside the model's, in the same order: the floating ones as two lists,
    and the others (BatchNorm's num_batches_tracked counters) as pairs."""
    averaged, current, counters = [], [], []
    pairs = zip(
        itertools.chain(average.parameters(), average.buffers()),
        itertools.chain(model.parameters(), model.buffers()),
        strict=True,
    )
    for avg, now in pairs:
        if avg.is_floating_point():
            averaged.append(avg)
            current.append(now)
        else:
            counters.append((avg, now))
    return averaged, current, counters


@torch.no_grad()
def move_average(average: nn.Module, model: nn.Module, weight: float, restart: bool = False) -> None:
    """average <- average + weight * (model - average) for every floating tensor; the counters copied from model.

    restart: then model <- average too (Lookahead's fast weights restarting from the slow ones).
    """
    averaged, current, counters = paired_tensors(average, model)
    if averaged:
        torch._foreach_lerp_(averaged, current, weight)
        if restart:
            torch._foreach_copy_(current, averaged)
    for avg, now in counters:
        avg.copy_(now)
