"""model=torchvision: torchvision's ImageNet networks as backbones, their weights read from torchvision's cache.

No test downloads anything: a weights file built here (a torchvision model's state_dict with every tensor drawn at
random, so that nothing matches a fresh initialization by chance) stands under the name torchvision's cache gives
the real one, in a temporary TORCH_HOME.
"""

import io
import json
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from torchvision.models import get_model, get_model_weights

from cnnlab.checkpoints.load import load_checkpoint
from cnnlab.commands.train import train
from cnnlab.commands.validation import check_finetune, validate_config
from cnnlab.errors import UserError
from cnnlab.models import torchvision_net
from cnnlab.training.classifier import classifier_from_checkpoint
from cnnlab.training.pretrained import load_backbone, preprocessing_from_weights
from tests.conftest import REPO, compose_config, make_image_folder, quick_run
from tests.launch import run_script, script_env

ARCHS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"]  # four heads: fc, classifier.{3,1,2}
THREE = ["cat", "dog", "fox"]
HEAD = ["classifier.3.weight", "classifier.3.bias"]  # mobilenet_v3_small's, the network of the fine-tuning run


def write_weights(torch_home: Path, arch: str) -> dict[str, torch.Tensor]:
    """A stand-in for torchvision's IMAGENET1K_V1 file of arch, where torchvision's cache keeps it; its tensors."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, tensor in get_model(arch, weights=None).state_dict().items():
        if not tensor.is_floating_point():
            state[name] = tensor + 7  # num_batches_tracked
        elif name.endswith("running_var"):
            state[name] = torch.rand(tensor.shape, generator=generator) + 0.5
        else:
            state[name] = torch.randn(tensor.shape, generator=generator) * 0.05
    path = torch_home / "hub" / "checkpoints" / Path(get_model_weights(arch).IMAGENET1K_V1.url).name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("arch", ARCHS)
def test_loading_carries_every_backbone_tensor_bit_identically_and_reinitializes_the_head(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    stored = write_weights(tmp_path, arch)
    # ImageNet's own class count: the head has the file's shape and is still replaced, not carried.
    model_cfg = {"arch": arch, "num_classes": 1000, "weights": "IMAGENET1K_V1"}
    model = torchvision_net(**model_cfg)
    head, report = load_backbone(model, {"_target_": "cnnlab.models.torchvision_net", **model_cfg})
    own = model.state_dict()
    assert len(head) == 2 and f"freshly initialized for 1000 classes: {', '.join(head)}" in report
    for name, tensor in own.items():
        if name in head:
            assert not torch.equal(tensor, stored[name]), name
        else:
            assert torch.equal(tensor, stored[name]), name
    assert f"{len(own) - 2} tensors carried over" in report


def test_a_weights_file_without_batchnorm_step_counters_loads_as_torchvision_loads_it(tmp_path, monkeypatch):
    """Older torchvision files have no num_batches_tracked entries, which torchvision's load_state_dict accepts
    (BatchNorm fills them in); a file missing a real tensor is still refused, naming it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    stored = write_weights(tmp_path, "resnet18")
    path = tmp_path / "hub" / "checkpoints" / Path(get_model_weights("resnet18").IMAGENET1K_V1.url).name
    without = {k: v for k, v in stored.items() if not k.endswith("num_batches_tracked")}
    assert len(without) < len(stored)
    torch.save(without, path)
    model_cfg = {
        "_target_": "cnnlab.models.torchvision_net",
        "arch": "resnet18",
        "num_classes": 3,
        "weights": "IMAGENET1K_V1",
    }
    model = torchvision_net(**{k: v for k, v in model_cfg.items() if k != "_target_"})
    head, _ = load_backbone(model, model_cfg)
    reference = get_model("resnet18", weights=None)
    reference.load_state_dict(without, strict=False)  # what torchvision's own loading leaves in the counters
    for name, tensor in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(tensor, reference.state_dict()[name]), name
        elif name not in head:
            assert torch.equal(tensor, stored[name]), name
    torch.save({k: v for k, v in without.items() if k != "layer1.0.conv1.weight"}, path)
    with pytest.raises(UserError, match=r"layer1\.0\.conv1\.weight.*damaged") as err:
        load_backbone(torchvision_net(**{k: v for k, v in model_cfg.items() if k != "_target_"}), model_cfg)
    assert "\n" not in str(err.value)


