"""What a compression method is: one object that knows its budget, its solver and the
module kind its factors become. The pipeline, reports, storage and benchmarks ask the
method, never its name (methods/__init__.py holds the registry)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ..budget import DictBudget, LowRankBudget, lowrank_budget
from ..errors import CospadiError
from ..layers.base import CompressedLinear
from ..layers.linear import LowRankLinear
from ..layers.quantized import QuantLowRankLinear
from ..solvers.options import SolverOptions
from ..solvers.profile import lowrank_errors, whitened_spectrum
from ..solvers.quantize import (
    QuantDenseFactors,
    QuantDictFactors,
    QuantLowRankFactors,
    QuantSpec,
    quantize_lowrank,
)

QUANT_FACTORS = (QuantDictFactors, QuantLowRankFactors, QuantDenseFactors)

Budget = LowRankBudget | DictBudget


class Method:
    """A compression method. Subclasses set the class attributes and implement `budget`
    and `solve`; `build` is shared. One instance per method lives in the registry.

    name: the registry key (`--method`). module_kind: the CompressedLinear subclass its
    factors become. shares: whether `members` > 1 matrices can share one left factor
    (per-group mode). default_group_size: the blocks per group when the user gives none.
    default_share: which linears of a block share a factor in per-group mode when the user
    gives none (kinds such as "gate"; None: the family adapter's q/k/v/gate/up).
    uses_solver_options: whether SolverOptions change its result (bench cache names,
    resume fingerprints). quantized_kind: the CompressedLinear its quantized factors
    become (None: `--quant` is refused). ignores_ratio: the method keeps every matrix's
    shape and only quantizes it (rtn, gptq: the ratio is 0). dense_quantizer: how a matrix
    kept dense (ratio 0) is quantized under `--quant` ("gptq" or "rtn";
    docs/quantization.md)."""

    name: ClassVar[str]
    module_kind: ClassVar[type[CompressedLinear]]
    shares: ClassVar[bool] = False
    default_group_size: ClassVar[int] = 1
    default_share: ClassVar[tuple[str, ...] | None] = None
    uses_solver_options: ClassVar[bool] = False
    quantized_kind: ClassVar[type[CompressedLinear] | None] = None
    ignores_ratio: ClassVar[bool] = False
    dense_quantizer: ClassVar[str] = "gptq"

    def budget(self, d1: int, d2: int, ratio: float, options: SolverOptions, members: int = 1) -> Budget:
        """The budget removing `ratio` of `members` (d1, d2) matrices that share one left
        factor (docs/method.md "Budget"; members = 1: one matrix)."""
        raise NotImplementedError

    def check(self, budget: Any, options: SolverOptions) -> None:
        """CospadiError when `options` cannot solve `budget` (called for every job before
        any work starts); the default accepts everything."""

    def solve(self, weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], budget: Any,
              options: SolverOptions) -> list[Any]:
        """Factors of each weight W_l (d1, d2) under its Gram G_l (d1, d1) within `budget`
        (from self.budget with members = len(weights)); several weights share ONE left
        factor, the same tensor object in every returned factor."""
        raise NotImplementedError

    def error_curve(self, weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor],
                    budgets: Sequence[Any], options: SolverOptions) -> list[float]:
        """The whitened squared error sum_l ||L_bar (W_l - W'_l)||_F^2 this method would
        reach at each of `budgets` (all for members = len(weights)), exact or a proxy that
        tracks it (solvers/profile.py); allocation compares budgets by it."""
        raise NotImplementedError

    def quantize(self, factors: Any, weight: torch.Tensor, gram: torch.Tensor, spec: QuantSpec) -> Any:
        """The factors of `weight` (d1, d2) quantized as `spec` says, calibrated on its Gram
        (d1, d1) (solvers/quantize.py); CospadiError for a method without quantized kind."""
        raise CospadiError(f"method {self.name} cannot quantize its factors: leave out --quant")

    def build(self, factors: Sequence[Any], biases: Sequence[torch.Tensor | None],
              dtype: torch.dtype) -> list[CompressedLinear]:
        """One drop-in module per factor (with its bias, stored in `dtype`), of the
        quantized kind for quantized factors; all of them hold the SAME nn.Parameter as
        their shared factor, so it is one tensor in memory, counted once by
        model.parameters() and saved once."""
        kind = self.quantized_kind if factors and isinstance(factors[0], QUANT_FACTORS) else self.module_kind
        assert kind is not None
        modules = [kind.from_factors(f, b, dtype) for f, b in zip(factors, biases)]
        attribute = kind.shared_factor
        for module in modules[1:]:
            setattr(module, attribute, getattr(modules[0], attribute))
        return modules


class LowRankMethod(Method):
    """A method whose factors are a rank-r pair (LowRankLinear) under the low-rank budget
    (docs/method.md "Budget"); subclasses implement `solve` only."""

    module_kind = LowRankLinear
    quantized_kind = QuantLowRankLinear
    whitened_basis: ClassVar[bool] = True  # the basis comes from the whitened SVD (False: data-free svd)

    def quantize(self, factors: Any, weight: torch.Tensor, gram: torch.Tensor, spec: QuantSpec) -> Any:
        """GPTQ on the left factor, the right one refit and GPTQ'd (quantize_lowrank)."""
        return quantize_lowrank(weight, gram, factors, spec)

    def budget(self, d1: int, d2: int, ratio: float, options: SolverOptions, members: int = 1) -> LowRankBudget:
        return lowrank_budget(d1, d2, ratio, members)

    def error_curve(self, weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor],
                    budgets: Sequence[Any], options: SolverOptions) -> list[float]:
        """Exact: the tail of the whitened spectrum (of the raw one for data-free svd)."""
        spectrum = whitened_spectrum(weights, grams, plain=not self.whitened_basis)
        return lowrank_errors(spectrum, [b.rank for b in budgets])
