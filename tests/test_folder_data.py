"""data=folder: users' own images in class folders, converted once, cached, and named in checkpoints."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict
from PIL import Image

import cnnlab.data.folder as folder_module
from cnnlab.checkpoints.load import load_checkpoint
from cnnlab.commands.evaluate import evaluate
from cnnlab.commands.predict import predict
from cnnlab.commands.train import train
from cnnlab.commands.validation import check_model_fits_data
from cnnlab.data import FolderDataModule
from cnnlab.data.images import load_image
from cnnlab.errors import UserError
from cnnlab.training.classifier import classifier_from_checkpoint
from tests.conftest import FOLDER_CLASSES, MODELS, compose_config, make_image_folder, quick_run
from tests.launch import run_script
from tests.test_predict import predict_config


def folder_overrides(root: Path, model: str = "resnet8", *extra: str) -> list[str]:
    """A quick CPU run on a tiny image folder."""
    return quick_run(root, "data.val_size=40", *extra, model=model, data="folder")


def folder_module_for(root: Path, **settings) -> FolderDataModule:
    return FolderDataModule(data_dir=str(root), val_size=settings.pop("val_size", 40), **settings)


def gradient_image(mode: str, size: tuple[int, int]) -> Image.Image:
    """A left-to-right ramp from black to white in the given mode."""
    width, height = size
    ramp = np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))  # (H, W)
    if mode == "I;16":
        return Image.fromarray(ramp.astype(np.uint16) * 257)
    return Image.fromarray(ramp).convert("RGB").convert(mode)


def cache_files(root: Path) -> list[Path]:
    return sorted((root / ".cnnlab-cache").glob("*"))


# --- the conversion ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "suffix, mode, size",
    [
        (".png", "L", (45, 30)),
        (".png", "RGBA", (28, 28)),
        (".png", "P", (14, 50)),
        (".png", "LA", (33, 17)),
        (".png", "I;16", (56, 56)),
        (".jpg", "RGB", (100, 80)),
        (".jpg", "L", (31, 29)),
        (".jpg", "CMYK", (40, 40)),
        (".bmp", "1", (30, 30)),
        (".bmp", "P", (35, 21)),
        (".bmp", "RGB", (17, 64)),
        (".webp", "RGB", (50, 50)),
        (".webp", "RGBA", (23, 37)),
    ],
)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_format_mode_and_size_becomes_the_configured_shape(tmp_path, suffix, mode, size, shape):
    path = tmp_path / f"image{suffix}"
    gradient_image(mode, size).save(path)
    array = load_image(path, shape)
    assert array.shape == shape and array.dtype == np.uint8
    assert array[:, :, -4:].mean() - array[:, :, :4].mean() > 60  # the ramp survives: dark left, bright right


def test_resize_scales_the_shorter_side_and_crops_the_middle(tmp_path):
    stripes = np.zeros((30, 90), np.uint8)  # (H, W): black sides, a white middle a little wider than a third
    stripes[:, 24:66] = 255
    Image.fromarray(stripes).save(tmp_path / "wide.png")
    array = load_image(tmp_path / "wide.png", (1, 10, 10))
    assert array.min() >= 250  # only the middle 30x30 is kept; a plain resize would keep the black sides


def test_exif_rotation_is_applied_before_conversion(tmp_path):
    image = Image.new("L", (20, 20), 0)
    image.paste(255, (0, 0, 20, 10))  # top half white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown turned a quarter clockwise
    image.save(tmp_path / "turned.png", exif=exif)
    array = load_image(tmp_path / "turned.png", (1, 20, 20))[0]
    assert array[:, 12:].mean() > 200 and array[:, :8].mean() < 50  # the white half is now on the right


def test_transparent_pixels_are_shown_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    palette = Image.new("P", (8, 8), 0)
    palette.save(tmp_path / "clear_palette.png", transparency=0)
    assert (load_image(tmp_path / "clear.png", (3, 8, 8)) == 255).all()
    assert (load_image(tmp_path / "clear_palette.png", (1, 8, 8)) == 255).all()


def test_predict_uses_the_data_packages_conversion():
    import cnnlab.commands.predict

    assert cnnlab.commands.predict.load_image is load_image


# --- classes and splits --------------------------------------------------------------------------------------------
class ReverseListing(list):
    """os.scandir's entries in reverse name order, usable as scandir's iterator is (also in a `with`)."""

    def __enter__(self):
        return iter(self)

    def __exit__(self, *exc) -> None:
        pass


def test_class_names_are_the_sorted_folder_names_and_labels_follow_them(tmp_path, monkeypatch):
    for value, name in ((120, "a"), (240, "C"), (10, "b")):  # in creation order and reversed, not sorted
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), value).save(tmp_path / "train" / name / f"{i}.png")
    # Folders listed in reverse name order, whatever this filesystem lists (tmpfs: newest first; ext4: by hash):
    # sorted names can only come from the code's own sorting.
    scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: ReverseListing(sorted(scandir(path), key=lambda e: e.name)[::-1]))
    dm = folder_module_for(tmp_path, image_shape=(1, 8, 8), val_size=0)
    facts = dm.discover()
    assert facts["class_names"] == ["C", "a", "b"] and facts["num_classes"] == 3
    dm.setup()
    images, labels = dm.splits["train"]
    value_of_label = {0: 240, 1: 120, 2: 10}
    assert all(images[i, 0, 0, 0].item() == value_of_label[int(labels[i])] for i in range(len(labels)))


def test_without_a_val_folder_val_size_images_are_held_out_by_a_seeded_split(tmp_path):
    make_image_folder(tmp_path, n_train=200, n_test=30)
    first, again, other = (folder_module_for(tmp_path, split_seed=s) for s in (0, 0, 1))
    for dm in (first, again, other):
        dm.setup()
    assert len(first.splits["val"][1]) == 40 and len(first.splits["train"][1]) == 160
    assert torch.equal(first.splits["val"][0], again.splits["val"][0])
    assert not torch.equal(first.splits["val"][0], other.splits["val"][0])
    assert len(first.splits["test"][1]) == 30


def test_a_val_folder_is_the_validation_split_and_train_keeps_every_image(tmp_path):
    make_image_folder(tmp_path, n_train=120, n_val=30, n_test=20)
    dm = folder_module_for(tmp_path, val_size=50)
    dm.setup()
    assert [len(dm.splits[s][1]) for s in ("train", "val", "test")] == [120, 30, 20]


def test_without_a_test_folder_the_test_split_is_the_validation_split_and_this_is_said_once(tmp_path, capsys):
    make_image_folder(tmp_path, n_train=100, n_val=20, n_test=0)
    dm = folder_module_for(tmp_path)
    dm.discover()
    dm.setup()
    assert torch.equal(dm.splits["test"][0], dm.splits["val"][0])
    assert capsys.readouterr().out.count("has no test/ folder") == 1


def test_a_val_or_test_class_that_train_lacks_is_refused(tmp_path):
    make_image_folder(tmp_path, n_train=60, n_test=20)
    (tmp_path / "test" / "yak").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "test" / "yak" / "0.png")
    with pytest.raises(UserError, match=r"test/yak is not one of the model's classes"):
        folder_module_for(tmp_path, val_size=10).discover()


def test_an_empty_class_folder_is_refused_and_stray_files_are_ignored_and_counted(tmp_path, capsys):
    make_image_folder(tmp_path, n_train=60, n_test=0)
    (tmp_path / "train" / "notes.txt").write_text("not a class")
    (tmp_path / "train" / "ant" / "readme.md").write_text("not an image")
    dm = folder_module_for(tmp_path, val_size=10)
    dm.discover()
    assert "ignored 2 files" in capsys.readouterr().out
    (tmp_path / "train" / "zebra").mkdir()
    with pytest.raises(UserError, match=r"train/zebra holds no PNG, JPEG, BMP or WebP images"):
        folder_module_for(tmp_path, val_size=10).discover()


def test_a_missing_folder_or_a_val_size_too_large_is_one_clear_paragraph(tmp_path):
    with pytest.raises(UserError, match="has no train/ folder"):
        folder_module_for(tmp_path).discover()
    with pytest.raises(UserError, match="needs the folder of your images"):
        FolderDataModule(data_dir=None)
    make_image_folder(tmp_path, n_train=30, n_test=10)
    with pytest.raises(UserError, match=r"data.val_size=40 must be at least 0 and below the 30 training images"):
        folder_module_for(tmp_path).discover()


# --- undecodable files ---------------------------------------------------------------------------------------------
def add_bad_files(root: Path) -> list[Path]:
    truncated = root / "train" / "ant" / "truncated.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    text = root / "test" / "bee" / "notes.jpg"
    text.write_text("not a JPEG")
    return [truncated, text]


def test_undecodable_files_are_named_together_in_one_paragraph(tmp_path):
    make_image_folder(tmp_path, n_train=80, n_test=20)
    bad = add_bad_files(tmp_path)
    with pytest.raises(UserError, match="2 image files .* cannot be decoded") as err:
        folder_module_for(tmp_path, val_size=10).discover()
    assert all(str(path) in str(err.value) for path in bad) and "data.skip_bad_files=true" in str(err.value)


def test_skip_bad_files_leaves_them_out_and_counts_them(tmp_path, capsys):
    make_image_folder(tmp_path, n_train=80, n_test=20)
    add_bad_files(tmp_path)
    dm = folder_module_for(tmp_path, val_size=10, skip_bad_files=True)
    dm.setup()
    assert "Skipped 2 image files" in capsys.readouterr().out
    assert len(dm.splits["train"][1]) + len(dm.splits["val"][1]) == 80 and len(dm.splits["test"][1]) == 20


# --- mean and std --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_mean_and_std_are_the_training_splits_pixel_statistics(tmp_path, shape):
    make_image_folder(tmp_path, shape=shape, n_train=120, n_test=20)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "train" / "ant" / "red.png")  # unlike other channels
    dm = folder_module_for(tmp_path, image_shape=shape)
    facts = dm.discover()
    dm.setup()
    pixels = dm.splits["train"][0].double() / 255
    assert facts["mean"] == pytest.approx(pixels.mean((0, 2, 3)).tolist(), abs=6e-5)
    assert facts["std"] == pytest.approx(pixels.std((0, 2, 3), unbiased=False).tolist(), abs=6e-5)
    assert len(facts["mean"]) == shape[0]


# --- the cache -----------------------------------------------------------------------------------------------------
def counting_decoder(monkeypatch) -> list[int]:
    """Count the files decode_files is asked to decode."""
    calls: list[int] = []
    real = folder_module.decode_files

    def counted(root, paths, *args, **kwargs):
        calls.append(len(paths))
        return real(root, paths, *args, **kwargs)

    monkeypatch.setattr(folder_module, "decode_files", counted)
    return calls


def test_the_cache_is_built_once_then_reused(tmp_path, monkeypatch):
    make_image_folder(tmp_path, n_train=100, n_test=20)
    calls = counting_decoder(monkeypatch)
    first = folder_module_for(tmp_path)
    first.setup()
    assert calls == [100, 20] and [p.name for p in cache_files(tmp_path)] == ["test-3x32x32.pt", "train-3x32x32.pt"]
    again = folder_module_for(tmp_path)
    again.setup()
    assert calls == [100, 20]  # nothing decoded
    assert torch.equal(first.splits["train"][0], again.splits["train"][0]) and first.mean == again.mean


def test_the_cache_is_rebuilt_when_a_file_changes_and_per_image_shape(tmp_path, monkeypatch):
    make_image_folder(tmp_path, n_train=100, n_test=20)
    folder_module_for(tmp_path).setup()
    changed = sorted((tmp_path / "train" / "ant").glob("*.png"))[0]
    Image.new("RGB", (32, 32), (1, 2, 3)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    calls = counting_decoder(monkeypatch)
    dm = folder_module_for(tmp_path, val_size=0)
    dm.setup()
    assert calls == [100]  # train/ again; test/ unchanged
    row = dm.indexes["train"]["files"].split("\n").index(changed.relative_to(tmp_path).as_posix())
    assert dm.indexes["train"]["images"][row, :, 0, 0].tolist() == [1, 2, 3]
    folder_module_for(tmp_path, image_shape=(1, 28, 28)).setup()
    assert calls == [100, 100, 20] and len(cache_files(tmp_path)) == 4  # a cache per image_shape


def test_a_file_rewritten_at_the_same_size_is_decoded_again_because_its_mtime_changed(tmp_path):
    make_image_folder(tmp_path, n_train=60, n_test=0)
    bmp = tmp_path / "train" / "ant" / "same-size.bmp"
    Image.new("RGB", (32, 32), (10, 20, 30)).save(bmp)
    folder_module_for(tmp_path, val_size=10).setup()
    size, mtime = bmp.stat().st_size, bmp.stat().st_mtime_ns
    Image.new("RGB", (32, 32), (200, 100, 50)).save(bmp)  # an uncompressed BMP's size follows its dimensions only
    os.utime(bmp, ns=(mtime, mtime + 10**9))  # as a later save leaves it, on filesystems with coarse timestamps too
    assert bmp.stat().st_size == size
    dm = folder_module_for(tmp_path, val_size=10)
    dm.setup()
    row = dm.indexes["train"]["files"].split("\n").index(bmp.relative_to(tmp_path).as_posix())
    assert dm.indexes["train"]["images"][row, :, 0, 0].tolist() == [200, 100, 50]  # not the cached (10, 20, 30)


def test_a_cache_that_fails_to_write_leaves_no_file_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    make_image_folder(tmp_path, n_train=60, n_test=0)

    def disk_full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 half a cache")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    dm = folder_module_for(tmp_path, val_size=10)
    dm.setup()
    assert len(dm.splits["train"][1]) == 50 and "No space left on device" in capsys.readouterr().out
    assert list((tmp_path / ".cnnlab-cache").iterdir()) == []  # neither the cache nor its temporary file


def test_a_damaged_cache_file_is_rebuilt(tmp_path, monkeypatch):
    make_image_folder(tmp_path, n_train=60, n_test=0)
    folder_module_for(tmp_path, val_size=10).setup()
    cache = tmp_path / ".cnnlab-cache" / "train-3x32x32.pt"
    cache.write_bytes(cache.read_bytes()[:1000])
    calls = counting_decoder(monkeypatch)
    dm = folder_module_for(tmp_path, val_size=10)
    dm.setup()
    assert calls == [60] and len(dm.splits["train"][1]) == 50
    assert torch.load(cache, weights_only=True)["images"].shape == (60, 3, 32, 32)


def test_a_read_only_data_folder_caches_in_the_users_cache_folder_and_says_so(tmp_path, monkeypatch, capsys):
    root = make_image_folder(tmp_path / "images", n_train=60, n_test=0)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real = folder_module.writable_folder
    monkeypatch.setattr(folder_module, "writable_folder", lambda p: root not in p.parents and real(p))
    folder_module_for(root, val_size=10).setup()
    assert "is read-only: caching decoded images in" in capsys.readouterr().out
    assert not (root / ".cnnlab-cache").exists()
    cached = list((tmp_path / "xdg" / "cnnlab").glob("images-*/train-3x32x32.pt"))
    assert len(cached) == 1
    calls = counting_decoder(monkeypatch)
    folder_module_for(root, val_size=10).setup()
    assert calls == []  # found there next time


def test_cache_dir_puts_the_cache_where_it_says(tmp_path):
    root = make_image_folder(tmp_path / "images", n_train=60, n_test=0)
    folder_module_for(root, val_size=10, cache_dir=str(tmp_path / "cache")).setup()
    assert len(list((tmp_path / "cache").glob("images-*/train-3x32x32.pt"))) == 1
    assert not (root / ".cnnlab-cache").exists()


def test_decoding_on_several_processes_gives_the_same_cache_as_one(tmp_path):
    root = make_image_folder(tmp_path, n_train=300, n_test=0, suffix=".jpg")
    paths = sorted(p.relative_to(root).as_posix() for p in (root / "train").rglob("*.jpg"))
    one = folder_module.decode_files(root, paths, (3, 32, 32), keep_pixels=True, workers=1)
    several = folder_module.decode_files(root, paths, (3, 32, 32), keep_pixels=True, workers=2)
    for key in ("images", "sums", "sums_of_squares"):
        assert torch.equal(one[key], several[key])


def test_a_folder_too_big_for_memory_is_refused_before_decoding_unless_loaded_per_item(tmp_path, monkeypatch):
    make_image_folder(tmp_path, n_train=100, n_test=0)
    monkeypatch.setattr(folder_module, "physical_memory", lambda: 100 * 3 * 32 * 32)  # twice the pixels is too little
    with pytest.raises(UserError, match="data.loader=torchvision"):
        folder_module_for(tmp_path).discover()
    assert cache_files(tmp_path) == []
    folder_module_for(tmp_path, loader="torchvision").discover()  # decodes once for the statistics, keeps no pixels
    assert torch.load(cache_files(tmp_path)[0], weights_only=True)["images"] is None


def test_the_torchvision_loader_decodes_per_item_and_gives_the_tensor_loaders_batches(tmp_path):
    make_image_folder(tmp_path, n_train=100, n_test=30, suffix=".jpg")
    tensor, lazy = folder_module_for(tmp_path), folder_module_for(tmp_path, loader="torchvision")
    tensor.setup()
    lazy.setup()
    assert isinstance(lazy.splits["train"][0], folder_module.LazyImages)
    assert torch.equal(lazy.splits["test"][0][torch.tensor([3, 0])], tensor.splits["test"][0][[3, 0]])
    assert lazy.splits["test"][0][torch.tensor([], dtype=torch.int64)].shape == (0, 3, 32, 32)  # no errors to show
    assert tensor.mean == lazy.mean and tensor.std == lazy.std
    for split in ("val", "test"):
        loader_of = {"val": "val_dataloader", "test": "test_dataloader"}[split]
        (x, y), (lx, ly) = next(iter(getattr(tensor, loader_of)())), next(iter(getattr(lazy, loader_of)()))
        assert torch.equal(y, ly) and torch.allclose(x, lx, atol=1e-6)


# --- the model follows the folder ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model, shape", [*[(m, [3, 32, 32]) for m in MODELS], ("lenet5", [1, 28, 28]), ("resnet8", [1, 40, 24])]
)
def test_the_models_channels_and_classes_follow_the_folder(tmp_path, model, shape):
    classes = ["circle", "square", "star", "wave"]
    make_image_folder(tmp_path / "images", shape=tuple(shape), n_train=40, n_test=0, classes=classes)
    overrides = [*folder_overrides(tmp_path / "images", model), f"data.image_shape={shape}", "data.val_size=8"]
    cfg = compose_config(overrides, tmp_path)
    with open_dict(cfg):
        cfg.data.update(instantiate(cfg.data).discover())
    check_model_fits_data(cfg)
    net = instantiate(cfg.model).eval()
    assert net(torch.zeros(2, *shape)).shape == (2, 4)
    first_conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == shape[0]


# --- checkpoints, eval and predict ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """ResNet-8 trained briefly on a folder of 40x36 JPEG photos-to-be (converted to 3x32x32)."""
    base = tmp_path_factory.mktemp("folder_run")
    root = make_image_folder(base / "images", shape=(3, 36, 40), n_train=240, n_test=60, suffix=".jpg")
    cfg = compose_config(
        [*folder_overrides(root), "trainer.max_epochs=2", "optimizer.lr=0.05"], base / "run", config_name="train"
    )
    return root, base / "run", train(cfg)


def test_the_checkpoint_stores_the_folders_class_names_and_statistics(folder_run):
    _, run_dir, _ = folder_run
    data = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)["hyper_parameters"]["data"]
    assert data["class_names"] == FOLDER_CLASSES and data["num_classes"] == 10
    assert len(data["mean"]) == len(data["std"]) == 3 and all(0 < s < 1 for s in data["std"])


def test_eval_names_the_classes_and_reuses_the_stored_statistics(folder_run, tmp_path, monkeypatch):
    _, run_dir, metrics = folder_run

    def recomputed(self):
        raise AssertionError("evaluation recomputed the folder's mean and std")

    monkeypatch.setattr(FolderDataModule, "pixel_statistics", recomputed)
    cfg = compose_config([f"ckpt_path={run_dir}/checkpoints/best.ckpt"], tmp_path, config_name="eval")
    result = evaluate(cfg)
    assert list(result["test_precision"]) == FOLDER_CLASSES
    assert result["test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-6) and result["samples"] == 60


def test_predict_converts_files_as_training_did(folder_run):
    root, run_dir, _ = folder_run
    ckpt_path = run_dir / "checkpoints" / "best.ckpt"
    files = sorted((root / "test").rglob("*.jpg"))
    rows = predict(predict_config(f"ckpt_path={ckpt_path}", f"inputs={root}/test/*/*.jpg", "top_k=1"))["predictions"]
    ckpt = load_checkpoint(ckpt_path)
    dm = instantiate(ckpt["hyper_parameters"]["data"], _convert_="all")
    dm.setup()
    classifier = classifier_from_checkpoint(ckpt)
    order = dm.indexes["test"]["files"].split("\n")
    images = dm.splits["test"][0][[order.index(f.relative_to(root).as_posix()) for f in files]]
    with torch.inference_mode():
        expected = classifier(dm.batch_transform(augment=False)(images)).argmax(1).tolist()
    assert [row["classes"][0] for row in rows] == [FOLDER_CLASSES[i] for i in expected]


def test_export_needs_only_the_checkpoint_of_a_folder_run(folder_run, tmp_path):
    from cnnlab.commands.export import export
    from tests.test_export import export_config

    root, run_dir, _ = folder_run
    out = tmp_path / "model.pt"
    moved = tmp_path / "images_elsewhere"
    root.rename(moved)  # the data folder is not needed: the checkpoint holds the input shape, mean and std
    try:
        export(export_config(f"ckpt_path={run_dir}/checkpoints/best.ckpt", "format=torchscript", f"output={out}"))
    finally:
        moved.rename(root)
    assert torch.jit.load(out)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


# --- the command line ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model, shape, epochs, splits",
    [
        ("lenet5", (1, 28, 28), 3, {"n_val": 0, "n_test": 0}),
        ("resnet8", (3, 32, 32), 2, {"n_val": 60, "n_test": 60}),
    ],
)
def test_train_script_learns_a_folder_end_to_end(tmp_path, model, shape, epochs, splits):
    make_image_folder(tmp_path / "images", shape=shape, n_train=300, **splits)
    overrides = [*folder_overrides(Path("images"), model), f"data.image_shape=[{','.join(map(str, shape))}]"]
    result = run_script(
        "train", *overrides, f"trainer.max_epochs={epochs}", "optimizer.lr=0.05", "hydra.run.dir=run", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("has no test/ folder" in result.stdout) == (splits["n_test"] == 0)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test_acc"] > 0.5
    stored = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)["hyper_parameters"]
    assert stored["data"]["class_names"] == FOLDER_CLASSES and stored["data"]["image_shape"] == list(shape)


def test_train_script_reports_a_bad_image_by_path_with_exit_2(tmp_path):
    make_image_folder(tmp_path / "images", n_train=60, n_test=20)
    bad = add_bad_files(tmp_path / "images")
    result = run_script(
        "train", *folder_overrides(Path("images")), "data.val_size=10", "hydra.run.dir=run", cwd=tmp_path
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert all(str(path) in result.stderr.replace("\n", "") for path in bad)


def test_folder_benchmark_writes_cifar_as_pngs_and_reports_every_measure(tmp_path):
    from cnnlab.tools.folder_benchmark import benchmark_folder
    from tests.conftest import make_cifar

    make_cifar(tmp_path / "data", n_train=200, n_test=50)
    overrides = [
        *folder_overrides(tmp_path / "png", "lenet5"),
        f"make_from={tmp_path / 'data' / 'cifar-10-batches-py'}",
        f"reference_data_dir={tmp_path / 'data'}",
        "steps=3",
        "warmup_steps=1",
        "repeats=1",
        "device=cpu",
    ]
    result = benchmark_folder(compose_config(overrides, tmp_path, config_name="benchmark_folder"))
    assert result["images_written"] == 250 and len(list((tmp_path / "png" / "test").rglob("*.png"))) == 50
    assert result["images_decoded"] == 250 and result["images_decoded_per_second"] > 0
    assert result["cache_load_seconds"] > 0 and result["cifar10_load_seconds"] > 0
    # the ratio of the two rates as reported (each rounded to 0.1 image/s, the ratio to 3 decimals)
    assert result["folder_over_cifar10"] == pytest.approx(
        result["folder_train_images_per_second"] / result["cifar10_train_images_per_second"], rel=1e-2
    )
    assert json.loads((tmp_path / "benchmark_folder.json").read_text())["images_decoded"] == 250


def test_make_shapes_writes_a_folder_that_trains_evaluates_and_predicts(tmp_path):
    from cnnlab.cli import make_shapes_main
    from cnnlab.data.shapes import SHAPES

    make_shapes_main([str(tmp_path / "shapes"), "--train", "90", "--test", "30"])
    for split, count in (("train", 30), ("test", 10)):
        for shape in SHAPES:
            files = sorted((tmp_path / "shapes" / split / shape).iterdir())
            assert len(files) == count and {f.suffix for f in files} == {".png", ".jpg"}
    overrides = folder_overrides(tmp_path / "shapes", "resnet8", "data.val_size=30", "trainer.max_epochs=1")
    metrics = train(compose_config(overrides, tmp_path / "run"))
    ckpt = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["data"]["class_names"] == list(SHAPES)
