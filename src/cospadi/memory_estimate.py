"""What a compression run will need in memory, from the model's shapes alone (a meta
skeleton will do), printed before the run starts (`cospadi compress`).

The parts (bytes): the weights outside the blocks (embeddings, final norm, head; tied
ones once); the blocks held at a time (all of them when the model is loaded whole, one
group when loaded block by block, pipeline/lazy.py); the calibration hidden states
(inputs and outputs of a block, at the model's dtype); the group's float64 Grams; the
transient activations of one block's forward on one batch (MLP and attention scores);
the solvers' work space (about 6 float64 copies of the largest matrix per worker); and
RUNTIME for the interpreter, torch and transformers. It is an estimate: allocator
slack and solver temporaries vary, measured peaks were within 25% of it (docs/scale.md)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from .adapters import adapter_for, decoder_layers

RUNTIME = 400 * 2**20  # python, torch, transformers and the tokenizer, measured on CPU
GiB, MiB = 2**30, 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per part (module doc) and where each part lives."""

    host: dict[str, int]
    device: dict[str, int]

    def describe(self) -> str:
        """One line: host (and device) totals with their largest parts."""
        def side(parts: dict[str, int]) -> str:
            detail = ", ".join(f"{name} {size / MiB:.0f}" for name, size in parts.items() if size >= MiB)
            return f"{sum(parts.values()) / GiB:.2f} GiB (MiB: {detail})"
        device = side(self.device) if self.device else "none (the run stays on the CPU)"
        return f"memory estimate: host {side(self.host)}; device {device}"


def _bytes(tensors: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _shape(linear: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer."""
    return int(getattr(linear, "in_features")), int(getattr(linear, "out_features"))  # noqa: B009


def estimate_memory(model: PreTrainedModel, samples: int, seq_len: int, batch_size: int, group_size: int,
                    workers: int, lazy: bool, device: torch.device) -> MemoryEstimate:
    """The MemoryEstimate of compressing `model` (real or meta tensors: only shapes are
    read) on `samples` x `seq_len` calibration tokens, `batch_size` windows per forward,
    in groups of `group_size` blocks, `workers` solves at once, the blocks loaded one
    group at a time when `lazy`, the work on `device` (the model staying on the CPU)."""
    layers = decoder_layers(model)
    in_blocks = {id(p) for p in layers.parameters()}
    outside = _bytes([p for p in model.parameters() if id(p) not in in_blocks])
    block = max(_bytes(list(layer.parameters())) for layer in layers)
    group = min(group_size, len(layers))
    adapter = adapter_for(model)
    shapes = {name: _shape(layers[0].get_submodule(name)) for name in adapter.targets}
    widths = [shapes[names[0]][0] for names in adapter.groups]
    largest = max(d1 * d2 for d1, d2 in shapes.values())
    config = getattr(model, "config", None)
    hidden = widths[0]
    inner = int(getattr(config, "intermediate_size", 4 * hidden))
    heads = int(getattr(config, "num_attention_heads", 1))
    itemsize = next(model.parameters()).element_size()
    work = {
        "one group of blocks" if lazy else "blocks being compressed": group * block if lazy or device.type != "cpu" else 0,
        "hidden states": 2 * samples * seq_len * hidden * itemsize,
        "Grams": group * sum(8 * w * w for w in widths),
        "block forward": batch_size * seq_len * (4 * inner + heads * seq_len) * 4,
        "solvers": workers * 6 * 8 * largest,
    }
    host = {"outside the blocks": outside, "runtime": RUNTIME}
    if not lazy:
        host["all blocks"] = len(layers) * block
    if device.type == "cpu":
        return MemoryEstimate({**host, **work}, {})
    return MemoryEstimate(host, work)
