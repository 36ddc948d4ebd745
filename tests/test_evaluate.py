"""evaluate(cfg) and scripts/eval.py: reproducing the training run's test score, reports, figures, rankings, errors."""

import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.checkpoints.load import load_checkpoint
from cnnlab.commands.evaluate import evaluate, resolve_checkpoints
from cnnlab.commands.figures import confusion_matrix_figure, misclassified_figure
from cnnlab.errors import UserError
from tests.checkpoint_helpers import EXPECTED_MESSAGE, bad_files, write_hostile_checkpoint
from tests.conftest import CIFAR_CLASSES, compose_config, make_mnist
from tests.launch import run_script, tensorboard_events


def checkpoint_logits(path, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's logits for every image of a split of its own data, computed here without evaluate()."""
    from hydra.utils import instantiate

    from cnnlab.training.classifier import classifier_from_checkpoint

    ckpt = load_checkpoint(path)
    datamodule = instantiate(ckpt["hyper_parameters"]["data"])
    datamodule.setup()
    images, labels = datamodule.splits[split]
    with torch.inference_mode():
        logits = classifier_from_checkpoint(ckpt).predict_logits(datamodule.batch_transform(augment=False)(images))
    return logits, labels


def eval_config(tmp_path, *overrides):
    return compose_config(list(overrides), tmp_path, config_name="eval")


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    run_dir, _ = trained_run
    eval_dir = tmp_path_factory.mktemp("eval")
    return eval_dir, evaluate(eval_config(eval_dir, f"ckpt_path={run_dir}/checkpoints/best.ckpt"))


def test_eval_reproduces_train_test_accuracy(trained_run, evaluated):
    (run_dir, _), (_, metrics) = trained_run, evaluated
    written = json.loads((run_dir / "metrics.json").read_text())
    assert 0.3 < written["test_acc"] < 1.0  # a score where a wrongly rebuilt model or data path would show
    assert abs(metrics["test_acc"] - written["test_acc"]) <= 1e-6
    assert metrics["test_loss"] == pytest.approx(written["test_loss"], abs=1e-5)


def test_eval_on_the_val_split_reproduces_the_best_val_accuracy(trained_run, tmp_path):
    run_dir, train_metrics = trained_run
    metrics = evaluate(eval_config(tmp_path, f"ckpt_path={run_dir}/checkpoints/best.ckpt", "split=val"))
    assert metrics["split"] == "val" and "test_acc" not in metrics
    assert abs(metrics["val_acc"] - train_metrics["val_acc_best"]) <= 1e-6
    assert metrics["samples"] == 100  # data.val_size of the training run, read from the checkpoint


def test_eval_on_an_empty_val_split_is_refused_in_one_paragraph(trained_run, tmp_path):
    """A run trained on all its images (data.val_size=0, as experiment=cifar10_record) has no validation images."""
    run_dir, _ = trained_run
    config = eval_config(tmp_path, f"ckpt_path={run_dir}/checkpoints/best.ckpt", "split=val", "+data.val_size=0")
    with pytest.raises(UserError, match=r"split=val holds no images.*data.val_size=0.*split=test") as err:
        evaluate(config)
    assert "\n" not in str(err.value)


def test_metrics_json_holds_top5_per_class_scores_and_the_checkpoint_hash(trained_run, evaluated):
    (run_dir, _), (eval_dir, metrics) = trained_run, evaluated
    written = json.loads((eval_dir / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    best = run_dir / "checkpoints" / "best.ckpt"
    assert written["checkpoint"] == str(best)
    assert written["checkpoint_sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    assert written["samples"] == 200 and written["split"] == "test"
    logits, labels = checkpoint_logits(best)
    assert (logits.argmax(1) == labels).float().mean().item() == pytest.approx(written["test_acc"], abs=1e-6)
    in_top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1)
    assert in_top5.float().mean().item() == pytest.approx(written["test_top5_acc"], abs=1e-6)
    assert written["test_acc"] < written["test_top5_acc"]  # some errors have the right class among the next four
    assert set(written["test_precision"]) == set(written["test_recall"]) == {str(i) for i in range(10)}
    recall = np.array(list(written["test_recall"].values()))
    assert recall.mean() == pytest.approx(written["test_acc"], abs=1e-6)  # 20 test images per class
    precision = np.array(list(written["test_precision"].values()))
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    assert f1.mean() == pytest.approx(written["test_macro_f1"], abs=1e-6)  # macro: the mean of per-class F1


def test_report_pngs_are_real_images(evaluated):
    eval_dir, _ = evaluated
    for name in ("confusion_matrix.png", "misclassified.png"):
        with Image.open(eval_dir / name) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
    assert not list(eval_dir.glob(".*.tmp"))


def test_confusion_matrix_names_every_class_on_both_axes_and_counts_each_cell():
    matrix = np.arange(100).reshape(10, 10)
    fig = confusion_matrix_figure(matrix, CIFAR_CLASSES)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == CIFAR_CLASSES
    assert [t.get_text() for t in ax.get_yticklabels()] == CIFAR_CLASSES
    assert {t.get_text() for t in ax.texts} == {str(v) for v in range(100)}


def test_misclassified_grid_titles_each_image_with_true_and_predicted_class():
    images = np.zeros((3, 3, 32, 32), dtype=np.uint8)
    fig = misclassified_figure(images, ["cat", "dog", "ship"], ["dog", "cat", "truck"], [0.9, 0.8, 0.7], columns=2)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["true cat\npred dog (90%)", "true dog\npred cat (80%)", "true ship\npred truck (70%)"]


def test_eval_writes_figures_and_numbers_to_tensorboard(evaluated):
    eval_dir, metrics = evaluated
    events = tensorboard_events(eval_dir)
    assert {"test/confusion_matrix", "test/misclassified"} <= set(events.Tags()["images"])
    assert events.Scalars("test/acc")[-1].value == pytest.approx(metrics["test_acc"])
    assert "test/precision/3" in events.Tags()["scalars"]


def test_data_overrides_replace_the_stored_data_config(trained_run, tmp_path):
    run_dir, _ = trained_run
    other = make_mnist(tmp_path / "other", n_train=200, n_test=50, seed=7)
    metrics = evaluate(
        eval_config(
            tmp_path / "eval",
            f"ckpt_path={run_dir}/checkpoints/best.ckpt",
            f"data.data_dir={other}",
            "data.eval_batch_size=7",
        )
    )
    assert metrics["samples"] == 50


def test_eval_data_keys_replace_the_stored_loader_workers_and_download(trained_run, tmp_path, monkeypatch):
    import cnnlab.commands.evaluate as evaluate_module

    built, loaders = [], []
    build, score = evaluate_module.build_datamodule, evaluate_module.logits_and_labels

    def recording_build(*args):
        built.append(build(*args))
        return built[-1]

    def recording_score(classifier, loader, *args):
        loaders.append(loader)
        return score(classifier, loader, *args)

    monkeypatch.setattr(evaluate_module, "build_datamodule", recording_build)
    monkeypatch.setattr(evaluate_module, "logits_and_labels", recording_score)
    best = f"ckpt_path={trained_run[0]}/checkpoints/best.ckpt"
    stored = evaluate(eval_config(tmp_path / "stored", best))
    replaced = evaluate(eval_config(tmp_path / "replaced", best, "data.loader=torchvision", "data.num_workers=1",
                                    "data.download=true"))  # fmt: skip
    assert [(d.loader, d.num_workers, d.download) for d in built] == [("tensor", 0, False), ("torchvision", 1, True)]
    assert isinstance(loaders[1], torch.utils.data.DataLoader) and loaders[1].num_workers == 1
    assert replaced["test_acc"] == pytest.approx(stored["test_acc"], abs=1e-6)  # the same images, another path


def test_misclassified_figure_shows_the_24_errors_the_model_was_surest_of(trained_run, tmp_path, monkeypatch):
    import cnnlab.commands.figures as figures

    shown = {}
    draw = figures.misclassified_figure

    def recording_draw(*errors, **kwargs):
        shown["errors"] = errors
        return draw(*errors, **kwargs)

    monkeypatch.setattr(figures, "misclassified_figure", recording_draw)
    best = trained_run[0] / "checkpoints" / "best.ckpt"
    evaluate(eval_config(tmp_path, f"ckpt_path={best}"))
    images, true, predicted, confidence = shown["errors"]
    logits, labels = checkpoint_logits(best)
    surest, guess = logits.softmax(dim=1).max(dim=1)
    wrong = (guess != labels).nonzero().flatten()
    assert len(wrong) > 24  # more errors than the figure has room for
    top = wrong[surest[wrong].argsort(descending=True)][:24]
    assert confidence == pytest.approx(surest[top].tolist(), abs=1e-6)
    assert true == [str(int(i)) for i in labels[top]] and predicted == [str(int(i)) for i in guess[top]]
    assert len(images) == 24


def test_several_checkpoints_are_ranked_in_one_table(trained_run, tmp_path):
    run_dir, _ = trained_run
    multirun = tmp_path / "multirun"
    for job, name in (("0", "last.ckpt"), ("1", "best.ckpt")):
        (multirun / job / "checkpoints").mkdir(parents=True)
        shutil.copy(run_dir / "checkpoints" / name, multirun / job / "checkpoints" / "best.ckpt")
    untrained = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    untrained["state_dict"] = {k: torch.zeros_like(v) for k, v in untrained["state_dict"].items()}
    (multirun / "2" / "checkpoints").mkdir(parents=True)
    torch.save(untrained, multirun / "2" / "checkpoints" / "best.ckpt")
    assert resolve_checkpoints(str(multirun / "*" / "checkpoints" / "best.ckpt")) == resolve_checkpoints(str(multirun))

    eval_dir = tmp_path / "eval"
    result = evaluate(eval_config(eval_dir, f"ckpt_path={multirun}"))
    with (eval_dir / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["rank"] for r in rows] == ["1", "2", "3"] and len(result["checkpoints"]) == 3
    accuracies = [float(r["acc"]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert rows[-1]["checkpoint"] == str(multirun / "2" / "checkpoints" / "best.ckpt")  # all-zero weights: last
    markdown = (eval_dir / "comparison.md").read_text().splitlines()
    assert markdown[0].startswith("| rank | checkpoint") and len(markdown) == 2 + 3
    assert sorted(p.name for p in eval_dir.glob("*/metrics.json")) == ["metrics.json"] * 3


def test_a_list_of_checkpoints_resolves_each_file_once(trained_run):
    run_dir, _ = trained_run
    best, last = run_dir / "checkpoints" / "best.ckpt", run_dir / "checkpoints" / "last.ckpt"
    assert resolve_checkpoints([str(best), str(last), str(run_dir)]) == [best, last]  # the run dir adds best again
    with pytest.raises(UserError, match=r"without any run below it \(no checkpoints/best.ckpt or .*last.ckpt\)"):
        resolve_checkpoints([str(run_dir / "tensorboard")])


@pytest.mark.parametrize("kind", list(EXPECTED_MESSAGE))
def test_unusable_checkpoints_are_refused_with_one_clear_message(trained_run, tmp_path, kind):
    run_dir, _ = trained_run
    path = bad_files(tmp_path, run_dir / "checkpoints" / "best.ckpt")[kind]
    eval_dir = tmp_path / "eval"
    with pytest.raises(UserError) as err:
        evaluate(eval_config(eval_dir, f"ckpt_path={path}"))
    assert EXPECTED_MESSAGE[kind] in str(err.value) and str(path) in str(err.value)
    assert not eval_dir.exists() or not any(eval_dir.iterdir())


def test_hostile_checkpoint_is_refused_and_its_code_never_runs(tmp_path):
    proof, marker = tmp_path / "proof-marker", tmp_path / "marker"
    write_hostile_checkpoint(tmp_path / "proof.ckpt", proof)
    torch.load(tmp_path / "proof.ckpt", weights_only=False)  # full unpickling does run it
    assert proof.exists()

    hostile = write_hostile_checkpoint(tmp_path / "hostile.ckpt", marker)
    with pytest.raises(UserError, match="refused") as err:
        load_checkpoint(hostile)
    assert "builtins.open" in str(err.value) or "io.open" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "key,node",
    [
        ("data", {"_target_": "pathlib.Path.touch"}),
        ("model", {"_target_": "cnnlab.models.LeNet5", "activation": {"_target_": "pathlib.Path.touch"}}),
        ("optimizer", {"_target_": "os.system", "_partial_": True}),
    ],
)
def test_checkpoint_whose_configs_would_instantiate_foreign_code_is_refused(trained_run, tmp_path, key, node):
    run_dir, _ = trained_run
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    marker = tmp_path / "marker"
    node = {k: ({**v, "self": str(marker)} if isinstance(v, dict) else v) for k, v in node.items()}
    if key == "data":
        node["self"] = str(marker)
    ckpt["hyper_parameters"][key] = node
    torch.save(ckpt, tmp_path / "edited.ckpt")
    with pytest.raises(UserError, match=f"{key}.*refused"):
        evaluate(eval_config(tmp_path / "eval", f"ckpt_path={tmp_path / 'edited.ckpt'}"))
    assert not marker.exists()


def test_data_that_does_not_fit_the_model_is_refused_before_any_output(trained_run, tmp_path):
    run_dir, _ = trained_run
    best = f"ckpt_path={run_dir}/checkpoints/best.ckpt"
    wrong_size = tmp_path / "wide"
    make_mnist(wrong_size, n_train=20, n_test=20)
    from cnnlab.data.formats import read_idx, write_idx

    raw = wrong_size / "MNIST" / "raw"
    for prefix in ("train", "t10k"):
        images = read_idx(raw / f"{prefix}-images-idx3-ubyte")
        write_idx(raw / f"{prefix}-images-idx3-ubyte", np.pad(images, ((0, 0), (2, 2), (2, 2))))  # 32x32
    eval_dir = tmp_path / "eval"
    with pytest.raises(UserError, match=r"image_shape=\[1, 28, 28\]") as err:
        evaluate(eval_config(eval_dir, best, f"data.data_dir={wrong_size}"))
    assert str(raw) in str(err.value) or str(wrong_size) in str(err.value)
    with pytest.raises(UserError, match="does not fit the model"):
        evaluate(eval_config(eval_dir, best, "+data.image_shape=[3,32,32]"))
    with pytest.raises(UserError, match=r"data.num_classes=7 does not fit the model .* num_classes=10"):
        evaluate(eval_config(eval_dir, best, "+data.num_classes=7"))
    assert not eval_dir.exists() or not any(eval_dir.iterdir())


def test_eval_script_reports_a_bad_checkpoint_with_exit_2_and_no_traceback(trained_run, tmp_path):
    """The command line's side of test_unusable_checkpoints_are_refused_with_one_clear_message, for one kind."""
    run_dir, _ = trained_run
    kind = "truncated"
    path = bad_files(tmp_path, run_dir / "checkpoints" / "best.ckpt")[kind]
    result = run_script("eval", f"ckpt_path={path}", "hydra.run.dir=ev", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and str(path) in result.stderr
    assert EXPECTED_MESSAGE[kind] in result.stderr
    left = {p.name for p in (tmp_path / "ev").iterdir()}
    assert left <= {".hydra", "eval.log"}  # Hydra's record of the command, no partial report


def test_eval_script_refuses_a_hostile_checkpoint_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    hostile = write_hostile_checkpoint(tmp_path / "hostile.ckpt", marker)
    result = run_script("eval", f"ckpt_path={hostile}", "hydra.run.dir=ev", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(hostile) in result.stderr and "refused" in result.stderr
    assert not marker.exists()


def test_eval_script_writes_its_report_under_outputs_eval(trained_run, tmp_path):
    run_dir, _ = trained_run
    result = run_script("eval", f"ckpt_path={run_dir}/checkpoints/best.ckpt", "data.eval_batch_size=50", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (eval_dir,) = (tmp_path / "outputs" / "eval").iterdir()
    assert {"metrics.json", "confusion_matrix.png", "misclassified.png", "tensorboard", "eval.log"} <= {
        p.name for p in eval_dir.iterdir()
    }
    written = json.loads((run_dir / "metrics.json").read_text())
    assert json.loads((eval_dir / "metrics.json").read_text())["test_acc"] == pytest.approx(written["test_acc"])
    assert "test_acc" in result.stdout


def test_an_unknown_data_key_is_refused_with_the_stored_keys(trained_run, tmp_path):
    run_dir, _ = trained_run
    with pytest.raises(UserError, match="data.colour is not a key") as err:
        evaluate(eval_config(tmp_path, f"ckpt_path={run_dir}/checkpoints/best.ckpt", "+data.colour=red"))
    assert "eval_batch_size" in str(err.value)


def test_console_scripts_name_the_entry_points():
    import importlib

    from tests.conftest import REPO, pyproject

    scripts = pyproject()["project"]["scripts"]
    for name in ("eval", "predict", "export"):
        module, function = scripts[f"cnnlab-{name}"].split(":")
        assert callable(getattr(importlib.import_module(module), function))
        wrapper = (REPO / "scripts" / f"{name}.py").read_text()
        assert f"from cnnlab.cli import {function}" in wrapper
