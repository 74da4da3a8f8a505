"""The compression methods by name: each maps a (d1, d2) weight to a budget, factors and
a drop-in module. Model code calls only these four functions."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .budget import DictBudget, LowRankBudget, check_rho, dict_budget, lowrank_budget
from .errors import CospadiError
from .modules import DictLinear, LowRankLinear
from .solvers import cospadi, svd, svd_llm
from .solvers.dictionary import INITS
from .solvers.factors import LowRankFactors, SparseDictFactors

METHODS = ("svd", "svd-llm", "cospadi")
Budget = LowRankBudget | DictBudget
Factors = LowRankFactors | SparseDictFactors


@dataclass(frozen=True)
class SolverOptions:
    """Options of the dictionary solver (ignored by the low-rank methods).
    rho = k / s; iters = alternations of sparse coding and dictionary update;
    power_iters = power iterations per atom update; init = "svd" (start from the
    whitened SVD basis) or "random" (k random columns, seeded by `seed`).
    The paper's setting is rho=2, iters=60, power_iters=8, init="random", seed=42."""

    rho: float = 2.0
    iters: int = 3
    power_iters: int = 8
    init: str = "svd"
    seed: int = 42

    def __post_init__(self) -> None:
        check_rho(self.rho)
        if int(self.iters) != self.iters or self.iters < 1:
            raise CospadiError(f"iters {self.iters!r} must be a positive integer (the paper uses 60)")
        if int(self.power_iters) != self.power_iters or self.power_iters < 1:
            raise CospadiError(f"power_iters {self.power_iters!r} must be a positive integer (the paper uses 8)")
        if self.init not in INITS:
            raise CospadiError(f"init {self.init!r} is unknown; choose one of: {', '.join(INITS)}")


def check_method(method: str) -> None:
    """CospadiError unless `method` is one of METHODS."""
    if method not in METHODS:
        raise CospadiError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")


def budget_for(method: str, d1: int, d2: int, ratio: float, options: SolverOptions) -> Budget:
    """The budget that removes `ratio` of a (d1, d2) matrix under `method` (METHOD.md)."""
    check_method(method)
    if method == "cospadi":
        return dict_budget(d1, d2, ratio, options.rho)
    return lowrank_budget(d1, d2, ratio)


def factorize(method: str, weight: torch.Tensor, gram: torch.Tensor, budget: Budget,
              options: SolverOptions) -> Factors:
    """Factors of W (d1, d2) under the calibration Gram (d1, d1) within `budget`."""
    check_method(method)
    if method == "svd":
        return svd(weight, gram, budget)
    if method == "svd-llm":
        return svd_llm(weight, gram, budget)
    return cospadi(weight, gram, budget, iters=options.iters, power_iters=options.power_iters, seed=options.seed,
                   init=options.init)


def build_module(factors: Factors, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """The drop-in module computing x @ factors.weight() + bias, stored in `dtype`."""
    if isinstance(factors, LowRankFactors):
        return LowRankLinear.from_factors(factors, bias, dtype)
    return DictLinear.from_factors(factors, bias, dtype)
