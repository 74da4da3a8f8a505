"""Quantized models end to end on a tiny random Llama: every method with every --quant
saves packed codes and scales, and reloads (cospadi.load and plain from_pretrained after
`import cospadi`) bit-identical to the model in memory, at the saved dtype and at bf16;
both forward paths of a quantized dictionary agree; `export --dense` still works; the
report counts the real bytes."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import cospadi
from cospadi.layers.linear import forward_path
from cospadi.layers.quantized import QuantDictLinear, QuantLinear, QuantLowRankLinear
from cospadi.storage import export
from cospadi.storage.folder_report import stored_linear_bytes

KINDS = {"cospadi": QuantDictLinear, "svd-llm": QuantLowRankLinear, "svd": QuantLowRankLinear, "rtn": QuantLinear,
         "gptq": QuantLinear}
GROUP = 24  # does not divide 32 or 64: partial last groups everywhere


def compressed(tiny_llama, tiny_ids, method: str, quant: str, group: int = GROUP):
    model = tiny_llama(2, seed=0)
    model, report = cospadi.compress(model, None, input_ids=tiny_ids, method=method, ratio=0.3, quant=quant,
                                     quant_group=group, progress=False,
                                     allocation=None if method in ("rtn", "gptq") else "uniform")
    return model, report


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("quant", ["int8", "int4", "int3"])
@pytest.mark.parametrize("method", ["cospadi", "svd-llm", "rtn", "gptq"])
def test_save_and_reload_are_bit_identical(method, quant, tiny_llama, tiny_ids, tmp_path):
    model, report = compressed(tiny_llama, tiny_ids, method, quant)
    module = model.model.layers[1].mlp.down_proj
    assert isinstance(module, KINDS[method]) and module.bits == int(quant[3:]) and module.group == GROUP
    expected = logits(model, tiny_ids[:2])
    folder = cospadi.save(model, None, tmp_path / "out", report.to_dict())
    assert torch.equal(logits(model, tiny_ids[:2]), expected)  # saving changed nothing in memory
    for again in (cospadi.load(folder)[0], AutoModelForCausalLM.from_pretrained(folder)):
        assert torch.equal(logits(again, tiny_ids[:2]), expected)
        theirs = again.state_dict()
        for key, tensor in model.state_dict().items():
            assert torch.equal(theirs[key], tensor), key
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    spec = config["modules"]["model.layers.1.mlp.down_proj"]
    assert spec["type"] == KINDS[method].kind and spec["bits"] == int(quant[3:]) and spec["group"] == GROUP


@pytest.mark.parametrize("method", ["cospadi", "svd-llm", "gptq"])
def test_packed_codes_on_disk_and_real_bytes_in_the_report(method, tiny_llama, tiny_ids, tmp_path):
    model, report = compressed(tiny_llama, tiny_ids, method, "int4")
    folder = cospadi.save(model, None, tmp_path / "out", report.to_dict(), dtype="bfloat16")
    module = model.model.layers[0].mlp.gate_proj  # 32 x 64
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = [n for n in f.keys() if n.startswith("model.layers.0.mlp.gate_proj.")]  # noqa: SIM118
        tensors = {n.rsplit(".", 1)[1]: f.get_tensor(n) for n in names}
    codes = [t for n, t in tensors.items() if n.endswith("_codes")]
    scales = [t for n, t in tensors.items() if n.endswith("_scales")]
    assert codes and all(t.dtype == torch.uint8 for t in codes) and all(t.dtype == torch.int16 for t in scales)
    assert not any(t.is_floating_point() for t in tensors.values())  # no dequantized copy on disk
    numbers = sum(module.quant_tensor(name).codes.numel() for name in module.quantized)
    assert sum(t.numel() for t in codes) == sum((module.quant_tensor(n).codes.numel() + 1) // 2 for n in module.quantized)
    assert numbers > 0
    stored, dense = stored_linear_bytes(model)
    text = (folder / "REPORT.md").read_text()
    assert "int4 codes with one bf16 scale per 24 inputs" in text
    assert f"{stored / 2**20:.1f} MiB stored" in text and stored < 0.4 * dense


def test_bf16_storage_reloads_what_the_converted_model_computes(tiny_llama, tiny_ids, tmp_path):
    model, report = compressed(tiny_llama, tiny_ids, "cospadi", "int8")
    folder = cospadi.save(model, None, tmp_path / "out", report.to_dict(), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    again, _ = cospadi.load(folder)
    assert torch.equal(logits(again, tiny_ids[:2]), logits(model, tiny_ids[:2]))
    as_float, _ = cospadi.load(folder, dtype="float32")  # codes x scales straight into float32: exact
    module, held = as_float.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.q_proj
    assert module.dictionary.dtype == torch.float32
    assert torch.equal(module.dictionary, held.quant_tensor("dictionary").dequantize(torch.float32))
    assert torch.equal(module.dictionary.to(torch.bfloat16), held.dictionary)


def test_both_forward_paths_of_a_quantized_dictionary_agree(tiny_llama, tiny_ids):
    model, _ = compressed(tiny_llama, tiny_ids, "cospadi", "int4")
    with forward_path(model, "dense"):
        dense = logits(model, tiny_ids[:1, :8])
    with forward_path(model, "sparse"):
        sparse = logits(model, tiny_ids[:1, :8])
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["cospadi", "rtn"])
def test_export_dense_after_quantization(method, tiny_llama, tiny_ids, tmp_path):
    model, report = compressed(tiny_llama, tiny_ids, method, "int4")
    folder = cospadi.save(model, None, tmp_path / "out", report.to_dict())
    out = export.export_dense(folder, tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert isinstance(plain.model.layers[0].mlp.up_proj, torch.nn.Linear)
    torch.testing.assert_close(logits(plain, tiny_ids[:2]), logits(model, tiny_ids[:2]), rtol=1e-4, atol=1e-4)


def test_quantized_output_error_is_reported_and_shrinks_with_bits(tiny_llama, tiny_ids):
    errors = {}
    for quant in ("int3", "int8"):
        _, report = compressed(tiny_llama, tiny_ids, "gptq", quant)
        errors[quant] = sum(m.output_error for m in report.matrices)
        assert report.ratio == 0.0 and all(m.output_error > 0 for m in report.matrices)
    assert errors["int8"] < errors["int3"] / 4


def test_an_interrupted_quantized_run_resumes_to_the_same_model(tiny_llama, tiny_ids, tmp_path, monkeypatch):
    """Progress files hold the stored form (codes, scales, mask); resuming rebuilds the
    quantized modules from them and the result equals an uninterrupted run."""
    from cospadi import resume
    from cospadi.pipeline import Recipe, compress_blocks
    from cospadi.solvers import SolverOptions
    from cospadi.solvers.quantize import QuantSpec

    recipe = Recipe("cospadi", 0.3, SolverOptions(), 1, None, QuantSpec(4, GROUP))
    whole = tiny_llama(2, seed=0)
    compress_blocks(whole, tiny_ids, recipe, progress=False, workers=1)
    real_save, calls = resume.save_progress, []

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr("cospadi.pipeline.run.save_progress", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        compress_blocks(tiny_llama(2, seed=0), tiny_ids, recipe, progress=False, workers=1, resume_dir=tmp_path / "r")
    monkeypatch.setattr("cospadi.pipeline.run.save_progress", real_save)
    resumed = tiny_llama(2, seed=0)
    compress_blocks(resumed, tiny_ids, recipe, progress=False, workers=1, resume_dir=tmp_path / "r")
    assert isinstance(resumed.model.layers[0].mlp.up_proj, QuantDictLinear)
    assert torch.equal(logits(resumed, tiny_ids[:2]), logits(whole, tiny_ids[:2]))
