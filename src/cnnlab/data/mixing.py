"""MixUp and CutMix of training batches: torchvision's v2.MixUp / v2.CutMix, seeded per batch.

MixUp (Zhang et al., 2018) blends each image with another of the batch, lambda ~ Beta(alpha, alpha); CutMix (Yun et
al., 2019) pastes a box of another image, its area 1 - lambda. Either way the labels become soft targets, the two
one-hot labels weighted by the pixels' shares. With both alphas set one of the two is chosen per batch with equal
odds, as torchvision's classification reference does.

torchvision draws lambda and the box from torch's global generator, which every DDP rank seeds alike and which a
resumed run does not restore. Each batch here draws from a generator seeded by (the run's seed, the count of
training batches before it, the rank), under torch.random.fork_rng, so ranks mix differently and a run resumed
after a kill mixes every later batch as the uninterrupted run did.
"""

import torch
from torch import Tensor
from torchvision.transforms import v2

from cnnlab.data.tensor_loader import stream_seed
from cnnlab.errors import UserError

MIX = 3  # the random stream of the mixing (tensor_loader's streams are 0-2)


def check_mixing(mixup_alpha: float, cutmix_alpha: float) -> None:
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise UserError(
            f"data.mixup_alpha={mixup_alpha} and data.cutmix_alpha={cutmix_alpha} must be 0 (off) or more: the "
            "alpha of the Beta(alpha, alpha) distribution of the mixing weight (the reference uses 0.2 and 1.0)."
        )


class BatchMixing:
    """Mixes a training batch of normalized images and integer labels into images and soft targets (B, K)."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int, seed: int) -> None:
        choices = []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(choices) if choices else None
        self.seed = seed

    @property
    def mixes(self) -> bool:
        return self.mix is not None

    def __call__(self, images: Tensor, labels: Tensor, batches_before: int, rank: int = 0) -> tuple[Tensor, Tensor]:
        """The batch mixed with the draws of training batch number batches_before (from 0) of the run on rank."""
        if self.mix is None:
            return images, labels
        with torch.random.fork_rng(devices=[]):  # lambda, the box and the choice are drawn on the CPU
            torch.manual_seed(stream_seed(self.seed, batches_before, MIX, rank))
            return self.mix(images, labels)
