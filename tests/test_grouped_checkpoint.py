"""Saving and reloading per-group models: a shared dictionary (or basis) is one tensor in
the safetensors file, config.json names its owner in every other holder's entry, the
reload is bit-identical and its holders share one Parameter again; byte figures count
the shared factor once; a damaged `shares` entry is a clear error."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from cospadi.storage.checkpoint import load, save
from cospadi.errors import CospadiError
from cospadi.storage.folder_report import stored_linear_bytes
from cospadi.groups import SHARED
from cospadi.pipeline import compress_blocks, unique_param_count
from cospadi.storage.sharing import factor_name, shared_factors

IDS = torch.randint(0, 200, (6, 20), generator=torch.Generator().manual_seed(2))


def grouped_model(method: str, layers: int = 3) -> tuple[LlamaForCausalLM, dict]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    report = compress_blocks(model, IDS, method, 0.3, batch_size=3, progress=False, group_size=2)
    return model, report.to_dict()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("method,dtype,coef_bits", [("cospadi", None, None), ("cospadi", "bfloat16", 14),
                                                    ("basis-sharing", None, None)])
def test_a_shared_factor_is_stored_once_and_reloads_shared(method, dtype, coef_bits, tmp_path):
    model, report = grouped_model(method)
    shares = shared_factors(model)
    # blocks 0 and 1 form a group; block 2 is alone: its modules own their factors
    assert shares == {f"model.layers.1.{name}": f"model.layers.0.{name}" for name in SHARED}
    out = save(model, None, tmp_path / "out", report, dtype=dtype, coef_bits=coef_bits)
    expected = logits(model)  # after save: the model holds what the folder holds
    factor = "dictionary" if method == "cospadi" else "left"
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        stored = sum(fh.get_tensor(k).numel() * fh.get_tensor(k).element_size() for k in keys
                     if ".layers." in k and not k.endswith("bias") and "layernorm" not in k)
    for holder, owner in shares.items():
        assert f"{owner}.{factor}" in keys and f"{holder}.{factor}" not in keys
    assert stored == stored_linear_bytes(model)[0]  # REPORT.md's byte figure: the shared factor once
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert {n: s["shares"] for n, s in modules.items() if "shares" in s} == shares

    loaded, _ = load(out)
    assert torch.equal(logits(loaded), expected)
    assert shared_factors(loaded) == shares
    for holder, owner in shares.items():
        h, o = loaded.get_submodule(holder), loaded.get_submodule(owner)
        assert getattr(h, factor_name(h)) is getattr(o, factor_name(o))
    assert unique_param_count(loaded) == unique_param_count(model)
    # the reloaded model saves again the same way
    again = save(loaded, None, tmp_path / "again", report, dtype=dtype, coef_bits=coef_bits)
    assert torch.equal(logits(load(again)[0]), expected)


def _rewrite_shares(folder, holder: str, owner: str) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["modules"][holder]["shares"] = owner
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("owner", ["model.layers.2.self_attn.q_proj", "model.layers.0.no_such_proj",
                                   "model.layers.0.mlp.down_proj"])
def test_a_damaged_shares_entry_is_a_clear_error(owner, tmp_path):
    model, report = grouped_model("cospadi")
    out = save(model, None, tmp_path / "out", report)
    _rewrite_shares(out, "model.layers.1.self_attn.q_proj", owner)
    with pytest.raises(CospadiError, match="corrupt"):
        load(out)
