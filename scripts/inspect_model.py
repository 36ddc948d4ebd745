"""Print a model's layers: `python scripts/inspect_model.py model=resnet18 data=cifar10`."""

from cnnlab.cli import inspect_main

if __name__ == "__main__":
    inspect_main()
