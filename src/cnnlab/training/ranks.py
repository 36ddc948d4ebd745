"""Decisions that every process of a distributed run must take together (stop, save), or they deadlock.

In a DDP run each step ends in a gradient all-reduce and each checkpoint save in a barrier: a process that stops or
saves alone leaves the others waiting there for ever. Each decision is therefore reduced across processes (one small
all-reduce, which also makes the host wait for the device), and only at steps every process reaches at the same
time. A single-process run pays nothing.
"""

import lightning as L

# Steps between two agreements on a host-side event (a signal, the time since the last save) in a multi-process run:
# such an event is acted on at most this many steps after it happens.
AGREE_EVERY_N_STEPS = 10


def any_rank(trainer: L.Trainer, flag: bool) -> bool:
    """True on every process when flag is true on at least one; every process must call it at the same point."""
    if trainer.world_size == 1:
        return flag
    return trainer.strategy.reduce_boolean_decision(flag, all=False)


def agreement_due(trainer: L.Trainer) -> bool:
    """Whether this step is one where the processes compare host-side events (every step in a single process)."""
    return trainer.world_size == 1 or trainer.global_step % AGREE_EVERY_N_STEPS == 0
