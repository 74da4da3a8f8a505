"""Compression budgets (docs/method.md "Budget") and the two ratio accountings.

A linear `y = x W` with `W` of shape (d1, d2) keeps, at compression ratio `gamma`:
  * low rank:   r with r (d1 + m d2) = (1 - gamma) m d1 d2, where m matrices share one
    (d1, r) basis (Basis Sharing; m = 1 per layer: r (d1 + d2) = (1 - gamma) d1 d2)
  * dictionary: k = floor((1 - gamma) m d1 d2 / (d1 + m d2 / rho)), s = floor(k / rho),
    where m matrices of shape (d1, d2) share one dictionary (m = 1 per layer).
Effective storage (eq. 11) counts numbers: d1 r + r d2, or d1 k + s d2.
Full storage (eq. 10) counts 16-bit words: the bf16 dictionary and values plus a packed
bitmask of S (k d2 bits = k d2 / 16 words).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import CospadiError


@dataclass(frozen=True)
class LowRankBudget:
    """Rank r for `members` matrices of shape (d1, d2) sharing one (d1, r) basis, each
    with its own (r, d2) coefficients (members = 1: one matrix, W ~ left @ right).
    Figures count the whole set, the shared basis once."""

    d1: int
    d2: int
    rank: int
    members: int = 1

    @property
    def effective_params(self) -> int:
        return self.rank * (self.d1 + self.members * self.d2)

    @property
    def storage_words(self) -> float:
        return float(self.effective_params)


@dataclass(frozen=True)
class DictBudget:
    """k atoms and s nonzeros per column for `members` matrices of shape (d1, d2)
    sharing one (d1, k) dictionary (members = 1: one matrix, its own dictionary).
    Figures count the whole set, the shared dictionary once."""

    d1: int
    d2: int
    atoms: int
    sparsity: int
    members: int = 1

    @property
    def effective_params(self) -> int:
        return self.d1 * self.atoms + self.members * self.sparsity * self.d2

    @property
    def storage_words(self) -> float:
        return self.effective_params + self.members * self.atoms * self.d2 / 16


def check_ratio(ratio: float) -> None:
    """Raise CospadiError unless 0 < ratio < 1."""
    if not (isinstance(ratio, (int, float)) and 0.0 < ratio < 1.0):
        raise CospadiError(f"ratio {ratio!r} is outside (0, 1): pass e.g. --ratio 0.3 (the fraction of weights removed)")


def check_rho(rho: float) -> None:
    """Raise CospadiError unless rho is a finite number >= 1 (s <= k)."""
    if not (isinstance(rho, (int, float)) and rho > 0 and math.isfinite(rho)):
        raise CospadiError(f"rho {rho!r} must be a positive number (atoms per nonzero, k / s); the paper's default is 2")
    if rho < 1:
        raise CospadiError(f"rho {rho} < 1 would need more nonzeros than atoms per column: use rho >= 1")


def check_members(members: int) -> None:
    """Raise CospadiError unless `members` (matrices sharing one factor) is an integer >= 1."""
    if not (isinstance(members, int) and members >= 1):
        raise CospadiError(f"{members!r} matrices cannot share a factor: give an integer >= 1")


def lowrank_budget(d1: int, d2: int, ratio: float, members: int = 1) -> LowRankBudget:
    """r = floor((1 - ratio) m d1 d2 / (d1 + m d2)), at least 1, for m = `members`
    matrices sharing one basis (a 1e-9 slack keeps 1 - 0.3 = 0.69999... from flooring an
    exact integer one too low)."""
    check_ratio(ratio)
    check_members(members)
    rank = max(1, math.floor((1.0 - ratio) * members * d1 * d2 / (d1 + members * d2) + 1e-9))
    return LowRankBudget(d1, d2, rank, members)


def dict_budget(d1: int, d2: int, ratio: float, rho: float = 2.0, members: int = 1) -> DictBudget:
    """k = floor((1 - ratio) m d1 d2 / (d1 + m d2 / rho)), s = floor(k / rho), s >= 1.
    Raises CospadiError when the budget leaves no atom or s would exceed k."""
    check_ratio(ratio)
    check_rho(rho)
    check_members(members)
    atoms = math.floor((1.0 - ratio) * members * d1 * d2 / (d1 + members * d2 / rho) + 1e-9)
    sparsity = math.floor(atoms / rho + 1e-9)
    if sparsity < 1:
        raise CospadiError(
            f"ratio {ratio} with rho {rho} leaves {atoms} atoms for a {d1}x{d2} matrix, too few for one "
            "nonzero per column: lower the ratio or rho")
    return DictBudget(d1, d2, atoms, sparsity, members)


def ratios(dense_params: float, effective_params: float, storage_words: float) -> dict[str, float]:
    """Both accountings for one matrix, a set of matrices or a model: the fraction removed
    counting numbers (eq. 11, `effective`) and counting 16-bit words with the bitmask
    (eq. 10, `storage`)."""
    return {
        "effective": 1.0 - effective_params / dense_params,
        "storage": 1.0 - storage_words / dense_params,
    }
