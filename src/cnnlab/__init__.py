"""cnnlab: train convolutional networks on MNIST and CIFAR-10, and see how convolution works."""

__version__ = "0.1.0"
