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
from .solvers.dictionary import INITS, SOLVERS
from .solvers.factors import LowRankFactors, SparseDictFactors

METHODS = ("svd", "svd-llm", "cospadi")
Budget = LowRankBudget | DictBudget
Factors = LowRankFactors | SparseDictFactors


@dataclass(frozen=True)
class SolverOptions:
    """Options of the dictionary solver (ignored by the low-rank methods).
    rho = k / s. solver: "ksvd" (Batch-OMP + K-SVD), "orthogonal" or "single-step".
    For ksvd: init = "orthogonal" | "svd" | "random" start; iters = alternations of
    Batch-OMP sparse coding and `sweeps` K-SVD sweeps (0 with the orthogonal start:
    its codes, then the sweeps); power_iters per atom update; seed for random starts.
    The default (orthogonal start, 8 sweeps, 2 power iterations, no OMP) measured as good
    as or better than the paper's setting at a small fraction of its time (BENCHMARKS.md);
    the paper's setting is solver="ksvd", init="random", iters=60, power_iters=8, sweeps=1."""

    rho: float = 2.0
    solver: str = "ksvd"
    iters: int = 0
    power_iters: int = 2
    sweeps: int = 8
    init: str = "orthogonal"
    seed: int = 42

    def __post_init__(self) -> None:
        check_rho(self.rho)
        if self.solver not in SOLVERS:
            raise CospadiError(f"solver {self.solver!r} is unknown; choose one of: {', '.join(SOLVERS)}")
        for name, low in (("iters", 0), ("power_iters", 1), ("sweeps", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise CospadiError(f"{name} {value!r} must be an integer >= {low} (the paper uses iters=60, "
                                   "power_iters=8, sweeps=1)")
        if self.init not in INITS:
            raise CospadiError(f"init {self.init!r} is unknown; choose one of: {', '.join(INITS)}")
        if self.solver == "ksvd" and self.iters == 0 and self.init != "orthogonal":
            raise CospadiError(f"iters 0 needs --init orthogonal (a {self.init} start has no codes yet): "
                               "pass --iters 1 or more")


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
    return cospadi(weight, gram, budget, solver=options.solver, iters=options.iters, power_iters=options.power_iters,
                   seed=options.seed, init=options.init, sweeps=options.sweeps)


def build_module(factors: Factors, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """The drop-in module computing x @ factors.weight() + bias, stored in `dtype`."""
    if isinstance(factors, LowRankFactors):
        return LowRankLinear.from_factors(factors, bias, dtype)
    return DictLinear.from_factors(factors, bias, dtype)
