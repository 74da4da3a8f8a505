"""The block dictionary update (MOD, the method of optimal directions, Engan et al. 1999):
all atoms at once on a fixed support (docs/method.md "Solvers").

A K-SVD sweep updates one atom at a time, gathering and scattering the columns that use
it: a memory-bound Python loop of k steps. A MOD pass instead takes

1. the least-squares dictionary for the current codes C (k, m): D = Y C^T (C C^T)^{-1},
2. atoms scaled to unit norm, their codes scaled the other way (D C unchanged),
3. the least-squares codes on the same support for that dictionary, by batched conjugate
   gradients from the current codes (pursuit.refit_on_support),

all (k, k) x (k, m) or (n, m) x (m, k) products. Each step minimises the objective over
one factor with the other fixed, so a pass never raises it in exact arithmetic; a pass
that measures worse in floating point is undone and the passes stop. Pure functions, no
model code."""
from __future__ import annotations

import torch

from .pursuit import refit_on_support

REFIT_STEPS = 2  # conjugate-gradient steps of each pass's code refit: 2, 4 and 8 fit alike (issue 17)


def least_squares_dictionary(signals: torch.Tensor, coef: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """argmin_D ||Y - D C||_F^2 for Y (n, m) and codes C (k, m): D (C C^T) = Y C^T over the
    atoms C uses (rows not all zero), solved by Cholesky in float64 with a relative ridge
    1e-10 * mean(diag) (bit-reproducible, unlike lstsq); the products C C^T, Y C^T are
    taken in the inputs' dtype. Atoms no code uses keep `previous`'s (n, k) columns.
    Returns D (n, k) in Y's dtype, atoms not normalised."""
    live = torch.nonzero(coef.abs().sum(1) > 0).squeeze(1)
    used = coef.index_select(0, live)
    normal = (used @ used.T).double()
    normal.diagonal().add_(1e-10 * float(normal.diagonal().mean()) + torch.finfo(normal.dtype).tiny)
    rhs = (signals @ used.T).double()
    d = previous.to(signals.dtype).clone()
    d[:, live] = torch.cholesky_solve(rhs.T, torch.linalg.cholesky(normal)).T.to(d.dtype)
    return d


def mod_pass(signals: torch.Tensor, dictionary: torch.Tensor, coef: torch.Tensor,
             support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One MOD pass from (D (n, k) unit atoms, codes C (k, m) zero off `support`): the
    least-squares dictionary, atoms normalised (codes rescaled), then REFIT_STEPS
    conjugate-gradient steps of the least-squares codes on `support`. Returns the new
    (D, C); the inputs are not modified. An atom whose least-squares column vanishes
    keeps its previous direction."""
    d = least_squares_dictionary(signals, coef, dictionary)
    norms = d.norm(dim=0)
    dead = ~(norms > 0)
    d[:, dead] = dictionary[:, dead].to(d.dtype)
    norms[dead] = 1.0
    d /= norms
    scaled = coef * norms[:, None]
    return d, refit_on_support(d.T @ d, d.T @ signals, support, scaled, REFIT_STEPS)


def block_update(signals: torch.Tensor, dictionary: torch.Tensor, coef: torch.Tensor, support: torch.Tensor,
                 passes: int, tol: float = 1e-4) -> float:
    """At most `passes` MOD passes (mod_pass) in place on `dictionary` (n, k) and `coef`
    (k, m), the support (k, m) fixed. A pass that would raise ||Y - D C||_F^2 is undone
    and ends the passes, as does one gaining less than `tol` (relative). Atoms no code
    uses are then re-seeded along the worst-fitted residual columns (unit norm; the
    objective is unchanged, the next coding may use them); passes = 0 changes nothing.
    Returns the final objective."""
    residual = signals - dictionary @ coef
    best = float((residual * residual).sum())
    if passes < 1:
        return best
    for _ in range(passes):
        d, c = mod_pass(signals, dictionary, coef, support)
        r = signals - d @ c
        objective = float((r * r).sum())
        if not objective <= best:
            break
        dictionary.copy_(d)
        coef.copy_(c)
        residual, gain, best = r, best - objective, objective
        if gain <= tol * (best + gain):
            break
    _reseed_unused(dictionary, coef, residual)
    return best


def _reseed_unused(dictionary: torch.Tensor, coef: torch.Tensor, residual: torch.Tensor) -> None:
    """Atoms whose codes are all zero get the normalised residual columns of largest norm,
    one distinct column each (as far as there are nonzero ones)."""
    unused = torch.nonzero(~(coef.abs().sum(1) > 0)).squeeze(1)
    if unused.numel() == 0:
        return
    norms = residual.norm(dim=0)
    worst = norms.topk(min(unused.numel(), norms.numel())).indices
    worst = worst[norms[worst] > 0]
    unused = unused[: worst.numel()]
    dictionary[:, unused] = residual[:, worst] / norms[worst]
