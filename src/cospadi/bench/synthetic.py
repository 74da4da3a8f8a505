"""Random-weight models at the shapes of larger public models, for the figures that depend
on shapes alone (bytes, speed, memory), where the real weights cannot be installed here
(`cospadi bench-infer --shapes NAME`).

The dense model is `from_config` of the built-in SmolLM2-135M's config with the larger
model's widths and depth (its tokenizer and vocabulary are the same), randomly initialised.
A compressed model replaces every linear of every block by the method's module at the
method's budget for that shape, with random factors instead of solved ones: the same
tensors, shapes, storage and kernels as a solved model, and no quality (its perplexity
means nothing and is not measured)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from ..adapters import adapter_for, decoder_layers
from ..budget import DictBudget, LowRankBudget
from ..errors import CospadiError
from ..files import atomic_folder
from ..methods import get_method
from ..models import load_model
from ..solvers import SolverOptions
from ..solvers.factors import LowRankFactors, SparseDictFactors
from ..storage.checkpoint import save, to_storage

# The shape fields of the published config.json of each model (the rest: SmolLM2-135M's).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                     "num_attention_heads": 15, "num_key_value_heads": 5, "head_dim": 64},
    "smollm2-1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 64},
}
BASE_MODEL = "smollm2-135m"
INIT_STD = 0.02  # the entries' standard deviation of every random weight, dense or factored


def check_shapes(name: str) -> None:
    """CospadiError unless `name` is a known shape set."""
    if name not in SHAPES:
        raise CospadiError(f"--shapes {name!r} is unknown; choose from {', '.join(SHAPES)}")


def random_dense(name: str, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(float32 model with `name`'s shapes and random weights drawn with `seed`, in eval
    mode; the built-in SmolLM2 tokenizer)."""
    check_shapes(name)
    base, tokenizer = load_model(BASE_MODEL)
    config = base.config
    del base
    for key, value in SHAPES[name].items():
        setattr(config, key, value)
    config.initializer_range = INIT_STD
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return model, tokenizer


def random_factors(budget: LowRankBudget | DictBudget, gen: torch.Generator) -> LowRankFactors | SparseDictFactors:
    """Factors with `budget`'s shapes (members = 1) whose product has entries of standard
    deviation about INIT_STD: low rank (d1, r) @ (r, d2); or a dictionary (d1, k) of unit
    atoms with s distinct random rows per column of S, ascending."""
    d1, d2 = budget.d1, budget.d2
    if isinstance(budget, LowRankBudget):
        left = torch.randn(d1, budget.rank, generator=gen) / math.sqrt(d1)
        right = torch.randn(budget.rank, d2, generator=gen) * INIT_STD * math.sqrt(d1 / budget.rank)
        return LowRankFactors(left, right)
    k, s = budget.atoms, budget.sparsity
    dictionary = torch.randn(d1, k, generator=gen)
    dictionary /= dictionary.norm(dim=0, keepdim=True)
    rows = torch.rand(k, d2, generator=gen).topk(s, dim=0).indices.sort(dim=0).values
    values = torch.randn(s, d2, generator=gen) * INIT_STD * math.sqrt(d1 / s)
    return SparseDictFactors(dictionary, rows, values)


def randomly_compressed(model: PreTrainedModel, method: str, ratio: float, options: SolverOptions,
                        seed: int) -> dict:
    """Replace every linear the model's adapter targets, in every block, by `method`'s
    module at `ratio` (uniform) with random factors (random_factors); returns the report
    `storage.checkpoint.save` records (method, ratio, options, synthetic)."""
    chosen = get_method(method)
    gen = torch.Generator().manual_seed(seed)
    for layer in decoder_layers(model):
        for name in adapter_for(model).targets:
            linear = layer.get_submodule(name)
            budget = chosen.budget(linear.in_features, linear.out_features, ratio, options)
            module = chosen.build([random_factors(budget, gen)], [linear.bias], linear.weight.dtype)[0]
            layer.set_submodule(name, module)
    return {"method": method, "ratio": ratio, "options": vars(options), "synthetic": "random factors"}


def save_random_folders(name: str, folders: dict[str, Path], ratio: float, options: SolverOptions, seed: int,
                        storage_dtype: str, coef_bits: int | None) -> None:
    """Save the random dense model of `name` (seed) to folders["dense"] and, for every other
    key (a method), that model randomly compressed (seed + 1) to its folder, each at
    `storage_dtype`; a folder already complete is kept."""
    dense = folders["dense"]
    if not (dense / "config.json").is_file():
        model, tokenizer = random_dense(name, seed)
        to_storage(model, storage_dtype)
        with atomic_folder(dense) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        del model
    for method, folder in folders.items():
        if method == "dense" or (folder / "cospadi.json").is_file():
            continue
        model, tokenizer = random_dense(name, seed)
        report = randomly_compressed(model, method, ratio, options, seed + 1)
        save(model, tokenizer, folder, report, dtype=storage_dtype, coef_bits=coef_bits)
        del model
