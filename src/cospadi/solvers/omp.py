"""Batch-OMP (Rubinstein et al.): greedy sparse coding of many signals against one
dictionary, working on the Gram D^T D with progressive Cholesky factors. All columns of
a chunk advance in lockstep (each picks exactly one atom per step), so every per-column
quantity is a batched tensor and there is no Python loop over columns."""
from __future__ import annotations

import torch


def batch_omp(dictionary: torch.Tensor, signals: torch.Tensor, sparsity: int,
              chunk_bytes: int = 24 << 20, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Code each column of `signals` (n, m) with exactly `sparsity` = s distinct atoms of
    `dictionary` (n, k), s <= k, by orthogonal matching pursuit.

    Returns (indices, values), both (s, m): column j of the code is values[:, j] at atom
    rows indices[:, j] (ascending), the least-squares coefficients on that support.
    An atom nearly dependent on those already chosen gets a ridge of `tol` times its
    squared norm in the Cholesky factor, so coefficients stay finite. Columns are coded
    a chunk at a time, sized so the chunk's (c, s, k) state fits in `chunk_bytes`
    (about the size of a last-level cache: larger chunks run several times slower)."""
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
    chunk = max(8, chunk_bytes // (sparsity * k * signals.element_size()))
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
    atoms (c, s) in selection order and their coefficients (c, s).

    With chol the Cholesky factor of G[sel, sel] and Q the orthonormalised chosen atoms,
    proj = chol^{-1} G[sel, :] = Q^T D (t, k per signal) gives both the new Cholesky row
    (its column `atom`) and D^T q of the new direction q, so the correlations
    alpha = D^T r update in O(t k) per step with no triangular solve; the coefficients
    come from one back substitution at the end."""
    c, k = alpha0.shape
    rows = torch.arange(c, device=alpha0.device)
    chol = torch.zeros(c, sparsity, sparsity, dtype=alpha0.dtype, device=alpha0.device)
    proj = torch.empty(c, sparsity, k, dtype=alpha0.dtype, device=alpha0.device)
    sel = torch.empty(c, sparsity, dtype=torch.long, device=alpha0.device)
    taken = torch.zeros(c, k, dtype=torch.bool, device=alpha0.device)
    z = torch.empty(c, sparsity, dtype=alpha0.dtype, device=alpha0.device)  # Q^T y = chol^{-1} alpha0[sel]
    alpha = alpha0.clone()
    for t in range(sparsity):
        atom = (alpha * inv_norm).abs().masked_fill_(taken, -1.0).argmax(dim=1)
        g_tt = diag[atom]
        row = gram[atom]  # G[atom, :] (c, k)
        if t:
            w = proj[rows, :t, atom]  # chol^{-1} G[sel, atom] (c, t)
            chol[:, t, :t] = w
            diag_t = (g_tt - (w * w).sum(1)).clamp_min(tol * g_tt).sqrt()
            row = row - torch.bmm(w.unsqueeze(1), proj[:, :t]).squeeze(1)
        else:
            diag_t = g_tt.sqrt()
        chol[:, t, t] = diag_t
        proj[:, t] = row / diag_t[:, None]
        z[:, t] = alpha[rows, atom] / diag_t
        sel[:, t] = atom
        taken[rows, atom] = True
        alpha -= proj[:, t] * z[:, t, None]
    coef = torch.linalg.solve_triangular(chol.transpose(1, 2), z.unsqueeze(-1), upper=True).squeeze(-1)
    return sel, coef
