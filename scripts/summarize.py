"""Rank the runs of a sweep or search: `python scripts/summarize.py outputs/multirun/<time>`."""

from cnnlab.cli import summarize_main

if __name__ == "__main__":
    summarize_main()
