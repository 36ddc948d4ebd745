"""Train a model: `python scripts/train.py model=resnet18 data=cifar10 trainer.max_epochs=30`."""

from cnnlab.cli import train_main

if __name__ == "__main__":
    train_main()
