"""Learning-rate schedules that torch.optim.lr_scheduler has no single class for."""

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from cnnlab.errors import UserError


class FactorSchedule(LRScheduler):
    """A per-step schedule that sets each group's rate to its base rate times factor(step), which a subclass
    defines; the rate depends on the step alone, so the closed form is the same."""

    def factor(self, step: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


class LinearWarmupDecay(FactorSchedule):
    """Each group's rate rises linearly from start_factor x its base rate to the base rate at step
    int(peak_fraction x total_steps), then falls linearly to end_factor x the base rate at total_steps.

    torch's LinearLR twice under SequentialLR draws the same curve, but SequentialLR takes scheduler objects, which a
    `_target_` config and a checkpoint's plain hyperparameters cannot hold. This is airbench94's LambdaLR schedule
    (0.2 -> 1 at 23% of the steps -> 0.07) as one class; its state is plain numbers, so it saves with a checkpoint.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        start_factor: float = 0.2,
        peak_fraction: float = 0.23,
        end_factor: float = 0.07,
        last_epoch: int = -1,
    ) -> None:
        if total_steps < 1 or not 0 <= peak_fraction <= 1 or start_factor < 0 or end_factor < 0:
            raise UserError(
                f"scheduler: total_steps={total_steps}, peak_fraction={peak_fraction}, start_factor={start_factor}, "
                f"end_factor={end_factor} do not make a schedule: total_steps must be at least 1, peak_fraction "
                "within [0, 1] and the factors 0 or more. Fix them in configs/scheduler or on the command line."
            )
        self.total_steps, self.peak_fraction = total_steps, peak_fraction
        self.start_factor, self.end_factor = start_factor, end_factor
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The multiple of the base rate at step (the number of optimizer steps taken)."""
        peak = int(self.total_steps * self.peak_fraction)
        if step < peak:
            return self.start_factor + (1 - self.start_factor) * step / peak
        done = (min(step, self.total_steps) - peak) / max(self.total_steps - peak, 1)
        return 1 + (self.end_factor - 1) * done


class WarmupCosine(FactorSchedule):
    """Each group's rate rises linearly from start_factor x its base rate to the base rate over the first
    int(warmup_fraction x total_steps) steps, then follows a half cosine down to end_factor x the base rate at
    total_steps.

    torchvision's classification reference builds this from LinearLR and CosineAnnealingLR under SequentialLR,
    stepped per epoch (--lr-warmup-epochs, --lr-warmup-decay); SequentialLR takes scheduler objects, which a config
    cannot hold, so it is one class here, stepped per batch, its state plain numbers.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        start_factor: float = 0.01,
        warmup_fraction: float = 0.1,
        end_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if total_steps < 1 or not 0 <= warmup_fraction < 1 or start_factor < 0 or end_factor < 0:
            raise UserError(
                f"scheduler: total_steps={total_steps}, warmup_fraction={warmup_fraction}, start_factor="
                f"{start_factor}, end_factor={end_factor} do not make a schedule: total_steps must be at least 1, "
                "warmup_fraction within [0, 1) and the factors 0 or more. Fix them in configs/scheduler or on the "
                "command line."
            )
        self.total_steps, self.warmup_fraction = total_steps, warmup_fraction
        self.start_factor, self.end_factor = start_factor, end_factor
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The multiple of the base rate at step (the number of optimizer steps taken)."""
        warmup = int(self.total_steps * self.warmup_fraction)
        if step < warmup:
            return self.start_factor + (1 - self.start_factor) * step / warmup
        done = (min(step, self.total_steps) - warmup) / max(self.total_steps - warmup, 1)
        return self.end_factor + (1 - self.end_factor) * 0.5 * (1 + math.cos(math.pi * done))
