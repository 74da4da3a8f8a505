"""REPORT.md of a saved folder: what was compressed, how, how big it is now, and how to
load it, for a person reading the folder (the machine-readable report is cospadi.json)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from torch import nn

from ..allocation import ratio_grid
from ..errors import CospadiError
from ..layers.base import compressed_modules


def stored_linear_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the compressed linears' weights take as stored, bytes the same linears
    would take as dense weights of the same dtype); biases excluded from both, a factor
    shared by several modules (per-group mode) counted once."""
    stored = dense = 0
    seen: dict[int, object] = {}  # id -> tensor, kept alive: stored_tensors may compute fresh ones (ids reused)
    for _, module in compressed_modules(model):
        tensors = module.stored_tensors()
        stored += sum(t.numel() * t.element_size() for t in tensors.values() if id(t) not in seen)
        seen.update((id(t), t) for t in tensors.values())
        dense += module.in_features * module.out_features * module.factor_dtype.itemsize
    return stored, dense


def render_report(model: nn.Module, report: dict, coef_bits: int | None) -> str:
    """The Markdown text of REPORT.md for a model about to be saved with `report` (the
    CompressionReport dict, possibly empty)."""
    stored, dense = stored_linear_bytes(model)
    dtype = str(model.dtype).removeprefix("torch.")
    lines = ["# cospadi compressed model", ""]
    if report.get("method"):
        options = ", ".join(f"{k}={v}" for k, v in (report.get("options") or {}).items())
        lines.append(f"- method: `{report['method']}` at ratio {report.get('ratio')} ({options})")
    calibration = report.get("calibration") or {}
    if calibration:
        lines.append(f"- calibration: {calibration.get('samples')} x {calibration.get('seq_len')} tokens")
    values = f", values of S in {coef_bits} bits" if coef_bits else ""
    lines.append(f"- storage: {dtype}{values}; S as a packed bitmask plus each column's values (no index lists)")
    quantized = sorted({(m.bits, m.group) for _, m in compressed_modules(model) if getattr(m, "bits", None)})
    if quantized:
        lines.append("- quantized factors (docs/quantization.md): " + ", ".join(
            f"int{bits} codes with one bf16 scale per {group} inputs" for bits, group in quantized))
    if dense:
        lines.append(f"- compressed linear weights: {stored / 2**20:.1f} MiB stored vs {dense / 2**20:.1f} MiB dense "
                     f"at {dtype} ({stored / dense:.3f} x dense)")
    for key, label in (("linear_ratios", "over the compressed linears"), ("model_ratios", "over all parameters")):
        ratios = report.get(key)
        if ratios:
            lines.append(f"- ratio {label}: effective (eq. 11) {ratios['effective']:.3f}, "
                         f"storage with bitmask and 16-bit values (eq. 10) {ratios['storage']:.3f}")
    summary = report.get("summary") or {}
    if summary.get("ppl") not in (None, "-"):
        lines.append(f"- token perplexity: dense {summary.get('dense ppl')}, compressed {summary.get('ppl')} "
                     "(held-out windows, see cospadi.json)")
    lines += ["", "Load it with `cospadi.load(folder)`, or with plain transformers after `import cospadi`:", "",
              "```python", "import cospadi", "from transformers import AutoModelForCausalLM",
              "model = AutoModelForCausalLM.from_pretrained(folder)", "```", "",
              "`cospadi export --dense FOLDER OUT` writes a plain checkpoint with W = D S multiplied out.", ""]
    groups: dict[str, list] = defaultdict(list)
    errors = {(m["layer"], m["name"]): m["output_error"] for m in report.get("matrices") or []}
    for name, module in compressed_modules(model):
        parts = name.split(".")
        kind = ".".join(parts[-2:])
        layer = next((int(p) for p in parts if p.isdigit()), None)
        groups[kind].append((module, errors.get((layer, kind))))
    lines += ["| matrix | count | shape | mean output error |", "|---|---|---|---|"]
    for kind, items in groups.items():
        shapes = sorted({m.describe() for m, _ in items})
        known = [e for _, e in items if e is not None]
        error = f"{sum(known) / len(known):.4f}" if known else "-"
        lines.append(f"| {kind} | {len(items)} | {'; '.join(shapes)} | {error} |")
    lines += _ratio_table(report)
    return "\n".join(lines) + "\n"


def _ratio_table(report: dict) -> list[str]:
    """REPORT.md's per-matrix ratios (blocks x kinds; 0 = kept dense) when the run
    allocated them per matrix; nothing for a uniform run."""
    allocation = report.get("allocation") or {}
    if allocation.get("allocation", "uniform") == "uniform" or not report.get("matrices"):
        return []
    blocks, kinds, grid = ratio_grid(report["matrices"])
    lines = ["", f"## Per-matrix ratios ({allocation['allocation']}, cost {allocation.get('cost')}; 0 = kept dense)",
             "", "| block | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    lines += [f"| {block} | " + " | ".join("-" if r is None else f"{r:g}" for r in row) + " |"
              for block, row in zip(blocks, grid)]
    return lines


def write_allocation_heatmap(report: dict, path: Path) -> Path | None:
    """The heatmap of a per-matrix allocation's ratios (bench/plot.py plot_allocation) at
    `path`, when the run allocated per matrix and matplotlib is installed; else None."""
    allocation = report.get("allocation") or {}
    if allocation.get("allocation", "uniform") == "uniform" or not report.get("matrices"):
        return None
    from ..bench.plot import plot_allocation

    try:
        return plot_allocation(report["matrices"], path, f"{report.get('method')} at ratio {report.get('ratio')}: "
                               f"per-matrix ratios ({allocation.get('cost')} cost)")
    except CospadiError:  # matplotlib missing: REPORT.md still has the table
        return None
