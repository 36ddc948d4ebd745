"""The reference that experiment=mnist_fast's wall time is measured against: a plain PyTorch loop, no framework.

It trains the same LeNet-5 (cnnlab.models.lenet, default config) for 3 epochs at batch 128 on all 60,000 MNIST
training images held in memory as one normalized float tensor, with Nesterov SGD at a constant rate, then prints the
test accuracy. It imports torch and numpy and nothing else that is heavy (no Lightning, Hydra, torchvision or
TensorBoard), which is what a user writing the loop by hand would load. Time the whole process from outside, e.g.
`/usr/bin/time -f %e python scripts/plain_mnist.py --data data`, and the same way
`python scripts/train.py experiment=mnist_fast`, alternated in the same hour (docs/speed.md).
"""

import argparse
from pathlib import Path

import torch
from torch import nn

from cnnlab.data.formats import read_idx
from cnnlab.models.lenet import LeNet5

MEAN, STD = 0.1307, 0.3081  # configs/data/mnist.yaml's mean and std of the training pixels


def load(raw_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as a normalized (N, 1, 28, 28) float tensor and labels as int64, from MNIST's IDX files."""
    prefix = "train" if split == "train" else "t10k"
    images = torch.from_numpy(read_idx(raw_dir / f"{prefix}-images-idx3-ubyte").copy())
    labels = torch.from_numpy(read_idx(raw_dir / f"{prefix}-labels-idx1-ubyte").copy()).long()
    return ((images.float() / 255 - MEAN) / STD).unsqueeze(1), labels


def train(data_dir: Path, epochs: int, batch_size: int, lr: float, seed: int) -> float:
    """Train LeNet-5 on MNIST in a hand-written loop and return its test accuracy."""
    torch.manual_seed(seed)
    raw_dir = data_dir / "MNIST" / "raw"
    train_x, train_y = load(raw_dir, "train")
    test_x, test_y = load(raw_dir, "test")
    model = LeNet5()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_y))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = criterion(model(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in zip(test_x.split(2500), test_y.split(2500)))
    return correct / len(test_y)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data"), help="folder holding MNIST/raw/")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    accuracy = train(args.data, args.epochs, args.batch_size, args.lr, args.seed)
    print(f"test accuracy {accuracy:.4f}")
