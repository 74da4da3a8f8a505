"""Per-matrix budgets: which fraction of each compressed linear is removed. The pipeline
takes a RatioMap, one ratio per (block index, linear name), 0 meaning "stays dense".
`uniform_ratios` gives every matrix the target ratio (the paper's setting);
`knapsack_ratios` gives each job the ratio a multiple-choice knapsack picks from its
profiled errors (pipeline/profile.py) under the global budget (docs/allocation.md)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from .budget import check_ratio
from .errors import CospadiError
from .knapsack import solve_mckp

if TYPE_CHECKING:
    from .pipeline.profile import JobProfile

ALLOCATIONS = ("uniform", "knapsack")
COSTS = ("normalized", "fisher")  # the knapsack's cost per job and candidate ratio (job_costs)
DEFAULT_COST = "fisher"  # the lower validation perplexity (BENCHMARKS.md "allocation costs")
DEFAULT_ALLOCATION = "knapsack"  # beat uniform at every ratio for svd-llm and cospadi (BENCHMARKS.md)

RatioMap = Mapping[tuple[int, str], float]  # (block index, linear name relative to the block) -> ratio


def uniform_ratios(n_blocks: int, targets: Iterable[str], ratio: float) -> dict[tuple[int, str], float]:
    """Every target linear of every block at `ratio`."""
    check_ratio(ratio)
    names = tuple(targets)
    return {(block, name): ratio for block in range(n_blocks) for name in names}


def check_ratio_map(ratios: RatioMap, n_blocks: int, targets: Iterable[str]) -> None:
    """CospadiError unless `ratios` gives exactly every target linear of every block a
    ratio in [0, 1) (0: the linear stays dense)."""
    expected = {(block, name) for block in range(n_blocks) for name in targets}
    missing, extra = sorted(expected - set(ratios)), sorted(set(ratios) - expected)
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"names {extra[0]}, which the model does not have"
        raise CospadiError(f"the per-matrix ratios must cover every (block, linear) of the model exactly: the map "
                           f"{what}")
    for ratio in ratios.values():
        if ratio != 0:
            check_ratio(ratio)


def shared_ratio(members: Iterable[tuple[int, str]], ratios: RatioMap) -> float:
    """The one ratio of linears that share a factor; CospadiError when their ratios differ
    (a shared job is allocated as one matrix)."""
    values = {ratios[member] for member in members}
    if len(values) != 1:
        raise CospadiError(f"linears sharing one factor {sorted(members)} were given different ratios "
                           f"{sorted(values)}: give a shared group one ratio")
    return values.pop()


def resolve_allocation(allocation: str | None, ratios: RatioMap | None = None) -> str:
    """The allocation a run uses: `allocation` when given; otherwise DEFAULT_ALLOCATION,
    or "uniform" when a per-matrix `ratios` map is given (it is the allocation)."""
    if allocation is not None:
        return allocation
    return "uniform" if ratios is not None else DEFAULT_ALLOCATION


def check_allocation(allocation: str, cost: str) -> None:
    """CospadiError unless `allocation` is one of ALLOCATIONS and `cost` one of COSTS."""
    if allocation not in ALLOCATIONS:
        raise CospadiError(f"unknown allocation {allocation!r}; choose one of: {', '.join(ALLOCATIONS)}")
    if cost not in COSTS:
        raise CospadiError(f"unknown allocation cost {cost!r}; choose one of: {', '.join(COSTS)}")


def job_costs(job: JobProfile, cost: str) -> list[float]:
    """The knapsack's cost of each candidate ratio of `job`: "normalized", the squared relative
    whitened error ||L (W - W')||^2 / ||L W||^2 (ROCKET's normalised error); "fisher", the
    whitened squared error times the job's loss sensitivity, an estimate of the loss it
    adds (pipeline/sensitivity.py)."""
    if cost == "normalized":
        return [error / job.energy if job.energy > 0 else 0.0 for error in job.errors]
    if job.sensitivity is None:
        raise CospadiError("the fisher cost needs the profile's sensitivities: profile with cost='fisher'")
    return [error * job.sensitivity for error in job.errors]


def knapsack_ratios(jobs: Sequence[JobProfile], ratio: float, cost: str = "normalized",
                    steps: int | None = None) -> dict[tuple[int, str], float]:
    """One ratio per job (given to each of its members) minimising the summed cost of
    `jobs` while their stored numbers (eq. 11) stay within (1 - ratio) of their dense
    size (knapsack.solve_mckp; within its 0.1% resolution of the optimum)."""
    check_ratio(ratio)
    capacity = (1.0 - ratio) * sum(job.dense_params for job in jobs)
    picked = solve_mckp([job_costs(job, cost) for job in jobs], [job.params for job in jobs], capacity, steps)
    return {member: job.ratios[choice] for job, choice in zip(jobs, picked) for member in job.members}


def ratio_grid(matrices: Iterable[Mapping]) -> tuple[list[int], list[str], list[list[float | None]]]:
    """(blocks, linear kinds, grid[block][kind] = ratio or None) from report rows (dicts
    with layer, name and ratio): what REPORT.md's table and the heatmap show."""
    rows = list(matrices)
    blocks = sorted({int(m["layer"]) for m in rows})
    kinds = list(dict.fromkeys(str(m["name"]) for m in rows))
    grid: list[list[float | None]] = [[None] * len(kinds) for _ in blocks]
    for m in rows:
        grid[blocks.index(int(m["layer"]))][kinds.index(str(m["name"]))] = float(m["ratio"])
    return blocks, kinds, grid
