"""A loader for datasets held whole in memory (on the GPU when training there) as one uint8 tensor.

Batches are formed by indexing a seeded permutation; normalization, random crop (translation) and flip run on the
whole batch on the device, or on the whole epoch at its start (augment_each="epoch"), after which a batch is a slice.
This removes the per-image Python work (PIL conversion, per-sample transforms, collation) that makes up most of an
epoch of a small network on the usual Dataset/DataLoader path.
"""

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from cnnlab.data.erasing import cutout, random_erasing

ORDER, AUGMENT = 0, 1  # the two random streams of an epoch: the data order and the augmentations
FIRST_FLIPS = 2  # the stream of the run's one draw of which images alternating flip mirrors in even epochs
FLIPS = ("none", "random", "alternating")
PAD_MODES = ("zeros", "reflect")
AUGMENT_EACH = ("batch", "epoch")


def flip_mode(flip: bool | str | None) -> str:
    """The flip mode a data config's `flip` names: true (configs before the modes existed) is random, false none."""
    if flip is True:
        return "random"
    if flip is False or flip is None:
        return "none"
    return str(flip)


def first_epoch_flips(seed: int, n: int, device: torch.device | str = "cpu") -> Tensor:
    """Which of a split's n images alternating flip mirrors in even epochs (a fair coin each, drawn once from seed);
    odd epochs mirror the others.

    airbench94 (Keller Jordan, cifar10-airbench) mirrors each image in every other epoch instead of in a random half
    of them: over any two epochs every image is seen both ways. The coin is per dataset index, not per batch
    position, so DDP ranks and a resumed run agree on it.
    """
    generator = torch.Generator().manual_seed(stream_seed(seed, 0, FIRST_FLIPS))
    return (torch.rand(n, generator=generator) < 0.5).to(device)


def reflect_indices(size: int, padding: int, device: torch.device) -> Tensor:
    """Source positions along one axis of a reflect-padded axis: -1 -> 1, size -> size - 2, as numpy's 'reflect'."""
    positions = torch.arange(-padding, size + padding, device=device).abs()
    return torch.where(positions > size - 1, 2 * (size - 1) - positions, positions)


def stream_seed(seed: int, epoch: int, stream: int, rank: int = 0) -> int:
    """A seed for one random stream of one epoch (and rank), independent of every other (seed, epoch, rank, stream).

    numpy's SeedSequence hashes the run's seed with the rest, so seed 43's first epoch shares nothing with seed 42's
    second (as `seed + epoch` would make it), and a study over seeds 1, 2, 3 draws independent data orders.
    """
    sequence = np.random.SeedSequence(seed % 2**64, spawn_key=(epoch, stream, rank))
    return int(sequence.generate_state(1, dtype=np.uint64)[0])


class EpochSampler:
    """Indices of one epoch: a permutation drawn from (seed, epoch), sharded across ranks as DistributedSampler does.

    Each rank gets every world_size-th index of the permutation, so ranks see disjoint shards. With pad (training)
    the permutation is first padded by wrapping around so that every rank gets the same number of samples, as DDP's
    per-step gradient exchange needs; without pad (evaluation) the shards may differ by one sample and together hold
    every sample exactly once, so metrics gathered across ranks count each sample once.
    Lightning calls set_epoch at the start of every training epoch.
    """

    def __init__(
        self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1, pad: bool = True
    ) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world_size = n, shuffle, seed, rank, world_size
        self.pad = pad
        self.epoch = 0
        self.num_samples = math.ceil(n / world_size) if pad else len(range(rank, n, world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch, ORDER))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if not self.pad:
            return order[self.rank :: self.world_size]
        total = self.num_samples * self.world_size
        if total > self.n:  # pad by wrapping around, as DistributedSampler does
            order = torch.cat([order, order[: total - self.n]])
        return order[self.rank : total : self.world_size]

    def __len__(self) -> int:
        return self.num_samples


