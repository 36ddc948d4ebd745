"""predict(cfg) and scripts/predict.py: image files in, the classes the evaluation path would give out."""

import csv
from io import StringIO

import numpy as np
import onnx
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from rich.console import Console

from cnnlab.checkpoints.load import data_config, load_checkpoint
from cnnlab.cli import config_dir
from cnnlab.commands import predict as predict_module
from cnnlab.commands.evaluate import logits_and_labels
from cnnlab.commands.export import export
from cnnlab.commands.predict import load_image, predict, progress_bar
from cnnlab.errors import UserError
from cnnlab.training.classifier import classifier_from_checkpoint
from tests.checkpoint_helpers import save_untrained_checkpoint
from tests.conftest import CIFAR_CLASSES, compose_config, quick_run
from tests.launch import run_script

COUNT = 20


def predict_config(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="predict", overrides=list(overrides))


@pytest.fixture
def trained(trained_run):
    """best.ckpt of the session's briefly trained LeNet-5."""
    return trained_run[0] / "checkpoints" / "best.ckpt"


def save_test_digits(ckpt_path, folder, count: int = COUNT):
    """The first count test images of the checkpoint's data as PNG files, and the eval path's argmax for them."""
    ckpt = load_checkpoint(ckpt_path)
    datamodule = instantiate(data_config(ckpt), _convert_="all")
    datamodule.setup("test")
    images = datamodule.splits["test"][0][:count]
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        array = image.permute(1, 2, 0).numpy()  # (C, H, W) -> (H, W, C)
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(folder / f"digit_{i:02d}.png")
    logits, _ = logits_and_labels(classifier_from_checkpoint(ckpt), datamodule.test_dataloader(), torch.device("cpu"))
    return logits[:count]


def export_onnx(ckpt_path, output):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"ckpt_path={ckpt_path}", "format=onnx", f"output={output}"])
    return export(cfg)["output"]


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


def test_a_missing_checkpoint_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match="gone.ckpt"):
        predict(predict_config(f"ckpt_path={tmp_path / 'gone.ckpt'}", f"inputs={tmp_path}"))


def test_onnx_export_predicts_the_top_k_of_its_checkpoint(trained, tmp_path):
    save_test_digits(trained, tmp_path / "digits")
    model = export_onnx(trained, tmp_path / "digits.onnx")
    from_ckpt = predict(predict_config(f"ckpt_path={trained}", f"inputs={tmp_path / 'digits'}", "top_k=3"))
    from_onnx = predict(predict_config(f"ckpt_path={model}", f"inputs={tmp_path / 'digits'}", "top_k=3"))
    assert from_onnx["runs_on"] == "onnxruntime CPUExecutionProvider"
    for a, b in zip(from_ckpt["predictions"], from_onnx["predictions"], strict=True):
        assert a["file"] == b["file"] and a["classes"] == b["classes"]
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-5, rtol=0)


def test_onnx_export_of_an_rgb_flip_tta_model_predicts_as_its_checkpoint(tiny_data, tmp_path):
    ckpt = save_untrained_checkpoint(tmp_path / "best.ckpt", tiny_data, "resnet8", "cifar10")
    stored = torch.load(ckpt, weights_only=True)
    stored["hyper_parameters"]["tta"] = "flip"
    torch.save(stored, ckpt)
    save_test_digits(ckpt, tmp_path / "images", count=6)
    model = export_onnx(ckpt, tmp_path / "cifar.onnx")
    rows = [
        predict(predict_config(f"ckpt_path={path}", f"inputs={tmp_path / 'images'}", "top_k=10"))["predictions"]
        for path in (ckpt, model)
    ]
    for a, b in zip(*rows, strict=True):
        assert a["classes"][0] == b["classes"][0] and a["classes"][0] in CIFAR_CLASSES
        # all ten classes: the same probability for each name, whatever near-ties do to the order
        np.testing.assert_allclose(
            [dict(zip(b["classes"], b["probabilities"]))[c] for c in a["classes"]], a["probabilities"], atol=1e-5
        )


