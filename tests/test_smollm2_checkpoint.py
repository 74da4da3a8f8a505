"""The real SmolLM2-135M with every q/k/v/o/gate/up/down linear of all 30 blocks in
CoSpaDi's dictionary form at ratio 0.3 (rho = 2), saved in the compact format (bf16,
14-bit values of S, packed bitmask): both reload routes give bit-identical logits and
identical greedy generations, lm-eval's HFLM evaluates the reloaded model, and
`export --dense` matches it. The factors come from a quick uncalibrated fit (k columns
of W as atoms, least-squares codes, the s largest kept per column), not from the
solver, which other tests cover: this file is about the format at full scale."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import cospadi
from cospadi import api
from cospadi.adapters import adapter_for, decoder_layers
from cospadi.budget import dict_budget
from cospadi.layers.linear import DictLinear
from cospadi.solvers.factors import SparseDictFactors
from cospadi.storage.export import export_dense


def quick_factors(weight: torch.Tensor, ratio: float) -> SparseDictFactors:
    """W (d1, d2) ~ D S within the dictionary budget at `ratio`, without calibration."""
    d1, d2 = weight.shape
    budget = dict_budget(d1, d2, ratio)
    columns = torch.randperm(d2, generator=torch.Generator().manual_seed(0))[: budget.atoms]
    dictionary = weight[:, columns]
    codes = torch.linalg.lstsq(dictionary, weight).solution  # (k, d2)
    rows = codes.abs().topk(budget.sparsity, dim=0).indices.sort(0).values
    return SparseDictFactors(dictionary, rows, codes.gather(0, rows))


@pytest.fixture(scope="module")
def saved(smollm2, tmp_path_factory):
    """(in-memory compressed model converted to the saved format, tokenizer, folder, windows)."""
    dense, tokenizer = smollm2
    model = copy.deepcopy(dense).eval()
    for layer in decoder_layers(model):
        for name in adapter_for(model).targets:
            linear = layer.get_submodule(name)
            factors = quick_factors(linear.weight.detach().T, 0.3)
            layer.set_submodule(name, DictLinear.from_factors(factors, linear.bias, torch.float32))
    folder = tmp_path_factory.mktemp("smollm2") / "cospadi"
    cospadi.save(model, tokenizer, folder, {"method": "cospadi", "ratio": 0.3}, dtype="bfloat16", coef_bits=14)
    windows = api.evaluation_ids(model, tokenizer, None, 64, 2)
    return model, tokenizer, folder, windows


@torch.no_grad()
def logits(model, input_ids):
    return model(input_ids=input_ids, use_cache=False).logits


def test_the_compact_folder_is_as_small_as_the_accounting_says(saved):
    model, _, folder, _ = saved
    modules = [m for m in model.modules() if isinstance(m, DictLinear)]
    assert len(modules) == 30 * 7 and all(m.coef_bits == 14 for m in modules)
    assert model.dtype == torch.bfloat16 and (folder / "tokenizer.json").is_file()
    stored = sum(m.dictionary.nbytes + m.mask.nbytes + m.coefs14.nbytes for m in modules)
    dense = sum(m.in_features * m.out_features * 2 for m in modules)
    assert 0.69 < stored / dense < 0.71  # eq. 10 with 14-bit values equals eq. 11 at rho = 2
    weights = sum(p.stat().st_size for p in folder.glob("model*.safetensors"))
    embeddings = model.model.embed_tokens.weight.nbytes
    assert weights < embeddings + stored + 2_000_000  # nothing else of size is stored
    assert "0.69" in (folder / "REPORT.md").read_text()


def test_both_routes_reload_bit_identical_logits_and_generations(saved):
    model, tokenizer, folder, windows = saved
    reloaded = [cospadi.load(folder)[0], AutoModelForCausalLM.from_pretrained(folder)]
    prompt = tokenizer("The history of the city", return_tensors="pt")
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    expected_tokens = model.generate(**prompt, **kwargs)
    for other in reloaded:
        assert other.dtype == torch.bfloat16
        assert torch.equal(logits(other, windows), logits(model, windows))
        assert torch.equal(logits(other, windows[:1, :1]), logits(model, windows[:1, :1]))  # the sparse path
        assert torch.equal(other.generate(**prompt, **kwargs), expected_tokens)
    assert tokenizer.decode(expected_tokens[0]).startswith("The history of the city")


def test_lm_eval_hflm_evaluates_the_reloaded_model(saved):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    _, _, folder, _ = saved
    model, tokenizer = cospadi.load(folder)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    context, continuations = "The capital of France is", [" Paris", " a banana"]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(context, c), idx=i)
                for i, c in enumerate(continuations)]
    scores = lm.loglikelihood(requests)
    for (score, _), continuation in zip(scores, continuations):
        ids = tokenizer(context + continuation, return_tensors="pt").input_ids
        n = len(tokenizer(continuation).input_ids)
        logprobs = torch.log_softmax(logits(model, ids)[0, :-1].float(), -1)
        expected = float(logprobs[-n:].gather(1, ids[0, -n:, None]).sum())
        assert score == pytest.approx(expected, rel=1e-2, abs=5e-2)  # HFLM sums bf16 log-probs
    assert scores[0][0] > scores[1][0]
    generated = lm.generate_until([Instance(request_type="generate_until", doc={}, idx=0, arguments=(
        context, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}))])
    assert isinstance(generated[0], str) and generated[0]


def test_dense_export_matches_the_reloaded_model(saved, tmp_path):
    _, _, folder, windows = saved
    out = export_dense(folder, tmp_path / "dense", dtype="float32")
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(exported.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    reference = cospadi.load(folder, dtype="float32")[0]
    expected = logits(reference, windows)
    assert float((logits(exported, windows) - expected).norm() / expected.norm()) < 1e-4
