"""`cospadi`: a calibration-whitened sparse dictionary per matrix, or shared by the same
projection of consecutive blocks (per-group mode)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..budget import DictBudget, dict_budget
from ..layers.linear import DictLinear
from ..layers.quantized import QuantDictLinear
from ..solvers import cospadi, cospadi_grouped
from ..solvers.dictionary import check_solver
from ..solvers.factors import SparseDictFactors
from ..solvers.options import SolverOptions
from ..solvers.profile import thresholded_errors, whitened_spectrum
from ..solvers.quantize import QuantDictFactors, QuantSpec, quantize_dict
from .base import Method


class Cospadi(Method):
    name = "cospadi"
    module_kind = DictLinear
    quantized_kind = QuantDictLinear
    shares = True
    default_share = ("gate", "up")  # sharing q/k/v too loses perplexity at low ratios (docs/method.md "Per-group mode")
    uses_solver_options = True

    def budget(self, d1: int, d2: int, ratio: float, options: SolverOptions, members: int = 1) -> DictBudget:
        return dict_budget(d1, d2, ratio, options.rho, members)

    def check(self, budget: DictBudget, options: SolverOptions) -> None:
        check_solver(budget, options)

    def solve(self, weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], budget: DictBudget,
              options: SolverOptions) -> list[SparseDictFactors]:
        if len(weights) == 1:
            return [cospadi(weights[0], grams[0], budget, options)]
        return cospadi_grouped(weights, grams, budget, options)

    def quantize(self, factors: SparseDictFactors, weight: torch.Tensor, gram: torch.Tensor,
                 spec: QuantSpec) -> QuantDictFactors:
        """GPTQ on D, the values of S refit on their support and rounded (quantize_dict)."""
        return quantize_dict(weight, gram, factors, spec)

    def error_curve(self, weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor],
                    budgets: Sequence[DictBudget], options: SolverOptions) -> list[float]:
        """The orthogonal-dictionary proxy (solvers/profile.py thresholded_errors)."""
        spectrum = whitened_spectrum(weights, grams)
        return thresholded_errors(spectrum, [(b.atoms, b.sparsity) for b in budgets])
