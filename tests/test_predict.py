"""predict(cfg) and scripts/predict.py: image files in, the classes the evaluation path would give out."""

import csv

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from cnnlab.checkpoints import classifier_from_checkpoint, data_config, load_checkpoint
from cnnlab.cli import config_dir
from cnnlab.errors import UserError
from cnnlab.evaluate import logits_and_labels
from cnnlab.predict import load_image, predict
from tests.checkpoint_helpers import run_script, train_briefly
from tests.conftest import compose_config

COUNT = 20


def predict_config(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="predict", overrides=list(overrides))


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train")
    train_briefly(tiny_data, run_dir, "test=false")
    return run_dir / "checkpoints" / "best.ckpt"


def save_test_digits(ckpt_path, folder, count: int = COUNT):
    """The first count test images of the checkpoint's data as PNG files, and the eval path's argmax for them."""
    ckpt = load_checkpoint(ckpt_path)
    datamodule = instantiate(data_config(ckpt), _convert_="all")
    datamodule.setup("test")
    images = datamodule.splits["test"][0][:count]
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(folder / f"digit_{i:02d}.png")
    logits, _ = logits_and_labels(classifier_from_checkpoint(ckpt), datamodule.test_dataloader(), torch.device("cpu"))
    return logits[:count]


def test_predicted_labels_of_saved_test_digits_equal_the_eval_argmax(trained, tmp_path):
    logits = save_test_digits(trained, tmp_path / "digits")
    result = predict(predict_config(f"ckpt_path={trained}", f"inputs={tmp_path / 'digits'}", "top_k=1"))
    rows = result["predictions"]
    assert [r["file"] for r in rows] == [str(tmp_path / "digits" / f"digit_{i:02d}.png") for i in range(COUNT)]
    expected = [str(i) for i in logits.argmax(dim=1).tolist()]
    assert [r["classes"][0] for r in rows] == expected
    assert len(set(expected)) > 3  # a model that answers one class for everything would prove nothing
    probabilities = logits.softmax(dim=1).max(dim=1).values.tolist()
    assert [r["probabilities"][0] for r in rows] == pytest.approx(probabilities, abs=1e-5)


def test_predictions_are_written_as_csv_with_top_k_columns(trained, tmp_path):
    save_test_digits(trained, tmp_path / "digits", count=4)
    output = tmp_path / "preds.csv"
    predict(predict_config(f"ckpt_path={trained}", f"inputs={tmp_path}/digits/*.png", f"output={output}", "top_k=3"))
    with output.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and list(rows[0]) == [
        "file",
        "class_1",
        "probability_1",
        "class_2",
        "probability_2",
        "class_3",
        "probability_3",
    ]
    for row in rows:
        probs = [float(row[f"probability_{k}"]) for k in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-5
        assert len({row["class_1"], row["class_2"], row["class_3"]}) == 3


@pytest.mark.parametrize(
    "mode, size, suffix",
    [("RGB", (100, 80), ".jpg"), ("RGBA", (28, 28), ".png"), ("P", (14, 50), ".png"), ("I;16", (56, 56), ".png")],
)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_images_of_any_size_and_mode_become_the_models_input_shape(tmp_path, mode, size, suffix, shape):
    gradient = np.tile(np.linspace(0, 255, size[0], dtype=np.uint8), (size[1], 1))  # (H, W)
    image = (
        Image.fromarray(gradient).convert(mode) if mode != "I;16" else Image.fromarray(gradient.astype(np.uint16) * 257)
    )
    path = tmp_path / f"image{suffix}"
    image.save(path)
    array = load_image(path, shape)
    assert array.shape == shape and array.dtype == np.uint8
    assert array.min() < 40 and array.max() > 200  # the gradient survives: 16-bit values are scaled, not clipped


def test_an_image_that_cannot_be_decoded_is_a_user_error_naming_it(tmp_path):
    broken = tmp_path / "broken.png"
    good = Image.new("L", (28, 28))
    good.save(broken)
    broken.write_bytes(broken.read_bytes()[:30])  # cut inside the image data
    with pytest.raises(UserError, match="cannot be decoded") as err:
        load_image(broken, (1, 28, 28))
    assert str(broken) in str(err.value)


def test_predict_script_reports_an_undecodable_image_with_exit_2_and_writes_no_csv(trained, tmp_path):
    folder = tmp_path / "images"
    save_test_digits(trained, folder, count=2)
    (folder / "zz_notes.png").write_text("not an image")
    result = run_script("predict", f"ckpt_path={trained}", f"inputs={folder}", "output=preds.csv", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(folder / "zz_notes.png") in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no CSV, no run directory


def test_predict_script_prints_a_table_and_writes_a_csv(trained, tmp_path):
    save_test_digits(trained, tmp_path / "images", count=3)
    result = run_script(
        "predict", f"ckpt_path={trained}", "inputs=images/digit_00.png", "output=preds.csv", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "digit_00.png" in result.stdout and "top 1" in result.stdout
    assert (tmp_path / "preds.csv").read_text().startswith("file,class_1,probability_1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "preds.csv"]


def test_predict_script_reports_a_missing_checkpoint(tmp_path):
    result = run_script("predict", "ckpt_path=gone.ckpt", "inputs=.", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "gone.ckpt" in result.stderr


def test_real_mnist_digits_saved_as_png_are_predicted_as_eval_predicts_them(real_data, tmp_path):
    cfg = compose_config(
        [
            f"data.data_dir={real_data}",
            "data.download=false",
            "trainer=cpu",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=150",
            "trainer.limit_val_batches=1",
            "test=false",
            "logger=csv",
            "callbacks.progress_bar=null",
            "+trainer.enable_progress_bar=false",
        ],
        tmp_path / "run",
    )
    from cnnlab.train import train

    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    logits = save_test_digits(ckpt, tmp_path / "digits")
    rows = predict(predict_config(f"ckpt_path={ckpt}", f"inputs={tmp_path / 'digits'}"))["predictions"]
    assert [r["classes"][0] for r in rows] == [str(i) for i in logits.argmax(dim=1).tolist()]
    # The first 20 MNIST test digits: a LeNet-5 after 150 steps gets nearly all of them.
    labels = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9, 0, 6, 9, 0, 1, 5, 9, 7, 3, 4]
    assert sum(r["classes"][0] == str(y) for r, y in zip(rows, labels)) >= 16
