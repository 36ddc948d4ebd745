"""Runs on the real MNIST and CIFAR-10 (folder from CNNLAB_REAL_DATA): the accuracy users are promised."""

import json

import numpy as np

from cnnlab.commands.train import train
from cnnlab.data.formats import read_cifar_pickle
from tests.conftest import compose_config, quick_run
from tests.launch import run_script


def test_default_command_reaches_99_percent_on_real_mnist(real_data, tmp_path):
    result = run_script("train", f"data.data_dir={real_data}", "hydra.run.dir=run", cwd=tmp_path, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    print(f"default MNIST run: test_acc={metrics['test_acc']:.4f} in {metrics['train_seconds']:.1f} s of training")
    assert metrics["test_acc"] >= 0.99


def test_mnist_fast_reaches_the_accuracy_its_config_documents_on_real_mnist(real_data, tmp_path):
    cfg = compose_config(["experiment=mnist_fast", "trainer=cpu", f"data.data_dir={real_data}"], tmp_path)
    metrics = train(cfg)
    print(f"experiment=mnist_fast: test_acc={metrics['test_acc']:.4f} in {metrics['train_seconds']:.1f} s of training")
    # configs/experiment/mnist_fast.yaml: LeNet-5 to 99% MNIST test accuracy in 2 epochs on all 60,000 images
    assert metrics["epochs"] == 2 and metrics["global_step"] == 2 * 469 and metrics["test_acc"] >= 0.99


def test_real_cifar10_batches_load_despite_their_rebuilt_checksums(real_data, tmp_path):
    overrides = quick_run(real_data, "data.val_size=5000", "trainer.fast_dev_run=true", model="resnet8", data="cifar10")
    metrics = train(compose_config(overrides, tmp_path))
    assert metrics["global_step"] == 1
    env = json.loads((tmp_path / "env.json").read_text())
    assert len(env["data_files_sha256"]) == 6
    meta = read_cifar_pickle(real_data / "cifar-10-batches-py" / "batches.meta")
    assert [n.decode() for n in meta["label_names"]][:2] == ["airplane", "automobile"]


def test_real_mnist_split_is_55k_train_5k_validation(real_data, tmp_path):
    from hydra.utils import instantiate

    cfg = compose_config([f"data.data_dir={real_data}"], tmp_path)
    dm = instantiate(cfg.data)
    dm.setup()
    assert len(dm.splits["train"][1]) == 55_000 and len(dm.splits["val"][1]) == 5_000
    assert len(dm.splits["test"][1]) == 10_000
    train_x = dm.splits["train"][0].float() / 255
    assert np.isclose(train_x.mean().item(), cfg.data.mean[0], atol=0.002)


def test_unfold_convolution_trains_lenet5_to_the_torch_convolutions_accuracy(real_data, tmp_path):
    accuracy = {}
    for impl in ("torch", "unfold"):
        overrides = [
            f"data.data_dir={real_data}",
            "trainer.max_epochs=1",
            f"model.conv_impl={impl}",
            "callbacks.progress_bar=null",
            "+trainer.enable_progress_bar=false",
        ]
        accuracy[impl] = train(compose_config(overrides, tmp_path / impl))["test_acc"]
    print(f"one epoch of LeNet-5 on MNIST: {accuracy}")
    assert accuracy["torch"] > 0.97
    assert abs(accuracy["torch"] - accuracy["unfold"]) <= 0.003
