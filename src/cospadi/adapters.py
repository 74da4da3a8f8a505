"""Architecture adapters: which linear layers of a decoder block are compressed, and
which of them read the same input (and so share one Gram matrix)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from .errors import CospadiError

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
OUTPUT = ("self_attn.o_proj",)
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
DOWN = ("mlp.down_proj",)


@dataclass(frozen=True)
class Adapter:
    """`groups`: tuples of linear names (relative to a block) that read one input, in the
    order the block runs them. Every name in every group is compressed."""

    family: str
    groups: tuple[tuple[str, ...], ...] = (ATTENTION, OUTPUT, GATE_UP, DOWN)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)


# Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 and Gemma3 (q/k norms) all name their
# projections alike; biases and norms stay untouched inside the block.
ADAPTERS: dict[str, Adapter] = {family: Adapter(family) for family in
                                ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")}


def adapter_for(model: PreTrainedModel) -> Adapter:
    """The adapter for model.config.model_type; CospadiError listing the supported ones."""
    family = getattr(model.config, "model_type", None)
    if family not in ADAPTERS:
        raise CospadiError(f"architecture {family!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[family]


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The ModuleList of decoder blocks, in order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise CospadiError(f"could not find the decoder blocks of {type(model).__name__}: expected `.layers` on its decoder")
    return layers
