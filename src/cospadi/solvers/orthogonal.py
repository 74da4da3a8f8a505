"""Closed-form sparse dictionary solvers (the fast relatives of K-SVD):

* learn_orthogonal: D with orthonormal columns (D^T D = I, needs k <= n). Sparse coding is
  then exact hard thresholding of D^T Y (the s largest magnitudes per column) and the
  dictionary update is an orthogonal Procrustes problem solved by one SVD of Y S^T.
  Both steps are exact minimisers, so the objective never increases.
* single_step: sparsify the coefficients of the truncated SVD of Y, then the least-squares
  dictionary for that fixed S (the MOD update D = Y S^T (S S^T)^+), in closed form."""
from __future__ import annotations

import torch

from .factors import DictionaryResult, sparse_from_dense


def hard_threshold(coefficients: torch.Tensor, sparsity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `sparsity` largest-magnitude entries of each column of (k, m):
    returns (dense codes (k, m) with the rest zeroed, boolean support (k, m))."""
    keep = coefficients.abs().topk(sparsity, dim=0, sorted=False).indices  # a set: order is irrelevant, 2x faster
    support = torch.zeros_like(coefficients, dtype=torch.bool).scatter_(0, keep, True)
    return coefficients * support, support


def learn_orthogonal(signals: torch.Tensor, atoms: int, sparsity: int, iters: int, tol: float = 1e-4,
                     init: torch.Tensor | None = None) -> DictionaryResult:
    """Minimise ||Y - D S||_F^2 with D (n, k) orthonormal and exactly s nonzeros per
    column of S, by at most `iters` rounds of (threshold, Procrustes), starting from the
    top-k left singular vectors of Y (n, m) or from `init` (orthonormalised). Stops early
    when a round improves the objective by less than `tol` (relative)."""
    n, m = signals.shape
    if atoms > n:
        raise ValueError(f"an orthonormal dictionary needs k <= n, got k={atoms} > n={n}")
    y = signals
    d = torch.linalg.qr(init.to(y)).Q if init is not None else torch.linalg.svd(y, full_matrices=False).U[:, :atoms]
    energy = float((y * y).sum())
    history: list[float] = []
    coef, support = hard_threshold(d.T @ y, sparsity)
    for _ in range(iters):
        history.append(energy - float((coef * coef).sum()))  # ||Y - D S||^2 for orthonormal D
        if len(history) > 1 and history[-2] - history[-1] <= tol * history[-2]:
            break
        left, _, right_h = torch.linalg.svd(y @ coef.T, full_matrices=False)
        d = left @ right_h
        coef, support = hard_threshold(d.T @ y, sparsity)
    history.append(energy - float((coef * coef).sum()))
    indices, values = sparse_from_dense(coef, support)
    return DictionaryResult(d, indices, values, history)


def single_step(signals: torch.Tensor, atoms: int, sparsity: int) -> DictionaryResult:
    """Codes = the s largest-magnitude coefficients per column of the rank-k SVD of Y
    (n, m) (their sensitivity: the error each one's removal would add); dictionary = the
    least-squares D for those codes. Unit-norm atoms; objective has one entry. Atoms that
    no code uses (beyond the rank of Y, e.g. k > n) get the unit vectors along the largest
    residual directions and keep zero coefficients."""
    u, sigma, vh = torch.linalg.svd(signals, full_matrices=False)
    k = min(atoms, sigma.numel())
    coefficients = torch.zeros(atoms, signals.shape[1], dtype=signals.dtype, device=signals.device)
    coefficients[:k] = sigma[:k, None] * vh[:k]
    coef, support = hard_threshold(coefficients, sparsity)
    from .block import least_squares_dictionary  # here: block -> pursuit -> this module

    # argmin_D ||Y - D S||_F over the used atoms, all in float64 (unused atoms: zero columns).
    zero = torch.zeros(signals.shape[0], atoms, dtype=torch.float64, device=signals.device)
    d = least_squares_dictionary(signals.double(), coef.double(), zero).to(signals.dtype)
    norms = d.norm(dim=0)
    scaled = norms > 0
    d[:, scaled] /= norms[scaled]
    coef[scaled] *= norms[scaled, None]
    residual = signals - d @ coef
    dead = torch.nonzero(~scaled).squeeze(1)
    if dead.numel():
        directions = torch.linalg.svd(residual, full_matrices=False).U
        d[:, dead] = directions[:, torch.arange(dead.numel(), device=d.device) % directions.shape[1]]
    indices, values = sparse_from_dense(coef, support)
    return DictionaryResult(d, indices, values, [float((residual * residual).sum())])
