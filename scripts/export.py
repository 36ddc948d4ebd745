"""Export a model: `python scripts/export.py ckpt_path=<run dir>/checkpoints/best.ckpt format=onnx`."""

from cnnlab.cli import export_main

if __name__ == "__main__":
    export_main()
