"""Write a randomly initialised Llama checkpoint of any size as a sharded safetensors folder,
with the SmolLM2 tokenizer, without ever holding the model in memory (issue 18: the
block-by-block loading measurement, docs/scale.md).

    python benchmarks/make_random_llama.py OUT --hidden 2048 --intermediate 5632 --layers 24
    cospadi compress --lazy --model OUT --method svd-llm --ratio 0.3 --out OUT-svd-llm --eval-windows 0

The tensors are drawn one at a time (normal, std 0.02; norms at 1) from a generator seeded
per tensor name, and written a shard (--shard-mb) at a time; peak memory is one shard.
Prints the parameter count and the bytes written."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from cospadi.models import builtin_model_dir


def random_tensor(name: str, like: torch.Tensor, seed: int) -> torch.Tensor:
    """`like`'s shape in float32: ones for norms, else N(0, 0.02^2), seeded by name."""
    if name.endswith("norm.weight"):
        return torch.ones(like.shape)
    digest = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(digest)) * 0.02


def write_model(out: Path, config: LlamaConfig, shard_bytes: int, seed: int) -> int:
    """Write the weights of a LlamaForCausalLM of `config` to `out` in shards of about
    `shard_bytes`, with the index and config.json; returns the bytes of weights."""
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    names = {k: v for k, v in skeleton.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in names.items():
        nbytes = tensor.numel() * 4
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for k, keys in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, names[name], seed) for name in keys}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({name: file for name in keys})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="a new folder")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--untied", action="store_true", help="an output head of its own (default: tied, as SmolLM2)")
    parser.add_argument("--shard-mb", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
                         tie_word_embeddings=not args.untied, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, dtype="float32")
    total = write_model(out, config, args.shard_mb * 2**20, args.seed)
    tokenizer.save_pretrained(out)
    print(f"{out}: {total // 4 / 1e6:.0f} M parameters, {total / 2**30:.2f} GiB of float32 weights")


if __name__ == "__main__":
    main()
