"""Output-size arithmetic for convolution, pooling and transposed convolution.

Every function takes an int or an (h, w) tuple for each argument, as nn.Conv2d does, and returns the same kind.
"""

import math

IntOrPair = int | tuple[int, int]


def _pair(v: IntOrPair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _per_axis(fn, n: IntOrPair, *args: IntOrPair) -> IntOrPair:
    if isinstance(n, int) and all(isinstance(a, int) for a in args):
        return fn(n, *args)
    pairs = [_pair(n)] + [_pair(a) for a in args]
    return tuple(fn(*axis) for axis in zip(*pairs))


def _conv1d(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool = False) -> int:
    span = n + 2 * p - d * (k - 1) - 1
    if span < 0:
        raise ValueError(f"a kernel of size {k} (dilation {d}) does not fit an input of size {n} with padding {p}")
    out = (math.ceil(span / s) if ceil_mode else span // s) + 1
    # PyTorch drops a last window that would start entirely inside the right padding.
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def conv_output_size(
    n: IntOrPair, kernel: IntOrPair, stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1
) -> IntOrPair:
    """floor((n + 2p - d(k-1) - 1) / s) + 1, the output size of nn.Conv2d along each axis."""
    return _per_axis(lambda n, k, s, p, d: _conv1d(n, k, s, p, d), n, kernel, stride, padding, dilation)


def pool_output_size(
    n: IntOrPair,
    kernel: IntOrPair,
    stride: IntOrPair | None = None,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    ceil_mode: bool = False,
) -> IntOrPair:
    """Output size of nn.MaxPool2d / nn.AvgPool2d; stride defaults to the kernel size as in PyTorch."""
    stride = kernel if stride is None else stride
    return _per_axis(lambda n, k, s, p, d: _conv1d(n, k, s, p, d, ceil_mode), n, kernel, stride, padding, dilation)


def conv_transpose_output_size(
    n: IntOrPair,
    kernel: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    output_padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
) -> IntOrPair:
    """(n - 1)s - 2p + d(k-1) + output_padding + 1, the output size of nn.ConvTranspose2d."""
    return _per_axis(
        lambda n, k, s, p, op, d: (n - 1) * s - 2 * p + d * (k - 1) + op + 1,
        n,
        kernel,
        stride,
        padding,
        output_padding,
        dilation,
    )
