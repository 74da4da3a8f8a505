"""Digests of the folders `cospadi.save` writes for tiny Llama and Qwen2 models under every
method (per layer and per group, plain and bf16 + 14-bit coefficients), with each
matrix's output error, to check that a refactor keeps the saved bytes.

    python benchmarks/folder_digests.py after.json
    git worktree add /tmp/before <old commit>
    PYTHONPATH=/tmp/before/src python benchmarks/folder_digests.py before.json   (adapt the
        compress_blocks call to the old API when it differs) and compare the two files.
"""
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import cospadi
from cospadi.pipeline import Recipe, compress_blocks
from cospadi.solvers import SolverOptions


def build(kind):
    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False)).eval()

def digest(folder):
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.name not in ("cospadi.json", "REPORT.md"):
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    report = json.loads((Path(folder) / "cospadi.json").read_text())["report"]
    out["errors"] = [round(m["output_error"], 12) for m in report["matrices"]]
    out["REPORT.md"] = hashlib.sha256((Path(folder) / "REPORT.md").read_bytes()).hexdigest()[:16]
    return out

ids = torch.randint(0, 300, (6, 24), generator=torch.Generator().manual_seed(1))
result = {}
for kind in ("llama", "qwen2"):
    for method, group in (("svd", 1), ("svd-llm", 1), ("basis-sharing", 2), ("cospadi", 1), ("cospadi", 2), ("cospadi", 3)):
        for store in ("plain", "compact"):
            model = build(kind)
            report = compress_blocks(model, ids, Recipe(method, 0.3, SolverOptions(), group), progress=False, workers=1)
            d = report.to_dict()
            d["seconds"] = d["peak_rss_mb"] = 0
            for m in d["matrices"]:
                m["seconds"] = 0
            with tempfile.TemporaryDirectory() as tmp:
                kw = dict(dtype="bfloat16", coef_bits=14 if method == "cospadi" else None) if store == "compact" else {}
                cospadi.save(model, None, Path(tmp) / "o", d, **kw)
                result[f"{kind}-{method}-g{group}-{store}"] = digest(Path(tmp) / "o")
                try:
                    m2, _ = cospadi.load(Path(tmp) / "o")
                except AttributeError:  # the old code cannot reload Qwen2 per-group folders
                    result[f"{kind}-{method}-g{group}-{store}"]["reload"] = "fails"
                    continue
                with torch.no_grad():
                    a, b = model(ids[:2]).logits, m2(ids[:2]).logits
                assert torch.equal(a, b), "reload differs"
Path(sys.argv[1]).write_text(json.dumps(result, indent=1, sort_keys=True))
print(len(result), "cells")
