"""Whitening by the calibration Gram matrix: ||X (W - W')||_F = ||L (W - W')||_F with
L upper triangular, L^T L = G = X^T X."""
from __future__ import annotations

import torch

from ..errors import CospadiError


def cholesky_upper(gram: torch.Tensor, jitter: float = 1e-6, max_tries: int = 6) -> torch.Tensor:
    """Upper-triangular L (d, d), float64, with L^T L = gram (+ a small ridge if needed).

    gram: symmetric PSD (d, d). If Cholesky fails, add max(0, -lambda_min) + eps * mean
    diagonal to the diagonal, eps starting at `jitter` and growing 10x per try. Raises
    CospadiError when the matrix is not finite, is zero, or stays singular."""
    g = gram.detach().to(torch.float64)
    g = g + g.T
    g.mul_(0.5)  # in place: the bits of 0.5 * (g + g.T) without a third (d, d) copy
    if not torch.isfinite(g).all():
        raise CospadiError("the calibration Gram matrix has non-finite entries: check the model's activations "
                           "(try float32 instead of float16) and the calibration text")
    scale = float(torch.diagonal(g).mean())
    if scale <= 0.0:
        raise CospadiError("the calibration Gram matrix is zero (this layer never saw a nonzero input): "
                           "use more or different calibration text")
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return factor.T.contiguous()
    shift = max(0.0, -float(torch.linalg.eigvalsh(g)[0]))
    eps = jitter
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for _ in range(max_tries):
        factor, info = torch.linalg.cholesky_ex(g + (shift + eps * scale) * eye)
        if int(info) == 0:
            return factor.T.contiguous()
        eps *= 10.0
    raise CospadiError("the calibration Gram matrix stays singular after adding a ridge: "
                       "use more calibration tokens (--calib-samples/--seq-len)")


def whiten(upper: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """L @ W: (d1, d1) x (d1, d2) -> (d1, d2), in float64."""
    return upper @ weight.to(torch.float64)


def unwhiten(upper: torch.Tensor, whitened: torch.Tensor) -> torch.Tensor:
    """L^{-1} @ A by a triangular solve (no explicit inverse): (d1, d1), (d1, n) -> (d1, n) float64."""
    return torch.linalg.solve_triangular(upper, whitened.to(torch.float64), upper=True)


def output_error(gram: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    """||X (W - W')||_F / ||X W||_F = ||L (W - W')||_F / ||L W||_F, the relative output
    error on the calibration set, from G = X^T X (d1, d1) and W, W' (d1, d2)."""
    g = gram.to(torch.float64)
    w = weight.to(torch.float64, copy=True)  # becomes W - W' in place below: 2 (d1, d2) copies at a time, not 5
    product = g @ w
    den = float(product.mul_(w).sum())
    del product
    delta = w.sub_(approx)  # float64 -= float32 widens exactly: the bits of w - approx.to(float64)
    product = g @ delta
    num = float(product.mul_(delta).sum())
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else float("nan")