def test_the_data_takes_input_size_mean_and_std_from_the_weights_unless_given(tmp_path):
    preprocessing = get_model_weights("resnet18").IMAGENET1K_V1.transforms()
    cfg = compose_config(quick_run(tmp_path, model="torchvision", data="folder"), tmp_path)
    preprocessing_from_weights(cfg)
    assert list(cfg.data.image_shape) == [3, 224, 224]
    assert list(cfg.data.mean) == preprocessing.mean and list(cfg.data.std) == preprocessing.std
    given = ["data.image_shape=[3,64,64]", "data.mean=[0.5,0.5,0.5]"]
    cfg = compose_config(quick_run(tmp_path, *given, model="torchvision", data="folder"), tmp_path)
    preprocessing_from_weights(cfg)
    assert list(cfg.data.image_shape) == [3, 64, 64] and list(cfg.data.mean) == [0.5, 0.5, 0.5]
    assert list(cfg.data.std) == preprocessing.std
    cfg = compose_config(quick_run(tmp_path, model="torchvision", data="cifar10"), tmp_path)
    with pytest.raises(UserError, match=r"fixed size\. Give it: data.image_shape=\[3,32,32\]"):
        preprocessing_from_weights(cfg)


def test_missing_weights_offline_stop_the_run_before_any_data_is_read_naming_file_folder_and_url(tmp_path):
    args = quick_run(tmp_path / "no-such-folder", "download_weights=false", model="torchvision", data="folder")
    result = run_script("train", *args, "hydra.run.dir=run", cwd=tmp_path, env={"TORCH_HOME": str(tmp_path / "th")})
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    folder = tmp_path / "th" / "hub" / "checkpoints"
    assert f"needs the file resnet18-f37072fd.pth in {folder}" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "no-such-folder" not in message and "Traceback" not in result.stderr


def test_backbone_lr_scale_needs_weights_to_scale(tmp_path):
    overrides = quick_run(tmp_path, "model.weights=null", "backbone_lr_scale=0.1", model="torchvision", data="folder")
    cfg = compose_config(overrides, tmp_path)
    preprocessing_from_weights(cfg)
    with pytest.raises(UserError, match="init_from is not set and the model has no weights"):
        check_finetune(cfg)
    validate_config(cfg)  # model.weights=null needs no file


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A TORCH_HOME holding the stand-in mobilenet_v3_small ImageNet file, and that file's tensors."""
    home = tmp_path_factory.mktemp("torch_home")
    return home, write_weights(home, "mobilenet_v3_small")


@pytest.fixture(scope="module")
def fine_tuned(torch_home, tmp_path_factory) -> tuple[Path, dict, str]:
    """MobileNetV3-Small fine-tuned for one epoch on a generated three-class folder, normalized as the weights expect
    (ImageNet's mean and std; 64x64 instead of their 224x224 to keep it quick), its stem frozen, the backbone at a
    tenth of the rate: run dir, metrics, and what the run printed."""
    folder = make_image_folder(tmp_path_factory.mktemp("three"), n_train=150, n_test=30, classes=THREE)
    run_dir = tmp_path_factory.mktemp("fine_tuned")
    settings = ["data.val_size=30", "freeze=[features.0,features.1]", "backbone_lr_scale=0.1", "optimizer.lr=0.05"]
    settings += ["model.arch=mobilenet_v3_small", "trainer.max_epochs=1", "data.image_shape=[3,64,64]"]
    cfg = compose_config(quick_run(folder, *settings, model="torchvision", data="folder"), run_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(torch_home[0]))
        printed = io.StringIO()
        with redirect_stdout(printed):
            metrics = train(cfg)
    return run_dir, metrics, printed.getvalue()


def stored_model(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def test_fine_tuning_records_the_new_head_and_the_weights_preprocessing(fine_tuned):
    run_dir, metrics, printed = fine_tuned
    assert metrics["status"] == "finished" and metrics["test_acc"] is not None
    assert "new head, freshly initialized for 3 classes: classifier.3.weight, classifier.3.bias" in printed
    hparams = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)[
        "hyper_parameters"
    ]
    preprocessing = get_model_weights("mobilenet_v3_small").IMAGENET1K_V1.transforms()
    assert hparams["data"]["image_shape"] == [3, 64, 64]  # as given; the weights' 224 where left null
    assert hparams["data"]["mean"] == preprocessing.mean and hparams["data"]["std"] == preprocessing.std
    assert hparams["finetune"]["fresh"] == HEAD
    assert hparams["model"] == {
        "_target_": "cnnlab.models.torchvision_net",
        "arch": "mobilenet_v3_small",
        "num_classes": 3,
        "weights": "IMAGENET1K_V1",
    }


