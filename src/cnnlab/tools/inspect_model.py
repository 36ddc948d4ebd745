"""inspect_model(cfg): one row per layer with its output shape, the shape the formulas predict, parameters,
multiply-accumulates, receptive field and effective stride.

The shapes come from a real forward pass of one zero image of the data config's shape; the predicted shapes come
from `cnnlab.ops` arithmetic applied to each layer's real input, and every row checks that the two agree.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from cnnlab.ops import UnfoldConv2d, conv_output_size, pool_output_size
from cnnlab.training.pretrained import preprocessing_from_weights

CONVS = (nn.Conv2d, UnfoldConv2d)
POOLS = (nn.MaxPool2d, nn.AvgPool2d)


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    predicted_shape: tuple[int, ...] | None
    params: int
    macs: int
    receptive_field: int | None  # pixels of the input image one output value sees; None: the whole image
    stride: int  # input pixels between neighbouring output values

    @property
    def agrees(self) -> bool:
        return self.predicted_shape is None or self.predicted_shape == self.output_shape


def _pairs(module: nn.Module, *names: str) -> list[int]:
    values = []
    for name in names:
        v = getattr(module, name)
        values.append(v[0] if isinstance(v, tuple) else v)
    return values


def predict_shape(module: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The output shape (without batch) the layer's formula gives for in_shape; None where there is no formula."""
    if isinstance(module, CONVS):
        c, h, w = in_shape
        if isinstance(module.padding, str):
            return None
        size = conv_output_size((h, w), module.kernel_size, module.stride, module.padding, module.dilation)
        return (module.out_channels, *size)
    if isinstance(module, POOLS):
        c, h, w = in_shape
        dilation = getattr(module, "dilation", 1)
        size = pool_output_size((h, w), module.kernel_size, module.stride, module.padding, dilation, module.ceil_mode)
        return (c, *size)
    if isinstance(module, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
        out = module.output_size
        h, w = (out, out) if isinstance(out, int) else out
        return (in_shape[0], h or in_shape[1], w or in_shape[2])
    if isinstance(module, nn.Flatten):
        n = 1
        for d in in_shape:
            n *= d
        return (n,)
    if isinstance(module, nn.Linear):  # on the last dimension: (C,) or, inside ConvNeXt blocks, (H, W, C)
        return (*in_shape[:-1], module.out_features)
    if isinstance(module, nn.BatchNorm2d | nn.ReLU | nn.GELU | nn.Tanh | nn.Identity | nn.Dropout):
        return in_shape
    return None


def count_macs(module: nn.Module, out_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of one image through this layer (convolutions and linear layers)."""
    if isinstance(module, CONVS):
        kh, kw = module.kernel_size
        per_output = (module.in_channels // module.groups) * kh * kw
        return per_output * out_shape[0] * out_shape[1] * out_shape[2]
    if isinstance(module, nn.Linear):  # once per position when applied to (H, W, C)
        return module.in_features * math.prod(out_shape)
    return 0


def layer_table(model: nn.Module, image_shape: tuple[int, int, int]) -> list[LayerRow]:
    """Run one zero image through model and describe every leaf layer in the order it ran."""
    rows: list[LayerRow] = []
    # Receptive field and stride of each tensor seen so far, keyed by id; the tensors are kept alive so ids stay unique.
    fields: dict[int, tuple[Tensor, int | None, int]] = {}
    last: list[tuple[int | None, int]] = [(1, 1)]

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x = inputs[0]
            # A tensor no layer produced (a residual sum) inherits the main path's field: it is the wider branch.
            _, rf, jump = fields.get(id(x), (None, *last[0]))
            if isinstance(module, CONVS + POOLS):
                k, s, d = _pairs(module, "kernel_size", "stride", "dilation")
                rf, jump = (None if rf is None else rf + (k - 1) * d * jump), jump * s
            elif isinstance(module, nn.Linear | nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
                rf = None  # each output value sees the whole image
            fields[id(output)] = (output, rf, jump)
            if "shortcut" not in name:
                last[0] = (rf, jump)
            out_shape = tuple(output.shape[1:])
            params = sum(p.numel() for p in module.parameters(recurse=False))
            rows.append(
                LayerRow(
                    name,
                    type(module).__name__,
                    out_shape,
                    predict_shape(module, tuple(x.shape[1:])),
                    params,
                    count_macs(module, out_shape),
                    rf,
                    jump,
                )
            )

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if not list(m.children())]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *image_shape))
    finally:
        for h in handles:
            h.remove()
    return rows


def render(rows: list[LayerRow], title: str, console: Console) -> None:
    """A Rich table on a terminal; plain aligned text when the output is piped or redirected."""
    headers = ["layer", "type", "output", "formula", "params", "MACs", "RF", "stride"]
    body = [
        [
            r.name,
            r.kind,
            "x".join(map(str, r.output_shape)),
            ("" if r.predicted_shape is None else "x".join(map(str, r.predicted_shape))) + ("" if r.agrees else " !"),
            f"{r.params:,}",
            f"{r.macs:,}",
            "all" if r.receptive_field is None else str(r.receptive_field),
            str(r.stride),
        ]
        for r in rows
    ]
    total = ["total", "", "", "", f"{sum(r.params for r in rows):,}", f"{sum(r.macs for r in rows):,}", "", ""]
    if console.is_terminal:
        table = Table(title=title)
        for i, h in enumerate(headers):
            table.add_column(h, justify="right" if i >= 4 else "left")
        for line in body:
            table.add_row(*line)
        table.add_section()
        table.add_row(*total)
        console.print(table)
        return
    widths = [max(len(line[i]) for line in [headers, *body, total]) for i in range(len(headers))]
    fmt = "  ".join(f"{{:{'>' if i >= 4 else '<'}{w}}}" for i, w in enumerate(widths))
    print(title)
    for line in [headers, *body, total]:
        print(fmt.format(*line).rstrip())


def inspect_model(cfg: DictConfig) -> dict[str, Any]:
    """Print the layer table of cfg.model on cfg.data's image shape; returns the rows and totals."""
    preprocessing_from_weights(cfg)  # as train.py does: model=torchvision's input size, where the data left it null
    with open_dict(cfg):  # as train.py does: a folder's (or CIFAR-100's) class count into cfg.data before building
        cfg.data.update(instantiate(cfg.data).discover())
    model = instantiate(cfg.model)
    image_shape = tuple(cfg.data.image_shape)
    rows = layer_table(model, image_shape)
    name = cfg.model.get("arch") or cfg.model._target_.rsplit(".", 1)[-1]  # model=torchvision: its arch
    title = f"{name} on {'x'.join(map(str, image_shape))} inputs"
    render(rows, title, Console())
    mismatches = [r.name for r in rows if not r.agrees]
    if mismatches:
        raise AssertionError(f"formula and forward pass disagree for {mismatches}")
    return {
        "rows": rows,
        "params": sum(p.numel() for p in model.parameters()),
        "macs": sum(r.macs for r in rows),
    }
