"""Starting a run from torchvision's ImageNet weights: `model=torchvision model.arch=<name> model.weights=<name>`.

The weights file comes through torchvision's own cache, `$TORCH_HOME/hub/checkpoints/<file>` (torch.hub.get_dir()),
where torchvision's model builders put and look for it; a missing file is downloaded there by torch.hub (which checks
the hash in its name) unless `download_weights=false`. Three things follow from the weights and are done here:
the data config takes the input size, mean and std of the weights' own preprocessing (where it left them null),
the file is checked before any data is read, and at the start of training every backbone tensor is copied in while
the classifier head, sized for data.num_classes, keeps its fresh initialization.
"""

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torchvision.models import Weights, get_model, get_model_weights

from cnnlab.errors import UserError
from cnnlab.machine_lock import machine_lock
from cnnlab.models.torchvision_net import weights_named

TARGET = "cnnlab.models.torchvision_net"
# Data configs that convert every image to data.image_shape as they read it; the others have a fixed image size.
CONVERTING_DATA = ("cnnlab.data.FolderDataModule",)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def model_weights(model_cfg: Any) -> Weights | None:
    """The torchvision weights a model config starts from; None for another model, or model.weights=null."""
    if model_cfg.get("_target_") != TARGET:
        return None
    try:
        return weights_named(model_cfg.get("arch", "resnet18"), model_cfg.get("weights"))
    except ValueError as err:
        raise UserError(f"model.arch / model.weights: {err}") from None


def weights_file(weights: Weights) -> Path:
    """Where torchvision's builders keep these weights: <torch hub dir>/checkpoints/<the URL's file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def preprocessing_from_weights(cfg: DictConfig) -> None:
    """Fill data.image_shape, mean and std that the config left null with what the model's weights expect.

    The weights' evaluation transform (weights.transforms()) names the crop size and the per-channel mean and std the
    network saw on ImageNet; model.weights=null takes those of the architecture's default weights, so a network
    trained from scratch sees its inputs as the pre-trained one would. Written into cfg.data before the data is
    built, they are stored in every checkpoint, and eval, predict and export use them from there.
    """
    if cfg.model.get("_target_") != TARGET:
        return
    weights = model_weights(cfg.model) or get_model_weights(cfg.model.arch).DEFAULT
    preprocessing = weights.transforms()
    size = preprocessing.crop_size[0]
    if cfg.data.get("image_shape") is None and cfg.data._target_ not in CONVERTING_DATA:
        raise UserError(
            f"model=torchvision takes its input size from the weights ({size}x{size} for {cfg.model.arch}) only for "
            f"data=folder, which converts images to any size; {cfg.data._target_} images have a fixed size. Give it: "
            "data.image_shape=[3,32,32] for CIFAR."
        )
    with open_dict(cfg):
        if cfg.data.get("image_shape") is None:
            cfg.data.image_shape = [3, size, size]
        for key in ("mean", "std"):
            if cfg.data.get(key) is None:
                cfg.data[key] = [float(v) for v in getattr(preprocessing, key)]


def check_weights_file(cfg: DictConfig) -> None:
    """The weights file is in torchvision's cache, downloaded into it when download_weights allows (by one process
    of the machine); else one paragraph naming the file, its folder and its URL. Skipped where the run's weights come
    from a checkpoint."""
    weights = model_weights(cfg.model)
    if weights is None or cfg.get("ckpt_path") or cfg.get("init_from"):
        return
    path = weights_file(weights)
    if path.is_file():
        return
    reason = "download_weights=false"
    if cfg.get("download_weights", True):
        with machine_lock("weights", path):  # every process of a torchrun/srun run gets here: one downloads
            if path.is_file():
                return  # another process downloaded it while this one waited
            try:  # torchvision's own download: into the cache, the hash in the file name checked
                weights.get_state_dict(progress=True, check_hash=True)
                return
            except (OSError, RuntimeError) as err:  # URLError is an OSError; a hash mismatch a RuntimeError
                reason = f"the download failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    raise UserError(
        f"model.weights={cfg.model.weights} needs the file {path.name} in {path.parent} (torchvision's cache, "
        f"$TORCH_HOME/hub/checkpoints), and it is not there ({reason}). It comes from {weights.url}: download it "
        f"into that folder on a machine with network access, or point TORCH_HOME at a folder holding "
        "hub/checkpoints/ with it; or train from scratch with model.weights=null."
    )


def head_names(model: nn.Module, arch: str, num_classes: int) -> list[str]:
    """The state_dict names of the classifier head: those whose shape changes with the class count."""
    with torch.device("meta"):
        other = get_model(arch, weights=None, num_classes=num_classes + 1).state_dict()
    return [name for name, tensor in model.state_dict().items() if other[name].shape != tensor.shape]


def load_backbone(model: nn.Module, model_cfg: dict[str, Any]) -> tuple[list[str], str]:
    """Copy the weights file's tensors into model, all but the classifier head, which keeps its initialization;
    returns the head's parameter names (the new layers) and the report the run header prints."""
    weights = model_weights(model_cfg)
    path = weights_file(weights)
    stored = torch.load(path, map_location="cpu", weights_only=True)  # the file check_weights_file found
    head = head_names(model, model_cfg["arch"], model_cfg["num_classes"])
    own = model.state_dict()
    carried = [n for n, t in own.items() if n not in head and n in stored and stored[n].shape == t.shape]
    # BatchNorm's step counters are absent from older torchvision files; torchvision's own load_state_dict accepts
    # that (BatchNorm fills them in), and so does this: they keep their fresh value.
    missing = [n for n in own if n not in head and n not in carried and not n.endswith("num_batches_tracked")]
    if missing:
        raise UserError(
            f"{path} does not fit torchvision's {model_cfg['arch']}: {missing[0]} (and {len(missing) - 1} more) is "
            f"missing or of another shape. The file is damaged or not {weights}; delete it and get it again from "
            f"{weights.url}."
        )
    model.load_state_dict({n: stored[n] for n in carried}, strict=False)
    report = (
        f"weights  {model_cfg['arch']} {weights} from {path}: {len(carried)} tensors carried over\n"
        f"  new head, freshly initialized for {model_cfg['num_classes']} classes: {', '.join(head)}"
    )
    return head, report


def start_from_weights(classifier: Any, cfg: DictConfig) -> str | None:
    """At the start of a new run of model.weights (not resumed, not init_from): load the backbone into the
    classifier's model and record the head as the fresh layers (backbone_lr_scale scales all others)."""
    if model_weights(cfg.model) is None or cfg.get("ckpt_path") or cfg.get("init_from"):
        return None
    fresh, report = load_backbone(classifier.model, _plain(cfg.model))
    classifier.hparams["finetune"]["fresh"] = fresh
    return report
