"""Compressed linears whose factors are stored quantized (docs/quantization.md):

* `qdict`  (QuantDictLinear): cospadi's D (d1, k) and the values of S (s, d2) quantized,
  S's pattern still the packed bitmask;
* `qlowrank` (QuantLowRankLinear): both low-rank factors quantized;
* `qdense` (QuantLinear): the dense weight itself quantized (the rtn / gptq baselines).

Each quantized factor `<name>` is stored as `<name>_codes` and `<name>_scales`
(quantized_codes.py). A module built by from_spec holds only these (slots the loader fills
by name); prepare() (the quantizer calls it after loading, the first forward otherwise)
dequantizes them into Parameters at the module's dtype, the same float32 product cast to
the same dtype that from_factors computes, so the reloaded model is bit-identical to the
compressed one; the forward is then the plain kind's (sparse and dense paths for qdict). The
codes and scales stay held (small) and state_dict() writes them, never the dequantized
floats. The run-time memory therefore holds the dequantized factors (issue 15's business)."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import CospadiError
from ..solvers.quantize import QuantDenseFactors, QuantDictFactors, QuantLowRankFactors, QuantTensor
from .base import CompressedLinear
from .bitmask import mask_to_words, packed_size, pattern_to_mask, words_to_mask
from .linear import DictLinear, LowRankLinear
from .quantized_codes import from_stored, slot_shapes, to_stored


class _QuantStore(CompressedLinear):
    """What the quantized kinds share: the slots of their quantized factors, and a
    state_dict of the stored form only. Subclasses list their factors' (d, n) shapes in
    `quant_shapes` and hold the dequantized ones in `_hold`."""

    quantized: ClassVar[tuple[str, ...]]
    bits: int
    group: int

    def quant_shapes(self) -> dict[str, tuple[int, int]]:
        """Quantized factor name -> the (d, n) shape of its QuantTensor."""
        raise NotImplementedError

    def _init_slots(self, bits: int, group: int, dtype: torch.dtype, device: torch.device | str | None) -> None:
        """Drop the plain factors the base class made and register the empty stored form."""
        self.bits, self.group, self._run_dtype = bits, group, dtype
        for name, shape in self.quant_shapes().items():
            self._parameters.pop(name, None)
            for key, size in slot_shapes(name, shape, bits, group).items():
                dtype_ = torch.uint8 if key.endswith("_codes") else torch.int16
                self.register_buffer(key, torch.zeros(size, dtype=dtype_, device=device))

    def _buffer(self, key: str) -> torch.Tensor:
        """The held buffer `key` (KeyError when absent)."""
        tensor = self._buffers[key]
        assert tensor is not None
        return tensor

    def _store(self, name: str, tensor: QuantTensor) -> None:
        for key, stored in to_stored(name, tensor).items():
            self._buffers[key] = stored.to(self._buffer(key).device)

    def quant_tensor(self, name: str) -> QuantTensor:
        """The stored QuantTensor of factor `name`."""
        return from_stored(self._buffer(f"{name}_codes"), self._buffer(f"{name}_scales"),
                           self.quant_shapes()[name], self.bits, self.group)

    def _dequantized(self, name: str) -> torch.Tensor:
        return self.quant_tensor(name).dequantize(self._run_dtype)

    def quant_stored(self) -> dict[str, torch.Tensor]:
        """The codes and scales of every quantized factor (model order of quant_shapes)."""
        return {key: self._buffer(key) for name, shape in self.quant_shapes().items()
                for key in slot_shapes(name, shape, self.bits, self.group)}

    @property
    def factor_dtype(self) -> torch.dtype:
        held = self._parameters.get(self.quantized[0])
        return held.dtype if held is not None else self._run_dtype

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        tensors = {**self.stored_tensors(), **({"bias": self.bias} if self.bias is not None else {})}
        for name, tensor in tensors.items():
            destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return self.quant_stored()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._drop_held()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _drop_held(self) -> None:
        """Forget the dequantized factors (load_state_dict refills the stored form)."""
        for name in self.quantized:
            held = self._parameters.pop(name, None)
            if held is not None:
                self._run_dtype = held.dtype

    def describe(self) -> str:
        return f"{super().describe()}, int{self.bits} g{self.group}"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, group={self.group}"


class QuantLinear(_QuantStore):
    """y = x @ matrix + bias with matrix (in, out) stored quantized (rtn / gptq baselines)."""

    kind = "qdense"
    spec_fields = ("in_features", "out_features", "bits", "group")
    shared_factor = "matrix_codes"
    quantized = ("matrix",)

    def __init__(self, in_features: int, out_features: int, bits: int, group: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_slots(bits, group, dtype, device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def quant_shapes(self) -> dict[str, tuple[int, int]]:
        return {"matrix": (self.in_features, self.out_features)}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype, coef_bits: int | None) -> QuantLinear:
        return cls(spec["in_features"], spec["out_features"], spec["bits"], spec["group"], bool(spec.get("bias")), dtype)

    @classmethod
    def tensor_shapes(cls, spec: dict, coef_bits: int | None) -> dict[str, tuple[int, ...]]:
        return slot_shapes("matrix", (spec["in_features"], spec["out_features"]), spec["bits"], spec["group"])

    @classmethod
    def from_factors(cls, factors: Any, bias: torch.Tensor | None, dtype: torch.dtype) -> QuantLinear:
        assert isinstance(factors, QuantDenseFactors)
        d1, d2 = factors.matrix.shape
        module = cls(d1, d2, factors.matrix.bits, factors.matrix.group, bias is not None, dtype,
                     factors.matrix.codes.device)
        module._store("matrix", factors.matrix)
        _copy_bias(module, bias)
        return module.prepare()

    def prepare(self) -> QuantLinear:
        if "matrix" not in self._parameters:
            self.matrix = nn.Parameter(self._dequantized("matrix"))
        return self

    def dense_weight(self) -> torch.Tensor:
        return self.prepare().matrix.detach().clone()

    def describe(self) -> str:
        return f"{self.in_features}x{self.out_features}, int{self.bits} g{self.group}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.prepare().matrix
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group={self.group}"


class QuantLowRankLinear(_QuantStore, LowRankLinear):
    """LowRankLinear with both factors stored quantized."""

    kind = "qlowrank"
    spec_fields = ("in_features", "out_features", "rank", "bits", "group")  # type: ignore[assignment]
    shared_factor = "left_codes"
    quantized = ("left", "right")

    def __init__(self, in_features: int, out_features: int, rank: int, bits: int, group: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        LowRankLinear.__init__(self, in_features, out_features, rank, bias, dtype, device)
        self._init_slots(bits, group, dtype, device)

    def quant_shapes(self) -> dict[str, tuple[int, int]]:
        return {"left": (self.in_features, self.rank), "right": (self.rank, self.out_features)}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype, coef_bits: int | None) -> QuantLowRankLinear:
        return cls(spec["in_features"], spec["out_features"], spec["rank"], spec["bits"], spec["group"],
                   bool(spec.get("bias")), dtype)

    @classmethod
    def tensor_shapes(cls, spec: dict, coef_bits: int | None) -> dict[str, tuple[int, ...]]:
        d1, d2, r, bits, group = (spec[name] for name in cls.spec_fields)
        return {**slot_shapes("left", (d1, r), bits, group), **slot_shapes("right", (r, d2), bits, group)}

    @classmethod
    def from_factors(cls, factors: Any, bias: torch.Tensor | None, dtype: torch.dtype) -> QuantLowRankLinear:
        assert isinstance(factors, QuantLowRankFactors)
        (d1, r), d2 = factors.left.shape, factors.right.shape[1]
        module = cls(d1, d2, r, factors.left.bits, factors.left.group, bias is not None, dtype,
                     factors.left.codes.device)
        module._store("left", factors.left)
        module._store("right", factors.right)
        _copy_bias(module, bias)
        return module.prepare()

    def prepare(self) -> QuantLowRankLinear:
        if "left" not in self._parameters:
            self.left = nn.Parameter(self._dequantized("left"))
            self.right = nn.Parameter(self._dequantized("right"))
        return self

    def dense_weight(self) -> torch.Tensor:
        return LowRankLinear.dense_weight(self.prepare())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LowRankLinear.forward(self.prepare(), x)


class QuantDictLinear(_QuantStore, DictLinear):
    """DictLinear with D and the values of S stored quantized (the values as an (s, d2)
    QuantTensor: groups along each column's stored values, in ascending row order); S's
    pattern is the packed bitmask `mask` as for DictLinear. Prepared, it is a plain
    DictLinear: `dictionary` and `coefs` Parameters at the module's dtype, `pattern`."""

    kind = "qdict"
    spec_fields = ("in_features", "out_features", "atoms", "sparsity", "bits", "group")  # type: ignore[assignment]
    shared_factor = "dictionary_codes"
    quantized = ("dictionary", "values")

    def __init__(self, in_features: int, out_features: int, atoms: int, sparsity: int, bits: int, group: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        DictLinear.__init__(self, in_features, out_features, atoms, sparsity, bias, dtype, device)
        self._parameters.pop("coefs", None)
        self._init_slots(bits, group, dtype, device)

    def quant_shapes(self) -> dict[str, tuple[int, int]]:
        return {"dictionary": (self.in_features, self.atoms), "values": (self.sparsity, self.out_features)}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype, coef_bits: int | None) -> QuantDictLinear:
        return cls(spec["in_features"], spec["out_features"], spec["atoms"], spec["sparsity"], spec["bits"],
                   spec["group"], bool(spec.get("bias")), dtype)

    @classmethod
    def tensor_shapes(cls, spec: dict, coef_bits: int | None) -> dict[str, tuple[int, ...]]:
        d1, d2, k, s, bits, group = (spec[name] for name in cls.spec_fields)
        return {**slot_shapes("dictionary", (d1, k), bits, group), "mask": (packed_size(k * d2),),
                **slot_shapes("values", (s, d2), bits, group)}

    @classmethod
    def from_factors(cls, factors: Any, bias: torch.Tensor | None, dtype: torch.dtype) -> QuantDictLinear:
        assert isinstance(factors, QuantDictFactors)
        (d1, k), (s, d2) = factors.dictionary.shape, factors.values.shape
        quant = factors.dictionary
        module = cls(d1, d2, k, s, quant.bits, quant.group, bias is not None, dtype, quant.codes.device)
        try:
            mask = pattern_to_mask(factors.indices, k)
        except ValueError as exc:
            raise ValueError(f"row indices must be ascending in every column and lie in [0, {k}): {exc}") from None
        if s > 1 and not bool((factors.indices.diff(dim=0) > 0).all()):
            raise ValueError(f"row indices must be ascending in every column and lie in [0, {k})")
        module._buffers["mask"] = mask.to(quant.codes.device)
        module._store("dictionary", factors.dictionary)
        module._store("values", factors.values)
        _copy_bias(module, bias)
        return module.prepare()

    def prepare(self) -> QuantDictLinear:
        """The word pattern from the mask (CospadiError when a column lacks exactly s bits),
        D and the values dequantized at the module's dtype. A no-op when prepared."""
        if self.prepared:
            return self
        pattern = mask_to_words(self._buffer("mask"), self.atoms, self.out_features, self.sparsity)
        self.dictionary = nn.Parameter(self._dequantized("dictionary"))
        self._hold_sparse(pattern, self._dequantized("values").T.contiguous())
        return self

    def _hold_slots(self) -> None:
        self._drop_held()
        self._parameters.pop("coefs", None)
        device = self._buffer("dictionary_codes").device
        self._buffers.pop("pattern", None)
        self.register_buffer("mask", torch.zeros(packed_size(self.atoms * self.out_features), dtype=torch.uint8,
                                                 device=device))

    def _drop_held(self) -> None:
        held = self._parameters.pop("dictionary", None)
        if held is not None:
            self._run_dtype = held.dtype

    def storage_tensors(self) -> dict[str, torch.Tensor]:
        mask = self._buffer("mask") if not self.prepared else words_to_mask(self._buffer("pattern"), self.atoms)
        return {"mask": mask}

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        stored = self.quant_stored()
        return {key: stored[key] for key in ("dictionary_codes", "dictionary_scales")} | self.storage_tensors() | \
            {key: stored[key] for key in ("values_codes", "values_scales")}

    def compact_(self, coef_bits: int | None) -> QuantDictLinear:
        if coef_bits is not None:
            raise CospadiError(f"the values of S are quantized (int{self.bits}); --coef-bits {coef_bits} packs "
                               "bf16 values: leave it out")
        return self

    def dense_weight(self) -> torch.Tensor:
        return DictLinear.dense_weight(self.prepare())


def _copy_bias(module: CompressedLinear, bias: torch.Tensor | None) -> None:
    if bias is not None and module.bias is not None:
        with torch.no_grad():
            module.bias.copy_(bias)