class BatchTransform:
    """uint8 batch -> normalized float batch, with optional augmentation of each image.

    Matches torchvision's [per-image steps] + RandomCrop(size, padding, padding_mode) + RandomHorizontalFlip +
    ToTensor + Normalize + RandomErasing per image. flip: "none", "random" (each image with probability 1/2) or
    "alternating" (the caller says which images, see first_epoch_flips); true and false stand for random and none.
    per_image: policies.per_image_stage's random-resized crop and policy; erasing: the probability of random erasing;
    cutout_size: the side of cutout's square in pixels (erasing.py).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 0,
        flip: bool | str = False,
        crop_pad_mode: str = "zeros",
        per_image: Callable[[Tensor, torch.Generator | None], Tensor] | None = None,
        erasing: float = 0.0,
        cutout_size: int = 0,
    ) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.crop_padding, self.flip, self.crop_pad_mode = crop_padding, flip_mode(flip), crop_pad_mode
        self.per_image, self.erasing, self.cutout_size = per_image, erasing, cutout_size
        self.fill = self.mean.flatten().round().clamp(0, 255).to(torch.uint8)  # the mean colour: 0 once normalized
        self.positions: dict[tuple, tuple[Tensor, ...]] = {}  # crop_positions' index tensors, by size and device
        if self.flip not in FLIPS or crop_pad_mode not in PAD_MODES:
            raise ValueError(
                f"flip must be one of {FLIPS} and crop_pad_mode one of {PAD_MODES}; got {flip!r}, {crop_pad_mode!r}."
            )

    def to(self, device: torch.device | str) -> "BatchTransform":
        """Keep the normalization constants on device (in place; returns self).

        A copy from host memory to a GPU makes the host wait for it; done once here, not once per batch.
        """
        self.mean, self.std, self.fill = self.mean.to(device), self.std.to(device), self.fill.to(device)
        return self

    def crop_positions(self, h: int, w: int, device: torch.device) -> tuple[Tensor, ...]:
        """The index tensors every crop of an h x w batch uses, built once per size and device: the reflect-padded
        rows and columns, and the crop's row and column offsets 0..h-1, 0..w-1 (about 12 operations a batch)."""
        key = (h, w, device)
        if key not in self.positions:
            p = self.crop_padding
            self.positions[key] = (
                reflect_indices(h, p, device),
                reflect_indices(w, p, device),
                torch.arange(h, device=device).view(1, 1, h, 1),
                torch.arange(w, device=device).view(1, 1, 1, w),
            )
        return self.positions[key]

    @property
    def augments(self) -> bool:
        return (
            self.crop_padding > 0
            or self.flip != "none"
            or self.per_image is not None
            or self.erasing > 0
            or self.cutout_size > 0
        )

    def __call__(self, x: Tensor, generator: torch.Generator | None = None, flips: Tensor | None = None) -> Tensor:
        """Augment and normalize x; flips (B bools) says which images to mirror under alternating flip."""
        return self.normalize(self.augment(x, generator, flips))

    def augment(self, x: Tensor, generator: torch.Generator | None = None, flips: Tensor | None = None) -> Tensor:
        """The augmentation of a uint8 batch, kept uint8 (one byte a value: a whole epoch fits where the images do):
        the per-image stage (random-resized crop, policy), the padded random crop, the flip, then erasing and cutout;
        the identity where the transform does not augment."""
        if self.per_image is not None:
            x = self.per_image(x, generator)
        b, _, h, w = x.shape
        if self.crop_padding:
            p = self.crop_padding
            reflect_rows, reflect_cols, crop_rows, crop_cols = self.crop_positions(h, w, x.device)
            if self.crop_pad_mode == "reflect":  # the border mirrored, the border pixel itself not repeated
                padded = x[:, :, reflect_rows][:, :, :, reflect_cols]
            else:
                padded = torch.nn.functional.pad(x, (p, p, p, p))  # (B, C, H, W) -> (B, C, H+2p, W+2p)
            dy = torch.randint(0, 2 * p + 1, (b, 1, 1, 1), device=x.device, generator=generator)
            dx = torch.randint(0, 2 * p + 1, (b, 1, 1, 1), device=x.device, generator=generator)
            rows = dy + crop_rows  # (B, 1, H, 1)
            cols = dx + crop_cols  # (B, 1, 1, W)
            x = padded.gather(2, rows.expand(b, x.shape[1], h, w + 2 * p))  # -> (B, C, H, W+2p)
            x = x.gather(3, cols.expand(b, x.shape[1], h, w))  # -> (B, C, H, W)
        if self.flip == "random":
            flip = torch.rand((b, 1, 1, 1), device=x.device, generator=generator) < 0.5
            x = torch.where(flip, x.flip(3), x)
        elif self.flip == "alternating":
            if flips is None:
                raise ValueError("flip='alternating' needs the images' flips (first_epoch_flips); none were given.")
            x = torch.where(flips.view(b, 1, 1, 1), x.flip(3), x)
        if self.erasing > 0:
            x = random_erasing(x, self.erasing, self.fill.to(x.device), generator)
        if self.cutout_size > 0:
            x = cutout(x, self.cutout_size, self.fill.to(x.device), generator)
        return x

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 pixels -> float32 (x - mean) / std per channel."""
        if self.mean.device != x.device:  # a transform built apart from a loader: moved on its first batch, then kept
            self.to(x.device)
        return (x.float() - self.mean) / self.std


class TensorLoader:
    """Iterates (images, labels) batches of a uint8 image tensor, transformed on the tensor's device.

    Exposes `sampler` so Lightning's per-epoch `set_epoch` call reaches the EpochSampler, like a DataLoader's
    (and `batch_sampler = None`, as a DataLoader with a plain sampler has). It is resumable: `state_dict` records the
    epoch and how many batches of it were served, and after `load_state_dict` the next pass over that epoch starts
    at the next unseen batch, so a run resumed mid-epoch sees exactly the batches an uninterrupted run would.

    augment_each="batch" crops and flips each batch as it is served. "epoch" crops and flips the epoch's images (this
    rank's shard, in the epoch's order) in one pass at its start, as airbench94 does, and then serves slices of that
    uint8 tensor, normalized: about 15 fewer operations a step for a copy of the shard held during the epoch. Both
    draw each image's crop and flip from the epoch's augmentation stream, in a different order, so their batches
    differ but follow the same distribution.
    """

    batch_sampler = None

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        sampler: EpochSampler,
        transform: BatchTransform,
        drop_last: bool = False,
        augment_each: str = "batch",
    ) -> None:
        if augment_each not in AUGMENT_EACH:
            raise ValueError(f"augment_each must be one of {AUGMENT_EACH}; got {augment_each!r}.")
        self.images, self.labels, self.augment_each = images, labels, augment_each
        # The constants go to the images' device now, while the loader is built, not inside a training step.
        self.batch_size, self.sampler, self.transform = batch_size, sampler, transform.to(images.device)
        self.drop_last = drop_last
        self.served = 0  # batches handed out so far in the current pass
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches already seen) from a checkpoint
        self.first_flips: Tensor | None = None  # alternating flip's coin per image, drawn on first use

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "served": self.served}

    def rewind(self) -> None:
        """Count the last batch handed out as not served: a run that stops inside its step serves it again."""
        self.served = max(self.served - 1, 0)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.resume_at = (state["epoch"], state["served"])

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        device = self.images.device
        order = self.sampler.indices().to(device)
        generator = None
        if self.transform.augments:
            generator = torch.Generator(device=device)
            generator.manual_seed(stream_seed(self.sampler.seed, self.sampler.epoch, AUGMENT, self.sampler.rank))
        skip = 0
        if self.resume_at is not None and self.resume_at[0] == self.sampler.epoch:
            skip = self.resume_at[1]  # Lightning counts these batches as done; the epoch's order is the same
        self.resume_at = None
        if generator is not None and self.augment_each == "epoch":
            yield from self.epoch_batches(order, generator, skip)
            return
        if generator is not None:  # replay the skipped batches' random crops and flips, so later batches match
            for i in range(skip):
                idx = order[i * self.batch_size : (i + 1) * self.batch_size]
                self.transform(self.images[idx], generator, self.flips(idx))
        self.served = skip
        for i in range(skip, len(self)):
            self.served = i + 1
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.transform(self.images[idx], generator, self.flips(idx)), self.labels[idx]

    def epoch_batches(self, order: Tensor, generator: torch.Generator, skip: int) -> Iterator[tuple[Tensor, Tensor]]:
        """augment_each="epoch": the shard cropped and flipped once, then served as slices from batch `skip` on (a
        resumed epoch draws the same augmentation again: nothing to replay)."""
        images = self.transform.augment(self.images[order], generator, self.flips(order))
        labels = self.labels[order]
        self.served = skip
        for i in range(skip, len(self)):
            self.served = i + 1
            start = i * self.batch_size
            yield (
                self.transform.normalize(images[start : start + self.batch_size]),
                labels[start : start + self.batch_size],
            )

    def flips(self, indices: Tensor) -> Tensor | None:
        """Which images at indices alternating flip mirrors this epoch; None under the other flip modes."""
        if self.transform.flip != "alternating":
            return None
        if self.first_flips is None:  # drawn once, on the images' device: no host-to-device copy per batch
            self.first_flips = first_epoch_flips(self.sampler.seed, len(self.images), self.images.device)
        return self.first_flips[indices] ^ bool(self.sampler.epoch % 2)
