"""`cospadi export --dense` (export.py): the exported folder is a plain transformers
checkpoint (no quantization entry, only nn.Linear layers, the dense model's tensor names),
it loads in a process that never imports cospadi, and its logits match the in-memory
compressed model up to float rounding, for every module type and a biased family."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import cospadi
from cospadi.errors import CospadiError
from cospadi.layers.linear import DictLinear, LowRankLinear
from cospadi.pipeline import Recipe, compress_blocks
from cospadi.solvers import SolverOptions
from cospadi.storage.export import densify, export_dense

TIED = {"llama": dict(tie_word_embeddings=True), "qwen2": dict(tie_word_embeddings=False), "gemma3": {}}


def ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, input_ids):
    return model(input_ids=input_ids, use_cache=False).logits


@pytest.fixture
def saved(tiny_model, calibration_ids):
    """Factory: a fresh tiny `family` model (tied embeddings for llama, biased q/k/v for
    qwen2, sliding layers for gemma3) compressed by `method` and saved to `folder` with
    `storage` (dtype, coef_bits); returns (model, the dense model's state_dict keys)."""
    def make(family: str, method: str, folder, **storage):
        model = tiny_model(family, **TIED[family])
        dense_keys = set(model.state_dict())
        report = compress_blocks(model, calibration_ids, Recipe(method, 0.3, SolverOptions(iters=1)), batch_size=4,
                                 progress=False)
        cospadi.save(model, None, folder, report.to_dict(), **storage)
        return model, dense_keys
    return make


@pytest.mark.parametrize("family,method", [("llama", "cospadi"), ("qwen2", "cospadi"), ("gemma3", "cospadi"),
                                           ("qwen2", "svd-llm")])
def test_export_matches_the_compressed_model(family, method, tmp_path, saved):
    model, dense_keys = saved(family, method, tmp_path / "cospadi")
    out = export_dense(tmp_path / "cospadi", tmp_path / "dense")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "_is_quantized" not in config
    assert not list(out.glob("cospadi.json")) and sorted(p.name for p in tmp_path.iterdir()) == ["cospadi", "dense"]
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert set(exported.state_dict()) == dense_keys  # exactly the dense model's tensors
    assert not any(isinstance(m, (DictLinear, LowRankLinear)) for m in exported.modules())
    for input_ids in (ids(5), ids(6)[:1, :1]):
        expected = logits(model, input_ids)
        error = float((logits(exported, input_ids) - expected).norm() / expected.norm())
        assert error < 1e-5, error


def test_export_keeps_or_changes_the_dtype(tmp_path, saved):
    model, _ = saved("llama", "cospadi", tmp_path / "cospadi", dtype="bfloat16", coef_bits=14)
    out = export_dense(tmp_path / "cospadi", tmp_path / "dense")
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.dtype == torch.bfloat16
    w = model.model.layers[1].mlp.up_proj.dense_weight()
    assert torch.equal(exported.model.layers[1].mlp.up_proj.weight, w.T)
    export_dense(tmp_path / "cospadi", tmp_path / "dense32", dtype="float32")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "dense32").dtype == torch.float32


def test_exported_folder_loads_without_cospadi(tmp_path, saved):
    model, _ = saved("qwen2", "cospadi", tmp_path / "cospadi")
    export_dense(tmp_path / "cospadi", tmp_path / "dense")
    torch.save(ids(2), tmp_path / "ids.pt")
    script = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'dense')!r})\n"
              "assert not [k for k in sys.modules if k.startswith('cospadi')]\n"
              f"with torch.no_grad(): out = m(torch.load({str(tmp_path / 'ids.pt')!r})).logits\n"
              f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = logits(model, ids(2))
    assert float((torch.load(tmp_path / "out.pt") - expected).norm() / expected.norm()) < 1e-5


def test_densify_in_memory_and_export_errors(tmp_path, saved):
    model, _ = saved("llama", "svd-llm", tmp_path / "cospadi")
    before = logits(model, ids(4))
    densify(model)
    assert not hasattr(model.config, "quantization_config")
    assert torch.allclose(logits(model, ids(4)), before, atol=1e-5)
    with pytest.raises(CospadiError, match="is the source folder"):
        export_dense(tmp_path / "cospadi", tmp_path / "cospadi")
    with pytest.raises(CospadiError, match="does not exist"):
        export_dense(tmp_path / "missing", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cospadi"]
