"""Compressed drop-in replacements for nn.Linear. Both compute y = x W + b with W never
materialised: LowRankLinear as (x U) V, DictLinear as (x D) S with S column-sparse."""
from __future__ import annotations

import torch
from torch import nn

from .solvers.factors import LowRankFactors, SparseDictFactors


class LowRankLinear(nn.Module):
    """y = (x @ left) @ right + bias; left (in, r), right (r, out)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.left = nn.Parameter(torch.empty(in_features, rank, dtype=dtype, device=device))
        self.right = nn.Parameter(torch.empty(rank, out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(cls, factors: LowRankFactors, bias: torch.Tensor | None, dtype: torch.dtype) -> "LowRankLinear":
        """A module holding the given factors (cast to dtype) and a copy of `bias`."""
        in_features, rank = factors.left.shape
        module = cls(in_features, factors.right.shape[1], rank, bias is not None, dtype, factors.left.device)
        with torch.no_grad():
            module.left.copy_(factors.left)
            module.right.copy_(factors.right)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.left) @ self.right
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class DictLinear(nn.Module):
    """y = (x @ dictionary) @ S + bias; dictionary (in, k); S (k, out) with exactly s
    nonzeros per column: `values` (s, out) at atom rows `indices` (s, out)."""

    def __init__(self, in_features: int, out_features: int, atoms: int, sparsity: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.atoms, self.sparsity = atoms, sparsity
        self.dictionary = nn.Parameter(torch.empty(in_features, atoms, dtype=dtype, device=device))
        self.values = nn.Parameter(torch.empty(sparsity, out_features, dtype=dtype, device=device))
        index_dtype = torch.int16 if atoms <= torch.iinfo(torch.int16).max else torch.int32
        self.register_buffer("indices", torch.zeros(sparsity, out_features, dtype=index_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(cls, factors: SparseDictFactors, bias: torch.Tensor | None, dtype: torch.dtype) -> "DictLinear":
        """A module holding the given factors (cast to dtype) and a copy of `bias`."""
        in_features, atoms = factors.dictionary.shape
        sparsity, out_features = factors.values.shape
        module = cls(in_features, out_features, atoms, sparsity, bias is not None, dtype, factors.dictionary.device)
        with torch.no_grad():
            module.dictionary.copy_(factors.dictionary)
            module.values.copy_(factors.values)
            module.indices.copy_(factors.indices)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def coefficients(self) -> torch.Tensor:
        """S as a dense (k, out) tensor."""
        dense = torch.zeros(self.atoms, self.out_features, dtype=self.values.dtype, device=self.values.device)
        return dense.scatter(0, self.indices.long(), self.values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.dictionary) @ self.coefficients()
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"atoms={self.atoms}, sparsity={self.sparsity}")
