"""Plain transformers loading of cospadi folders, through transformers' quantizer plugin
mechanism (register_quantization_config / register_quantizer, HfQuantizer).

A saved folder's config.json carries

    "quantization_config": {"quant_method": "cospadi", "format_version": 2,
                            "coef_bits": null | 14, "method": ..., "ratio": ...,
                            "modules": {"model.layers.0.self_attn.q_proj":
                                        {"type": "dict", "in_features": 576, "out_features": 576,
                                         "atoms": 268, "sparsity": 134, "bias": false}, ...}}

A module whose left factor (dictionary / left) is shared with an earlier module (per-group
mode) carries `"shares": "<owner module name>"`; the factor is stored once, under its
owner, and the modules are tied again on loading (sharing.py).

After `import cospadi`, `AutoModelForCausalLM.from_pretrained(folder)` finds the
"cospadi" quantizer: before the weights are read it swaps every listed nn.Linear for the
DictLinear / LowRankLinear the entry describes (on the meta device, at the model's
dtype); the weights then load by name into those modules; afterwards every DictLinear
checks its mask and derives its row indices."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..layers.bitmask import packed_size
from ..layers.coefficients import check_coef_bits, packed14_size
from ..errors import CospadiError
from ..layers.linear import DictLinear, LowRankLinear, compressed_modules
from .sharing import shared_factors, tie_shared

QUANT_METHOD = "cospadi"
FORMAT_VERSION = 2  # 1: cospadi.json held the modules; values (s, out) and int16 indices
_FIELDS = {"dict": ("in_features", "out_features", "atoms", "sparsity"),
           "lowrank": ("in_features", "out_features", "rank")}


def module_spec(module: nn.Module) -> dict:
    """The JSON-ready constructor arguments of a DictLinear or LowRankLinear."""
    if isinstance(module, DictLinear):
        return {"type": "dict", "in_features": module.in_features, "out_features": module.out_features,
                "atoms": module.atoms, "sparsity": module.sparsity, "bias": module.bias is not None}
    if isinstance(module, LowRankLinear):
        return {"type": "lowrank", "in_features": module.in_features, "out_features": module.out_features,
                "rank": module.rank, "bias": module.bias is not None}
    raise TypeError(f"{type(module).__name__} is not a compressed module")


def check_spec(name: str, spec: object) -> None:
    """CospadiError unless `spec` is a well-formed module entry."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in _FIELDS:
        raise CospadiError(f"config.json: unknown module type {kind!r} for {name}; the folder is corrupt or from a "
                           "newer cospadi: upgrade cospadi")
    for field in _FIELDS[kind]:
        value = spec.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CospadiError(f"config.json: {name} has {field}={value!r}, not a positive integer; the folder is corrupt")
    if "shares" in spec and not isinstance(spec["shares"], str):
        raise CospadiError(f"config.json: {name} has shares={spec['shares']!r}, not a module name; the folder is corrupt")


_BUILDERS: dict[str, Callable[[dict, torch.dtype, int | None], nn.Module]] = {
    "dict": lambda s, dt, bits: DictLinear(s["in_features"], s["out_features"], s["atoms"], s["sparsity"],
                                           bool(s.get("bias")), dt, coef_bits=bits),
    "lowrank": lambda s, dt, bits: LowRankLinear(s["in_features"], s["out_features"], s["rank"],
                                                 bool(s.get("bias")), dt),
}


def stored_shapes(spec: dict, coef_bits: int | None) -> dict[str, tuple[int, ...]]:
    """Tensor name (relative to the module) -> shape, of what a module with `spec` saves."""
    d1, d2 = spec["in_features"], spec["out_features"]
    if spec["type"] == "dict":
        k, s = spec["atoms"], spec["sparsity"]
        shapes = {"dictionary": (d1, k), "mask": (packed_size(k * d2),)}
        shapes.update({"coefs": (d2, s)} if coef_bits is None else {"coefs14": (packed14_size(d2 * s),)})
    else:
        shapes = {"left": (d1, spec["rank"]), "right": (spec["rank"], d2)}
    if spec.get("shares"):  # the shared factor is stored once, under its owner
        shapes.pop("dictionary" if spec["type"] == "dict" else "left")
    return shapes | ({"bias": (d2,)} if spec.get("bias") else {})


