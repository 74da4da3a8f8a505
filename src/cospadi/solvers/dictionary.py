"""Sparse dictionary learning (K-SVD with Batch-OMP) and the CoSpaDi solver built on it.

learn_dictionary works on any (n, m) matrix; cospadi() applies it to the whitened weight
L W so that the learned factors minimise the calibration output error ||X (W - D S)||_F."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..budget import DictBudget
from .factors import SparseDictFactors, sparse_from_dense
from .omp import batch_omp
from .whitening import cholesky_upper, unwhiten, whiten


@dataclass
class DictionaryResult:
    """dictionary (n, k) with unit-norm atoms; indices and values (s, m) as in
    SparseDictFactors; objective[t] = ||Y - D S||_F^2 after alternation t."""

    dictionary: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    objective: list[float] = field(default_factory=list)


INITS = ("svd", "random")


def initial_dictionary(signals: torch.Tensor, atoms: int, seed: int, init: str = "random") -> torch.Tensor:
    """A unit-norm starting dictionary (n, k) for `signals` (n, m).
    "random": k distinct columns chosen with torch.Generator(seed) (METHOD.md step 1);
    "svd": the top left singular vectors (the rank-k optimum's basis) and, when k exceeds
    the rank, seeded random columns for the rest. Zero columns become random unit vectors."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}")
    n, m = signals.shape
    gen = torch.Generator().manual_seed(seed)
    cols = torch.randperm(m, generator=gen)[:atoms].to(signals.device)
    start = signals[:, cols].clone()
    if init == "svd":
        basis = torch.linalg.svd(signals, full_matrices=False).U[:, :atoms]
        start[:, : basis.shape[1]] = basis
    norms = start.norm(dim=0)
    dead = norms <= torch.finfo(signals.dtype).eps * signals.abs().max().clamp_min(1.0)
    if bool(dead.any()):
        start[:, dead] = torch.randn(n, int(dead.sum()), generator=gen, dtype=signals.dtype).to(signals.device)
        norms = start.norm(dim=0)
    return start / norms


def learn_dictionary(signals: torch.Tensor, atoms: int, sparsity: int, iters: int,
                     power_iters: int = 8, seed: int = 42, init: str | torch.Tensor = "random",
                     on_iter: Callable[[int, float], None] | None = None) -> DictionaryResult:
    """Minimise ||Y - D S||_F^2 over D (n, k) and S (k, m) with exactly s nonzeros per
    column of S, by `iters` alternations of (1) Batch-OMP sparse coding and (2) K-SVD atom
    updates, each atom's rank-1 fit taken by `power_iters` power iterations warm-started
    at the current atom. The support found by OMP is kept through the update.

    The objective never increases: a column whose new OMP code fits worse than its
    previous code under the same dictionary keeps the previous one, and the warm-started
    power iteration never lowers an atom's Rayleigh quotient. `init` names a start for
    initial_dictionary or gives one (n, k). on_iter(t, objective) is called after each alternation."""
    if iters < 1:
        raise ValueError("iters must be at least 1")
    y = signals
    if isinstance(init, torch.Tensor):
        d = init.to(y) / init.to(y).norm(dim=0).clamp_min(torch.finfo(y.dtype).tiny)
    else:
        d = initial_dictionary(y, atoms, seed, init)
    coef = support = None
    history: list[float] = []
    for t in range(iters):
        idx, val = batch_omp(d, y, sparsity)
        new_support = torch.zeros(atoms, y.shape[1], dtype=torch.bool, device=y.device).scatter_(0, idx, True)
        new_coef = torch.zeros(atoms, y.shape[1], dtype=y.dtype, device=y.device).scatter_(0, idx, val)
        residual = y - d @ new_coef
        if coef is not None:
            old_residual = y - d @ coef
            worse = (residual * residual).sum(0) > (old_residual * old_residual).sum(0)
            new_coef[:, worse], new_support[:, worse] = coef[:, worse], support[:, worse]
            residual[:, worse] = old_residual[:, worse]
        coef, support = new_coef, new_support
        _update_atoms(d, coef, support, residual, power_iters)
        history.append(float((residual * residual).sum()))
        if on_iter is not None:
            on_iter(t, history[-1])
    indices, values = sparse_from_dense(coef, support)
    return DictionaryResult(d, indices, values, history)


def _update_atoms(d: torch.Tensor, coef: torch.Tensor, support: torch.Tensor, residual: torch.Tensor,
                  power_iters: int) -> None:
    """K-SVD dictionary update in place, atom by atom. For atom i used by columns Omega:
    E = residual[:, Omega] + d_i coef[i, Omega]; (d_i, coef[i, Omega]) <- best rank-1 fit
    of E found by power iteration from d_i; residual[:, Omega] <- E - d_i coef[i, Omega].
    An unused atom is re-seeded with the worst-fitted residual column (no code uses it,
    so the objective is unchanged until the next sparse coding)."""
    rt = residual.T.contiguous()  # columns of the residual as contiguous rows
    for i in range(d.shape[1]):
        omega = support[i].nonzero().squeeze(1)
        if omega.numel() == 0:
            worst = (rt * rt).sum(1).argmax()
            norm = rt[worst].norm()
            if norm > 0:
                d[:, i] = rt[worst] / norm
            continue
        et = rt.index_select(0, omega).addr_(coef[i, omega], d[:, i])  # E^T (|Omega|, n)
        u = d[:, i]
        for _ in range(power_iters):
            nxt = et.T @ (et @ u)
            norm = nxt.norm()
            if not norm > 0:
                break
            u = nxt / norm
        v = et @ u
        d[:, i] = u
        coef[i, omega] = v
        rt.index_copy_(0, omega, et.addr_(v, u, alpha=-1.0))
    residual.copy_(rt.T)


def cospadi(weight: torch.Tensor, gram: torch.Tensor, budget: DictBudget, iters: int = 60,
            power_iters: int = 8, seed: int = 42, init: str = "random", dtype: torch.dtype = torch.float32,
            on_iter: Callable[[int, float], None] | None = None) -> SparseDictFactors:
    """CoSpaDi factors of W (d1, d2) under the calibration Gram G (d1, d1): learn (D_L, S)
    on L W with L^T L = G, then D = L^{-1} D_L by a triangular solve. Learning runs in
    `dtype` from `init` ("random": the paper's; "svd": warm start). Returns float64 dictionary (d1, k) and values (s, d2), indices (s, d2)."""
    upper = cholesky_upper(gram)
    whitened = whiten(upper, weight).to(dtype)
    result = learn_dictionary(whitened, budget.atoms, budget.sparsity, iters, power_iters, seed, init, on_iter)
    return SparseDictFactors(unwhiten(upper, result.dictionary), result.indices, result.values.to(torch.float64))
