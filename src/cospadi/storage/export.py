"""`cospadi export --dense DIR OUT`: a plain transformers checkpoint of a compressed
model, every DictLinear / LowRankLinear multiplied out into an nn.Linear with
W = D S (or U V), for runtimes that know nothing of cospadi. It is as large as the dense
original; what it keeps is the compressed model's accuracy. Beside the transformers files
it writes `cospadi-export.json` (where the export came from), which marks the folder as a
cospadi output that a later export may replace with overwrite=True."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from ..files import atomic_folder, check_output_folder
from ..layers.base import compressed_modules
from .checkpoint import load, parse_dtype

EXPORT_DESCRIPTION = "cospadi-export.json"  # one of files.OUTPUT_MARKERS


@torch.no_grad()
def densify(model: PreTrainedModel) -> PreTrainedModel:
    """Replace, in place, every compressed module of `model` by an nn.Linear computing
    x W + b with W = the module's product (formed in float32, stored at the module's
    dtype), and drop the cospadi quantization entry. Returns the model."""
    for name, module in list(compressed_modules(model)):
        weight = module.dense_weight()  # (in, out)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           dtype=weight.dtype, device=weight.device)
        linear.weight.copy_(weight.T)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        model.set_submodule(name, linear)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model.config, "_is_quantized"):
        del model.config._is_quantized
    return model


def export_dense(folder: str | os.PathLike, out_dir: str | os.PathLike,
                 dtype: torch.dtype | str | None = None, overwrite: bool = False) -> Path:
    """Load the cospadi folder `folder`, densify it and write a plain transformers folder
    (config without quantization entry, safetensors, tokenizer, cospadi-export.json) to
    `out_dir` atomically, at `dtype` ('float32', 'bfloat16', 'float16'; None: the saved
    dtype). `out_dir` must not be `folder` or a parent of it, nor a folder of other files;
    an earlier cospadi output there is replaced only with `overwrite`."""
    inputs = {"the source folder": folder}
    check_output_folder(out_dir, overwrite=overwrite, inputs=inputs)  # before the minutes of loading
    model, tokenizer = load(folder, dtype=parse_dtype(dtype))
    densify(model)
    with atomic_folder(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        description = {"exported_from": str(Path(folder).resolve()), "format": "dense",
                       "dtype": str(model.dtype).removeprefix("torch.")}
        (tmp / EXPORT_DESCRIPTION).write_text(json.dumps(description, indent=1))
    return Path(out_dir)
