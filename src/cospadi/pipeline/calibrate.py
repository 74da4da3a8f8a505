"""The calibrate pass: one float64 Gram X^T X per distinct linear input of a block,
accumulated while the block runs on its calibration inputs (docs/method.md "Objective
and whitening")."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..adapters import Adapter
from .capture import BlockKwargs, run_block

Fold = Callable[[dict[tuple[str, ...], list[torch.Tensor]]], dict[tuple[str, ...], torch.Tensor]]
ROWS = 256  # rows of a Gram widened at a time (add_widened)


def add_widened(gram: torch.Tensor, product: torch.Tensor, rows: int = ROWS) -> None:
    """gram += product in place, gram float64 and product float32 (d, d): the bits of
    gram + product.double() (float32 -> float64 is exact, the sum is one rounding), but
    `rows` rows at a time: torch's mixed-dtype add_ widens the whole of `product` into a
    (d, d) float64 temporary first (254 MB at d = 5632)."""
    for start in range(0, gram.shape[0], rows):
        gram[start:start + rows].add_(product[start:start + rows])


@torch.no_grad()
def accumulate_grams(layer: nn.Module, adapter: Adapter, states: list[torch.Tensor],
                     kwargs: BlockKwargs) -> dict[tuple[str, ...], torch.Tensor]:
    """One Gram X^T X (d1, d1) per input group of the adapter, over every calibration
    token entering the block: each batch's product is formed in float32 and summed in
    float64 across batches."""
    return calibrate_block(layer, adapter, states, kwargs)[0]


@torch.no_grad()
def calibrate_block(layer: nn.Module, adapter: Adapter, states: list[torch.Tensor], kwargs: BlockKwargs,
                    keep_outputs: bool = False, fold: Fold | None = None,
                    ) -> tuple[dict[tuple[str, ...], torch.Tensor], list[torch.Tensor] | None]:
    """accumulate_grams' Grams and, with `keep_outputs`, the block's outputs of the same
    run (one (B, L, H) tensor per batch of `states`; None otherwise). With `fold`
    (several ranks, distributed.py): the per-batch products are kept and fold(products)
    sums them with the other ranks' in global batch order."""
    grams: dict[tuple[str, ...], torch.Tensor] = {}
    products: dict[tuple[str, ...], list[torch.Tensor]] = {group: [] for group in adapter.groups}

    def hook_for(group: tuple[str, ...]) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            product = x.T @ x
            if fold is not None:
                products[group].append(product.double())
            elif group in grams:
                add_widened(grams[group], product)
            else:
                grams[group] = product.double()
        return hook

    handles = [layer.get_submodule(group[0]).register_forward_pre_hook(hook_for(group)) for group in adapter.groups]
    try:
        if keep_outputs:
            outputs = run_block(layer, states, kwargs)
        else:  # each batch's outputs are dropped at once
            for hidden in states:
                run_block(layer, [hidden], kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if fold is not None:
        grams = fold(products)
    return grams, outputs if keep_outputs else None
