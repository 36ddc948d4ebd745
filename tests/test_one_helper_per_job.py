"""One helper per job: the device picker, the file-pattern resolver, the writable-folder check and preparing data
once per machine, each shared by every command that needs it; and the assertions that pin the data cache's key, the
class-folder order and the NaN check's device decision."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cnnlab.commands.devices import pick_device
from cnnlab.commands.evaluate import evaluate, resolve_checkpoints
from cnnlab.commands.predict import predict, resolve_inputs
from cnnlab.errors import UserError
from cnnlab.writable_folders import writable_folder
from tests.conftest import DDP_ON_CPU, compose_config, make_cifar100, make_image_folder, quick_run
from tests.launch import script_env, script_path
from tests.test_evaluate import eval_config
from tests.test_predict import predict_config


def present(device: str) -> bool:
    """Whether this machine has the device a device= string names (auto: always)."""
    kind, _, index = device.partition(":")
    if kind == "cuda":
        return torch.cuda.device_count() > int(index or 0)
    return kind in ("cpu", "auto") or (kind == "mps" and torch.backends.mps.is_available())


# --- one device picker ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:1", "mps", "gpu", "cuda:x"])
def test_eval_and_predict_take_the_same_device_strings_and_refuse_a_missing_device_alike(trained_run, tmp_path, device):
    best = trained_run[0] / "checkpoints" / "best.ckpt"
    Image.new("L", (28, 28), 128).save(tmp_path / "digit.png")
    commands = {
        "eval": lambda: evaluate(eval_config(tmp_path / "eval", f"ckpt_path={best}", f"device={device}")),
        "predict": lambda: predict(predict_config(f"ckpt_path={best}", f"inputs={tmp_path / 'digit.png'}",
                                                  f"device={device}")),
    }  # fmt: skip
    outcomes = {}
    for name, command in commands.items():
        try:
            command()
            outcomes[name] = "ran"
        except UserError as err:
            outcomes[name] = str(err)
    assert outcomes["eval"] == outcomes["predict"]
    if device in ("gpu", "cuda:x"):
        assert outcomes["eval"].startswith(f"device='{device}' is not known; choose auto")
    else:
        assert (outcomes["eval"] == "ran") == present(device), outcomes["eval"]
        assert outcomes["eval"] == "ran" or outcomes["eval"].startswith(f"device={device}, but PyTorch sees")


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "gpu", "cuda:x"])
def test_the_benchmark_refuses_a_device_as_eval_does(tiny_data, tmp_path, device):
    from cnnlab.tools.benchmark import benchmark

    cfg = compose_config(quick_run(tiny_data, f"device={device}", "steps=2", "warmup_steps=1"), tmp_path,
                         config_name="benchmark")  # fmt: skip
    if device not in ("gpu", "cuda:x") and present(device):
        pytest.skip(f"this machine has {device}")
    with pytest.raises(UserError) as benchmarked:
        benchmark(cfg)
    with pytest.raises(UserError) as evaluated:
        pick_device(device)
    assert str(benchmarked.value) == str(evaluated.value)


# --- one resolver of files, folders and glob patterns -------------------------------------------------------------
def test_checkpoints_and_images_are_named_by_file_folder_pattern_or_home_relative_path_alike(
    trained_run, tmp_path, monkeypatch
):
    run_dir = trained_run[0]
    best = run_dir / "checkpoints" / "best.ckpt"
    images = tmp_path / "images"
    images.mkdir()
    for name in ("b.png", "a.png"):
        Image.new("L", (28, 28)).save(images / name)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_inputs(["~/images/b.png", "~/images", "~/images/*.png"]) == [images / "b.png", images / "a.png"]
    monkeypatch.setenv("HOME", str(run_dir.parent))
    home_relative = f"~/{run_dir.name}"
    assert resolve_checkpoints([f"{home_relative}/checkpoints/best.ckpt", home_relative]) == [best]
    for resolve, key, what in ((resolve_inputs, "inputs", "Image"), (resolve_checkpoints, "ckpt_path", "Checkpoint")):
        missing = f"{what} {tmp_path / 'gone'} does not exist. Check the path given as {key}="
        with pytest.raises(UserError, match=re.escape(missing)):
            resolve(str(tmp_path / "gone"))
        with pytest.raises(UserError, match=re.escape(f"{key}={tmp_path / '*.none'} matches no file")):
            resolve(str(tmp_path / "*.none"))


# --- one writable-folder check -------------------------------------------------------------------------------------
def test_a_folder_is_writable_where_it_or_the_nearest_folder_above_it_takes_a_file_and_asking_creates_nothing(
    tmp_path,
):
    assert writable_folder(tmp_path / "new" / "deeper") and not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")
    assert not writable_folder(tmp_path / "file" / "below")  # a file in the way
    assert not writable_folder(Path("/proc/cnnlab"))  # refused even to root, whose permission bits say yes


# --- data prepared once per machine -------------------------------------------------------------------------------
def test_cifar100_under_two_processes_downloads_once_though_every_process_reads_its_class_names(tmp_path):
    # torchrun starts both processes at once; CIFAR-100's class names come from its meta file, which every process
    # reads before the model is built, so every process needs the files before Lightning's own prepare_data barrier.
    source, log = make_cifar100(tmp_path / "source"), tmp_path / "downloads.log"
    args = ["data=cifar100", *DDP_ON_CPU, *quick_run(trainer=None), f"data.data_dir={tmp_path / 'empty'}",
            "data.download=true", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "data._target_=tests.ddp_helpers.CountingCIFAR100", f"+data.source={source}", f"+data.log={log}",
            "hydra.run.dir=run", "test=false"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([*torchrun, script_path("train"), *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=240, env=script_env())  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(log.read_text().split()) == 1, log.read_text()


def test_an_image_folder_under_two_processes_is_decoded_once_though_every_process_reads_its_classes(tmp_path):
    # Every process reads the folder's class names and statistics before the model is built (data.num_classes,
    # mean, std from discover()), so every process would decode the folder with all cores and write its cache.
    folder, log = make_image_folder(tmp_path / "folder", n_train=120, n_test=30), tmp_path / "writes.log"
    args = [*DDP_ON_CPU, *quick_run(folder, data="folder", trainer=None), "trainer.max_epochs=1",
            "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "data.val_size=20",
            "data._target_=tests.ddp_helpers.CountingFolder", f"+data.log={log}", "hydra.run.dir=run",
            "test=false"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([*torchrun, script_path("train"), *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=240, env=script_env())  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    writes = log.read_text().split()
    assert sorted(w.split(":")[1] for w in writes) == ["test", "train"], writes  # each split folder decoded once
    assert len({w.split(":")[0] for w in writes}) == 1, writes  # by one process


def test_torchvision_weights_under_two_processes_are_downloaded_once(tmp_path):
    # check_weights_file runs in every process of a torchrun/srun run before fit(); torchvision's download writes
    # the file under a temporary name and renames it, so two processes would each fetch the whole file.
    log = tmp_path / "downloads.log"
    env = {**script_env(), "LOCAL_WORLD_SIZE": "2"}
    command = [sys.executable, "-m", "tests.ddp_helpers", "weights", str(tmp_path / "torch"), str(log)]
    processes = [subprocess.Popen([*command, str(rank)], env=env, cwd=Path(__file__).parent.parent,
                                  stderr=subprocess.PIPE, text=True) for rank in (0, 1)]  # fmt: skip
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read()[-3000:]
    assert len(log.read_text().split()) == 1, log.read_text()
    assert len(list((tmp_path / "torch" / "hub" / "checkpoints").iterdir())) == 1


def test_a_machine_lock_reached_again_while_held_goes_on_instead_of_waiting_for_itself(tmp_path):
    import threading

    from cnnlab.machine_lock import machine_lock

    def nested() -> None:
        with machine_lock("decode", tmp_path), machine_lock("decode", tmp_path / "."):
            done.append(True)

    done: list[bool] = []
    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert done == [True]  # a second lock object on the same file would wait for the first forever


# --- the NaN check's read decision ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("device", "free"), [("cpu", True), ("cuda", False), ("cuda:1", False), ("mps", False)])
def test_the_nan_check_reads_the_loss_every_step_on_the_cpu_and_only_there(device, free):
    # On an accelerator a read makes the host wait for the device; the tests of what the check then does replace
    # this decision to run on the CPU, so the decision itself is pinned here.
    from cnnlab.training.stopping import StopOnNonFiniteLoss

    assert StopOnNonFiniteLoss.reads_are_free(torch.device(device)) is free
