"""Sparse dictionary learning (K-SVD style alternations of sparse coding and dictionary
updates) and the CoSpaDi solver built on it.

learn_dictionary works on any (n, m) matrix; cospadi() applies it to the whitened weight
L W so that the learned factors minimise the calibration output error ||X (W - D S)||_F."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..budget import DictBudget
from ..errors import CospadiError
from .block import block_update
from .factors import DictionaryResult, SparseDictFactors, sparse_from_dense
from .omp import batch_omp
from .options import SolverOptions
from .orthogonal import hard_threshold, learn_orthogonal, single_step
from .pursuit import htp_code
from .whitening import cholesky_upper, unwhiten, whiten


def initial_dictionary(signals: torch.Tensor, atoms: int, seed: int, init: str = "random") -> torch.Tensor:
    """A unit-norm starting dictionary (n, k) for `signals` (n, m).
    "random": k distinct columns chosen with torch.Generator(seed) (docs/method.md "Solvers");
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


def learn_dictionary(signals: torch.Tensor, atoms: int, sparsity: int, options: SolverOptions,
                     start: torch.Tensor | None = None,
                     on_iter: Callable[[int, float], None] | None = None) -> DictionaryResult:
    """Minimise ||Y - D S||_F^2 over D (n, k) and S (k, m) with exactly s nonzeros per
    column of S (the ksvd solver; `options.solver` is not read). `options.iters`
    alternations of (1) sparse coding by `options.coder` ("htp": hard thresholding
    pursuit, solvers/pursuit.py; "omp": Batch-OMP) and (2) `options.sweeps` dictionary
    updates on the support the coder found (update_dictionary: by `options.update`, "mod"
    block passes over all atoms at once, solvers/block.py, or "ksvd" sweeps, each atom's
    rank-1 fit taken by `options.power_iters` power iterations warm-started at the current
    atom). solvers.options.PAPER is the paper's solver.

    Start: the (n, k) tensor `start` when given, else by `options.init`: "random" (k
    columns chosen with `options.seed`), "svd" (top singular vectors), "orthogonal"
    (learn_orthogonal's dictionary *and codes* after at most `options.rounds` rounds: its
    sweeps run before the first coding, and iters may be 0). With more atoms than
    dimensions (k > n) "orthogonal" is overcomplete_start: the complete solution (k = n,
    already swept) plus atoms from its residual, then at least one coding alternation, so
    the result never fits worse than the complete dictionary at the same s.

    The objective never increases: a column whose new code fits worse than its previous
    code under the same dictionary keeps the previous one, a MOD pass that would raise it
    is undone, and the warm-started power iteration never lowers an atom's Rayleigh
    quotient. objective[t] is recorded after each round of updates; on_iter(t, objective)
    is called then."""
    y = signals
    iters, n = options.iters, y.shape[0]
    coef = support = None
    swept = False  # whether the start's codes were already swept (the overcomplete start)
    if start is not None:
        d = start.to(y) / start.to(y).norm(dim=0).clamp_min(torch.finfo(y.dtype).tiny)
    elif options.init == "orthogonal" and atoms <= n:
        first = learn_orthogonal(y, atoms, sparsity, options.rounds)
        d, coef, support = first.dictionary, *dense_codes(first.indices, first.values, atoms)
    elif options.init == "orthogonal":
        d, coef, support = overcomplete_start(y, atoms, sparsity, options)
        iters, swept = max(iters, 1), True
    else:
        d = initial_dictionary(y, atoms, options.seed, options.init)
    if iters < (0 if coef is not None else 1):
        raise ValueError("iters must be at least 1 unless the start provides codes")
    history: list[float] = []

    def update(coef: torch.Tensor, support: torch.Tensor) -> None:
        history.append(update_dictionary(y, d, coef, support, options))
        if on_iter is not None:
            on_iter(len(history) - 1, history[-1])

    if coef is not None and support is not None and not swept:
        update(coef, support)
    for _ in range(iters):
        coef, support = _code(d, y, sparsity, coef, support, options.coder)
        update(coef, support)
    assert coef is not None and support is not None  # iters >= 1 or a start with codes
    indices, values = sparse_from_dense(coef, support)
    return DictionaryResult(d, indices, values, history)