def test_frozen_layers_keep_the_files_weights_and_batchnorm_statistics(fine_tuned, torch_home):
    tuned, stored = stored_model(fine_tuned[0] / "checkpoints" / "last.ckpt"), torch_home[1]
    frozen = [n for n in tuned if n.startswith(("features.0.", "features.1."))]
    assert any(n.endswith("running_mean") for n in frozen)
    for name in frozen:
        assert torch.equal(tuned[name], stored[name]), name
    for name in ("features.2.block.0.0.weight", "features.2.block.0.1.running_mean"):
        assert not torch.equal(tuned[name], stored[name]), name  # the rest trains


def test_backbone_lr_scale_gives_the_backbone_the_scaled_rate_and_the_head_the_full_rate(fine_tuned):
    ckpt = torch.load(fine_tuned[0] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g["max_lr"] for g in groups] == pytest.approx([0.005, 0.05])  # the one-cycle peak per group
    assert len(groups[1]["params"]) == len(HEAD)  # the head alone at the full rate


def test_the_checkpoint_loads_with_weights_only_and_rebuilds_without_the_weights_file(
    fine_tuned, tmp_path, monkeypatch
):
    path = fine_tuned[0] / "checkpoints" / "best.ckpt"
    torch.load(path, map_location="cpu", weights_only=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # holds no weights file
    classifier = classifier_from_checkpoint(load_checkpoint(path))
    assert classifier(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_eval_predict_and_export_work_on_the_fine_tuned_checkpoint_without_the_weights_file(fine_tuned, tmp_path):
    run_dir, metrics, _ = fine_tuned
    best = run_dir / "checkpoints" / "best.ckpt"
    folder = Path(load_checkpoint(best)["hyper_parameters"]["data"]["data_dir"]) / "test" / "dog"
    commands = [
        ["eval.py", f"ckpt_path={best}", "hydra.run.dir=eval"],
        ["predict.py", f"ckpt_path={best}", f"inputs={folder}", "output=preds.csv"],
        ["export.py", f"ckpt_path={best}", "format=onnx", "output=model.onnx"],
    ]
    plan, results = tmp_path / "plan.json", tmp_path / "results.json"
    plan.write_text(json.dumps([[str(REPO / "scripts" / name), *args] for name, *args in commands]))
    # The three commands in one interpreter (tests/script_runner.py); nothing downstream reads the ImageNet file.
    env = script_env({"TORCH_HOME": str(tmp_path / "empty")})
    runner = [sys.executable, str(REPO / "tests" / "script_runner.py"), str(plan), str(results)]
    assert subprocess.run(runner, cwd=tmp_path, env=env, timeout=600).returncode == 0
    done = json.loads(results.read_text())
    assert [r["exit_code"] for r in done] == [0, 0, 0], [Path(r["log"]).read_text()[-2000:] for r in done]
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["test_acc"] == pytest.approx(metrics["test_acc"])
    assert len((tmp_path / "preds.csv").read_text().splitlines()) == 1 + len(list(folder.iterdir()))
    assert "N x 3 x 64 x 64" in Path(done[2]["log"]).read_text() and (tmp_path / "model.onnx").is_file()


def test_the_config_target_names_the_builder_even_after_its_module_is_imported():
    """`_target_: cnnlab.models.torchvision_net` (configs and stored checkpoints) is the function, not the module
    Python binds to the package's attribute when the submodule is imported first."""
    code = (
        "import cnnlab.models.torchvision_net, cnnlab.training.pretrained\n"
        "from hydra.utils import get_method\n"
        "print(get_method('cnnlab.models.torchvision_net').__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=script_env())
    assert result.returncode == 0 and result.stdout.split() == ["torchvision_net"], result.stderr[-2000:]


@pytest.mark.parametrize("arch", ["googlenet", "inception_v3"])
def test_backbones_that_return_auxiliary_outputs_while_training_are_refused_before_any_data_is_read(tmp_path, arch):
    # Their forward returns a tuple of logits while training, which the classifier's loss cannot take.
    folder = make_image_folder(tmp_path / "folder", n_train=40, n_test=10)
    overrides = quick_run(folder, f"model.arch={arch}", "model.weights=null", model="torchvision", data="folder")
    with pytest.raises(UserError, match=rf"arch='{arch}' is not a torchvision classification model.*auxiliary") as err:
        train(compose_config(overrides, tmp_path / "run"))
    assert "\n" not in str(err.value)
    assert not (folder / ".cnnlab-cache").exists() and not (tmp_path / "run" / "metrics.json").exists()
