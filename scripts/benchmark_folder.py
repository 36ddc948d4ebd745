"""Measure data=folder: `python scripts/benchmark_folder.py data=folder data.data_dir=<folder> [make_from=<cifar>]`."""

from cnnlab.cli import benchmark_folder_main

if __name__ == "__main__":
    benchmark_folder_main()
