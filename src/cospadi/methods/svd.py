"""`svd`: data-free truncated SVD of each weight (the calibration is ignored)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..budget import LowRankBudget, lowrank_budget
from ..layers.linear import LowRankLinear
from ..solvers import svd
from ..solvers.factors import LowRankFactors
from ..solvers.options import SolverOptions
from .base import Method


class Svd(Method):
    name = "svd"
    module_kind = LowRankLinear

    def budget(self, d1: int, d2: int, ratio: float, options: SolverOptions, members: int = 1) -> LowRankBudget:
        return lowrank_budget(d1, d2, ratio, members)

    def solve(self, weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], budget: LowRankBudget,
              options: SolverOptions) -> list[LowRankFactors]:
        return [svd(weight, gram, budget) for weight, gram in zip(weights, grams)]
