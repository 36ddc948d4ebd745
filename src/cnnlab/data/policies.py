"""Per-image training augmentation from torchvision.transforms.v2: a random-resized crop and an augmentation policy.

These are the transforms of torchvision's classification reference (the recipe behind its ImageNet weights): a
crop of random area and aspect ratio resized to the model's input, then one of the learned or random policies
(TrivialAugment, RandAugment, AugMix, AutoAugment). Each image draws its own crop and operations, so they run per
image: in DataLoader workers on the torchvision loader, in a loop over the batch on the tensor loader (see
per_image_stage). Erasing and mixing, which vectorize, are in erasing.py and mixing.py.
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchvision.transforms import v2

from cnnlab.errors import UserError

POLICIES = (
    "none",
    "trivial_augment_wide",
    "rand_augment",
    "augmix",
    "auto_augment_imagenet",
    "auto_augment_cifar10",
    "auto_augment_svhn",
)
INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}
DEFAULT_MAGNITUDE = {"rand_augment": 9, "augmix": 3}  # torchvision's defaults: RandAugment magnitude, AugMix severity
MAGNITUDE_RANGE = {"rand_augment": (0, 30), "augmix": (1, 10)}  # RandAugment's 31 bins; AugMix's severity


def check_policy_settings(
    policy: str,
    policy_magnitude: int | None,
    interpolation: str,
    random_resized_crop: bool,
    crop_scale: Sequence[float],
    crop_ratio: Sequence[float],
) -> None:
    """Refuse a policy, magnitude, interpolation or crop range that is not known or cannot make a crop."""
    if policy not in POLICIES:
        raise UserError(f"data.policy={policy!r} is not known; choose one of {', '.join(POLICIES)}.")
    if interpolation not in INTERPOLATIONS:
        raise UserError(
            f"data.interpolation={interpolation!r} is not known; choose one of {', '.join(INTERPOLATIONS)}."
        )
    if policy_magnitude is not None:
        if policy not in MAGNITUDE_RANGE:
            raise UserError(
                f"data.policy_magnitude={policy_magnitude} has no meaning for data.policy={policy}: only rand_augment "
                "(magnitude 0-30) and augmix (severity 1-10) take one. Set data.policy_magnitude=null."
            )
        low, high = MAGNITUDE_RANGE[policy]
        if not low <= policy_magnitude <= high:
            raise UserError(
                f"data.policy_magnitude={policy_magnitude} is outside {low}..{high} for data.policy={policy}."
            )
    if random_resized_crop:
        scale, ratio = list(crop_scale), list(crop_ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise UserError(
                f"data.crop_scale={scale} must be [low, high] fractions of the image's area with 0 < low <= high <= 1, "
                "e.g. [0.08, 1.0] (torchvision's default) or [0.35, 1.0] for small images."
            )
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise UserError(
                f"data.crop_ratio={ratio} must be [low, high] aspect ratios (width / height) with 0 < low <= high, "
                "e.g. [0.75, 1.3333]."
            )


def policy_transform(policy: str, magnitude: int | None, interpolation: str) -> v2.Transform | None:
    """The torchvision v2 transform of an augmentation policy; None for "none"."""
    mode = INTERPOLATIONS[interpolation]
    if policy == "none":
        return None
    if policy == "trivial_augment_wide":
        return v2.TrivialAugmentWide(interpolation=mode)
    if policy == "rand_augment":
        return v2.RandAugment(
            magnitude=DEFAULT_MAGNITUDE[policy] if magnitude is None else magnitude, interpolation=mode
        )
    if policy == "augmix":
        return v2.AugMix(severity=DEFAULT_MAGNITUDE[policy] if magnitude is None else magnitude, interpolation=mode)
    learned = {
        "auto_augment_imagenet": v2.AutoAugmentPolicy.IMAGENET,
        "auto_augment_cifar10": v2.AutoAugmentPolicy.CIFAR10,
        "auto_augment_svhn": v2.AutoAugmentPolicy.SVHN,
    }[policy]
    return v2.AutoAugment(policy=learned, interpolation=mode)


def per_image_transforms(
    size: Sequence[int],
    random_resized_crop: bool,
    crop_scale: Sequence[float],
    crop_ratio: Sequence[float],
    policy: str,
    policy_magnitude: int | None,
    interpolation: str,
) -> list[v2.Transform]:
    """The per-image steps, in the reference's order: the random-resized crop to size (H, W), then the policy."""
    steps: list[v2.Transform] = []
    if random_resized_crop:
        steps.append(
            v2.RandomResizedCrop(
                list(size),
                scale=tuple(crop_scale),
                ratio=tuple(crop_ratio),
                interpolation=INTERPOLATIONS[interpolation],
                antialias=True,
            )
        )
    policy_step = policy_transform(policy, policy_magnitude, interpolation)
    if policy_step is not None:
        steps.append(policy_step)
    return steps


def per_image_stage(steps: list[v2.Transform]) -> Callable[[Tensor, torch.Generator | None], Tensor] | None:
    """The steps applied to each image of a uint8 batch on its device, each image drawing its own parameters; None
    when there are no steps.

    torchvision's v2 transforms draw their parameters from torch's global generator, and one call on a batch draws
    once for the whole batch. The tensor loader needs its own stream (the epoch's augmentation generator, so that a
    resumed run and each DDP rank draw as they should) and one draw per image: the stage takes a seed from that
    generator and applies the steps image by image with torch's global generator seeded from it, restoring the global
    generator afterwards.
    """
    if not steps:
        return None
    transform = v2.Compose(steps)

    def stage(x: Tensor, generator: torch.Generator | None) -> Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=x.device).item()) if generator else None
        with torch.random.fork_rng(devices=[]):  # parameters are drawn on the CPU, whatever x's device
            if seed is not None:
                torch.manual_seed(seed)
            return torch.stack([transform(image) for image in x])  # (B, C, H, W) -> (B, C, h, w)

    return stage
