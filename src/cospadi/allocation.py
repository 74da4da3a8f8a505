"""Per-matrix budgets: which fraction of each compressed linear is removed. The pipeline
takes a RatioMap, one ratio per (block index, linear name); `uniform_ratios` gives every
matrix the target ratio (the paper's setting, the default). Other allocations (e.g. a
knapsack over profiled errors) plug in here by producing another RatioMap."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from .budget import check_ratio
from .errors import CospadiError

RatioMap = Mapping[tuple[int, str], float]  # (block index, linear name relative to the block) -> ratio


def uniform_ratios(n_blocks: int, targets: Iterable[str], ratio: float) -> dict[tuple[int, str], float]:
    """Every target linear of every block at `ratio`."""
    check_ratio(ratio)
    names = tuple(targets)
    return {(block, name): ratio for block in range(n_blocks) for name in names}


def check_ratio_map(ratios: RatioMap, n_blocks: int, targets: Iterable[str]) -> None:
    """CospadiError unless `ratios` gives exactly every target linear of every block a
    ratio in (0, 1)."""
    expected = {(block, name) for block in range(n_blocks) for name in targets}
    missing, extra = sorted(expected - set(ratios)), sorted(set(ratios) - expected)
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"names {extra[0]}, which the model does not have"
        raise CospadiError(f"the per-matrix ratios must cover every (block, linear) of the model exactly: the map "
                           f"{what}")
    for ratio in ratios.values():
        check_ratio(ratio)


def shared_ratio(members: Iterable[tuple[int, str]], ratios: RatioMap) -> float:
    """The one ratio of linears that share a factor; CospadiError when their ratios differ
    (a shared job is allocated as one matrix)."""
    values = {ratios[member] for member in members}
    if len(values) != 1:
        raise CospadiError(f"linears sharing one factor {sorted(members)} were given different ratios "
                           f"{sorted(values)}: give a shared group one ratio")
    return values.pop()
