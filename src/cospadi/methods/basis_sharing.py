"""`basis-sharing`: one whitened SVD basis shared by the same projection of consecutive
blocks (Basis Sharing; groups of 2 by default, the paper's protocol). A group of one
matrix is exactly svd-llm."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..budget import LowRankBudget
from ..solvers import basis_sharing, svd_llm
from ..solvers.factors import LowRankFactors
from ..solvers.options import SolverOptions
from .base import LowRankMethod


class BasisSharing(LowRankMethod):
    name = "basis-sharing"
    shares = True
    default_group_size = 2

    def solve(self, weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], budget: LowRankBudget,
              options: SolverOptions) -> list[LowRankFactors]:
        if len(weights) == 1:
            return [svd_llm(weights[0], grams[0], budget)]
        return basis_sharing(weights, grams, budget)
