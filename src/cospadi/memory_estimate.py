"""What a compression run will need in memory, from the model's shapes alone (a meta
skeleton will do), printed before the run starts (`cospadi compress`).

The parts (bytes):
- RUNTIME: the interpreter, torch, transformers and the tokenizer;
- the weights outside the blocks (embeddings, final norm, head; tied ones once);
- the blocks held at a time: all of them when the model is loaded whole, one group when
  loaded block by block (pipeline/lazy.py);
- the calibration hidden states: one copy at the model's dtype (propagation replaces each
  batch in place), two in groups of several blocks (a block's dense outputs feed the
  next one), plus one batch of outputs;
- the group's float64 Grams;
- the larger of the block forward (one batch's MLP activations and attention scores in
  float32, plus the float32 product of the widest Gram) and the solvers' work space,
  per worker: the larger of one float64 (d1, d1) matrix of the widest input (the
  symmetrised Gram, factored in place) and 5 float64 copies of the largest matrix
  (svd-llm: the whitened matrix, the SVD's copy, U and Vh, LAPACK's work space; the
  Cholesky factor is dropped during the SVD, solvers/lowrank.py).

All of the group's blocks and Grams are counted through the solve, although one worker
releases each job's weights and Grams once it is solved, smallest jobs first
(pipeline/solve.py): the estimate errs high.

Block by block, the embeddings and head are released after the capture pass and read
again for the save (pipeline/lazy.py), so the host peak is the largest of three phases:
the capture (outside + hidden states), the block loop (one group and its work) and the
save (outside + one tensor). The measured peak was at most 20% below the estimate
(docs/scale.md, tests/test_memory_estimate.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from .adapters import adapter_for, decoder_layers

RUNTIME = 550 * 2**20  # python, torch, transformers, the model skeleton and allocator slack: RSS entering the
# block loop of a lazy run, less its hidden states (measured on the issue-18 Llama, docs/scale.md)
GiB, MiB = 2**30, 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per part (module doc) at the peak, and where each part lives."""

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


def _work(model: PreTrainedModel, samples: int, seq_len: int, batch_size: int, group: int,
          workers: int) -> dict[str, int]:
    """The block-side parts of one group's turn: hidden states, Grams, and the larger of
    the block forward and the solvers (module doc)."""
    layers = decoder_layers(model)
    adapter = adapter_for(model)
    shapes = {name: _shape(layers[0].get_submodule(name)) for name in adapter.targets}
    widths = [shapes[names[0]][0] for names in adapter.groups]
    config = getattr(model, "config", None)
    hidden = widths[0]
    inner = int(getattr(config, "intermediate_size", 4 * hidden))
    heads = int(getattr(config, "num_attention_heads", 1))
    itemsize = next(model.parameters()).element_size()
    largest = max(d1 * d2 for d1, d2 in shapes.values())
    forward = batch_size * seq_len * (4 * inner + heads * seq_len) * 4 + 4 * max(widths) ** 2
    solvers = workers * 8 * max(max(d1 for d1, _ in shapes.values()) ** 2, 5 * largest)
    return {
        "hidden states": ((2 if group > 1 else 1) * samples + batch_size) * seq_len * hidden * itemsize,
        "Grams": group * sum(8 * w * w for w in widths),
        "solvers" if solvers >= forward else "block forward": max(solvers, forward),
    }


def estimate_memory(model: PreTrainedModel, samples: int, seq_len: int, batch_size: int, group_size: int,
                    workers: int, lazy: bool, device: torch.device) -> MemoryEstimate:
    """The MemoryEstimate of compressing `model` (real or meta tensors: only shapes are
    read) on `samples` x `seq_len` calibration tokens, `batch_size` windows per forward,
    in groups of `group_size` blocks, `workers` solves at once, the blocks loaded one
    group at a time when `lazy`, the work on `device` (the model staying on the CPU).
    The parts are those of the phase with the highest host peak (module doc)."""
    layers = decoder_layers(model)
    in_blocks = {id(p) for p in layers.parameters()}
    outside = _bytes([p for p in model.parameters() if id(p) not in in_blocks])
    block = max(_bytes(list(layer.parameters())) for layer in layers)
    group = min(group_size, len(layers))
    work = _work(model, samples, seq_len, batch_size, group, workers)
    held = {"one group of blocks": group * block} if lazy else {"all blocks": len(layers) * block}
    on_cpu = device.type == "cpu"
    if not lazy:
        host = {"runtime": RUNTIME, "outside the blocks": outside, **held}
        return MemoryEstimate({**host, **work}, {}) if on_cpu else \
            MemoryEstimate(host, {"blocks being compressed": group * block, **work})
    capture = {"runtime": RUNTIME, "outside the blocks": outside, "hidden states": work["hidden states"]}
    loop = {"runtime": RUNTIME, **held, **work} if on_cpu else {"runtime": RUNTIME, **held}
    host = max(capture, loop, key=lambda parts: sum(parts.values()))
    return MemoryEstimate(host, {}) if on_cpu else MemoryEstimate(host, {**held, **work})
