"""benchmark_folder(cfg): what data=folder costs against a built-in dataset holding the same images.

Three measures: images decoded per second when a folder is first used (the cache is built), seconds to load that
cache in a later run (against the reference dataset's own loading), and training images/s of data=folder against
the reference data config (CIFAR-10), timed in turn in one process as scripts/benchmark.py does.
"""

import copy
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from cnnlab.commands.run_record import environment, write_json
from cnnlab.commands.train import plain
from cnnlab.config_files import config_dir
from cnnlab.data.cifar import TRAIN_BATCHES
from cnnlab.data.formats import read_cifar_batch, read_cifar_pickle, write_image_folder
from cnnlab.errors import UserError
from cnnlab.tools.benchmark import _accelerator, _device, lightning_rate, print_result

# Keys the reference data config takes from the folder's, so that both train on the same batches.
SHARED_KEYS = (
    *("batch_size", "eval_batch_size", "val_size", "split_seed", "loader"),
    *("augment", "crop_padding", "crop_pad_mode", "flip"),
)


def write_cifar_folder(source: Path, root: Path) -> int:
    """Write the CIFAR-10 batches in source as PNG files, root/{train,test}/<class>/<n>.png; returns the count."""
    names = [n.decode() for n in read_cifar_pickle(source / "batches.meta")["label_names"]]
    count = 0
    for split, batches in (("train", TRAIN_BATCHES), ("test", ["test_batch"])):
        parts = [read_cifar_batch(source / name) for name in batches]
        images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        with ThreadPoolExecutor() as pool:  # zlib releases the GIL while it compresses
            jobs = [
                pool.submit(write_image_folder, root, split, images[i], labels[i], names, offset=int(i[0]))
                for i in np.array_split(np.arange(len(labels)), 64)
                if len(i)
            ]
            for job in jobs:
                job.result()
        count += len(labels)
    return count


def reference_config(cfg: DictConfig) -> DictConfig:
    """cfg with data replaced by the reference data config (read from configs/data/), sharing the folder's batches."""
    node = OmegaConf.load(Path(config_dir()) / "data" / f"{cfg.reference_data}.yaml")
    for key in SHARED_KEYS:
        node[key] = cfg.data[key]
    node.data_dir = cfg.reference_data_dir
    reference = copy.deepcopy(cfg)
    with open_dict(reference):
        reference.data = node
    return reference


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def benchmark_folder(cfg: DictConfig) -> dict[str, Any]:
    """Decode rate, cache loading time and training speed of data=folder against cfg.reference_data; writes JSON."""
    if not cfg.data._target_.endswith("FolderDataModule"):
        raise UserError("scripts/benchmark_folder.py measures data=folder: add data=folder data.data_dir=<folder>.")
    root = Path(cfg.data.data_dir).expanduser().resolve()
    result: dict[str, Any] = {}
    if cfg.make_from and not (root / "train").is_dir():
        seconds = timed(lambda: result.update(images_written=write_cifar_folder(Path(cfg.make_from), root)))
        result["write_seconds"] = round(seconds, 1)

    # First use: every cache of this image_shape removed, so every file is decoded.
    cold = instantiate(cfg.data)
    for folder in cold.cache_folders():
        for split in ("train", "val", "test"):
            cold.cache_file(folder, split).unlink(missing_ok=True)
    facts: dict[str, Any] = {}
    result["first_use_seconds"] = round(timed(lambda: facts.update(cold.discover())), 2)
    decoded = sum(len(index["labels"]) + len(index["failures"]) for index in cold.indexes.values())
    decode_seconds = sum(float(index["decode_seconds"]) for index in cold.indexes.values())
    result.update(images_decoded=decoded, images_decoded_per_second=round(decoded / decode_seconds))
    result["decode_workers"] = cold.decode_workers
    with open_dict(cfg):
        cfg.data.update(facts)

    # Later runs: the cache read and the splits formed, as DataModule.setup does it, against the reference dataset.
    reference = reference_config(cfg)
    folder_loads, reference_loads = [], []
    for _ in range(cfg.repeats):
        folder_loads.append(timed(lambda: instantiate(cfg.data).setup()))
        reference_loads.append(timed(lambda: instantiate(reference.data).setup()))
    result["cache_load_seconds"] = round(min(folder_loads), 3)
    result[f"{cfg.reference_data}_load_seconds"] = round(min(reference_loads), 3)

    # Training speed, in turn.
    device = _device(cfg)
    runs = {"folder": _accelerator(cfg), cfg.reference_data: _accelerator(reference)}
    best: dict[str, float] = {}
    for _ in range(cfg.repeats):
        for name, run_cfg in runs.items():
            best[name] = max(best.get(name, 0.0), lightning_rate(run_cfg, run_cfg.data.loader))
    result["folder_train_images_per_second"] = round(best["folder"], 1)
    result[f"{cfg.reference_data}_train_images_per_second"] = round(best[cfg.reference_data], 1)
    result[f"folder_over_{cfg.reference_data}"] = round(best["folder"] / best[cfg.reference_data], 3)
    result["device"] = str(device)
    result["config"] = {key: plain(cfg[key]) for key in ("model", "data", "trainer")}
    result["config"]["data"].pop("class_names", None)
    result["env"] = environment(cfg.seed, cfg.trainer.deterministic, {})
    write_json(Path(cfg.output), result)
    print_result(result)
    return result
