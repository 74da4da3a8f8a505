"""Compressed drop-in replacements for nn.Linear. Both compute y = x W + b with W never
materialised: LowRankLinear as (x U) V, DictLinear as (x D) S with S column-sparse.

DictLinear stores S as docs/method.md "Storage format" describes: a packed bitmask of its (k, d2) pattern
(`mask`, see bitmask.py) plus the s values of each column in ascending row order
(`coefs`, (d2, s), at the module's dtype; or `coefs14`, packed 14-bit codes, see
coefficients.py). Row indices are derived from the mask when the module is first used
and kept in a cache that follows the stored tensors."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CospadiError
from . import kernels
from .base import CompressedLinear
from .bitmask import mask_to_columns, packed_size, pattern_to_mask
from .coefficients import check_coef_bits, pack14, packed14_size, unpack14


class LowRankLinear(CompressedLinear):
    """y = (x @ left) @ right + bias; left (in, r), right (r, out)."""

    kind = "lowrank"
    spec_fields = ("in_features", "out_features", "rank")
    shared_factor = "left"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.left = nn.Parameter(torch.empty(in_features, rank, dtype=dtype, device=device))
        self.right = nn.Parameter(torch.empty(rank, out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype, coef_bits: int | None) -> LowRankLinear:
        return cls(spec["in_features"], spec["out_features"], spec["rank"], bool(spec.get("bias")), dtype)

    @classmethod
    def tensor_shapes(cls, spec: dict, coef_bits: int | None) -> dict[str, tuple[int, ...]]:
        return {"left": (spec["in_features"], spec["rank"]), "right": (spec["rank"], spec["out_features"])}

    def describe(self) -> str:
        return f"{self.in_features}x{self.out_features}, r={self.rank}"

    @classmethod
    def from_factors(cls, factors: Any, bias: torch.Tensor | None, dtype: torch.dtype) -> LowRankLinear:
        """A module holding the given factors (cast to dtype) and a copy of `bias`."""
        in_features, rank = factors.left.shape
        module = cls(in_features, factors.right.shape[1], rank, bias is not None, dtype, factors.left.device)
        with torch.no_grad():
            module.left.copy_(factors.left)
            module.right.copy_(factors.right)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def dense_weight(self) -> torch.Tensor:
        """W = left @ right, (in, out), multiplied in float32 and cast to the module's dtype."""
        return (self.left.float() @ self.right.float()).to(self.left.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.left) @ self.right
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@dataclass
class _Runtime:
    """What DictLinear derives from its stored tensors: built once, dropped when they change."""

    key: tuple
    columns: torch.Tensor  # (out, s) int32, ascending rows of each column of S
    coefs: torch.Tensor  # (out, s) at the module's dtype, detached
    csr: torch.Tensor | None = None  # S^T (out, k), built on the first sparse call


