"""The plain PyTorch loop that experiment=mnist_fast is timed against: `python scripts/plain_mnist.py --data data`."""

from cnnlab.tools.plain_mnist import main

if __name__ == "__main__":
    main()