def test_an_onnx_file_without_cnnlab_metadata_is_one_user_error(trained, tmp_path):
    model = onnx.load(export_onnx(trained, tmp_path / "digits.onnx"))
    del model.metadata_props[:]  # as another tool would write it
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, foreign)
    save_test_digits(trained, tmp_path / "digits", count=2)
    output = tmp_path / "preds.csv"
    with pytest.raises(UserError, match="scripts/export.py") as err:
        predict(predict_config(f"ckpt_path={foreign}", f"inputs={tmp_path / 'digits'}", f"output={output}"))
    assert f"{foreign} has no cnnlab description" in str(err.value)
    assert not output.exists()


def test_a_damaged_onnx_file_is_a_user_error_naming_it(tmp_path):
    damaged = tmp_path / "model.onnx"
    damaged.write_bytes(b"\x08\x07garbage")
    with pytest.raises(UserError, match="cannot be loaded by onnxruntime") as err:
        predict(predict_config(f"ckpt_path={damaged}", f"inputs={tmp_path}"))
    assert str(damaged) in str(err.value)


def test_decoding_and_classifying_go_batch_by_batch(trained, tmp_path, monkeypatch):
    save_test_digits(trained, tmp_path / "digits")
    whole = predict(predict_config(f"ckpt_path={trained}", f"inputs={tmp_path / 'digits'}", "batch_size=256"))
    pending, most_pending = [], []

    def counting_load_image(path, image_shape):
        pending.append(path)
        return load_image(path, image_shape)

    def counting_predictor(*args):
        predictor = make_predictor(*args)
        logits = predictor.logits

        def counted(images):
            most_pending.append(len(pending))
            pending.clear()
            return logits(images)

        predictor.logits = counted
        return predictor

    make_predictor = predict_module.checkpoint_predictor
    monkeypatch.setattr(predict_module, "load_image", counting_load_image)
    monkeypatch.setattr(predict_module, "checkpoint_predictor", counting_predictor)
    batched = predict(predict_config(f"ckpt_path={trained}", f"inputs={tmp_path / 'digits'}", "batch_size=3"))
    assert most_pending == [3, 3, 3, 3, 3, 3, 2]  # never more images decoded than one batch holds
    for a, b in zip(whole["predictions"], batched["predictions"], strict=True):
        assert a["classes"] == b["classes"]
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-6)


