"""How much the model's loss cares about each linear's output (docs/allocation.md
"Costs"): the mean squared gradient of the calibration loss with respect to the linear's
outputs, per token and output channel. With the empirical Fisher approximation of the
loss curvature, an output error E = X (W - W') whose direction is unrelated to the
gradient raises the summed loss by about 0.5 * sensitivity * ||E||_F^2, which makes
whitened errors of different blocks and kinds comparable.

One forward and backward pass of the dense model over the calibration windows, with
gradients taken for the activations only (the weights' gradients are never formed)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from ..adapters import adapter_for, decoder_layers


def output_sensitivities(model: PreTrainedModel, input_ids: torch.Tensor,
                         batch_size: int = 2) -> dict[tuple[int, str], float]:
    """(block, linear name) -> sum over tokens of ||dL/dy_t||^2 / (tokens * d2), where L
    is the summed next-token cross entropy over `input_ids` (N, T) and y_t the linear's
    output at token t. Batches of `batch_size` windows bound the activation memory."""
    adapter, layers = adapter_for(model), decoder_layers(model)
    sums: dict[tuple[int, str], float] = {}
    counts: dict[tuple[int, str], int] = {}

    def hook_for(key: tuple[int, str]) -> Callable:
        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            def grad_hook(grad: torch.Tensor) -> None:
                sums[key] = sums.get(key, 0.0) + float(grad.float().pow(2).sum())
                counts[key] = counts.get(key, 0) + grad.numel()
            output.register_hook(grad_hook)
        return forward_hook

    handles = [layers[i].get_submodule(name).register_forward_hook(hook_for((i, name)))
               for i in range(len(layers)) for name in adapter.targets]
    flags = [p.requires_grad for p in model.parameters()]
    device = next(model.parameters()).device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            for batch in input_ids.split(batch_size):
                batch = batch.to(device)
                embeds = model.get_input_embeddings()(batch).detach().requires_grad_(True)
                loss = model(inputs_embeds=embeds, labels=batch, use_cache=False).loss
                (loss * (batch.numel() - batch.shape[0])).backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return {key: sums[key] / counts[key] for key in sums}
