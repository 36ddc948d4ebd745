"""Search hyperparameters with Optuna: `python scripts/search.py n_trials=20 trainer.max_epochs=4`."""

from cnnlab.cli import search_main

if __name__ == "__main__":
    search_main()
