"""The plots: `cospadi bench`'s perplexity against compression ratio, log scale, one line
per method, the dense model as a horizontal line, a panel per measure the sweep has (token
perplexity, word perplexity, last-word accuracy on a linear scale); and the heatmap of a
knapsack allocation's per-matrix ratios (blocks x matrix kinds)."""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import CospadiError
from ..files import atomic_file

PANELS = (("token_ppl", "token perplexity", True), ("word_ppl", "word perplexity (lm-eval)", True),
          ("lastword_acc", "last-word accuracy", False))
OFF_SCALE = 1000.0  # log panels end at this multiple of the dense value; higher points sit on the edge
STYLES = {"svd": ("tab:gray", "x"), "svd-llm": ("tab:blue", "s"), "basis-sharing": ("tab:green", "^"),
          "cospadi": ("tab:orange", "o"), "cospadi-group": ("tab:red", "D"), "replaceme": ("tab:purple", "v"),
          "replaceme+cospadi": ("tab:brown", "P")}


def check_matplotlib() -> None:
    """CospadiError with the pip command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CospadiError("the bench plot needs matplotlib: pip install 'cospadi[plot]' (or pass --plot none)") from None


def clip_to_scale(points: list[tuple[float, float]], ceiling: float) -> tuple[list[tuple[float, float]], bool]:
    """(ratio, value) points with values above `ceiling` moved onto it, and whether any
    was: a collapsed method (svd at 1e8) must not squeeze every other line together."""
    clipped = [(x, min(y, ceiling)) for x, y in points]
    return clipped, any(y > ceiling for _, y in points)


def plot_sweep(rows: list[dict], path: str | Path, title: str) -> Path:
    """Draw the cells `rows` (bench.run_sweep's: dense first, then method x ratio with
    `method`, `ratio` and the PANELS measures) into the PNG `path`, written atomically.
    Non-finite values (a diverged model) are left out of their line; on the log panels,
    values above OFF_SCALE x dense are drawn on the top edge and the legend says so.
    Returns the path."""
    plt = _pyplot()
    dense, cells = rows[0], rows[1:]
    panels = [p for p in PANELS if dense.get(p[0]) is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in cells))
    for ax, (key, label, log) in zip(axes[0], panels):
        for method in methods:
            points = sorted((r["ratio"], r[key]) for r in cells if r["method"] == method
                            and isinstance(r.get(key), (int, float)) and math.isfinite(r[key]))
            if points:
                color, marker = STYLES.get(method, (None, "o"))
                name = method
                if log:
                    points, off = clip_to_scale(points, OFF_SCALE * dense[key])
                    name += f" (above {OFF_SCALE:g}x dense: on the top edge)" if off else ""
                ax.plot(*zip(*points), marker=marker, color=color, label=name)
        ax.axhline(dense[key], color="black", linestyle="--", linewidth=1, label="dense")
        if log:
            ax.set_yscale("log")
            ax.set_ylim(top=OFF_SCALE * dense[key] * 1.5)
        else:
            ax.set_ylim(bottom=0)
        ax.set_xticks(sorted({r["ratio"] for r in cells}))
        ax.set_xlabel("compression ratio (fraction of linear weights removed)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save_png(fig, path)


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend; CospadiError when matplotlib is missing."""
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: str | Path) -> Path:
    """Lay out `fig`, write it to the PNG `path` atomically and close it; returns the path."""
    plt = _pyplot()
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def plot_allocation(matrices: list[dict], path: str | Path, title: str) -> Path:
    """The heatmap of report rows `matrices` (layer, name, ratio): blocks down, linear kinds
    across, colour = the fraction removed (0: kept dense), each cell labelled. Written
    atomically to the PNG `path`; returns it."""
    plt = _pyplot()
    import numpy as np

    from ..allocation import ratio_grid

    blocks, kinds, grid = ratio_grid(matrices)
    values = np.array([[np.nan if r is None else r for r in row] for row in grid])
    fig, ax = plt.subplots(figsize=(1.1 * len(kinds) + 2.5, 0.28 * len(blocks) + 1.8))
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), r in np.ndenumerate(values):
        if np.isfinite(r):
            ax.text(j, i, f"{r:g}", ha="center", va="center", fontsize=6, color="white" if r < 0.6 else "black")
    ax.set_xticks(range(len(kinds)), [k.split(".")[-1] for k in kinds], rotation=30)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=6)
    ax.set_ylabel("block")
    fig.colorbar(image, ax=ax, label="ratio (fraction removed)")
    ax.set_title(title, fontsize=9)
    return _save_png(fig, path)
