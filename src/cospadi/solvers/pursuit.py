"""Sparse coding for large s: hard thresholding pursuit (HTP) with a least-squares refit
on each support by batched conjugate gradients (docs/method.md "Solvers").

Batch-OMP builds each column's support one atom at a time with a Cholesky update, so
its cost per column grows with s^2 k (and its state with s k). For the dictionaries of
real models (s in the hundreds) that is the slow part. HTP instead works on all columns
at once with dense (k, m) matrices: a gradient step on ||Y - D X||^2, keep the s largest
entries of each column, then solve least squares on that support. Every step costs a
(k, k) x (k, m) product, whatever s is. Near-orthogonal dictionaries (the ones the
orthogonal start and its extension produce) need only a few steps.

Each column keeps its starting code when the new one fits worse, so the objective never
rises; pure functions, no model code."""
from __future__ import annotations

import torch

from .orthogonal import hard_threshold


def column_objective(gram: torch.Tensor, correlations: torch.Tensor, energy: torch.Tensor,
                     coef: torch.Tensor) -> torch.Tensor:
    """||y_j - D x_j||^2 for every column j, from G = D^T D (k, k), B = D^T Y (k, m),
    energy = ||y_j||^2 (m,) and the codes X (k, m). Returns (m,)."""
    return energy - 2.0 * (coef * correlations).sum(0) + (coef * (gram @ coef)).sum(0)


def refit_on_support(gram: torch.Tensor, correlations: torch.Tensor, support: torch.Tensor, start: torch.Tensor,
                     iters: int, tol: float = 1e-7) -> torch.Tensor:
    """Least-squares codes on a fixed support: for every column j, the x_j supported on
    support[:, j] minimising ||y_j - D x_j||^2, i.e. G_SS x_S = B_S, by conjugate
    gradients on all columns at once (masked dense products), from `start` (k, m),
    at most `iters` steps, stopping when every column's residual norm is below `tol`
    times its right-hand side's. Returns the codes (k, m), zero off the support."""
    mask = support.to(gram.dtype)
    x = start * mask
    r = (correlations - gram @ x) * mask
    p = r.clone()
    rs = (r * r).sum(0)
    limit = (tol * tol) * ((correlations * mask) ** 2).sum(0)
    tiny = torch.finfo(gram.dtype).tiny
    for _ in range(iters):
        if bool((rs <= limit).all()):
            break
        gp = (gram @ p) * mask
        alpha = rs / (p * gp).sum(0).clamp_min(tiny)
        x += alpha * p
        r -= alpha * gp
        rs_next = (r * r).sum(0)
        p = r + (rs_next / rs.clamp_min(tiny)) * p
        rs = rs_next
    return x


def htp_code(dictionary: torch.Tensor, signals: torch.Tensor, sparsity: int, start: torch.Tensor,
             start_support: torch.Tensor, steps: int = 4,
             refit_iters: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of `signals` Y (n, m) over `dictionary` D (n, k) with exactly `sparsity` = s
    nonzeros per column, improving the codes `start` (k, m), zero off `start_support`
    (k, m) boolean with s entries per column:
    `steps` rounds of HTP (step 1 / max_i ||d_i||^2 along the gradient, keep the s largest
    magnitudes, refit on that support by refit_on_support with `refit_iters` steps).
    Every column ends with the best code seen, never worse than its start.
    Returns (codes (k, m), boolean support (k, m))."""
    gram = dictionary.T @ dictionary
    correlations = dictionary.T @ signals
    energy = (signals * signals).sum(0)
    step = 1.0 / float(gram.diagonal().max().clamp_min(torch.finfo(gram.dtype).tiny))  # 1 for unit atoms
    best, best_support = start.clone(), start_support.clone()
    best_error = column_objective(gram, correlations, energy, best)
    coef = best
    for _ in range(steps):
        moved = coef + step * (correlations - gram @ coef)
        moved, support = hard_threshold(moved, sparsity)
        coef = refit_on_support(gram, correlations, support, moved, refit_iters)
        error = column_objective(gram, correlations, energy, coef)
        better = error < best_error
        best[:, better], best_support[:, better], best_error[better] = coef[:, better], support[:, better], error[better]
    return best, best_support

