"""The factor types every solver returns. `W ~ left @ right` or `W ~ D @ S`, with W of
shape (d1, d2) as in docs/method.md "Notation" (W = linear.weight.T)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LowRankFactors:
    """W ~ left @ right; left (d1, r), right (r, d2)."""

    left: torch.Tensor
    right: torch.Tensor

    def weight(self) -> torch.Tensor:
        """The (d1, d2) product."""
        return self.left @ self.right


@dataclass
class SparseDictFactors:
    """W ~ D @ S; D = dictionary (d1, k); S (k, d2) has exactly s structural nonzeros per
    column: column j holds values[:, j] at rows indices[:, j] (s, d2), rows ascending."""

    dictionary: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor

    @property
    def atoms(self) -> int:
        return self.dictionary.shape[1]

    def coefficients(self) -> torch.Tensor:
        """S as a dense (k, d2) tensor."""
        dense = torch.zeros(self.atoms, self.values.shape[1], dtype=self.values.dtype, device=self.values.device)
        return dense.scatter_(0, self.indices.long(), self.values)

    def weight(self) -> torch.Tensor:
        """The (d1, d2) product D @ S."""
        return self.dictionary @ self.coefficients().to(self.dictionary.dtype)


def sparse_from_dense(coefficients: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, d2) values and a (k, d2) boolean support with the same count s in every column
    -> (indices, values), both (s, d2), indices ascending in each column."""
    counts = support.sum(0)
    s = int(counts[0]) if counts.numel() else 0
    if not bool((counts == s).all()):
        raise ValueError("every column of the support must hold the same number of nonzeros")
    # A stable sort of the negated mask puts the True rows first, in ascending order.
    order = torch.sort((~support).to(torch.int8), dim=0, stable=True).indices[:s]
    return order, coefficients.gather(0, order)


@dataclass
class DictionaryResult:
    """dictionary (n, k) with unit-norm atoms; indices and values (s, m) as in
    SparseDictFactors; objective[t] = ||Y - D S||_F^2 after alternation t."""

    dictionary: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    objective: list[float] = field(default_factory=list)
