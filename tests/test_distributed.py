"""Distributed data parallel on CPU (gloo): two processes launched by Lightning, and two torchrun "nodes"."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from cnnlab.training.classifier import ImageClassifier
from tests.conftest import DDP_ON_CPU, make_mnist, quick_run
from tests.launch import free_port, run_script, script_env, script_path

TWO_EPOCHS = quick_run(None, "trainer.max_epochs=2", "trainer.limit_train_batches=4", trainer=None)  # DDP comes first


@pytest.fixture(scope="module")
def odd_mnist(tmp_path_factory) -> Path:
    """A tiny MNIST whose 201 test images do not split evenly over two processes."""
    return make_mnist(tmp_path_factory.mktemp("odd_mnist"), n_train=600, n_test=201)


def test_two_process_ddp_writes_one_run_dir_and_a_checkpoint_one_process_loads(odd_mnist, tmp_path):
    args = [*DDP_ON_CPU, f"data.data_dir={odd_mnist}", *TWO_EPOCHS]
    result = run_script("train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr

    (run_dir,) = (tmp_path / "outputs" / "train").iterdir()  # the second rank wrote into the same run dir
    assert list(tmp_path.iterdir()) == [tmp_path / "outputs"]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".hydra", "checkpoints", "env.json", "metrics.json", "tensorboard", "train.log", "train_ddp_process_1.log"
    ]  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_batch_size"] == 64 and metrics["global_step"] == 8  # 4 steps of 2 x 32 images per epoch
    # images per second of training count both processes' images
    assert metrics["train_images_per_second"] == pytest.approx(8 * 64 / metrics["train_seconds"], rel=0.01)

    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    classifier = ImageClassifier(**ckpt["hyper_parameters"])
    classifier.load_state_dict(ckpt["state_dict"])
    datamodule = instantiate(ckpt["hyper_parameters"]["data"])
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    (single,) = trainer.test(classifier, datamodule=datamodule, verbose=False)
    # Two shards of 101 and 100 test images, gathered: every test image counted once, so accuracy matches exactly.
    assert metrics["test_acc"] == pytest.approx(single["test/acc"], abs=1e-6)


def test_torchrun_two_single_process_nodes_on_loopback_write_one_metrics_json(odd_mnist, tmp_path):
    port = free_port()
    args = [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.num_nodes=2",
        "trainer.devices=1",
        "data.loader=torchvision",  # the Dataset path: Lightning gives each rank a DistributedSampler
        f"data.data_dir={odd_mnist}",
        "hydra.run.dir=run",
        *TWO_EPOCHS,
    ]
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={rank}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                script_path("train"),
                *args,
            ],  # fmt: skip
            cwd=tmp_path,
            env=script_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert list(tmp_path.iterdir()) == [tmp_path / "run"]
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("**/metrics.json")] == ["run/metrics.json"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_batch_size"] == 64 and metrics["epochs"] == 2
    # Lightning's DistributedSampler pads the 201 test images to 202 by repeating the first (the second rank's shard
    # ends with image 0): the test stage scores image 0 twice.
    from tests.test_evaluate import checkpoint_logits

    logits, labels = checkpoint_logits(tmp_path / "run" / "checkpoints" / "best.ckpt")
    correct = (logits.argmax(1) == labels).tolist()
    assert len(correct) == 201 and sum(correct) < 201  # so counting image 0 twice changes the score
    assert metrics["test_acc"] == pytest.approx((sum(correct) + correct[0]) / 202, abs=1e-6)


def test_sweep_with_a_ddp_trainer_is_refused_before_any_run(tmp_path):
    args = ["-m", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "seed=1,2"]
    result = run_script("train", *args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "cannot use a distributed trainer" in result.stderr and "hydra/launcher=slurm_ddp" in result.stderr
    assert not list(tmp_path.glob("**/metrics.json"))


@pytest.mark.parametrize("world_size", [2, 3])
def test_evaluation_shards_hold_every_sample_exactly_once(world_size):
    from cnnlab.data.tensor_loader import EpochSampler

    shards = [EpochSampler(201, False, rank=r, world_size=world_size, pad=False).indices() for r in range(world_size)]
    assert sorted(torch.cat(shards).tolist()) == list(range(201))
    assert [len(EpochSampler(201, False, rank=r, world_size=world_size, pad=False)) for r in range(world_size)] == [
        len(s) for s in shards
    ]


@pytest.fixture(scope="module")
def submitit_plugin(tmp_path_factory) -> Path:
    """Hydra's submitit launcher plugin (the `slurm` extra), installed into a folder of its own for these tests."""
    target = tmp_path_factory.mktemp("submitit")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
               "hydra-submitit-launcher>=1.2", "submitit"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"installing the slurm extra's plugin failed: {result.stderr[-3000:]}"
    return target


@pytest.mark.parametrize("launcher", ["submitit_slurm", "slurm_ddp"])
def test_the_slurm_launcher_configs_compose_with_the_plugin_installed(submitit_plugin, tmp_path, launcher):
    import yaml

    args = [f"hydra/launcher={launcher}", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu", "--cfg", "all", "--resolve"]  # fmt: skip
    with_plugin = {"PYTHONPATH": os.pathsep.join([str(submitit_plugin), script_env()["PYTHONPATH"]])}
    result = run_script("train", *args, cwd=tmp_path, env=with_plugin, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load(result.stdout)
    slurm = config["hydra"]["launcher"]
    assert slurm["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert slurm["partition"] == "gpu" and config["trainer"]["num_nodes"] == 2
    if launcher == "slurm_ddp":  # each job sized from the trainer: 2 nodes x 4 processes, one GPU each
        assert (slurm["nodes"], slurm["tasks_per_node"], slurm["gpus_per_node"]) == (2, 4, 4)
    assert not list(tmp_path.iterdir())  # printing the config starts nothing


def test_two_process_ddp_with_muon_and_augmentation_keeps_both_ranks_weights_identical(odd_mnist, tmp_path):
    # Each rank mixes and augments its own batches differently; the all-reduced gradients then take Muon's
    # orthogonalized step and SGD's step alike on both ranks, so their weights stay the same to the bit.
    output = tmp_path / "probe"
    probe = ["+callbacks.probe._target_=tests.ddp_helpers.TrainingStateProbe", f"+callbacks.probe.output={output}",
             "+callbacks.probe.module=conv1"]  # fmt: skip
    augment = ["data.policy=trivial_augment_wide", "data.erasing=0.5", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0"]
    args = [*DDP_ON_CPU, f"data.data_dir={odd_mnist}", *TWO_EPOCHS, "optimizer=muon", *augment, *probe, "test=false"]
    result = run_script("train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((output / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["buffers"] == ranks[1]["buffers"] and ranks[0]["buffers"]["weight"]
    assert len(ranks[0]["steps"]) == 8 and len(ranks[0]["steps"][0]["lrs"]) == 3  # Muon's, the biases', the head's
