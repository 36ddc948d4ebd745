"""export(cfg) and scripts/export.py: ONNX and TorchScript files that compute what the PyTorch model computes."""

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from hydra import compose, initialize_config_dir

from cnnlab.checkpoints.load import data_config, file_sha256, load_checkpoint
from cnnlab.cli import config_dir
from cnnlab.commands.export import export
from cnnlab.commands.export_metadata import read_torchscript_description
from cnnlab.errors import UserError
from cnnlab.training.classifier import classifier_from_checkpoint
from tests.checkpoint_helpers import save_untrained_checkpoint
from tests.launch import run_script


def export_config(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="export", overrides=list(overrides))


def pytorch_logits(ckpt_path, batch: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return classifier_from_checkpoint(load_checkpoint(ckpt_path))(batch).numpy()


@pytest.mark.parametrize("model, data", [("lenet5", "mnist"), ("resnet8", "cifar10")])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_model_matches_pytorch_on_a_new_batch(tiny_data, tmp_path, model, data, fmt):
    ckpt = save_untrained_checkpoint(tmp_path / "run" / "best.ckpt", tiny_data, model, data)
    result = export(export_config(f"ckpt_path={ckpt}", f"format={fmt}"))
    suffix = ".onnx" if fmt == "onnx" else ".torchscript.pt"
    assert result["output"] == str(tmp_path / "run" / f"best{suffix}")
    assert result["max_abs_diff"] <= 1e-4
    shape = load_checkpoint(ckpt)["hyper_parameters"]["data"]["image_shape"]
    batch = torch.randn(5, *shape, generator=torch.Generator().manual_seed(3))  # a batch size export never saw
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(result["output"], providers=["CPUExecutionProvider"])
        got = session.run(["logits"], {"images": batch.numpy()})[0]
    else:
        got = torch.jit.load(result["output"]).eval()(batch).detach().numpy()
    np.testing.assert_allclose(got, pytorch_logits(ckpt, batch), atol=1e-4, rtol=0)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(["best.ckpt", f"best{suffix}"])


def test_export_writes_to_the_output_given(tiny_data, tmp_path):
    ckpt = save_untrained_checkpoint(tmp_path / "best.ckpt", tiny_data)
    output = tmp_path / "models" / "digits.onnx"
    result = export(export_config(f"ckpt_path={ckpt}", "format=onnx", f"output={output}"))
    assert result["output"] == str(output)
    batch = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])  # the file given
    np.testing.assert_allclose(session.run(["logits"], {"images": batch.numpy()})[0], pytorch_logits(ckpt, batch),
                               atol=1e-4, rtol=0)  # fmt: skip
    assert sorted(p.name for p in output.parent.iterdir()) == ["digits.onnx"]  # nothing else, no temporary file


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_export_that_does_not_reproduce_pytorch_is_not_kept(tiny_data, tmp_path, fmt):
    ckpt = save_untrained_checkpoint(tmp_path / "best.ckpt", tiny_data)
    with pytest.raises(UserError, match=f"The {fmt} export .* does not reproduce PyTorch"):
        export(export_config(f"ckpt_path={ckpt}", f"format={fmt}", "tolerance=-1"))  # nothing can pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt"]


def test_unknown_format_is_a_user_error():
    with pytest.raises(UserError, match="onnx, torchscript"):
        export(export_config("ckpt_path=x.ckpt", "format=tflite"))


def test_export_script_reports_the_difference_it_measured(tiny_data, tmp_path):
    ckpt = save_untrained_checkpoint(tmp_path / "best.ckpt", tiny_data)
    result = run_script("export", f"ckpt_path={ckpt}", "format=onnx", "output=model.onnx", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max abs difference from PyTorch" in result.stdout and (tmp_path / "model.onnx").is_file()
    assert "Traceback" not in result.stderr


def test_export_script_reports_a_corrupt_checkpoint_with_exit_2(tmp_path):
    bad = tmp_path / "best.ckpt"
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    result = run_script("export", f"ckpt_path={bad}", "format=torchscript", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(bad) in result.stderr and "truncated or corrupt" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt"]


def with_tta(ckpt_path, level: str):
    """The checkpoint rewritten as a run trained with tta=<level> would store it."""
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["hyper_parameters"]["tta"] = level
    torch.save(ckpt, ckpt_path)
    return ckpt_path


@pytest.mark.parametrize("model, data, tta", [("lenet5", "mnist", "none"), ("resnet8", "cifar10", "flip_translate")])
def test_onnx_and_torchscript_exports_describe_themselves_as_the_checkpoint_does(tiny_data, tmp_path, model, data, tta):
    ckpt = save_untrained_checkpoint(tmp_path / "best.ckpt", tiny_data, model, data)
    with_tta(ckpt, tta)
    onnx_file = export(export_config(f"ckpt_path={ckpt}", "format=onnx"))["output"]
    script_file = export(export_config(f"ckpt_path={ckpt}", "format=torchscript"))["output"]

    from_onnx = {prop.key: json.loads(prop.value) for prop in onnx.load(onnx_file).metadata_props}
    from_script = read_torchscript_description(script_file)
    assert from_onnx == from_script
    stored = data_config(load_checkpoint(ckpt))
    for key in ("image_shape", "mean", "std", "class_names"):
        assert from_onnx[key] == list(stored[key]), key
    assert from_onnx["tta"] == tta
    assert from_onnx["checkpoint_sha256"] == file_sha256(ckpt)
    # What onnxruntime users read (README): the same values.
    meta = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"]).get_modelmeta()
    assert json.loads(meta.custom_metadata_map["class_names"]) == list(stored["class_names"])
