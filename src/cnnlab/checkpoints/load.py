"""Load a training checkpoint safely, and read its data configuration (training/classifier.py rebuilds the model).

Checkpoints are read with `torch.load(weights_only=True)`: tensors, containers and plain values only. A file that
would need arbitrary unpickling (which can run any code) is refused before anything in it executes. Every problem
a user can fix is a UserError naming the file.
"""

import hashlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from cnnlab.errors import UserError

# A checkpoint written by this project stores these constructor arguments of ImageClassifier.
REQUIRED_HPARAMS = ("model", "optimizer", "data")
# What each stored config may instantiate. Configs are instantiated by Hydra, which calls any `_target_` it finds, so
# a checkpoint naming anything else (or nesting a `_target_` deeper) could run code without any unpickling.
ALLOWED_TARGETS = {
    "model": ("cnnlab.models.",),
    "data": ("cnnlab.data.",),
    "optimizer": ("torch.optim.", "cnnlab.training.param_groups.", "cnnlab.training.muon."),
    "scheduler": ("torch.optim.lr_scheduler.", "cnnlab.training.schedules."),
}
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6 is a zip archive
PICKLE_MAGIC = b"\x80"  # the legacy torch.save format starts with a pickle protocol opcode


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at path as a dict on the CPU, checked to be a cnnlab classifier checkpoint."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"Checkpoint {path} does not exist. Check the path (relative paths start where you run).")
    if path.is_dir():
        raise UserError(f"Checkpoint {path} is a directory; give a .ckpt file, e.g. {path}/checkpoints/best.ckpt.")
    with path.open("rb") as f:
        head = f.read(4)
    if not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC)):
        raise UserError(
            f"{path} is not a checkpoint: it is not a file written by torch.save (its first bytes are "
            f"{head.hex() or 'missing'}). Give the .ckpt file a training run wrote under <run dir>/checkpoints/."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise _corrupt(path, err) from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            what = f"objects that only arbitrary unpickling could create (it asks for {found.group(1)})"
        else:  # an opcode the safe loader does not accept: damaged, or built to run code
            detail = next((line for line in str(err).splitlines() if "Unsupported" in line), "")
            what = f"content that the safe loader does not accept ({detail.strip()[:120] or 'unknown opcode'})"
        raise UserError(
            f"Checkpoint {path} holds {what}, so it was refused and none of its content ran. cnnlab checkpoints "
            "hold tensors and plain values only; use a checkpoint written by `cnnlab-train`, and do not load files "
            "from sources you do not trust."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise _corrupt(path, err) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(
            f"{path} is a PyTorch file but not a Lightning checkpoint (it has no state_dict). Give the .ckpt file a "
            "training run wrote under <run dir>/checkpoints/."
        )
    hparams = ckpt.get("hyper_parameters")
    missing = [k for k in REQUIRED_HPARAMS if not isinstance((hparams or {}).get(k), dict)]
    if missing or not str(hparams["model"].get("_target_", "")).startswith("cnnlab."):
        raise UserError(
            f"Checkpoint {path} was not written by cnnlab: its hyper_parameters lack "
            f"{', '.join(missing) or 'a cnnlab model _target_'}, so the model and data cannot be rebuilt from it. "
            "Give a checkpoint written by `cnnlab-train` (<run dir>/checkpoints/best.ckpt)."
        )
    check_targets(hparams, path)
    return ckpt


def _nested_targets(node: Any, where: str) -> list[str]:
    if isinstance(node, dict):
        found = [f"{where}._target_"] if "_target_" in node else []
        return found + [t for k, v in node.items() for t in _nested_targets(v, f"{where}.{k}")]
    if isinstance(node, list):
        return [t for i, v in enumerate(node) for t in _nested_targets(v, f"{where}[{i}]")]
    return []


def check_targets(hparams: dict[str, Any], path: Path) -> None:
    """Refuse stored configs that would make Hydra call anything but ALLOWED_TARGETS: this project's models, data,
    optimizer and schedule factories, and torch.optim."""
    for key, prefixes in ALLOWED_TARGETS.items():
        node = hparams.get(key)
        if not node:
            continue
        target = str(node.get("_target_", ""))
        nested = [t for k, v in node.items() for t in _nested_targets(v, f"{key}.{k}")]
        if not target.startswith(prefixes) or nested:
            what = f"{key}._target_={target!r}" if not target.startswith(prefixes) else f"a nested {nested[0]}"
            allowed = " or ".join(f"{prefix}*" for prefix in prefixes)
            raise UserError(
                f"Checkpoint {path} names {what} in its hyper_parameters, where only {allowed} may stand; rebuilding "
                "it would call code the checkpoint chose, so it was refused and nothing in it ran. Use a checkpoint "
                "written by `cnnlab-train`, and do not load files from sources you do not trust."
            )


def _corrupt(path: Path, err: Exception) -> UserError:
    return UserError(
        f"Checkpoint {path} is truncated or corrupt and cannot be read ({type(err).__name__}: "
        f"{str(err).splitlines()[0][:160] if str(err) else 'no detail'}). Copy it again or use another checkpoint "
        "of the run (last.ckpt)."
    )


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_config(ckpt: dict[str, Any], overrides: dict[str, Any] | None = None, source: str = "") -> dict[str, Any]:
    """The checkpoint's stored data config with the overrides whose value is not None put over it."""
    stored = dict(ckpt["hyper_parameters"]["data"])
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(stored))
    if unknown:
        raise UserError(
            f"data.{unknown[0]} is not a key of the data config stored in checkpoint {source}; the keys are "
            f"{', '.join(sorted(stored))}."
        )
    return {**stored, **given}