def test_an_undecodable_file_in_a_late_batch_leaves_no_csv(trained, tmp_path):
    save_test_digits(trained, tmp_path / "images", count=6)
    (tmp_path / "images" / "zz_notes.png").write_text("not an image")  # sorted last: the fourth batch of two
    output = tmp_path / "preds.csv"
    cfg = predict_config(f"ckpt_path={trained}", f"inputs={tmp_path / 'images'}", "batch_size=2", f"output={output}")
    with pytest.raises(UserError, match="zz_notes.png cannot be decoded"):
        predict(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_predict_script_output_piped_holds_the_table_alone(trained, tmp_path):
    save_test_digits(trained, tmp_path / "images")
    result = run_script("predict", f"ckpt_path={trained}", "inputs=images", "batch_size=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""  # ten batches, and no progress bar: the output is not a terminal
    assert "\x1b" not in result.stdout and "Classifying" not in result.stdout
    assert result.stdout.count("digit_") == COUNT


def test_a_terminal_shows_a_progress_bar_for_many_batches(trained, tmp_path, monkeypatch, capsys):
    save_test_digits(trained, tmp_path / "images")
    from rich.console import Console

    # Rich treats the captured stderr as an interactive terminal (a property, so every Rich version obeys it)
    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    monkeypatch.setenv("TERM", "xterm-256color")
    predict(predict_config(f"ckpt_path={trained}", f"inputs={tmp_path / 'images'}", "batch_size=2"))
    assert f"Classifying {COUNT} images" in capsys.readouterr().err
    predict(predict_config(f"ckpt_path={trained}", f"inputs={tmp_path / 'images'}", "batch_size=8"))  # 3 batches
    assert "Classifying" not in capsys.readouterr().err


def test_progress_is_left_out_when_the_console_is_not_a_terminal():
    quiet = Console(file=StringIO())
    with progress_bar(quiet, 10, "Working") as step:
        for _ in range(10):
            step()
    assert quiet.file.getvalue() == ""
    terminal = Console(file=StringIO(), force_terminal=True, force_interactive=True)
    with progress_bar(terminal, 10, "Working") as step:
        for _ in range(10):
            step()
    assert "Working" in terminal.file.getvalue()


def test_an_error_inside_the_progress_bar_stops_it_and_shows_the_cursor_again():
    terminal = Console(file=StringIO(), force_terminal=True, force_interactive=True)
    with pytest.raises(UserError), progress_bar(terminal, 10, "Working") as step:
        step()
        raise UserError("an undecodable file")
    shown = terminal.file.getvalue()
    assert shown.rfind("\x1b[?25h") > shown.rfind("\x1b[?25l") >= 0  # the cursor hidden for the bar is shown again


def test_device_auto_uses_the_gpu_when_there_is_one(trained, tmp_path):
    save_test_digits(trained, tmp_path / "images", count=2)
    result = predict(predict_config(f"ckpt_path={trained}", f"inputs={tmp_path / 'images'}"))
    assert result["runs_on"] == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predictions_on_the_gpu_equal_those_on_the_cpu(trained, tmp_path):
    save_test_digits(trained, tmp_path / "images")
    rows = {
        device: predict(predict_config(f"ckpt_path={trained}", f"inputs={tmp_path / 'images'}", f"device={device}"))
        for device in ("cpu", "cuda")
    }
    assert rows["cuda"]["runs_on"] == "cuda"
    for a, b in zip(rows["cpu"]["predictions"], rows["cuda"]["predictions"], strict=True):
        assert a["classes"] == b["classes"]
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_device_cuda_without_a_gpu_is_a_user_error(trained, tmp_path):
    with pytest.raises(UserError, match="device=cuda, but PyTorch sees no CUDA GPU"):
        predict(predict_config(f"ckpt_path={trained}", f"inputs={tmp_path}", "device=cuda"))


def test_device_cuda_for_onnx_needs_onnxruntimes_cuda_provider(trained, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    model = export_onnx(trained, tmp_path / "digits.onnx")
    with pytest.raises(UserError, match="onnxruntime-gpu"):
        predict(predict_config(f"ckpt_path={model}", f"inputs={tmp_path}", "device=cuda"))


def test_a_torchscript_export_given_to_predict_is_a_user_error_naming_what_to_give():
    with pytest.raises(UserError, match="is a TorchScript export"):
        predict(predict_config("ckpt_path=run/best.torchscript.pt", "inputs=."))


def test_an_unknown_device_is_a_user_error():
    with pytest.raises(UserError, match="auto, cpu, cuda"):
        predict(predict_config("ckpt_path=x.ckpt", "inputs=.", "device=tpu"))


def test_real_mnist_digits_saved_as_png_are_predicted_as_eval_predicts_them(real_data, tmp_path):
    steps = ["data.batch_size=128", "trainer.max_epochs=1", "trainer.limit_train_batches=150"]  # 19,200 digits
    cfg = compose_config(
        quick_run(real_data, *steps, "trainer.limit_val_batches=1", "test=false", "logger=csv"), tmp_path / "run"
    )
    from cnnlab.commands.train import train

    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    logits = save_test_digits(ckpt, tmp_path / "digits")
    rows = predict(predict_config(f"ckpt_path={ckpt}", f"inputs={tmp_path / 'digits'}"))["predictions"]
    assert [r["classes"][0] for r in rows] == [str(i) for i in logits.argmax(dim=1).tolist()]
    # The first 20 MNIST test digits: a LeNet-5 after 150 steps gets nearly all of them.
    labels = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9, 0, 6, 9, 0, 1, 5, 9, 7, 3, 4]
    assert sum(r["classes"][0] == str(y) for r, y in zip(rows, labels)) >= 16