def dense_codes(indices: torch.Tensor, values: torch.Tensor, atoms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, m) row indices and values -> dense codes (k, m) and their boolean support (k, m)."""
    shape = (atoms, indices.shape[1])
    support = torch.zeros(shape, dtype=torch.bool, device=values.device).scatter_(0, indices, True)
    return torch.zeros(shape, dtype=values.dtype, device=values.device).scatter_(0, indices, values), support


def overcomplete_start(signals: torch.Tensor, atoms: int, sparsity: int,
                       options: SolverOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A start for k = `atoms` > n atoms that fits exactly as well as the complete solution:
    learn_dictionary with k = n at the same s (the orthogonal start and its dictionary
    updates, no coding), then k - n unit atoms along the top left singular vectors of its residual
    Y - D S (the worst-fitted directions; seeded random ones past the residual's rank),
    unused so far. Returns (dictionary (n, k), codes (k, m), support (k, m))."""
    y = signals
    n, m = y.shape
    complete = learn_dictionary(y, n, sparsity, options.but(iters=0))
    coef, support = dense_codes(complete.indices, complete.values, n)
    residual = y - complete.dictionary @ coef
    extra = torch.linalg.svd(residual, full_matrices=False).U[:, : atoms - n]
    if extra.shape[1] < atoms - n:
        gen = torch.Generator().manual_seed(options.seed)
        fill = torch.randn(n, atoms - n - extra.shape[1], generator=gen, dtype=y.dtype).to(y.device)
        extra = torch.cat([extra, fill / fill.norm(dim=0)], 1)
    d = torch.cat([complete.dictionary, extra], 1)
    pad = atoms - n
    coef = torch.cat([coef, coef.new_zeros(pad, m)])
    return d, coef, torch.cat([support, support.new_zeros(pad, m)])


def _code(d: torch.Tensor, y: torch.Tensor, sparsity: int, coef: torch.Tensor | None, support: torch.Tensor | None,
          coder: str) -> tuple[torch.Tensor, torch.Tensor]:
    """New codes (k, m) and support with s nonzeros per column by `coder`; each column
    keeps its previous code (when there is one) if the new one fits worse."""
    if coder == "htp":
        if coef is None or support is None:
            coef, support = hard_threshold(d.T @ y, sparsity)
        return htp_code(d, y, sparsity, coef, support)
    idx, val = batch_omp(d, y, sparsity)
    new_coef, new_support = dense_codes(idx, val, d.shape[1])
    if coef is not None and support is not None:
        new_residual, old_residual = y - d @ new_coef, y - d @ coef
        worse = (new_residual * new_residual).sum(0) > (old_residual * old_residual).sum(0)
        new_coef[:, worse], new_support[:, worse] = coef[:, worse], support[:, worse]
    return new_coef, new_support


def update_dictionary(signals: torch.Tensor, dictionary: torch.Tensor, coef: torch.Tensor, support: torch.Tensor,
                      options: SolverOptions) -> float:
    """`options.sweeps` dictionary updates of (D (n, k), codes (k, m)) in place on the fixed
    support (k, m), by `options.update`: "mod" (block.block_update, all atoms at once) or
    "ksvd" (atom-by-atom rank-1 sweeps). Never raises ||Y - D S||_F^2; returns it."""
    if options.update == "mod":
        return block_update(signals, dictionary, coef, support, options.sweeps)
    residual = signals - dictionary @ coef
    _update_atoms(dictionary, coef, support, residual, options.power_iters, options.sweeps)
    return float((residual * residual).sum())


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


def cospadi(weight: torch.Tensor, gram: torch.Tensor, budget: DictBudget, options: SolverOptions = SolverOptions(),
            dtype: torch.dtype = torch.float32,
            on_iter: Callable[[int, float], None] | None = None) -> SparseDictFactors:
    """CoSpaDi factors of W (d1, d2) under the calibration Gram G (d1, d1): learn (D_L, S)
    on L W with L^T L = G, then D = L^{-1} D_L by a triangular solve, so the factors
    minimise ||X (W - D S)||_F (docs/method.md "Objective and whitening"). The solver is
    `options.solver`: "ksvd" (learn_dictionary), "orthogonal" (learn_orthogonal for at most
    `options.rounds` rounds, needs k <= d1) or "single-step". Learning runs in `dtype`;
    returns a float64 dictionary (d1, k) and values (s, d2), indices (s, d2).

    An overcomplete budget (k > d1: an MLP's gate/up at real models' shapes, shared
    dictionaries at low ratios) runs learn_dictionary's overcomplete start (docs/method.md
    "Overcomplete dictionaries"); the orthogonal solver refuses it (check_solver)."""
    check_solver(budget, options)
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
    if options.solver == "ksvd":
        result = learn_dictionary(whitened, budget.atoms, budget.sparsity, options, on_iter=on_iter)
    elif options.solver == "orthogonal":
        result = learn_orthogonal(whitened, budget.atoms, budget.sparsity, options.rounds)
    else:
        result = single_step(whitened, budget.atoms, budget.sparsity)
    dictionary = result.dictionary.to(torch.float64)
    if basis is not None:
        dictionary = basis @ dictionary
    return SparseDictFactors(unwhiten(upper, dictionary), result.indices, result.values.to(torch.float64))


def check_solver(budget: DictBudget, options: SolverOptions) -> None:
    """CospadiError when `options` cannot solve `budget`: the orthogonal solver holds at
    most d1 orthonormal atoms."""
    if options.solver == "orthogonal" and budget.atoms > budget.d1:
        raise CospadiError(f"the orthogonal solver needs at most d1 = {budget.d1} atoms, the budget has "
                           f"{budget.atoms} (an overcomplete dictionary): use --solver ksvd (the default), or a "
                           "higher ratio")
