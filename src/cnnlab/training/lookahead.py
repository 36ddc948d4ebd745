"""Lookahead averaging: slow weights that every few optimizer steps move part of the way to the trained (fast)
weights, which then restart from them; the slow weights are the run's result.

The design is airbench94's (Keller Jordan, cifar10-airbench), part of its 94.01% mean CIFAR-10 accuracy over 1,000
runs: an update every 5 steps, with a decay that grows over the run as 0.95^5 * (t / T)^3 at step t of T, so the
early updates leave the fast weights alone (decay near 0) and the late ones hold them back near an average.
"""

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from cnnlab.errors import UserError
from cnnlab.training.foreach_average import move_average


class Lookahead(WeightAveraging):
    """Keeps slow weights (parameters and BatchNorm buffers) and pulls the fast ones back to them every k steps.

    Lightning's WeightAveraging holds the slow weights (an AveragedModel beside the model), swaps them in for
    validation, writes them as the checkpoint's `state_dict` with the fast weights beside them in
    `current_model_state` (tensors only: the checkpoint loads with weights_only, and a resumed run restores both and
    continues exactly) and copies them into the model when training ends. So validation, best.ckpt, the test stage,
    eval, predict and export all see the slow weights, the ones the run ends with. This subclass adds the update:
    after optimizer step t, when t is a multiple of update_every_n_steps, slow <- slow + (1 - d_t) * (fast - slow)
    and fast <- slow, with d_t = decay^update_every_n_steps * (t / T)^power over the run's T optimizer steps
    (counted as Lightning's global_step, so gradient accumulation counts optimizer steps, not batches). Like
    ema.EMA, it leaves a checkpoint's state_dict in place outside fitting, so the test stage scores the slow
    weights best.ckpt was chosen by.

    Args:
        decay: the decay per optimizer step at the end of the run (0.95: airbench94's).
        update_every_n_steps: optimizer steps between updates (k).
        power: how the decay grows over the run, (t / T)^power.
    """

    def __init__(self, decay: float = 0.95, update_every_n_steps: int = 5, power: float = 3.0) -> None:
        if not 0.0 <= decay <= 1.0 or update_every_n_steps < 1 or power < 0.0:
            raise ValueError(
                f"Lookahead needs 0 <= decay <= 1, update_every_n_steps >= 1 and power >= 0; got {decay}, "
                f"{update_every_n_steps}, {power}."
            )
        super().__init__(use_buffers=True)
        self.decay, self.update_every_n_steps, self.power = decay, update_every_n_steps, power
        self.total_steps = 0  # the run's optimizer steps, known once training starts

    def decay_at(self, step: int, total_steps: int) -> float:
        """d_t of the update after optimizer step `step` of total_steps: 0 copies the fast weights into the slow."""
        return self.decay**self.update_every_n_steps * min(step / total_steps, 1.0) ** self.power

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        others = [c for c in trainer.callbacks if isinstance(c, WeightAveraging) and c is not self]
        if others:  # two callbacks would each swap their own weights in for validation and checkpoints
            raise UserError(
                f"Lookahead keeps the weights a run is judged by, and so does {type(others[0]).__name__}; use one "
                "of them (callbacks.ema=null or callbacks.lookahead=null)."
            )
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        if total == float("inf"):
            raise UserError("Lookahead's schedule spans the run: set trainer.max_epochs or trainer.max_steps.")
        self.total_steps = int(total)

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step <= self._latest_update_step or step % self.update_every_n_steps:
            return  # no optimizer step since the last update (gradient accumulation), or not an update step
        weight = 1.0 - self.decay_at(step, self.total_steps)
        # slow <- slow + (1 - d_t) * (fast - slow), then fast <- slow; BatchNorm's step counters: the fast ones count on
        move_average(self._average_model.module, pl_module, weight, restart=True)
        self._latest_update_step = step

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Outside fit (the test stage after training) the checkpoint's state_dict, the slow weights, is what is scored.
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
