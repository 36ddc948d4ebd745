"""The device a command runs on, from its `device=` setting: auto, cpu, cuda, cuda:<index> or mps."""

import torch

from cnnlab.errors import UserError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:<index> or mps (auto: a CUDA GPU when there is one, else the CPU)"


def parse_device(name: str) -> torch.device | None:
    """The device name stands for, unchecked against this machine; None for auto."""
    name = str(name).strip()
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps") or (device.type != "cuda" and device.index):
        raise UserError(f"device={name!r} is not known; choose {DEVICE_CHOICES}.")
    return device


def pick_device(name: str) -> torch.device:
    """The torch device for device=name, refused in one paragraph when this machine does not have it."""
    device = parse_device(name)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
            raise UserError(
                f"device={name}, but PyTorch sees no CUDA GPU here ({build}; torch.cuda.is_available() is False). "
                "Use device=auto (the GPU when there is one) or device=cpu."
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(
                f"device={name}, but PyTorch sees {count} CUDA GPU{'s' if count > 1 else ''} here (cuda:0 to "
                f"cuda:{count - 1}; CUDA_VISIBLE_DEVICES hides others). Pick one of those, or device=cuda for the "
                "first."
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={name}, but PyTorch sees no Apple GPU (MPS) here. Use device=auto or device=cpu.")
    return device
