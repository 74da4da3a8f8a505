"""Perplexity against bytes (`cospadi bench --pareto`, docs/quantization.md): every cell of
a sweep as a point (bytes of the compressed linears' weights, token perplexity), the
Pareto front marked (no other point both smaller and better), as a table and a PNG.

Bytes are those of a bf16 folder: every floating tensor a module stores at 2 bytes per
number, integer tensors (bitmask, packed codes, scales stored by their bit pattern) at
their own size; a plain linear (dense, or kept dense by an allocation) at 2 bytes per
weight; biases excluded; a factor shared by several modules counted once."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..adapters import adapter_for, decoder_layers
from ..layers.base import CompressedLinear
from .plot import STYLES, _pyplot, _save_png

FLOAT_BYTES = 2  # bf16
MARKERS = {"none": "o", "int8": "s", "int4": "^", "int3": "v"}
COLORS = {**{method: color for method, (color, _) in STYLES.items()}, "rtn": "tab:olive", "gptq": "tab:cyan",
          "dense (bf16)": "black"}


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of `tensor` in a bf16 folder: floats at FLOAT_BYTES, integers at their size."""
    return tensor.numel() * (FLOAT_BYTES if tensor.is_floating_point() else tensor.element_size())


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the target linears' weights of every decoder block of `model`, as a bf16
    folder stores them (module doc)."""
    adapter, total = adapter_for(model), 0
    seen: dict[int, torch.Tensor] = {}  # kept alive: stored_tensors may compute fresh tensors (ids reused)
    for layer in decoder_layers(model):
        for name in adapter.targets:
            module = layer.get_submodule(name)
            if not isinstance(module, CompressedLinear):
                total += module.weight.numel() * FLOAT_BYTES
                continue
            for tensor in module.stored_tensors().values():
                if id(tensor) not in seen:
                    seen[id(tensor)] = tensor
                    total += tensor_bytes(tensor)
    return total


def cell_bytes(cell: dict, dense: dict) -> float | None:
    """A cell's linear_bytes; for a cell cached before they were recorded (never a
    quantized one), the dense bytes times its eq. 10 storage fraction (bf16 values and
    the bitmask: the same count); None when neither is known."""
    if cell.get("linear_bytes") is not None:
        return float(cell["linear_bytes"])
    ratios = cell.get("linear_ratios")
    if ratios and dense.get("linear_bytes") and "quant" not in cell:
        return float(dense["linear_bytes"]) * (1.0 - ratios["storage"])
    return None


def front(points: list[tuple[float, float]]) -> list[bool]:
    """For each (bytes, perplexity) point, whether it is on the Pareto front: no other
    point has both at most its bytes and at most its perplexity, one of them strictly
    less. Non-finite perplexities are never on it."""
    flags = []
    for i, (b, p) in enumerate(points):
        dominated = any((b2 <= b and p2 <= p and (b2 < b or p2 < p)) for j, (b2, p2) in enumerate(points) if j != i
                        and math.isfinite(p2))
        flags.append(math.isfinite(p) and not dominated)
    return flags


def front_gap(points: list[tuple[float, float]]) -> list[float | None]:
    """For each (bytes, perplexity) point off the Pareto front, the perplexity it would
    have to get below to join it: the best perplexity of the other points no larger than
    it. None for a point on the front (or with a non-finite perplexity)."""
    gaps: list[float | None] = []
    for on, (i, (b, p)) in zip(front(points), enumerate(points)):
        smaller = [p2 for j, (b2, p2) in enumerate(points) if j != i and b2 <= b and math.isfinite(p2)]
        gaps.append(min(smaller) if not on and math.isfinite(p) and smaller else None)
    return gaps


def pareto_rows(cells: list[dict]) -> list[dict]:
    """Table rows, smallest first: method, ratio, quantization, MiB of the linear
    weights, bytes and perplexity relative to dense bf16, token perplexity, whether the
    cell is on the Pareto front and, when it is not, the perplexity it would need to join
    it (front_gap) and how far that is from its own. Cells without bytes are left out."""
    dense = cells[0]
    known = [(c, cell_bytes(c, dense)) for c in cells]
    known = [(c, b) for c, b in known if b is not None]
    points = [(b, c["token_ppl"]) for c, b in known]
    flags, gaps = front(points), front_gap(points)
    rows = []
    for (cell, size), on, gap in sorted(zip(known, flags, gaps), key=lambda item: item[0][1]):
        dense_bytes = cell_bytes(dense, dense) or float("nan")
        rows.append({"method": "dense (bf16)" if cell is dense else cell["method"],
                     "ratio": f"{cell['ratio']:g}", "quant": cell.get("quant", "none"),
                     "linear MiB": size / 2**20, "x dense bytes": size / dense_bytes,
                     "token ppl": cell["token_ppl"], "x dense ppl": cell["token_ppl"] / dense["token_ppl"],
                     "Pareto front": "yes" if on else "",
                     "ppl to join the front": "" if gap is None else f"< {gap:.4g} ({gap / cell['token_ppl'] - 1:+.1%})"})
    return rows


def plot_pareto(cells: list[dict], path: str | Path, title: str) -> Path:
    """Token perplexity (log) against MiB of the linear weights: one colour per method,
    one marker per quantization, each point labelled with its ratio, the Pareto front as
    a black step line; written atomically to the PNG `path`. Returns the path."""
    plt = _pyplot()
    rows = pareto_rows(cells)
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for method in dict.fromkeys(r["method"] for r in rows):
        for quant in dict.fromkeys(r["quant"] for r in rows if r["method"] == method):
            points = [(r["linear MiB"], r["token ppl"], r["ratio"]) for r in rows
                      if r["method"] == method and r["quant"] == quant and math.isfinite(r["token ppl"])]
            if not points:
                continue
            color = COLORS.get(method, "tab:gray")
            marker = "*" if method == "dense (bf16)" else MARKERS.get(quant, "o")
            ax.scatter([p[0] for p in points], [p[1] for p in points], color=color, marker=marker, s=40,
                       label=method if quant == "none" else f"{method} {quant}", zorder=3)
            for x, y, ratio in points:
                if ratio != "0":
                    ax.annotate(ratio, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    best = [(r["linear MiB"], r["token ppl"]) for r in rows if r["Pareto front"]]
    if best:
        ax.step(*zip(*best), where="post", color="black", linewidth=1, linestyle="--", label="Pareto front", zorder=2)
    ax.set_yscale("log")
    ax.set_xlabel("MiB of the compressed linears' weights (bf16 folder)")
    ax.set_ylabel("token perplexity (held-out)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    return _save_png(fig, path)
