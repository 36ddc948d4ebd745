"""Classify images: `python scripts/predict.py ckpt_path=<run dir>/checkpoints/best.ckpt inputs=digits/`."""

from cnnlab.cli import predict_main

if __name__ == "__main__":
    predict_main()
