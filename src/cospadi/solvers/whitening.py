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
    return whitening_factor(gram, jitter, max_tries)[0]


def whitening_factor(gram: torch.Tensor, jitter: float = 1e-6, max_tries: int = 6) -> tuple[torch.Tensor, float | None]:
    """cholesky_upper's L and the ridge it added to the symmetrised Gram's diagonal (None:
    none), so that refactor(gram, ridge) can give the same L again. Memory beyond `gram`:
    one (d, d) float64 matrix, which becomes L (the factorization runs in place); for a
    singular Gram, eigvalsh's copy instead while lambda_min is found (and a symmetrised
    copy too when the Gram is not symmetric bit for bit)."""
    source = gram.detach().to(torch.float64)
    g = _symmetrised(source)
    if not _all_finite(g):
        raise CospadiError("the calibration Gram matrix has non-finite entries: check the model's activations "
                           "(try float32 instead of float16) and the calibration text")
    scale = float(torch.diagonal(g).mean())
    if scale <= 0.0:
        raise CospadiError("the calibration Gram matrix is zero (this layer never saw a nonzero input): "
                           "use more or different calibration text")
    if _factor_in_place(g):
        return g, None
    del g  # overwritten by the failed attempt
    # 0.5 (G + G^T) is G itself, bit for bit, when G is: then no second (d, d) matrix is needed
    symmetric = source if torch.equal(source, source.mT) else _symmetrised(source)
    shift = max(0.0, -float(torch.linalg.eigvalsh(symmetric)[0]))
    del symmetric
    eps = jitter
    for _ in range(max_tries):
        ridge = shift + eps * scale
        g = _ridged(source, ridge)
        if _factor_in_place(g):
            return g, ridge
        del g
        eps *= 10.0
    raise CospadiError("the calibration Gram matrix stays singular after adding a ridge: "
                       "use more calibration tokens (--calib-samples/--seq-len)")


def refactor(gram: torch.Tensor, ridge: float | None) -> torch.Tensor:
    """whitening_factor(gram)'s L again, bit for bit, from its ridge (one Cholesky: solvers
    drop L while other large buffers are alive and factor it again afterwards)."""
    source = gram.detach().to(torch.float64)
    g = _symmetrised(source) if ridge is None else _ridged(source, ridge)
    if not _factor_in_place(g):
        raise CospadiError("the calibration Gram matrix changed between two factorizations: report this as a bug")
    return g


def _all_finite(matrix: torch.Tensor, rows: int = 256) -> bool:
    """torch.isfinite(matrix).all(), `rows` rows at a time: on a whole float64 (d, d) matrix
    isfinite's temporaries take about 1.4 times the matrix."""
    return all(bool(torch.isfinite(part).all()) for part in matrix.split(rows))


def _symmetrised(source: torch.Tensor) -> torch.Tensor:
    """0.5 (G + G^T) of a float64 G, in a new matrix (scaled in place: one (d, d) copy)."""
    return torch.add(source, source.mT).mul_(0.5)


def _ridged(source: torch.Tensor, ridge: float) -> torch.Tensor:
    """The bits of 0.5 (G + G^T) + ridge * I without the identity matrices: off the
    diagonal that sum adds ridge * 0.0 (+0.0 for ridge >= 0, which turns -0.0 into +0.0),
    on it the ridge."""
    g = _symmetrised(source).add_(ridge * 0.0)
    g.diagonal().add_(ridge)
    return g


def _factor_in_place(g: torch.Tensor) -> bool:
    """Overwrite the symmetric float64 g (d, d) with the transpose L^T of its lower Cholesky
    factor (the bits of cholesky_ex(g).L.T: the same LAPACK call on the same values, run in
    place on g's column-major view). False, leaving g overwritten, when g is not positive
    definite."""
    view = g.mT
    info = torch.empty((), dtype=torch.int32, device=g.device)
    try:
        torch.linalg.cholesky_ex(view, out=(view, info))
    except RuntimeError:  # a torch that refuses the aliased out=: the same factor through a copy
        factor, info = torch.linalg.cholesky_ex(g)
        g.copy_(factor.mT)
    return int(info) == 0


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
