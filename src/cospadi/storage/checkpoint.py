"""Saving and reloading compressed models.

A saved folder is what transformers' `save_pretrained` writes (config.json, safetensors
shards, generation config) plus the tokenizer, `cospadi.json` (the format version and the
run's full report) and `REPORT.md` (a short human-readable summary). config.json carries
a `quantization_config` with `quant_method: "cospadi"` and every compressed module's
spec (config.py), so after `import cospadi` plain
`AutoModelForCausalLM.from_pretrained(folder)` rebuilds the model; `load` does the same
after checking the folder. cospadi.json also records the sha256 of every file saved
with it (weights, config, tokenizer, REPORT.md, the allocation heatmap) and a digest of
itself; both routes refuse a file that no longer matches (older folders have
none: not checked).
Folders are written under a temporary name and renamed into place, so a failed or
interrupted save never leaves a half-written folder; an existing folder is replaced only
when it is an earlier cospadi output and overwrite=True (files.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..errors import CospadiError
from ..files import atomic_folder, check_output_folder, file_sha256
from ..layers.base import compressed_modules
from ..layers.coefficients import check_coef_bits
from ..models import held_load_warnings, release
from .config import FORMAT_VERSION, CospadiConfig
from .folder_checks import DESCRIPTION, check_folder, recorded_checksums, verified, weight_files, with_digest
from .folder_report import render_report, write_allocation_heatmap
from .sharing import declared_for_saving

REPORT = "REPORT.md"
HEATMAP = "allocation.png"  # a per-matrix allocation's ratios, blocks x kinds (bench/plot.py)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'float32' | 'bfloat16' | 'float16' (or a torch dtype, or None) -> torch dtype or None."""
    if name is None or isinstance(name, torch.dtype):
        if name is not None and name not in DTYPES.values():
            raise CospadiError(f"dtype {name} is not supported; choose one of {', '.join(DTYPES)}")
        return name
    if name not in DTYPES:
        raise CospadiError(f"dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def to_storage(model: PreTrainedModel, dtype: torch.dtype | str | None = None,
               coef_bits: int | None = None) -> PreTrainedModel:
    """Convert `model` in place to what `save` writes: floating tensors cast to `dtype`
    (None: unchanged) and, with coef_bits=14, every DictLinear's values truncated to 14
    bits and packed. Returns the model."""
    dtype = parse_dtype(dtype)
    check_coef_bits(coef_bits)
    if dtype is not None:
        _cast_saved_tensors(model, dtype)
    for _, module in compressed_modules(model):
        module.compact_(coef_bits)
    return model


def _cast_saved_tensors(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating parameters and persistent buffers to `dtype`, as
    from_pretrained(dtype=...) builds them; non-persistent buffers (rotary tables) keep
    their dtype, so the converted model and its reload compute alike."""
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "compute_dtype"):  # DictLinear: its dtype, whatever width D is held at
                module.compute_dtype = dtype
            for param in module.parameters(recurse=False):
                if param.is_floating_point() and param.dtype != dtype:
                    param.data = param.data.to(dtype)
            for name, buffer in module.named_buffers(recurse=False):
                if (buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype
                        and name not in module._non_persistent_buffers_set):
                    module._buffers[name] = buffer.to(dtype)


def save(model: PreTrainedModel, tokenizer, out_dir: str | os.PathLike, report: dict | None = None, *,
         dtype: torch.dtype | str | None = None, coef_bits: int | None = None,
         max_shard_size: str | int | None = None, overwrite: bool = False) -> Path:
    """Write the compressed `model`, its tokenizer (None: none), cospadi.json (with the
    sha256 of every weight file) and REPORT.md to `out_dir` atomically. `dtype`
    ('float32', 'bfloat16', 'float16'; None: the model's own) and `coef_bits` (14: packed
    14-bit values of S; None: the dtype's) choose the storage; if they change the numbers,
    `model` is converted in place first (to_storage), so the model you hold computes
    exactly what the folder reloads. `max_shard_size` (e.g. "200MB") splits the weights
    into several safetensors shards. An existing `out_dir` is replaced only when it is an
    earlier cospadi output and `overwrite` is set; the folder the model was loaded from
    (or a parent of it) and a folder holding other files are refused (files.py)."""
    modules = dict(compressed_modules(model))
    if not modules:
        raise CospadiError("the model has no compressed modules: compress it first (cospadi.compress), or save a "
                           "dense model with save_pretrained")
    source = str(getattr(model, "name_or_path", "") or "")
    inputs = {"the folder the model was loaded from": source if source and Path(source).is_dir() else None}
    check_output_folder(out_dir, overwrite=overwrite, inputs=inputs)  # before converting the model
    to_storage(model, dtype, coef_bits)
    report = report or {}
    bits = coef_bits if any(m.coef_bits == coef_bits for m in modules.values()) else None
    model.config.quantization_config = CospadiConfig.from_model(model, bits, report.get("method"),
                                                                report.get("ratio"))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    with atomic_folder(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        with declared_for_saving(model):  # shared factors are written once
            model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / REPORT).write_text(render_report(model, report, bits))
        write_allocation_heatmap(report, tmp / HEATMAP)
        checksums = {path.name: file_sha256(path) for path in sorted(tmp.iterdir())
                     if path.is_file() and path.name != DESCRIPTION}
        description = {"format_version": FORMAT_VERSION, "checksums": checksums, "report": report}
        (tmp / DESCRIPTION).write_text(json.dumps(with_digest(description), indent=1))
    return Path(out_dir)


def load(path: str | os.PathLike, dtype: torch.dtype | str | None = None) -> tuple[PreTrainedModel, object]:
    """Rebuild a model saved by `save`: (model in eval mode, tokenizer or None). The model
    comes back at its saved dtype unless `dtype` says otherwise; its logits are
    bit-identical to those of the model that was saved. Every damaged-folder case raises
    CospadiError with what to do (see folder_checks.py), a weight file that differs from
    its recorded sha256 included."""
    folder = Path(path)
    check_folder(folder)
    torch_dtype = parse_dtype(dtype) or "auto"
    try:
        checked = weight_files(folder) + [folder / name for name in recorded_checksums(folder) or {}]
        with verified(checked), held_load_warnings() as held:  # the quantizer need not hash again
            model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, output_loading_info=True,
                                                               ignore_mismatched_sizes=True)  # reported below
    except CospadiError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CospadiError(f"cannot load {folder} ({reason}); the folder is corrupt: compress again") from None
    problems = {kind: sorted(str(k) for k in info.get(kind) or []) for kind in
                ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        detail = "; ".join(f"{kind.replace('_', ' ')} {names[:3]}" for kind, names in problems.items() if names)
        raise CospadiError(f"{folder}: the weights do not match config.json ({detail}); the folder is corrupt or "
                           "from another tool: compress again")
    release(held)  # transformers' report, shown only when the load is accepted
    model.eval()
    tokenizer = None
    if (folder / "tokenizer_config.json").exists():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CospadiError(f"cannot read the tokenizer in {folder} ({type(exc).__name__}); the folder is "
                               "corrupt: copy it again") from None
    return model, tokenizer
