"""`svd`: data-free truncated SVD of each weight (the calibration is ignored)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..budget import LowRankBudget
from ..solvers import svd
from ..solvers.factors import LowRankFactors
from ..solvers.options import SolverOptions
from .base import LowRankMethod


class Svd(LowRankMethod):
    name = "svd"
    whitened_basis = False

    def solve(self, weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], budget: LowRankBudget,
              options: SolverOptions) -> list[LowRankFactors]:
        return [svd(weight, gram, budget) for weight, gram in zip(weights, grams)]
