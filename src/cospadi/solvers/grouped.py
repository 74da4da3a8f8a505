"""Factors shared across a group of layers (docs/method.md "Per-group mode"): m weights of the
same shape (d1, d2), e.g. the q_proj of two consecutive blocks, get ONE left factor (a
CoSpaDi dictionary or a Basis Sharing basis, (d1, k)) and their own right factors.

Shared metric: G_bar = mean of the members' Grams, L_bar its Cholesky factor. The learner
runs once on the whitened concatenation [L_bar W_1 ... L_bar W_m] (d1, m d2), the shared
factor is unwhitened once, and the right factor is sliced per member. Both solvers reuse
the per-layer ones on that concatenation (whitening a concatenation by one L_bar is
whitening each block by it), so every per-layer solver option carries over unchanged.
Pure functions: no model code here."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..budget import DictBudget, LowRankBudget
from .dictionary import cospadi
from .factors import LowRankFactors, SparseDictFactors
from .lowrank import svd_llm
from .options import SolverOptions


def mean_gram(grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """G_bar = (1/m) sum_l G_l, float64 (d1, d1). Grams must all be (d1, d1)."""
    if not grams:
        raise ValueError("a group needs at least one Gram matrix")
    shape = grams[0].shape
    if any(g.shape != shape for g in grams) or len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"the Grams of a group must all be square of one size, got {[tuple(g.shape) for g in grams]}")
    return torch.stack([g.to(torch.float64) for g in grams]).mean(0)


def _check_group(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor],
                 budget: DictBudget | LowRankBudget) -> tuple[int, int]:
    """(d1, d2) after checking m weights of one shape, m Grams and a budget for m members."""
    if not weights or len(weights) != len(grams):
        raise ValueError(f"need one Gram per weight, got {len(weights)} weights and {len(grams)} Grams")
    d1, d2 = weights[0].shape
    if any(w.shape != (d1, d2) for w in weights):
        raise ValueError(f"the weights of a group must share one shape, got {[tuple(w.shape) for w in weights]}")
    if (budget.d1, budget.d2, budget.members) != (d1, d2, len(weights)):
        raise ValueError(f"budget is for {budget.members} x ({budget.d1}, {budget.d2}), the group is "
                         f"{len(weights)} x ({d1}, {d2})")
    return d1, d2


def cospadi_grouped(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], budget: DictBudget,
                    options: SolverOptions = SolverOptions(), **solver: Any) -> list[SparseDictFactors]:
    """CoSpaDi factors of m weights W_l (d1, d2) under their Grams G_l (d1, d1) with one
    shared dictionary: learn (D_L, S) on [L_bar W_1 ... L_bar W_m] (d1, m d2) with the
    cospadi() learner under `options` (`solver` keywords are cospadi()'s others: dtype,
    on_iter), unwhiten D = L_bar^{-1} D_L once, and give member l the
    columns l d2 ... (l + 1) d2 - 1 of S. `budget` = dict_budget(d1, d2, ratio, rho,
    members=m). Returns m SparseDictFactors whose `dictionary` is the SAME (d1, k)
    float64 tensor object; indices/values (s, d2) each. m = 1 gives cospadi() exactly."""
    d1, d2 = _check_group(weights, grams, budget)
    whole = cospadi(torch.cat([w.to(torch.float64) for w in weights], dim=1), mean_gram(grams),
                    DictBudget(d1, len(weights) * d2, budget.atoms, budget.sparsity), options, **solver)
    return [SparseDictFactors(whole.dictionary, whole.indices[:, j * d2:(j + 1) * d2].contiguous(),
                              whole.values[:, j * d2:(j + 1) * d2].contiguous()) for j in range(len(weights))]


def basis_sharing(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor],
                  budget: LowRankBudget) -> list[LowRankFactors]:
    """Basis Sharing (Wang et al., 2024) factors of m weights W_l (d1, d2): the rank-r
    SVD of [L_bar W_1 ... L_bar W_m] (d1, m d2) gives one basis, unwhitened once,
    B = L_bar^{-1} U_r Sigma_r^{1/2} (d1, r), and per-member coefficients
    C_l = Sigma_r^{1/2} V_r^T[:, l d2 ... (l + 1) d2 - 1] (r, d2); this minimises
    sum_l ||L_bar (W_l - B C_l)||_F^2 over rank-r shared bases. `budget` =
    lowrank_budget(d1, d2, ratio, members=m). Returns m LowRankFactors whose `left` is
    the SAME float64 tensor object. m = 1 gives svd_llm() exactly."""
    d1, d2 = _check_group(weights, grams, budget)
    whole = svd_llm(torch.cat([w.to(torch.float64) for w in weights], dim=1), mean_gram(grams),
                    LowRankBudget(d1, len(weights) * d2, budget.rank))
    return [LowRankFactors(whole.left, whole.right[:, j * d2:(j + 1) * d2].contiguous()) for j in range(len(weights))]
