"""The capture and propagate passes: the hidden states (and keyword arguments) entering
block 0, and a block's outputs for given inputs."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import CospadiError

BlockKwargs = dict[int, dict]  # batch size -> keyword arguments of one block's forward


class _StopForward(Exception):
    """Raised by a capture hook to end a forward pass early."""


@torch.no_grad()
def capture_block_inputs(model: PreTrainedModel, layers: nn.ModuleList, input_ids: torch.Tensor,
                         batch_size: int) -> tuple[list[torch.Tensor], list[BlockKwargs]]:
    """Hidden states entering block 0 for `input_ids` (N, L), as a list of (B, L, H)
    batches, and for every block the keyword arguments the model passes it, per batch
    size. Each batch stops right after the embeddings, except the first batch of each size,
    which runs on to the last block to record every block's arguments (Gemma3's sliding
    and global layers get different masks and rotary tables)."""
    states: list[torch.Tensor] = []
    block_kwargs: list[BlockKwargs] = [{} for _ in layers]
    last = len(layers) - 1

    def hook_for(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if len(args) > 1:
                raise CospadiError(f"{type(module).__name__} received positional arguments beyond the hidden "
                                   "states; this transformers version is not supported")
            size = hidden.shape[0]
            if i == 0:
                states.append(hidden.detach())
            if size not in block_kwargs[i]:
                block_kwargs[i][size] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if i == last or size in block_kwargs[last]:
                raise _StopForward
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for batch in input_ids.split(batch_size):
            with contextlib.suppress(_StopForward):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return states, block_kwargs


@torch.no_grad()
def run_block(layer: nn.Module, states: list[torch.Tensor], kwargs: BlockKwargs) -> list[torch.Tensor]:
    """The block's outputs for each batch of input states."""
    outputs = []
    for hidden in states:
        out = layer(hidden, **kwargs[hidden.shape[0]])
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


@torch.no_grad()
def propagate(layer: nn.Module, states: list[torch.Tensor], kwargs: BlockKwargs) -> None:
    """Replace each batch of `states` by the block's outputs for it, in place: a batch's
    inputs are freed as soon as its outputs exist (no second copy of every batch)."""
    for b, hidden in enumerate(states):
        states[b] = run_block(layer, [hidden], kwargs)[0]
        del hidden
