"""One check that the test stage, eval, predict and the ONNX export score a checkpoint alike."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from cnnlab.checkpoints.load import load_checkpoint
from cnnlab.training.classifier import classifier_from_checkpoint
from tests.conftest import compose_config


def assert_one_inference_path(best: Path, metrics: dict[str, Any], tmp_path: Path, tta: str) -> dict[str, Any]:
    """eval reproduces the test stage's metrics; predict, on the first 16 test images written as PNG files, gives the
    classes and probabilities of the classifier's predict_logits; the ONNX export computes the same logits and names
    the TTA level. Returns what a caller may check further: the classifier, the batch and the ONNX logits."""
    import onnxruntime

    from cnnlab.commands.evaluate import evaluate
    from cnnlab.commands.export import export
    from cnnlab.commands.predict import predict
    from tests.test_export import export_config
    from tests.test_predict import predict_config

    ckpt = load_checkpoint(best)
    assert ckpt["hyper_parameters"]["tta"] == tta
    evaluated = evaluate(compose_config([f"ckpt_path={best}"], tmp_path / "eval", config_name="eval"))
    assert evaluated["test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-6)
    assert evaluated["test_loss"] == pytest.approx(metrics["test_loss"], abs=1e-5)

    datamodule = instantiate(ckpt["hyper_parameters"]["data"])
    datamodule.setup()
    images = datamodule.splits["test"][0][:16]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:02d}.png")
    predicted = predict(predict_config(f"ckpt_path={best}", f"inputs={folder}"))
    classifier = classifier_from_checkpoint(ckpt)
    batch = datamodule.batch_transform(augment=False)(images)
    with torch.inference_mode():
        logits = classifier.predict_logits(batch)
    for row, p in zip(predicted["predictions"], logits.softmax(1), strict=True):
        assert row["classes"][0] == datamodule.class_names[int(p.argmax())]
        assert row["probabilities"][0] == pytest.approx(float(p.max()), abs=1e-5)

    exported = export(export_config(f"ckpt_path={best}", f"output={tmp_path / 'm.onnx'}"))
    assert exported["tta"] == tta and exported["max_abs_diff"] <= 1e-4
    session = onnxruntime.InferenceSession(exported["output"], providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": batch.numpy()})[0]
    assert np.abs(got - logits.numpy()).max() <= 1e-4
    return {"classifier": classifier, "batch": batch, "onnx_logits": got, "session": session, "export": exported}
