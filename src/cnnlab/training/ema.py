"""An exponential moving average (EMA) of the weights, warmed up, and the one set of weights a run is judged by.

The average is Lightning's WeightAveraging machinery (an AveragedModel beside the trained one, BatchNorm statistics
averaged too, swapped in for validation, written as the checkpoint's `state_dict` with the raw weights beside it in
`current_model_state`). Three things differ from Lightning's EMAWeightAveraging:

- Warm-up. Update n (counting from 0) mixes in the current weights with decay min(decay, (1 + n) / (warmup + n)), as
  TensorFlow's ExponentialMovingAverage does with num_updates: the first updates follow the weights closely, so the
  average is worth validating from the first epoch, and the untrained start fades out. With a constant decay of 0.99
  every 5 steps, a 12-epoch CIFAR-10 run (about 200 updates) still held 12% of the untrained weights at its end.
- One set of weights outside training. Validation, the choice of best.ckpt, the test stage after training, eval,
  predict and export all use the averaged weights: a checkpoint's `state_dict`. Lightning's callback would put the
  raw weights back whenever a checkpoint is loaded, so the test stage after fit scored other weights than the ones
  best.ckpt was chosen by and eval scores; here the raw weights are restored only to continue training.
- No waiting for the GPU. The update itself is done here, with its count on the host: AveragedModel's own update
  reads its device-side count twice per update. It writes into WeightAveraging's `_average_model` (no public
  accessor); tests/test_run_semantics.py checks the average against the formula, so a Lightning change that moves
  it fails there.
"""

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from cnnlab.training.foreach_average import move_average


class EMA(WeightAveraging):
    """Keeps an exponential moving average of the model's weights and BatchNorm statistics.

    Args:
        decay: the decay per update once warmed up (0.99: the average spans about the last 100 updates).
        update_every_n_steps: optimizer steps between updates.
        warmup: update n uses decay min(decay, (1 + n) / (warmup + n)); 10 reaches 0.9 after 80 updates.
    """

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1, warmup: float = 10.0) -> None:
        if not 0.0 <= decay < 1.0 or update_every_n_steps < 1 or warmup < 1.0:
            raise ValueError(
                f"EMA needs 0 <= decay < 1, update_every_n_steps >= 1 and warmup >= 1; got {decay}, "
                f"{update_every_n_steps}, {warmup}."
            )
        super().__init__(use_buffers=True)
        self.decay, self.update_every_n_steps, self.warmup = decay, update_every_n_steps, warmup
        self.updates = 0  # updates made so far, counted on the host so that no step waits for the device
        self.updated_at_step = 0  # the optimizer step after which the average was last updated

    def decay_of_update(self, n: int) -> float:
        """The decay that update n (from 0) applies: 0 copies the weights, values near 1 change the average little."""
        return min(self.decay, (1 + n) / (self.warmup + n)) if n > 0 else 0.0

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # Replaces AveragedModel.update_parameters, which tests its device-side update count in Python twice per
        # update (each test makes the host wait for the GPU): the count lives on the host here.
        if trainer.global_step <= self.updated_at_step:
            return  # no optimizer step since the last update: before the first, or within an accumulation window
        if not self.should_update(step_idx=trainer.global_step - 1):
            return
        average = self._average_model
        weight = 1.0 - self.decay_of_update(self.updates)
        move_average(average.module, pl_module, weight)  # avg <- decay * avg + (1 - decay) * now; counters copied
        self.updates += 1
        self.updated_at_step = trainer.global_step
        average.n_averaged.fill_(self.updates)  # AveragedModel's own count, saved with the average; no read

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Outside fit (the test stage after training) the checkpoint's state_dict, the average, is what is scored.
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "updated_at_step": self.updated_at_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates, self.updated_at_step = state_dict["updates"], state_dict["updated_at_step"]
