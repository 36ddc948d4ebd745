"""Runs written by earlier versions of cnnlab keep working: they evaluate and resume."""

import shutil
from pathlib import Path

import torch

from cnnlab.checkpoints.resume import resume_arguments
from cnnlab.commands.evaluate import evaluate
from cnnlab.commands.train import train
from tests.conftest import compose_config, make_mnist

# A LeNet-5 (BatchNorm on) run of 2 epochs, 16 steps, on make_mnist(n_train=300, n_test=100), written by the code
# before src/cnnlab/ was grouped into training/, checkpoints/, commands/ and tools/ (commit ded83a8): its
# .hydra/overrides.yaml and checkpoints/last.ckpt (508 kB).
OLD_RUN = Path(__file__).parent / "fixtures" / "run_before_regrouping"


def test_a_run_written_before_the_regrouping_evaluates_and_resumes(tmp_path):
    run_dir = shutil.copytree(OLD_RUN, tmp_path / "run")
    data = make_mnist(tmp_path / "data", n_train=300, n_test=100)
    last = run_dir / "checkpoints" / "last.ckpt"
    stored = torch.load(last, map_location="cpu", weights_only=True)
    assert stored["global_step"] == 16 and stored["hyper_parameters"]["model"]["_target_"] == "cnnlab.models.LeNet5"

    scored = evaluate(compose_config([f"ckpt_path={last}", f"data.data_dir={data}"], tmp_path / "eval", "eval"))
    assert scored["test_acc"] > 0.9  # the tiny digits' patterns, learnt in the old run

    args = resume_arguments([f"resume={run_dir}", "trainer.max_epochs=3", f"data.data_dir={data}"])
    metrics = train(compose_config([a for a in args if not a.startswith("hydra.")], run_dir))
    assert metrics["status"] == "finished" and metrics["epochs"] == 3 and metrics["global_step"] == 16 + 8
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 24 and resumed["optimizer_states"]  # continued, optimizer state and all
