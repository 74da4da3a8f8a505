"""The one interface of every compressed linear layer, and the registry of their kinds.

A CompressedLinear computes y = x W + b for a weight W (in, out) that it never stores
whole. Storage, reports, export and resume only talk to this interface, never to a
concrete class: a new kind of module (say an int8 dictionary) is one subclass with a new
`kind`, and it is saved, reloaded, reported and exported with no other change.

Each kind describes itself by a JSON `spec` (its constructor's integer arguments, the
`type` = kind and `bias`), which is what a saved folder's config.json lists per module;
`from_spec` rebuilds an empty module from it and `stored_shapes` says which tensors (name,
shape) the module saves. `shared_factor` names the attribute holding the left factor
that several modules may hold in common (per-group mode)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import CospadiError

MODULE_KINDS: dict[str, type[CompressedLinear]] = {}  # spec "type" -> class, filled by subclassing


class CompressedLinear(nn.Module):
    """Base of the compressed drop-in replacements of nn.Linear (see the module doc).
    Subclasses set `kind`, `spec_fields` (positive integer constructor arguments, in order
    after nothing else) and `shared_factor`, and implement the methods that raise here."""

    kind: ClassVar[str]
    spec_fields: ClassVar[tuple[str, ...]]
    shared_factor: ClassVar[str]
    in_features: int
    out_features: int
    bias: nn.Parameter | None
    coef_bits: int | None = None  # the compact form of the stored numbers (compact_), None: plain

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            MODULE_KINDS[cls.kind] = cls

    # ------------------------------------------------------------------ what a kind implements
    @classmethod
    def from_factors(cls, factors: Any, bias: torch.Tensor | None, dtype: torch.dtype) -> CompressedLinear:
        """A module holding the solver's `factors` (cast to dtype) and a copy of `bias`."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype, coef_bits: int | None) -> CompressedLinear:
        """An empty module (uninitialised tensors) of the shape `spec` describes."""
        raise NotImplementedError

    @classmethod
    def tensor_shapes(cls, spec: dict, coef_bits: int | None) -> dict[str, tuple[int, ...]]:
        """Name (relative to the module) -> shape of each tensor a module of `spec` holds,
        bias excluded, shared factor included."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The (in, out) weight the module computes with, formed in float32 and cast to
        the module's dtype (for export and error measurements). Not called `weight`: code
        that finds a `weight` attribute takes the module for a plain linear layer
        (transformers' tie_weights does, on Qwen2's biased q/k/v in per-group mode)."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short shape summary for reports, e.g. "576x576, r=200"."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared behaviour
    def spec(self) -> dict:
        """The JSON-ready description from_spec rebuilds the module from."""
        return {"type": self.kind, **{name: getattr(self, name) for name in self.spec_fields},
                "bias": self.bias is not None}

    def compact_(self, coef_bits: int | None) -> CompressedLinear:
        """Convert the stored numbers to the compact form `coef_bits` names, in place
        (kinds without one ignore it). Returns self."""
        return self

    def prepare(self) -> CompressedLinear:
        """Check the stored tensors and derive what the forward needs (CospadiError when
        they are inconsistent); runs by itself on first use. Returns self."""
        return self

    @classmethod
    def stored_shapes(cls, spec: dict, coef_bits: int | None) -> dict[str, tuple[int, ...]]:
        """Name -> shape of each tensor a module of `spec` writes to disk: its tensors and
        bias, less the shared factor when `spec` says it `shares` another module's (that
        factor is stored once, under its owner)."""
        shapes = cls.tensor_shapes(spec, coef_bits)
        if spec.get("shares"):
            shapes.pop(cls.shared_factor)
        return shapes | ({"bias": (spec["out_features"],)} if spec.get("bias") else {})

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors the module saves (parameters and persistent buffers), bias excluded."""
        tensors: dict[str, torch.Tensor] = dict(self.named_parameters(recurse=False))
        tensors.update((name, buffer) for name, buffer in self.named_buffers(recurse=False)
                       if name not in self._non_persistent_buffers_set)
        tensors.pop("bias", None)
        return tensors

    @property
    def factor_dtype(self) -> torch.dtype:
        """The floating dtype the module computes in (that of its shared factor)."""
        return getattr(self, self.shared_factor).dtype


def check_spec(name: str, spec: object) -> type[CompressedLinear]:
    """The class of a well-formed module entry `spec` (config.json or a resume file);
    CospadiError naming `name` and what is wrong otherwise."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in MODULE_KINDS:
        raise CospadiError(f"config.json: unknown module type {kind!r} for {name}; the folder is corrupt or from a "
                           "newer cospadi: upgrade cospadi")
    assert isinstance(spec, dict)
    for field in MODULE_KINDS[kind].spec_fields:
        value = spec.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CospadiError(f"config.json: {name} has {field}={value!r}, not a positive integer; the folder is corrupt")
    if "shares" in spec and not isinstance(spec["shares"], str):
        raise CospadiError(f"config.json: {name} has shares={spec['shares']!r}, not a module name; the folder is corrupt")
    return MODULE_KINDS[kind]


def compressed_modules(model: nn.Module) -> Iterator[tuple[str, CompressedLinear]]:
    """(name, module) of every CompressedLinear in `model`, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear):
            yield name, module
