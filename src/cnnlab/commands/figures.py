"""Evaluation figures: a confusion matrix and a grid of the most confident errors, drawn with matplotlib's Agg.

Figures are built as plain `Figure` objects on an Agg canvas (no pyplot state, no display needed), saved as PNG
atomically, and turned into HWC uint8 arrays for TensorBoard.
"""

import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cnnlab.atomic_files import write_bytes_atomic


def confusion_matrix_figure(matrix: np.ndarray, class_names: list[str]) -> Figure:
    """Counts of (true class, predicted class), class names on both axes and each count in its cell."""
    n = len(class_names)
    side = max(4.0, 0.55 * n + 2.0)
    fig = Figure(figsize=(side, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(n):
        for j in range(n):
            color = "white" if matrix[i, j] > threshold else "black"
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", color=color, fontsize=8)
    ax.set_title(f"Confusion matrix ({int(matrix.sum())} images)")
    fig.tight_layout()
    return fig


def misclassified_figure(
    images: np.ndarray, true: list[str], predicted: list[str], confidence: list[float], columns: int = 6
) -> Figure:
    """A grid of images (N x C x H x W uint8), each titled with its true and predicted class."""
    count = len(images)
    rows = max(1, -(-count // columns))
    fig = Figure(figsize=(1.9 * columns, 2.1 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for k in range(rows * columns):
        ax = fig.add_subplot(rows, columns, k + 1)
        ax.axis("off")
        if k >= count:
            continue
        image = images[k].transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if image.shape[2] == 1:
            ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(image)
        ax.set_title(f"true {true[k]}\npred {predicted[k]} ({confidence[k]:.0%})", fontsize=8)
    if count == 0:
        fig.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    fig.suptitle("Most confident errors")
    fig.tight_layout()
    return fig


def figure_array(fig: Figure) -> np.ndarray:
    """The rendered figure as an H x W x 3 uint8 array (for TensorBoard's add_image)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def save_figure(fig: Figure, path: Path) -> None:
    """Write the figure as a PNG atomically (temporary file + rename)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_bytes_atomic(path, buffer.getvalue())
