"""Sparse dictionary learning (K-SVD with Batch-OMP) and the CoSpaDi solver built on it.

learn_dictionary works on any (n, m) matrix; cospadi() applies it to the whitened weight
L W so that the learned factors minimise the calibration output error ||X (W - D S)||_F."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..budget import DictBudget
from .factors import DictionaryResult, SparseDictFactors, sparse_from_dense
from .omp import batch_omp
from .whitening import cholesky_upper, unwhiten, whiten


INITS = ("orthogonal", "svd", "random")
ORTHOGONAL_ROUNDS = 25  # default cap of the orthogonal rounds (they stop early when one gains < 1e-4)


def initial_dictionary(signals: torch.Tensor, atoms: int, seed: int, init: str = "random") -> torch.Tensor:
    """A unit-norm starting dictionary (n, k) for `signals` (n, m).
    "random": k distinct columns chosen with torch.Generator(seed) (METHOD.md step 1);
    "svd": the top left singular vectors (the rank-k optimum's basis) and, when k exceeds
    the rank, seeded random columns for the rest. Zero columns become random unit vectors."""
    if init not in ("svd", "random"):
        raise ValueError("initial_dictionary builds 'svd' or 'random' starts")
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
                     power_iters: int = 8, seed: int = 42, init: str | torch.Tensor = "random", sweeps: int = 1,
                     on_iter: Callable[[int, float], None] | None = None,
                     rounds: int = ORTHOGONAL_ROUNDS) -> DictionaryResult:
    """Minimise ||Y - D S||_F^2 over D (n, k) and S (k, m) with exactly s nonzeros per
    column of S. `iters` alternations of (1) Batch-OMP sparse coding and (2) `sweeps`
    K-SVD sweeps over the atoms, each atom's rank-1 fit taken by `power_iters` power
    iterations warm-started at the current atom; the support found by OMP is kept
    through the sweeps. With iters=60, power_iters=8, sweeps=1, init="random" this is
    the paper's solver.

    init: "random" (k seeded random columns), "svd" (top singular vectors), "orthogonal"
    (learn_orthogonal's dictionary *and codes* after at most `rounds` rounds: its sweeps
    run before the first OMP, and iters may be 0), or an (n, k) tensor. "orthogonal" needs k <= n and falls back to
    "svd" otherwise.

    The objective never increases: a column whose new OMP code fits worse than its
    previous code under the same dictionary keeps the previous one, and the warm-started
    power iteration never lowers an atom's Rayleigh quotient. objective[t] is recorded
    after each round of sweeps; on_iter(t, objective) is called then."""
    y = signals
    coef = support = None
    if isinstance(init, torch.Tensor):
        d = init.to(y) / init.to(y).norm(dim=0).clamp_min(torch.finfo(y.dtype).tiny)
    elif init == "orthogonal" and atoms <= y.shape[0]:
        from .orthogonal import learn_orthogonal

        start = learn_orthogonal(y, atoms, sparsity, rounds)
        d = start.dictionary
        support = torch.zeros(atoms, y.shape[1], dtype=torch.bool, device=y.device).scatter_(0, start.indices, True)
        coef = torch.zeros(atoms, y.shape[1], dtype=y.dtype, device=y.device).scatter_(0, start.indices, start.values)
    else:
        d = initial_dictionary(y, atoms, seed, "svd" if init == "orthogonal" else init)
    if iters < (0 if coef is not None else 1):
        raise ValueError("iters must be at least 1 unless the start provides codes")
    history: list[float] = []

    def update(residual: torch.Tensor) -> None:
        _update_atoms(d, coef, support, residual, power_iters, sweeps)
        history.append(float((residual * residual).sum()))
        if on_iter is not None:
            on_iter(len(history) - 1, history[-1])

    if coef is not None:
        update(y - d @ coef)
    for _ in range(iters):
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
        update(residual)
    indices, values = sparse_from_dense(coef, support)
    return DictionaryResult(d, indices, values, history)


def _update_atoms(d: torch.Tensor, coef: torch.Tensor, support: torch.Tensor, residual: torch.Tensor,
                  power_iters: int, sweeps: int = 1) -> None:
    """`sweeps` K-SVD dictionary updates in place, atom by atom. For atom i used by columns Omega:
    E = residual[:, Omega] + d_i coef[i, Omega]; (d_i, coef[i, Omega]) <- best rank-1 fit
    of E found by power iteration from d_i; residual[:, Omega] <- E - d_i coef[i, Omega].
    An unused atom is re-seeded with the worst-fitted residual column (no code uses it,
    so the objective is unchanged until the next sparse coding). The support is fixed
    throughout, so each atom's Omega is found once for all sweeps."""
    if sweeps < 1:
        return
    rt = residual.T.contiguous()  # columns of the residual as contiguous rows
    omegas = [row.nonzero().squeeze(1) for row in support]
    for i in [i for _ in range(sweeps) for i in range(d.shape[1])]:
        omega = omegas[i]
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


SOLVERS = ("ksvd", "orthogonal", "single-step")


def cospadi(weight: torch.Tensor, gram: torch.Tensor, budget: DictBudget, solver: str = "ksvd", iters: int = 60,
            power_iters: int = 8, seed: int = 42, init: str = "random", sweeps: int = 1,
            dtype: torch.dtype = torch.float32,
            on_iter: Callable[[int, float], None] | None = None,
            rounds: int = ORTHOGONAL_ROUNDS) -> SparseDictFactors:
    """CoSpaDi factors of W (d1, d2) under the calibration Gram G (d1, d1): learn (D_L, S)
    on L W with L^T L = G, then D = L^{-1} D_L by a triangular solve, so the factors
    minimise ||X (W - D S)||_F. `solver`: "ksvd" (learn_dictionary with iters, power_iters,
    init, sweeps, rounds; the defaults here are the paper's), "orthogonal" (learn_orthogonal
    for at most `rounds` rounds, needs k <= d1) or "single-step". Learning runs in `dtype`; returns a float64
    dictionary (d1, k) and values (s, d2), indices (s, d2)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}")
    upper = cholesky_upper(gram)
    whitened = whiten(upper, weight)
    # A tall L W (d1 > d2, e.g. down_proj) has rank <= d2: with L W = Q R (Q (d1, d2)
    # orthonormal), every solver step (OMP inner products D^T Y, Gram D^T D, atom updates,
    # Procrustes) stays in range(Q), so learning on R (d2, d2) and mapping D = Q D_R is the
    # same computation in d2 instead of d1 coordinates. Needs k <= d2 (an orthonormal D_R).
    basis = None
    if whitened.shape[0] > whitened.shape[1] >= budget.atoms:
        basis, whitened = torch.linalg.qr(whitened)
    whitened = whitened.to(dtype)
    if solver == "ksvd":
        result = learn_dictionary(whitened, budget.atoms, budget.sparsity, iters, power_iters, seed, init, sweeps,
                                  on_iter, rounds)
    elif solver == "orthogonal":
        from .orthogonal import learn_orthogonal

        result = learn_orthogonal(whitened, budget.atoms, budget.sparsity, rounds)
    else:
        from .orthogonal import single_step

        result = single_step(whitened, budget.atoms, budget.sparsity)
    dictionary = result.dictionary.to(torch.float64)
    if basis is not None:
        dictionary = basis @ dictionary
    return SparseDictFactors(unwhiten(upper, dictionary), result.indices, result.values.to(torch.float64))
