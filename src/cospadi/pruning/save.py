"""Saving a compressed model whatever it holds: storage/checkpoint.py `save` for a model with
compressed modules (a combination such as replaceme+cospadi), a plain transformers folder
for one that only lost blocks (replaceme), which any transformers reloads without cospadi."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ..files import atomic_folder, check_output_folder
from ..layers.base import compressed_modules
from ..storage.checkpoint import save, to_storage
from ..storage.export import EXPORT_DESCRIPTION

PLAIN_FORMAT = "pruned"  # cospadi-export.json's "format" for a depth-pruned plain folder


def save_model(model: PreTrainedModel, tokenizer, out_dir: str | os.PathLike, report: dict | None = None, *,
               dtype: torch.dtype | str | None = None, coef_bits: int | None = None,
               overwrite: bool = False) -> Path:
    """Write `model` to `out_dir` atomically. With compressed modules: checkpoint.save (same
    arguments). Without: config.json (no quantization entry), safetensors and the tokenizer
    as save_pretrained writes them, at `dtype` (None: the model's own; the model is cast in
    place first), plus cospadi-export.json holding `report`, which marks the folder as a
    cospadi output (so `overwrite` may replace it); `coef_bits` has nothing to pack then.
    The output-folder rules are checkpoint.save's (files.check_output_folder)."""
    if any(True for _ in compressed_modules(model)):
        return save(model, tokenizer, out_dir, report, dtype=dtype, coef_bits=coef_bits, overwrite=overwrite)
    source = str(getattr(model, "name_or_path", "") or "")
    inputs = {"the folder the model was loaded from": source if source and Path(source).is_dir() else None}
    check_output_folder(out_dir, overwrite=overwrite, inputs=inputs)  # before converting the model
    to_storage(model, dtype)
    with atomic_folder(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        description = {"format": PLAIN_FORMAT, "dtype": str(model.dtype).removeprefix("torch."), "report": report or {}}
        (tmp / EXPORT_DESCRIPTION).write_text(json.dumps(description, indent=1))
    return Path(out_dir)
