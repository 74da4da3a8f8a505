"""`svd-llm`: whitened truncated SVD of each weight (SVD-LLM)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..budget import LowRankBudget
from ..solvers import svd_llm
from ..solvers.factors import LowRankFactors
from ..solvers.options import SolverOptions
from .base import LowRankMethod


class SvdLlm(LowRankMethod):
    name = "svd-llm"

    def solve(self, weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], budget: LowRankBudget,
              options: SolverOptions) -> list[LowRankFactors]:
        return [svd_llm(weight, gram, budget) for weight, gram in zip(weights, grams)]
