"""Shared factors on disk. In per-group mode several compressed modules hold the SAME
nn.Parameter as their left factor (DictLinear.dictionary, LowRankLinear.left). A saved
folder stores it once, under its owner (the first module holding it, in model order),
and config.json's module entry of every other holder says `"shares": "<owner module>"`.

Both directions use transformers' own tied-weights machinery, as it does for tied input
and output embeddings: while saving, each holder declares its factor in
`_tied_weights_keys`, so save_pretrained drops the duplicates instead of refusing shared
tensors; while loading, the quantizer ties each holder to its owner and registers the
pair in `model.all_tied_weights_keys`, so the absent copies are not reported missing and
from_pretrained re-ties them after the weights are read."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..errors import CospadiError
from ..layers.base import compressed_modules


def shared_factors(model: nn.Module) -> dict[str, str]:
    """{holder module name: owner module name} for every compressed module whose left
    factor is the same Parameter as that of an earlier one (the owner, which is absent)."""
    owners: dict[int, str] = {}
    shares = {}
    for name, module in compressed_modules(model):
        factor = getattr(module, module.shared_factor)
        if id(factor) in owners:
            shares[name] = owners[id(factor)]
        else:
            owners[id(factor)] = name
    return shares


@contextmanager
def declared_for_saving(model: nn.Module) -> Iterator[dict[str, str]]:
    """Within the block, every holder of a shared factor lists it in `_tied_weights_keys`,
    so model.save_pretrained writes the factor once (under its owner). Yields
    shared_factors(model); the declarations are removed afterwards."""
    shares = shared_factors(model)
    holders = [model.get_submodule(name) for name in shares]
    for holder, owner in zip(holders, shares.values()):
        holder._tied_weights_keys = {holder.shared_factor: f"{owner}.{holder.shared_factor}"}
    try:
        yield shares
    finally:
        for holder in holders:
            holder.__dict__.pop("_tied_weights_keys", None)


def tie_shared(model: nn.Module, shares: dict[str, str]) -> None:
    """Make each holder in `shares` ({holder: owner}, as in config.json) hold its owner's
    factor Parameter and register the pair as tied weights (holder key -> owner key) in
    `model.all_tied_weights_keys` when the model has one (transformers models). CospadiError
    when an owner is not an earlier compressed module of the same kind and factor shape."""
    modules = dict(compressed_modules(model))
    order = list(modules)
    tied = getattr(model, "all_tied_weights_keys", None)
    for holder_name, owner_name in shares.items():
        holder, owner = modules.get(holder_name), modules.get(owner_name)
        if holder is None or owner is None or type(holder) is not type(owner) \
                or order.index(owner_name) >= order.index(holder_name) or owner_name in shares:
            raise CospadiError(f"config.json: {holder_name} shares the factor of {owner_name!r}, which is not an earlier "
                               "compressed module of the same kind that owns its factor; the folder is corrupt")
        name = holder.shared_factor
        if getattr(holder, name).shape != getattr(owner, name).shape:
            raise CospadiError(f"config.json: {holder_name} and {owner_name} share a factor but have different "
                               "shapes; the folder is corrupt")
        setattr(holder, name, getattr(owner, name))
        if isinstance(tied, dict):
            tied[f"{holder_name}.{name}"] = f"{owner_name}.{name}"
