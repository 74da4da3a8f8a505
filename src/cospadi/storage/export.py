"""`cospadi export --dense DIR OUT`: a plain transformers checkpoint of a compressed
model, every DictLinear / LowRankLinear multiplied out into an nn.Linear with
W = D S (or U V), for runtimes that know nothing of cospadi. It is as large as the dense
original; what it keeps is the compressed model's accuracy."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import CospadiError
from ..files import atomic_folder
from ..layers.base import compressed_modules
from .checkpoint import load, parse_dtype


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
                 dtype: torch.dtype | str | None = None) -> Path:
    """Load the cospadi folder `folder`, densify it and write a plain transformers folder
    (config without quantization entry, safetensors, tokenizer) to `out_dir` atomically,
    at `dtype` ('float32', 'bfloat16', 'float16'; None: the saved dtype)."""
    if Path(out_dir).resolve() == Path(folder).resolve():
        raise CospadiError("the export would overwrite its source folder: choose another OUT")
    model, tokenizer = load(folder, dtype=parse_dtype(dtype))
    densify(model)
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
