"""Measure training speed: `python scripts/benchmark.py model=lenet5 data=mnist device=cpu [target_acc=0.99]`."""

from cnnlab.cli import benchmark_main

if __name__ == "__main__":
    benchmark_main()
