"""Saving and reloading per-group models: a shared dictionary (or basis) is one tensor in
the safetensors file, config.json names its owner in every other holder's entry, the
reload is bit-identical and its holders share one Parameter again; byte figures count
the shared factor once; a damaged `shares` entry is a clear error."""
import json

import pytest
import torch
from safetensors import safe_open

from cospadi.adapters import ATTENTION, GATE_UP
from cospadi.errors import CospadiError
from cospadi.pipeline import Recipe, compress_blocks, unique_param_count
from cospadi.storage.checkpoint import load, save
from cospadi.storage.folder_report import stored_linear_bytes
from cospadi.storage.sharing import shared_factors

SHARED = ATTENTION + GATE_UP  # the Llama family's linears that share a factor across a group


@pytest.fixture
def grouped_model(tiny_llama, tiny_ids):
    """Factory: (tiny_llama of `layers` blocks compressed by `method` in groups of 2, its report dict)."""
    def make(method: str, layers: int = 3) -> tuple[torch.nn.Module, dict]:
        model = tiny_llama(layers)
        recipe = Recipe(method, 0.3, group_size=2, share=("q", "k", "v", "gate", "up"))  # more than cospadi's default
        report = compress_blocks(model, tiny_ids, recipe, batch_size=3, progress=False)
        return model, report.to_dict()
    return make


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("method,dtype,coef_bits", [("cospadi", None, None), ("cospadi", "bfloat16", 14),
                                                    ("basis-sharing", None, None)])
def test_a_shared_factor_is_stored_once_and_reloads_shared(method, dtype, coef_bits, tmp_path, grouped_model, tiny_ids):
    model, report = grouped_model(method)
    shares = shared_factors(model)
    # blocks 0 and 1 form a group; block 2 is alone: its modules own their factors
    assert shares == {f"model.layers.1.{name}": f"model.layers.0.{name}" for name in SHARED}
    out = save(model, None, tmp_path / "out", report, dtype=dtype, coef_bits=coef_bits)
    expected = logits(model, tiny_ids)  # after save: the model holds what the folder holds
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
    assert torch.equal(logits(loaded, tiny_ids), expected)
    assert shared_factors(loaded) == shares
    for holder, owner in shares.items():
        h, o = loaded.get_submodule(holder), loaded.get_submodule(owner)
        assert getattr(h, h.shared_factor) is getattr(o, o.shared_factor)
    assert unique_param_count(loaded) == unique_param_count(model)
    # the reloaded model saves again the same way
    again = save(loaded, None, tmp_path / "again", report, dtype=dtype, coef_bits=coef_bits)
    assert torch.equal(logits(load(again)[0], tiny_ids), expected)


def _rewrite_shares(folder, holder: str, owner: str) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["modules"][holder]["shares"] = owner
    path.write_text(json.dumps(config))
    description = json.loads((folder / "cospadi.json").read_text())
    description.pop("checksums"), description.pop("digest")  # as saved before checksums: the check behind them
    (folder / "cospadi.json").write_text(json.dumps(description))


@pytest.mark.parametrize("owner", ["model.layers.2.self_attn.q_proj", "model.layers.0.no_such_proj",
                                   "model.layers.0.mlp.down_proj"])
def test_a_damaged_shares_entry_is_a_clear_error(owner, tmp_path, grouped_model):
    model, report = grouped_model("cospadi")
    out = save(model, None, tmp_path / "out", report)
    _rewrite_shares(out, "model.layers.1.self_attn.q_proj", owner)
    with pytest.raises(CospadiError, match="corrupt"):
        load(out)
