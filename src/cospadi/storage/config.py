"""The `quantization_config` entry of a saved folder's config.json: its schema, its checks,
and rebuilding the compressed modules it lists.

    "quantization_config": {"quant_method": "cospadi", "format_version": 2,
                            "coef_bits": null | 14, "method": ..., "ratio": ...,
                            "modules": {"model.layers.0.self_attn.q_proj":
                                        {"type": "dict", "in_features": 576, "out_features": 576,
                                         "atoms": 268, "sparsity": 134, "bias": false}, ...}}

Each module entry is its CompressedLinear's `spec()` (layers/base.py). A module whose left
factor is shared with an earlier module (per-group mode) carries `"shares": "<owner module
name>"`; the factor is stored once, under its owner, and the modules are tied again on
loading (sharing.py)."""
from __future__ import annotations

import torch
from torch import nn
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import CospadiError
from ..layers.base import check_spec, compressed_modules
from ..layers.coefficients import check_coef_bits
from .sharing import shared_factors

QUANT_METHOD = "cospadi"
FORMAT_VERSION = 2  # 1: cospadi.json held the modules; values (s, out) and int16 indices


def stored_shapes(spec: dict, coef_bits: int | None) -> dict[str, tuple[int, ...]]:
    """Tensor name (relative to the module) -> shape, of what a module with `spec` saves."""
    return check_spec("module", spec).stored_shapes(spec, coef_bits)


def replace_modules(model: nn.Module, modules: dict[str, dict], dtype: torch.dtype, coef_bits: int | None) -> None:
    """Swap each named submodule of `model` for an empty compressed module built from its
    spec (on the current default device). CospadiError for a name the model lacks."""
    for name, spec in modules.items():
        kind = check_spec(name, spec)
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CospadiError(f"config.json lists compressed module {name}, which this "
                               f"{type(model).__name__} does not have; the folder is corrupt") from None
        expected = (getattr(old, "in_features", None), getattr(old, "out_features", None))
        if expected != (spec["in_features"], spec["out_features"]):
            raise CospadiError(f"config.json: {name} is {spec['in_features']}x{spec['out_features']} but the model's "
                               f"layer is {expected[0]}x{expected[1]}; the folder is corrupt")
        model.set_submodule(name, kind.from_spec(spec, dtype, coef_bits))


class CospadiConfig(QuantizationConfigMixin):
    """The `quantization_config` entry of a cospadi folder (see the module doc)."""

    def __init__(self, modules: dict[str, dict] | None = None, format_version: int = FORMAT_VERSION,
                 coef_bits: int | None = None, method: str | None = None, ratio: float | None = None,
                 **kwargs) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.coef_bits = coef_bits
        self.method = method
        self.ratio = ratio
        self.modules = dict(modules or {})
        self.post_init()

    def post_init(self) -> None:
        """CospadiError for a newer or unknown format version or malformed modules."""
        version = self.format_version
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CospadiError(f"config.json: cospadi format_version {version!r} is not a version number; "
                               "the folder is corrupt")
        if version > FORMAT_VERSION:
            raise CospadiError(f"this folder uses cospadi format version {version}, newer than this cospadi "
                               f"reads ({FORMAT_VERSION}): upgrade cospadi")
        if version < FORMAT_VERSION:
            raise CospadiError(f"this folder uses cospadi format version {version}, from before the packed "
                               f"bitmask format ({FORMAT_VERSION}): compress the model again")
        check_coef_bits(self.coef_bits)
        if not isinstance(self.modules, dict):
            raise CospadiError("config.json: quantization_config.modules must map module names to specs")
        for name, spec in self.modules.items():
            check_spec(name, spec)

    @classmethod
    def from_model(cls, model: nn.Module, coef_bits: int | None = None, method: str | None = None,
                   ratio: float | None = None) -> CospadiConfig:
        """The entry describing every compressed module of `model`."""
        specs = {name: m.spec() for name, m in compressed_modules(model)}
        for holder, owner in shared_factors(model).items():
            specs[holder]["shares"] = owner
        return cls(specs, coef_bits=coef_bits, method=method, ratio=ratio)
