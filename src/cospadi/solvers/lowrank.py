"""Low-rank baselines: truncated SVD (data-free) and SVD-LLM (whitened truncated SVD)."""
from __future__ import annotations

import torch

from ..budget import LowRankBudget
from .factors import LowRankFactors
from .whitening import refactor, unwhiten, whiten, whitening_factor


def _split(u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = sigma[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def svd(weight: torch.Tensor, gram: torch.Tensor | None, budget: LowRankBudget) -> LowRankFactors:
    """Best rank-r approximation of W (d1, d2) in Frobenius norm; the Gram is ignored.
    Returns float64 factors (d1, r), (r, d2) sharing sqrt of the singular values."""
    u, sigma, vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
    left, right = _split(u, sigma, vh, budget.rank)
    return LowRankFactors(left, right)


def svd_llm(weight: torch.Tensor, gram: torch.Tensor, budget: LowRankBudget) -> LowRankFactors:
    """Rank-r minimiser of ||X (W - A B)||_F given G = X^T X (d1, d1): SVD of L W,
    keep r, unwhiten the left factor with a triangular solve. Float64 factors. L is
    dropped during the SVD and factored again for the solve (refactor: the same bits, one
    more Cholesky), so that L (d1, d1) and the SVD's buffers are never held together."""
    upper, ridge = whitening_factor(gram)
    whitened = whiten(upper, weight)
    del upper
    u, sigma, vh = torch.linalg.svd(whitened, full_matrices=False)
    del whitened
    left, right = _split(u, sigma, vh, budget.rank)
    del u, sigma, vh
    return LowRankFactors(unwhiten(refactor(gram, ridge), left), right)
