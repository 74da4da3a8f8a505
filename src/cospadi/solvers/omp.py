"""Batch-OMP (Rubinstein et al.): greedy sparse coding of many signals against one
dictionary, working on the Gram D^T D with progressive Cholesky factors. All columns of
a chunk advance in lockstep (each picks exactly one atom per step), so every per-column
quantity is a batched tensor and there is no Python loop over columns."""
from __future__ import annotations

import torch


def batch_omp(dictionary: torch.Tensor, signals: torch.Tensor, sparsity: int,
              chunk: int = 512, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Code each column of `signals` (n, m) with exactly `sparsity` = s distinct atoms of
    `dictionary` (n, k), s <= k, by orthogonal matching pursuit.

    Returns (indices, values), both (s, m): column j of the code is values[:, j] at atom
    rows indices[:, j] (ascending), the least-squares coefficients on that support.
    An atom nearly dependent on those already chosen gets a ridge of `tol` times its
    squared norm in the Cholesky factor, so coefficients stay finite. Columns are coded
    `chunk` at a time to bound memory (chunk * s * s floats for the factors)."""
    n, k = dictionary.shape
    m = signals.shape[1]
    if not 1 <= sparsity <= k:
        raise ValueError(f"sparsity {sparsity} must be in [1, {k}]")
    gram = dictionary.T @ dictionary
    diag = gram.diagonal().clone()
    inv_norm = diag.clamp_min(torch.finfo(diag.dtype).tiny).rsqrt()
    correlations = dictionary.T @ signals
    indices = torch.empty(sparsity, m, dtype=torch.long, device=signals.device)
    values = torch.empty(sparsity, m, dtype=signals.dtype, device=signals.device)
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        sel, coef = _omp_chunk(gram, diag, inv_norm, correlations[:, start:stop].T.contiguous(), sparsity, tol)
        order = sel.argsort(dim=1)
        indices[:, start:stop] = sel.gather(1, order).T
        values[:, start:stop] = coef.gather(1, order).T
    return indices, values


def _omp_chunk(gram: torch.Tensor, diag: torch.Tensor, inv_norm: torch.Tensor, alpha0: torch.Tensor,
               sparsity: int, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OMP for c signals given their atom correlations alpha0 (c, k). Returns the chosen
    atoms (c, s) in selection order and their coefficients (c, s)."""
    c, k = alpha0.shape
    rows = torch.arange(c, device=alpha0.device)
    chol = torch.zeros(c, sparsity, sparsity, dtype=alpha0.dtype, device=alpha0.device)
    sel = torch.zeros(c, sparsity, dtype=torch.long, device=alpha0.device)
    taken = torch.zeros(c, k, dtype=torch.bool, device=alpha0.device)
    z = torch.zeros(c, sparsity, dtype=alpha0.dtype, device=alpha0.device)  # chol^{-1} alpha0[sel]
    alpha = alpha0
    coef = None
    for t in range(sparsity):
        score = (alpha * inv_norm).abs().masked_fill_(taken, -1.0)
        atom = score.argmax(dim=1)
        g_tt = diag[atom]
        if t == 0:
            chol[:, 0, 0] = g_tt.sqrt()
        else:
            # New Cholesky row: w = chol^{-1} G[sel, atom], l = sqrt(G[atom, atom] - |w|^2).
            g = gram[atom].gather(1, sel[:, :t]).unsqueeze(-1)
            w = torch.linalg.solve_triangular(chol[:, :t, :t], g, upper=False).squeeze(-1)
            chol[:, t, :t] = w
            chol[:, t, t] = (g_tt - (w * w).sum(1)).clamp_min(tol * g_tt).sqrt()
        sel[:, t] = atom
        taken[rows, atom] = True
        # Forward substitution extends by one entry; one back solve gives the coefficients.
        z[:, t] = (alpha0[rows, atom] - (chol[:, t, :t] * z[:, :t]).sum(1)) / chol[:, t, t]
        coef = torch.linalg.solve_triangular(chol[:, : t + 1, : t + 1].transpose(1, 2),
                                             z[:, : t + 1].unsqueeze(-1), upper=True).squeeze(-1)
        if t + 1 < sparsity:
            dense = torch.zeros_like(alpha0).scatter_(1, sel[:, : t + 1], coef)
            alpha = alpha0 - dense @ gram
    return sel, coef
