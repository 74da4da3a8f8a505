"""The multiple-choice knapsack: pick exactly one option per item so that the summed
weight stays within a capacity and the summed cost is least. Solved by dynamic
programming over a discretised capacity (docs/allocation.md "Knapsack"):

weights are counted in units of u = capacity / steps, rounded UP, so every answer is
feasible for the true weights; the answer is the exact optimum of the rounded problem,
hence costs no more than the true optimum at capacity - n u (n items). With the default
steps = 1000 n that is within 0.1% of the capacity. Pure numpy, no model code."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .errors import CospadiError

MAX_STEPS = 400_000  # the DP table is items x steps bytes of choices


def solve_mckp(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[float]], capacity: float,
               steps: int | None = None) -> list[int]:
    """The option index per item minimising sum(costs[i][c_i]) subject to
    sum(weights[i][c_i]) <= capacity. costs/weights: one list per item, of the same
    length (>= 1), weights >= 0. `steps`: capacity resolution (default min(1000 n,
    MAX_STEPS); exact when every weight is a multiple of capacity / steps). CospadiError
    when even the lightest options do not fit."""
    n = len(costs)
    if n == 0:
        return []
    if len(weights) != n or any(len(c) != len(w) or not c for c, w in zip(costs, weights)):
        raise ValueError("every item needs as many costs as weights, at least one")
    lightest = sum(min(w) for w in weights)
    if lightest > capacity * (1 + 1e-12):
        raise CospadiError(f"the budget {capacity:.6g} is below the smallest possible size {lightest:.6g}: "
                           "lower the ratio or allow larger cuts")
    steps = steps or min(1000 * n, MAX_STEPS)
    unit = capacity / steps if capacity > 0 else 1.0
    units = [np.array([math.ceil(w / unit - 1e-9) for w in ws], dtype=np.int64) for ws in weights]
    best = np.zeros(steps + 1)  # best[c]: least cost of the items so far within c units
    choice = np.zeros((n, steps + 1), dtype=np.int16)
    for i in range(n):
        best, choice[i] = _add_item(best, np.asarray(costs[i], dtype=np.float64), units[i])
    if not np.isfinite(best[steps]):  # rounding up pushed the lightest options over
        raise CospadiError("the budget is too tight for the knapsack's resolution: raise steps or the ratio's room")
    picked, c = [0] * n, steps
    for i in range(n - 1, -1, -1):
        picked[i] = int(choice[i, c])
        c -= int(units[i][picked[i]])
    return picked


def _add_item(best: np.ndarray, cost: np.ndarray, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One DP step: the least cost within each capacity once this item's options are
    added, and the option that achieves it."""
    size = best.size
    new = np.full(size, np.inf)
    picked = np.zeros(size, dtype=np.int16)
    candidate = np.empty(size)
    better = np.empty(size, dtype=bool)
    for j, (c, u) in enumerate(zip(cost, units)):
        if u >= size:
            continue
        np.add(best[:size - u], c, out=candidate[u:])
        np.less(candidate[u:], new[u:], out=better[u:])
        np.copyto(new[u:], candidate[u:], where=better[u:])
        np.copyto(picked[u:], j, where=better[u:])
    return new, picked