def replace_modules(model: nn.Module, modules: dict[str, dict], dtype: torch.dtype, coef_bits: int | None) -> None:
    """Swap each named submodule of `model` for an empty compressed module built from its
    spec (on the current default device). CospadiError for a name the model lacks."""
    for name, spec in modules.items():
        check_spec(name, spec)
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CospadiError(f"config.json lists compressed module {name}, which this "
                               f"{type(model).__name__} does not have; the folder is corrupt") from None
        expected = (getattr(old, "in_features", None), getattr(old, "out_features", None))
        if expected != (spec["in_features"], spec["out_features"]):
            raise CospadiError(f"config.json: {name} is {spec['in_features']}x{spec['out_features']} but the model's "
                               f"layer is {expected[0]}x{expected[1]}; the folder is corrupt")
        model.set_submodule(name, _BUILDERS[spec["type"]](spec, dtype, coef_bits))


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
                   ratio: float | None = None) -> "CospadiConfig":
        """The entry describing every compressed module of `model`."""
        specs = {name: module_spec(m) for name, m in compressed_modules(model)}
        for holder, owner in shared_factors(model).items():
            specs[holder]["shares"] = owner
        return cls(specs, coef_bits=coef_bits, method=method, ratio=ratio)


ALIGNMENT = 64  # bytes; torch's CPU allocator aligns to this


@torch.no_grad()
def realign(model: nn.Module) -> None:
    """Copy every CPU parameter and buffer that does not start on a 64-byte boundary into
    fresh (aligned) memory. transformers' loader leaves them misaligned, and torch's CPU
    kernels then round differently (and run slower): the reloaded model would not be
    bit-identical to the one that was saved. Tied parameters stay tied."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.device.type == "cpu" and param.data_ptr() % ALIGNMENT:
                param.data = param.data.clone()
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.device.type == "cpu" and buffer.data_ptr() % ALIGNMENT:
                module._buffers[name] = buffer.clone()


def _mapped_weight_files() -> list[tuple[int, int]]:
    """Address ranges of the .safetensors files this process has memory-mapped (from
    /proc/self/maps; [] where that does not exist)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(".safetensors"):
            low, high = fields[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return ranges


@torch.no_grad()
def release_weight_files(model: nn.Module) -> int:
    """When the model's float tensors were all converted on load (e.g. a bf16 folder loaded
    at fp32) and only non-float buffers (the bitmask, the packed 14-bit values) still point
    into the memory-mapped weight file, copy those buffers so the mapping can close: every
    page of it was read during loading, and while one tensor refers to it, all of them stay
    resident (about the folder's size). Where float tensors use the file directly (a
    same-dtype load), nothing is copied: the model then runs on the mapping itself.
    Returns the bytes copied."""
    ranges = _mapped_weight_files()
    if not ranges:
        return 0

    def mapped(tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu" and any(low <= tensor.data_ptr() < high for low, high in ranges)

    tensors = [(module, name, tensor, kind) for module in model.modules()
               for kind, items in (("param", module.named_parameters(recurse=False)),
                                   ("buffer", module.named_buffers(recurse=False)))
               for name, tensor in items if tensor is not None]
    aliased = [entry for entry in tensors if mapped(entry[2])]
    if any(entry[2].is_floating_point() for entry in aliased):
        return 0
    copied = 0
    for module, name, tensor, kind in aliased:
        if kind == "param":
            tensor.data = tensor.data.clone()
        else:
            module._buffers[name] = tensor.clone()
        copied += tensor.numel() * tensor.element_size()
    return copied


class CospadiHfQuantizer(HfQuantizer):
    """Rebuilds the compressed modules of a pre-compressed cospadi folder; it cannot
    compress on the fly (that needs calibration: use `cospadi compress`)."""

    requires_calibration = True
    quantization_config: CospadiConfig

    def _process_model_before_weight_loading(self, model, checkpoint_files: list[str] | None = None, **kwargs):
        from .folder_checks import check_module_tensors, check_safetensors  # reads safetensors headers only

        files = [f for f in checkpoint_files or [] if str(f).endswith(".safetensors")]
        if files:
            headers = [check_safetensors(Path(f)) for f in files]
            check_module_tensors(self.quantization_config.to_dict(), headers)
        replace_modules(model, self.quantization_config.modules, model.dtype, self.quantization_config.coef_bits)
        tie_shared(model, {name: spec["shares"] for name, spec in self.quantization_config.modules.items()
                           if spec.get("shares")})
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        realign(model)
        release_weight_files(model)
        for _, module in compressed_modules(model):
            if isinstance(module, DictLinear):
                module.prepare()
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make "cospadi" known to transformers (idempotent; runs on `import cospadi`)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(CospadiConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(CospadiHfQuantizer)


register()
