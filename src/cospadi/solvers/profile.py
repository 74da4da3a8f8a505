"""Error curves for allocation (docs/allocation.md): a matrix's (or a shared job's)
whitened squared error ||L (W - W')||_F^2 at many budgets at once, from ONE SVD, so that
a knapsack can pick a budget per matrix without running the solver at each.

* low rank (svd-llm, basis-sharing): exact, the tail of the whitened spectrum;
* data-free svd: exact, sum over dropped directions of sigma_i^2 ||L u_i||^2;
* dictionaries (cospadi): a proxy, the orthogonal dictionary (the top min(k, rank)
  whitened singular vectors) with the s largest codes per column kept; it bounds the
  learned dictionary's error from above and tracks it (BENCHMARKS.md "profile proxy").

Several weights sharing one left factor are whitened by their mean Gram and concatenated,
as the grouped solvers do (grouped.py). Pure functions, float64, no model code."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .grouped import mean_gram
from .whitening import cholesky_upper, whiten


@dataclass(frozen=True)
class Spectrum:
    """The SVD of a whitened (concatenated) weight Z = L_bar [W_1 ... W_m] (d1, m d2):
    singular values (r,), right vectors (r, m d2), energy ||Z||_F^2, and the left
    vectors' whitened-back norms (r,) ||L_bar U_i|| (only for the data-free svd's curve)."""

    sigma: torch.Tensor
    vh: torch.Tensor
    energy: float
    unwhitened_left: torch.Tensor | None = None


def whitened_spectrum(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor],
                      plain: bool = False) -> Spectrum:
    """The Spectrum of m weights (d1, d2) under their Grams (d1, d1). `plain`: the SVD
    is of the raw [W_1 ... W_m] (data-free svd), the error still measured whitened."""
    upper = cholesky_upper(mean_gram(grams))
    stacked = torch.cat([w.to(torch.float64) for w in weights], dim=1)
    if plain:
        u, sigma, vh = torch.linalg.svd(stacked, full_matrices=False)
        norms = (upper @ u).norm(dim=0)
        return Spectrum(sigma, vh, float(((upper @ stacked) ** 2).sum()), norms)
    whitened = whiten(upper, stacked)
    _, sigma, vh = torch.linalg.svd(whitened, full_matrices=False)
    return Spectrum(sigma, vh, float((whitened * whitened).sum()))


def lowrank_errors(spectrum: Spectrum, ranks: Sequence[int]) -> list[float]:
    """Whitened squared error of the best rank-r approximation for each r in `ranks`:
    the energy beyond the first r singular values (exact for svd-llm and basis-sharing);
    for a plain-SVD spectrum, sum_{i >= r} sigma_i^2 ||L U_i||^2 (exact for svd)."""
    weight = spectrum.sigma ** 2
    if spectrum.unwhitened_left is not None:
        weight = weight * spectrum.unwhitened_left ** 2
    tails = torch.cat([weight.flip(0).cumsum(0).flip(0), weight.new_zeros(1)])
    return [float(tails[min(r, weight.numel())]) for r in ranks]


def thresholded_errors(spectrum: Spectrum, budgets: Sequence[tuple[int, int]]) -> list[float]:
    """For each (atoms k, nonzeros s): the whitened squared error of the orthogonal
    dictionary of the top min(k, rank) singular vectors with the s largest-magnitude codes
    of each column kept (codes of an orthonormal dictionary: sigma_i vh_i)."""
    codes_squared = (spectrum.sigma[:, None] * spectrum.vh) ** 2
    out = []
    for atoms, sparsity in budgets:
        top = codes_squared[:min(atoms, codes_squared.shape[0])]
        keep = min(sparsity, top.shape[0])
        kept = float(top.topk(keep, dim=0, sorted=False).values.sum())
        out.append(max(spectrum.energy - kept, 0.0))
    return out
