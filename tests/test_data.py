"""Data: the on-disk readers, splits, the two loader paths, and the errors users see for bad files."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from cnnlab.data import CIFAR10DataModule, MNISTDataModule
from cnnlab.data.formats import read_cifar_batch, read_idx, write_idx
from cnnlab.data.tensor_loader import BatchTransform, EpochSampler
from cnnlab.errors import UserError
from tests.conftest import DATASETS, compose_config, make_cifar, make_mnist, quick_run


def datamodule(data_dir: Path, data: str, tmp_path: Path, *extra: str):
    cfg = compose_config(quick_run(data_dir, *extra, data=data), tmp_path)
    return instantiate(cfg.data)


def test_idx_round_trip_keeps_shape_and_bytes(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    write_idx(tmp_path / "x-idx3-ubyte", array)
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte"), array)


def test_truncated_idx_file_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((4, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match=f"{path}.*truncated"):
        read_idx(path)


def test_idx_file_with_wrong_magic_number_is_refused(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"\x01\x02\x03")
    with pytest.raises(UserError, match="not an IDX file of unsigned bytes"):
        read_idx(path)


def test_mnist_image_and_label_count_mismatch_is_refused(tmp_path):
    make_mnist(tmp_path, n_train=60, n_test=20)
    write_idx(tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte", np.zeros(19, np.uint8))
    dm = MNISTDataModule(data_dir=str(tmp_path), val_size=10, download=False)
    with pytest.raises(UserError, match="20 images but .* 19 labels"):
        dm.setup()


def test_cifar_reader_accepts_well_formed_batches_with_any_checksum(tmp_path):
    make_cifar(tmp_path, n_train=50, n_test=20)
    images, labels = read_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch")
    assert images.shape == (20, 3, 32, 32) and images.dtype == np.uint8 and labels.shape == (20,)


class _Marker:
    """Unpickling this object would create a file: the stand-in for hostile code in a data file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_hostile_cifar_batch_is_refused_and_its_code_never_runs(tmp_path):
    make_cifar(tmp_path, n_train=50, n_test=20)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({b"data": _Marker(str(marker)), b"labels": [0]}, protocol=2))
    with pytest.raises(UserError, match="not a plain CIFAR batch"):
        read_cifar_batch(batch)
    assert not marker.exists()


def test_truncated_cifar_batch_is_refused_naming_the_file(tmp_path):
    make_cifar(tmp_path, n_train=50, n_test=20)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(UserError, match="data_batch_3"):
        read_cifar_batch(batch)


