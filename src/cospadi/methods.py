"""The compression methods by name: each maps a (d1, d2) weight, or a group of weights that
share one left factor, to a budget, factors and drop-in modules. Model code calls only
the functions here."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .budget import DictBudget, LowRankBudget, check_rho, dict_budget, lowrank_budget
from .errors import CospadiError
from .layers.linear import DictLinear, LowRankLinear
from .solvers import basis_sharing, cospadi, cospadi_grouped, svd, svd_llm
from .solvers.dictionary import INITS, SOLVERS
from .solvers.factors import LowRankFactors, SparseDictFactors

METHODS = ("svd", "svd-llm", "basis-sharing", "cospadi")
Budget = LowRankBudget | DictBudget
Factors = LowRankFactors | SparseDictFactors


@dataclass(frozen=True)
class SolverOptions:
    """Options of the dictionary solver (ignored by the low-rank methods).
    rho = k / s. solver: "ksvd" (Batch-OMP + K-SVD), "orthogonal" or "single-step".
    For ksvd: init = "orthogonal" | "svd" | "random" start; iters = alternations of
    Batch-OMP sparse coding and `sweeps` K-SVD sweeps (0 with the orthogonal start:
    its codes, then the sweeps); power_iters per atom update; seed for random starts.
    rounds: at most this many (threshold, Procrustes) rounds of the orthogonal start and
    of the orthogonal solver.
    The default (orthogonal start of 25 rounds, 8 sweeps, 2 power iterations, no OMP) measured as good
    as or better than the paper's setting at a small fraction of its time (BENCHMARKS.md);
    the paper's setting is solver="ksvd", init="random", iters=60, power_iters=8, sweeps=1."""

    rho: float = 2.0
    solver: str = "ksvd"
    iters: int = 0
    power_iters: int = 2
    sweeps: int = 8
    init: str = "orthogonal"
    seed: int = 42
    rounds: int = 25

    def __post_init__(self) -> None:
        check_rho(self.rho)
        if self.solver not in SOLVERS:
            raise CospadiError(f"solver {self.solver!r} is unknown; choose one of: {', '.join(SOLVERS)}")
        for name, low in (("iters", 0), ("power_iters", 1), ("sweeps", 0), ("rounds", 1)):
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


def budget_for(method: str, d1: int, d2: int, ratio: float, options: SolverOptions, members: int = 1) -> Budget:
    """The budget that removes `ratio` of `members` (d1, d2) matrices sharing one left
    factor under `method` (METHOD.md; members = 1: one matrix). Only basis-sharing and
    cospadi share; basis-sharing with one member is svd-llm's budget."""
    check_method(method)
    if members > 1 and method not in ("basis-sharing", "cospadi"):
        raise CospadiError(f"method {method} does not share factors across layers")
    if method == "cospadi":
        return dict_budget(d1, d2, ratio, options.rho, members)
    return lowrank_budget(d1, d2, ratio, members)


def factorize(method: str, weight: torch.Tensor, gram: torch.Tensor, budget: Budget,
              options: SolverOptions) -> Factors:
    """Factors of W (d1, d2) under the calibration Gram (d1, d1) within `budget`."""
    check_method(method)
    if method == "svd":
        return svd(weight, gram, budget)
    if method in ("svd-llm", "basis-sharing"):  # a basis shared by one matrix is its svd-llm basis
        return svd_llm(weight, gram, budget)
    return cospadi(weight, gram, budget, **_solver_kwargs(options, budget))


def _solver_kwargs(options: SolverOptions, budget: DictBudget) -> dict:
    """cospadi()'s keywords for `options` under `budget`. An orthonormal dictionary holds at
    most d1 atoms; with more (an overcomplete dictionary: shared ones at low ratios, e.g.
    SmolLM2's gate/up in groups of 2 below ratio 0.35, or any matrix at a very low ratio) the
    orthogonal start becomes learn_dictionary's SVD start, which has no codes yet, so at
    least one Batch-OMP alternation runs (iters 0 -> 1); the orthogonal solver cannot run."""
    iters = options.iters
    if budget.atoms > budget.d1:
        if options.solver == "orthogonal":
            raise CospadiError(f"the orthogonal solver needs at most d1 = {budget.d1} atoms, the budget has "
                               f"{budget.atoms} (an overcomplete dictionary): use --solver ksvd, or a higher ratio")
        if options.solver == "ksvd" and options.init == "orthogonal":
            iters = max(iters, 1)
    return dict(solver=options.solver, iters=iters, power_iters=options.power_iters, seed=options.seed,
                init=options.init, sweeps=options.sweeps, rounds=options.rounds)


def factorize_group(method: str, weights: list[torch.Tensor], grams: list[torch.Tensor], budget: Budget,
                    options: SolverOptions) -> list[Factors]:
    """Factors of m weights W_l (d1, d2) under their Grams (d1, d1) sharing one left
    factor within `budget` (budget_for(..., members=m)): one dictionary (cospadi) or
    basis (basis-sharing) learned under the mean Gram, the same tensor object in every
    returned factor. One weight: exactly factorize()."""
    check_method(method)
    if len(weights) == 1:
        return [factorize(method, weights[0], grams[0], budget, options)]
    if method == "cospadi":
        return cospadi_grouped(weights, grams, budget, **_solver_kwargs(options, budget))
    if method == "basis-sharing":
        return basis_sharing(weights, grams, budget)
    raise CospadiError(f"method {method} does not share factors across layers")


def build_module(factors: Factors, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """The drop-in module computing x @ factors.weight() + bias, stored in `dtype`."""
    if isinstance(factors, LowRankFactors):
        return LowRankLinear.from_factors(factors, bias, dtype)
    return DictLinear.from_factors(factors, bias, dtype)


def build_shared_modules(factors: list[Factors], biases: list[torch.Tensor | None],
                         dtype: torch.dtype) -> list[nn.Module]:
    """One drop-in module per member (as build_module), all holding the SAME nn.Parameter
    as their shared factor (`dictionary` of DictLinear, `left` of LowRankLinear): one
    tensor in memory, counted once by model.parameters()."""
    modules = [build_module(f, b, dtype) for f, b in zip(factors, biases)]
    name = "dictionary" if isinstance(modules[0], DictLinear) else "left"
    for module in modules[1:]:
        setattr(module, name, getattr(modules[0], name))
    return modules
