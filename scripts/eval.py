"""Evaluate checkpoints: `python scripts/eval.py ckpt_path=outputs/train/<time>/checkpoints/best.ckpt`."""

from cnnlab.cli import eval_main

if __name__ == "__main__":
    eval_main()