class DictLinear(CompressedLinear):
    """y = (x @ dictionary) @ S + bias; dictionary (in, k); S (k, out) with exactly s
    nonzeros per column, stored as `mask` (packed bits of its pattern) and `coefs`
    (out, s) or `coefs14` (coef_bits=14). `values` and `indices` give S as (s, out)
    values and ascending row indices. `path` picks the forward: "auto" (by input size
    and device, see kernels.choose_path), "dense" or "sparse"."""

    kind = "dict"
    spec_fields = ("in_features", "out_features", "atoms", "sparsity")
    shared_factor = "dictionary"

    def __init__(self, in_features: int, out_features: int, atoms: int, sparsity: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 coef_bits: int | None = None) -> None:
        super().__init__()
        check_coef_bits(coef_bits)
        if not 1 <= sparsity <= atoms:
            raise CospadiError(f"sparsity {sparsity} must lie in [1, atoms={atoms}]")
        self.in_features, self.out_features = in_features, out_features
        self.atoms, self.sparsity, self.coef_bits = atoms, sparsity, coef_bits
        self.dictionary = nn.Parameter(torch.empty(in_features, atoms, dtype=dtype, device=device))
        self.register_buffer("mask", torch.zeros(packed_size(atoms * out_features), dtype=torch.uint8, device=device))
        if coef_bits is None:
            self.coefs = nn.Parameter(torch.empty(out_features, sparsity, dtype=dtype, device=device))
        else:
            self.register_buffer("coefs14", torch.zeros(packed14_size(out_features * sparsity), dtype=torch.uint8,
                                                        device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.path = "auto"
        self._runtime: _Runtime | None = None

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype, coef_bits: int | None) -> DictLinear:
        return cls(spec["in_features"], spec["out_features"], spec["atoms"], spec["sparsity"], bool(spec.get("bias")),
                   dtype, coef_bits=coef_bits)

    @classmethod
    def tensor_shapes(cls, spec: dict, coef_bits: int | None) -> dict[str, tuple[int, ...]]:
        d1, d2, k, s = (spec[name] for name in cls.spec_fields)
        values = {"coefs": (d2, s)} if coef_bits is None else {"coefs14": (packed14_size(d2 * s),)}
        return {"dictionary": (d1, k), "mask": (packed_size(k * d2),), **values}

    def describe(self) -> str:
        return f"{self.in_features}x{self.out_features}, k={self.atoms}, s={self.sparsity}"

    @classmethod
    def from_factors(cls, factors: Any, bias: torch.Tensor | None, dtype: torch.dtype) -> DictLinear:
        """A module holding the given factors (cast to dtype) and a copy of `bias`;
        factors.indices must be ascending in every column."""
        in_features, atoms = factors.dictionary.shape
        sparsity, out_features = factors.values.shape
        module = cls(in_features, out_features, atoms, sparsity, bias is not None, dtype, factors.dictionary.device)
        with torch.no_grad():
            module.dictionary.copy_(factors.dictionary)
            module.mask.copy_(pattern_to_mask(factors.indices, atoms))
            module.coefs.copy_(factors.values.T)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    # ------------------------------------------------------------------ storage
    def compact_(self, coef_bits: int | None) -> DictLinear:
        """Store the values with `coef_bits` (14: truncated to 14 bits and packed; None:
        keep as they are). In place; a no-op when already so. Returns self."""
        check_coef_bits(coef_bits)
        if coef_bits == self.coef_bits or coef_bits is None:
            return self
        packed = pack14(self.coefs.detach())
        del self.coefs
        self.register_buffer("coefs14", packed)
        self.coef_bits = coef_bits
        self._runtime = None
        return self

    def _stored_coefs(self) -> torch.Tensor:
        """(out, s) values at the module's dtype; the Parameter itself when not packed."""
        if self.coef_bits is None:
            return self.coefs
        return unpack14(self.coefs14, self.out_features * self.sparsity).view(
            self.out_features, self.sparsity).to(self.dictionary.dtype)

    def _key(self) -> tuple:
        """Identifies the stored tensors the cache was derived from: objects, storage,
        in-place versions (inference tensors keep none, and cannot change outside
        inference mode) and the compute dtype. Cheap: it runs on every forward."""
        mask = self._buffers["mask"]
        stored = self._parameters["coefs"] if self.coef_bits is None else self._buffers["coefs14"]
        return (id(mask), mask.data_ptr(), -1 if mask.is_inference() else mask._version,
                id(stored), stored.data_ptr(), -1 if stored.is_inference() else stored._version,
                self._parameters["dictionary"].dtype)

    def prepare(self) -> DictLinear:
        """Derive the row indices from the mask (checking that every column has exactly s
        bits: CospadiError otherwise) and decode packed values. Runs by itself on first
        use; call it after loading to fail early. Returns self."""
        key = self._key()
        if self._runtime is None or self._runtime.key != key:
            columns = mask_to_columns(self.mask, self.atoms, self.out_features, self.sparsity)
            self._runtime = _Runtime(key, columns, self._stored_coefs().detach())
        return self

    @property
    def values(self) -> torch.Tensor:
        """S's stored values, (s, out): column j's values in ascending row order."""
        return self._stored_coefs().T

    @property
    def indices(self) -> torch.Tensor:
        """S's row indices, (s, out) int32, ascending in every column."""
        return self.prepare()._runtime.columns.T

    def coefficients(self) -> torch.Tensor:
        """S as a dense (k, out) tensor."""
        dense = torch.zeros(self.atoms, self.out_features, dtype=self.dictionary.dtype, device=self.mask.device)
        return dense.scatter(0, self.indices.long(), self.values)

    def dense_weight(self) -> torch.Tensor:
        """W = D S, (in, out), multiplied in float32 and cast to the module's dtype."""
        return (self.dictionary.float() @ self.coefficients().float()).to(self.dictionary.dtype)

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runtime = self._runtime
        if runtime is None or runtime.key != self._key():
            runtime = self.prepare()._runtime
        flat = x.reshape(-1, self.in_features)
        dictionary = self._parameters["dictionary"]
        coefs = self._parameters["coefs"] if self.coef_bits is None else runtime.coefs
        path = self.path
        if path == "auto":
            needs_grad = torch.is_grad_enabled() and (dictionary.requires_grad or coefs.requires_grad
                                                      or x.requires_grad)
            path = kernels.choose_path(flat.shape[0], x.device, needs_grad)
        if path == "sparse":
            if runtime.csr is None:
                runtime.csr = kernels.build_csr(runtime.columns, runtime.coefs, self.atoms)
            y = kernels.sparse_forward(flat, dictionary, runtime.csr, self.bias)  # chosen only without autograd
        elif path == "dense":
            y = kernels.dense_forward(flat, dictionary, runtime.columns, coefs, self.bias)
        else:
            raise CospadiError(f"unknown path {path!r}; choose one of {', '.join(kernels.PATHS)}")
        return y.view(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), ...: the cache follows on next use
        self._runtime = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_runtime"] = None
        return state

    def extra_repr(self) -> str:
        bits = f", coef_bits={self.coef_bits}" if self.coef_bits else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"atoms={self.atoms}, sparsity={self.sparsity}{bits}")


@contextmanager
def forward_path(model: nn.Module, path: str) -> Iterator[None]:
    """Within the block, every DictLinear of `model` uses `path` ("auto", "dense" or
    "sparse"); the previous choices come back afterwards."""
    if path not in kernels.PATHS:
        raise CospadiError(f"unknown path {path!r}; choose one of {', '.join(kernels.PATHS)}")
    modules = [m for m in model.modules() if isinstance(m, DictLinear)]
    before = [m.path for m in modules]
    for module in modules:
        module.path = path
    try:
        yield
    finally:
        for module, old in zip(modules, before):
            module.path = old
