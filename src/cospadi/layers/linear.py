"""Compressed drop-in replacements for nn.Linear. Both compute y = x W + b with W never
materialised: LowRankLinear as (x U) V, DictLinear as (x D) S with S column-sparse.

DictLinear holds S as the forward reads it (kernels.py, docs/inference.md): `coefs`
(d2, s), each column's values in ascending row order, and `pattern` (d2, ceil(k / 16))
int16, each column's k bits in 16-bit words (bitmask.py). Saved folders store S as
docs/method.md "Storage format" describes: a packed bitmask of its (k, d2) pattern
(`mask`, bitmask.py) plus `coefs` or `coefs14` (packed 14-bit codes, coefficients.py);
state_dict() writes that form and prepare() turns a loaded one into the held form."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import CospadiError
from . import kernels
from .base import CompressedLinear
from .bitmask import mask_to_words, packed_size, pattern_to_words, words_to_mask, words_to_rows
from .coefficients import check_coef_bits, pack14, packed14_size, truncate14, unpack14


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


class DictLinear(CompressedLinear):
    """y = (x @ dictionary) @ S + bias; dictionary (in, k); S (k, out) with exactly s
    nonzeros per column, held as the kernels read it (kernels.py): `coefs` (out, s),
    column j's values in ascending row order, and `pattern` (out, ceil(atoms / 16))
    int16, column j's bits in 16-bit words (bitmask.py). `coefs` is a Parameter at the
    module's dtype, or with coef_bits=14 a bf16 buffer that stays bf16 whatever the
    module's dtype (the 14-bit values are exact there). That is all a prepared module
    holds besides the bias.

    Saved folders store S as `mask` (packed bits of its pattern, bitmask.py) and `coefs`
    or `coefs14` (packed 14-bit codes, coefficients.py): state_dict() writes that form,
    computed from the held one; a module built by from_spec holds it as empty slots for
    the loader, and prepare() (the quantizer calls it after loading; the first forward
    otherwise) turns it into the held form and drops the slots. Reading `mask` or
    `coefs14` on a prepared module computes them. `values` and `indices` give S as (s, out)
    values and ascending row indices (computed). `path` picks the forward: "auto" (by input
    size and device, see kernels.choose_path), "dense" or "sparse" (the bit walk)."""

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
        self.compute_dtype = dtype  # the module's dtype; `dictionary` may be held narrower (prepare)

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
        """A prepared module holding the given factors (cast to dtype) and a copy of
        `bias`; factors.indices (s, out) must be ascending in every column (ValueError)."""
        in_features, atoms = factors.dictionary.shape
        sparsity, out_features = factors.values.shape
        indices = factors.indices
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= atoms
                                or (sparsity > 1 and not bool((indices.diff(dim=0) > 0).all()))):
            raise ValueError(f"row indices must be ascending in every column and lie in [0, {atoms})")
        module = cls(in_features, out_features, atoms, sparsity, bias is not None, dtype, factors.dictionary.device)
        with torch.no_grad():
            module.dictionary.copy_(factors.dictionary)
            if bias is not None:
                module.bias.copy_(bias)
        module._hold_sparse(pattern_to_words(indices, atoms), factors.values.T.to(dtype))
        return module

    # ------------------------------------------------------------------ the two forms of S
    @property
    def prepared(self) -> bool:
        """Whether S is held as the kernels read it (True) or as the loader's storage slots."""
        return "pattern" in self._buffers

    def _hold_sparse(self, pattern: torch.Tensor, coefs: torch.Tensor) -> None:
        """Hold S as `pattern` (out, ceil(atoms / 16)) int16 and `coefs` (out, s),
        dropping the storage slots."""
        self._buffers.pop("mask", None)
        self._buffers.pop("coefs14", None)
        self.register_buffer("pattern", pattern.contiguous(), persistent=False)
        if self.coef_bits is None:
            self.coefs = coefs if isinstance(coefs, nn.Parameter) else nn.Parameter(coefs.contiguous())
        else:
            self._parameters.pop("coefs", None)
            self.register_buffer("coefs", coefs.to(torch.bfloat16).contiguous(), persistent=False)

    def _hold_slots(self) -> None:
        """Back to the storage form (empty slots), so load_state_dict can copy into it."""
        device = self.dictionary.device
        self._buffers.pop("pattern", None)
        self.register_buffer("mask", torch.zeros(packed_size(self.atoms * self.out_features), dtype=torch.uint8,
                                                 device=device))
        if self.coef_bits is not None:
            self._buffers.pop("coefs", None)
            self.register_buffer("coefs14", torch.zeros(packed14_size(self.out_features * self.sparsity),
                                                        dtype=torch.uint8, device=device))

    def prepare(self) -> DictLinear:
        """Turn the storage form into the held form: the word pattern from the mask
        (checking that every column has exactly s bits: CospadiError otherwise), packed
        values decoded to bf16; the mask and packed values are dropped. A no-op when
        already prepared; runs by itself on first use. Returns self."""
        if self.prepared:
            return self
        pattern = mask_to_words(self._buffers["mask"], self.atoms, self.out_features, self.sparsity)
        if self.coef_bits is None:
            coefs = self.coefs
        else:
            coefs = unpack14(self._buffers["coefs14"], self.out_features * self.sparsity).view(self.out_features,
                                                                                                self.sparsity)
        self._hold_sparse(pattern, coefs)
        self._narrow_dictionary()
        return self

    def _narrow_dictionary(self) -> None:
        """Hold a float32 D at bf16 when every entry is exact there (a bf16 folder loaded
        into a float32 model): the products still run in float32 (sparse_forward), so
        the outputs are unchanged up to summation order, and D takes half the bytes. Done
        on D's data, so members of a group that share D see one narrowed tensor."""
        data = self.dictionary.data
        if data.dtype == torch.float32 and torch.equal(data.to(torch.bfloat16).to(torch.float32), data):
            self.dictionary.data = data.to(torch.bfloat16)

    def compact_(self, coef_bits: int | None) -> DictLinear:
        """Store the values with `coef_bits` (14: truncated to 14 bits, held as bf16 and
        saved packed; None: keep as they are). In place; a no-op when already so. Returns self."""
        check_coef_bits(coef_bits)
        if coef_bits == self.coef_bits or coef_bits is None:
            return self
        self.prepare()
        pattern, values = self._buffers["pattern"], truncate14(self.coefs.detach())
        self.coef_bits = coef_bits
        self._hold_sparse(pattern, values)
        return self

    def storage_tensors(self) -> dict[str, torch.Tensor]:
        """What a saved folder holds for S: `mask` and `coefs` or `coefs14` (computed from
        the held form when prepared)."""
        if not self.prepared:
            return {name: t for name, t in (("mask", self._buffers.get("mask")), ("coefs14", self._buffers.get("coefs14")),
                                            ("coefs", self._parameters.get("coefs"))) if t is not None}
        pattern, coefs = self._buffers["pattern"], self.coefs
        mask = words_to_mask(pattern, self.atoms)
        return {"mask": mask, **({"coefs": coefs} if self.coef_bits is None else {"coefs14": pack14(coefs.detach())})}

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {"dictionary": self.dictionary, **self.storage_tensors()}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.dictionary.dtype != self.compute_dtype:  # held narrower: written at the module's dtype
            destination[prefix + "dictionary"] = self.dictionary.detach().to(self.compute_dtype)
        if self.prepared:
            for name, tensor in self.storage_tensors().items():
                destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.prepared:
            self._hold_slots()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("mask", "coefs14") and "pattern" in self.__dict__.get("_buffers", {}):
            stored = self.storage_tensors()
            if name in stored:
                return stored[name]
        return super().__getattr__(name)

    @property
    def values(self) -> torch.Tensor:
        """S's stored values, (s, out) at the module's dtype: column j's values in ascending row order."""
        return self.prepare().coefs.T.to(self.compute_dtype)

    @property
    def indices(self) -> torch.Tensor:
        """S's row indices, (s, out) int64, ascending in every column (decoded from the pattern)."""
        return words_to_rows(self.prepare()._buffers["pattern"], self.atoms, self.sparsity).T

    def coefficients(self) -> torch.Tensor:
        """S as a dense (k, out) tensor."""
        dense = torch.zeros(self.atoms, self.out_features, dtype=self.compute_dtype, device=self.dictionary.device)
        return dense.scatter(0, self.indices, self.values)

    def dense_weight(self) -> torch.Tensor:
        """W = D S, (in, out), multiplied in float32 and cast to the module's dtype."""
        return (self.dictionary.float() @ self.coefficients().float()).to(self.compute_dtype)

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pattern = self._buffers.get("pattern")
        if pattern is None:
            pattern = self.prepare()._buffers["pattern"]
        coefs = self._parameters["coefs"] if self.coef_bits is None else self._buffers["coefs"]
        flat = x.reshape(-1, self.in_features)
        dictionary = self._parameters["dictionary"]
        path = self.path
        if path == "auto":
            needs_grad = torch.is_grad_enabled() and (dictionary.requires_grad or coefs.requires_grad
                                                      or x.requires_grad)
            path = kernels.choose_path(flat.shape[0], x.device, needs_grad, x.dtype)
        if path == "sparse":
            y = kernels.sparse_forward(flat, dictionary, coefs, pattern, self.bias)  # chosen only without autograd
        elif path == "dense":
            y = kernels.dense_forward(flat, dictionary, coefs, pattern, self.bias)
        else:
            raise CospadiError(f"unknown path {path!r}; choose one of {', '.join(kernels.PATHS)}")
        return y.view(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse: bool = True):
        """.to(), .half(), ...: bf16-held 14-bit values move with the module but keep their dtype."""
        held = self._buffers.pop("coefs", None) if self.coef_bits is not None else None
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        result = super()._apply(fn, recurse)
        if held is not None:
            self._buffers["coefs"] = held.to(self.dictionary.device)
        return result

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
