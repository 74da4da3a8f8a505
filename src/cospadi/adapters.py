"""Architecture adapters: per model family, which linear layers of a decoder block are
compressed, which of them read the same input (and so share one Gram matrix), and which
share one factor across the blocks of a group in per-group mode. A new family is one
entry in ADAPTERS (with its own groups and shared names when its projections differ,
e.g. a fused qkv_proj)."""
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
    order the block runs them. Every name in every group is compressed. `shared`: the
    names whose factor the blocks of a group share (the Basis Sharing protocol: q, k, v,
    gate and up; o and down stay per layer, docs/method.md "Per-group mode")."""

    family: str
    groups: tuple[tuple[str, ...], ...] = (ATTENTION, OUTPUT, GATE_UP, DOWN)
    shared: tuple[str, ...] = ATTENTION + GATE_UP

    def __post_init__(self) -> None:
        stray = [name for name in self.shared if name not in self.targets]
        if stray:
            raise ValueError(f"adapter {self.family}: shared linears {stray} are not among its targets")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    def shares(self, name: str) -> bool:
        """Whether the linear `name` shares its factor across the blocks of a group."""
        return name in self.shared


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