def test_missing_files_get_one_paragraph_naming_them_and_data_dir(tmp_path):
    dm = MNISTDataModule(data_dir=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(UserError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert "train-images-idx3-ubyte" in message and "data.data_dir" in message and "\n" not in message


def test_failed_download_becomes_the_missing_files_paragraph(tmp_path, monkeypatch):
    def offline(self):
        raise OSError("network unreachable")

    monkeypatch.setattr(CIFAR10DataModule, "fetch", offline)
    with pytest.raises(UserError, match="could not be downloaded"):
        CIFAR10DataModule(data_dir=str(tmp_path), download=True).prepare_data()


def test_relative_data_dir_resolves_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert MNISTDataModule(data_dir="data").data_dir == tmp_path / "data"


@pytest.mark.parametrize("data", DATASETS)
def test_validation_split_is_seeded_and_disjoint_from_training(tiny_data, tmp_path, data):
    first, second = (datamodule(tiny_data, data, tmp_path) for _ in range(2))
    first.setup(), second.setup()
    n_train = len(first.splits["train"][1])
    assert len(first.splits["val"][1]) == 100 and n_train + 100 in (500, 600)
    assert torch.equal(first.splits["val"][0], second.splits["val"][0])
    val_rows = {bytes(x.numpy()) for x in first.splits["val"][0]}
    assert not val_rows & {bytes(x.numpy()) for x in first.splits["train"][0]}


def test_validation_split_larger_than_the_training_set_is_refused(tiny_data, tmp_path):
    dm = datamodule(tiny_data, "mnist", tmp_path, "data.val_size=600")
    with pytest.raises(UserError, match="data.val_size=600"):
        dm.setup()


def test_a_cifar_validation_split_that_leaves_no_training_images_stops_the_run_when_loaded(tiny_data, tmp_path):
    from cnnlab.commands.train import train

    # CIFAR-10 has no cheap header to read its size from before the run starts: the check comes when it is loaded.
    cfg = compose_config(quick_run(tiny_data, "data.val_size=500", model="lenet5", data="cifar10"), tmp_path)
    with pytest.raises(UserError, match=r"data.val_size=500 must be .* below the 500 training images"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.json").exists()


def test_image_shape_that_does_not_fit_the_files_is_refused(tiny_data, tmp_path):
    dm = datamodule(tiny_data, "mnist", tmp_path, "data.image_shape=[1,32,32]")
    with pytest.raises(UserError, match="image_shape"):
        dm.setup()


@pytest.mark.parametrize("data", DATASETS)
def test_tensor_and_torchvision_paths_give_the_same_unaugmented_batches(tiny_data, tmp_path, data):
    fast = datamodule(tiny_data, data, tmp_path, "data.loader=tensor")
    slow = datamodule(tiny_data, data, tmp_path, "data.loader=torchvision")
    fast.setup(), slow.setup()
    batches = list(zip(fast.val_dataloader(), slow.val_dataloader(), strict=True))
    assert len(batches) == 2  # 100 validation images in batches of 64
    for a, b in batches:
        assert torch.allclose(a[0], b[0], atol=1e-5) and torch.equal(a[1], b[1])


def square_offsets(images: torch.Tensor, labels: torch.Tensor, dm) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each augmented class_patterns image shows its bright square, against where the unaugmented one has it:
    (row shift in pixels, whether it is mirrored), for the labels whose square is far from the vertical midline."""
    pixels = images * torch.tensor(dm.std).view(1, -1, 1, 1) + torch.tensor(dm.mean).view(1, -1, 1, 1)  # -> [0, 1]
    bright = (pixels[:, 0] > 0.8).float()  # (N, H, W): the square; the noise stays below 60/255
    count = bright.sum(dim=(1, 2))
    rows = (bright.sum(2) * torch.arange(32)).sum(1) / count  # centre of mass
    cols = (bright.sum(1) * torch.arange(32)).sum(1) / count
    top, left = 4 + 6 * (labels // 5), 3 + 5 * (labels % 5)  # conftest.class_patterns: a 5 x 4 square
    row_shift = (rows - (top + 2)).round()
    centre, mirrored = left + 1.5, 31 - (left + 1.5)
    flipped = (cols - mirrored).abs() < (cols - centre).abs()
    apart = labels % 5 != 2  # the middle column's square and its mirror image overlap
    return row_shift[apart], flipped[apart]


def test_tensor_and_torchvision_augmentation_have_the_same_statistics(tiny_data, tmp_path):
    fast = datamodule(tiny_data, "cifar10", tmp_path, "data.loader=tensor", "data.batch_size=400")
    slow = datamodule(tiny_data, "cifar10", tmp_path, "data.loader=torchvision", "data.batch_size=400")
    fast.setup(), slow.setup()
    stats, shifts = [], []
    torch.manual_seed(0)  # the torchvision transforms draw from the global generator
    for dm in (fast, slow):
        batches = []
        for epoch in range(5):
            loader = dm.train_dataloader()
            getattr(loader.sampler, "set_epoch", lambda _: None)(epoch)  # as Lightning does: new crops and flips
            batches += list(loader)
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        stats.append((x.mean().item(), x.std().item(), (x == x.min()).float().mean().item()))
        row_shift, flipped = square_offsets(x, y, dm)
        # A random horizontal flip mirrors about half of the images.
        assert 0.43 < flipped.float().mean().item() < 0.57
        # A random crop of 4 pixels of padding moves each image by -4..4 rows, each about equally often.
        share = torch.stack([(row_shift == s).float().mean() for s in range(-4, 5)])
        assert share.sum().item() == pytest.approx(1.0) and share.min().item() > 0.06 and share.max().item() < 0.17
        shifts.append(share)
    (m1, s1, z1), (m2, s2, z2) = stats
    assert abs(m1 - m2) < 0.02 and abs(s1 - s2) < 0.02 and abs(z1 - z2) < 0.01  # z: share of zero-padded pixels
    assert (shifts[0] - shifts[1]).abs().max().item() < 0.05


def test_batch_crop_matches_a_per_image_crop_of_the_padded_image():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)
    transform = BatchTransform(mean=[0, 0, 0], std=[1 / 255] * 3, crop_padding=2)
    g = torch.Generator().manual_seed(0)
    out = transform(x, g)
    g = torch.Generator().manual_seed(0)
    dy, dx = (torch.randint(0, 5, (2, 1, 1, 1), generator=g) for _ in range(2))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2)).float()
    for i in range(2):
        expected = padded[i, :, dy[i] : dy[i] + 6, dx[i] : dx[i] + 6]
        assert torch.equal(out[i], expected)


def test_epoch_sampler_shards_like_distributed_sampler():
    n, world = 10, 3
    shards = [EpochSampler(n, shuffle=True, seed=1, rank=r, world_size=world) for r in range(world)]
    for s in shards:
        s.set_epoch(2)
    parts = [s.indices() for s in shards]
    assert all(len(p) == 4 for p in parts)  # ceil(10 / 3), padded by wrapping around
    assert set(torch.cat(parts).tolist()) == set(range(n))
    ref = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=1, shuffle=False)
    assert EpochSampler(n, shuffle=False, rank=1, world_size=world).indices().tolist() == list(ref)


def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    a, b = EpochSampler(50, True, seed=3), EpochSampler(50, True, seed=3)
    assert torch.equal(a.indices(), b.indices())
    b.set_epoch(1)
    assert not torch.equal(a.indices(), b.indices())
