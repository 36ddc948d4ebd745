"""`python scripts/learn_kernel.py [steps=N lr=X log_every=N seed=N]`: learn the 1x2 edge kernel and print it."""

import hydra
from omegaconf import DictConfig

from cnnlab.cli import config_dir, run_reporting_user_errors
from cnnlab.tools.learn_kernel import run


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="learn_kernel")
def main(cfg: DictConfig) -> None:
    """Learn the kernel with configs/learn_kernel.yaml and the command-line overrides, and print the result."""
    run_reporting_user_errors(run, cfg)


if __name__ == "__main__":
    main()
