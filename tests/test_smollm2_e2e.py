"""End to end on the real SmolLM2-135M, truncated to its first 2 decoder blocks so the
three methods fit in a test: calibrated on 4 x 128 tokens of the built-in wiki
calibration split and compressed at ratio 0.3 with svd, svd-llm and cospadi (iters=2).

Checked: each compressed module holds exactly its budget of parameters; the per-matrix
output errors order cospadi < svd-llm < svd on average over the 14 matrices (the paper's
core claim at matrix level; in block 0, where every method sees the same Gram, svd-llm
beats svd on every matrix); logits stay finite; the error at the output of the last
compressed block orders the same way; and the perplexity of the full 30-block model with
its first two blocks replaced by the compressed ones orders dense <= cospadi <= svd-llm
<= svd on 2 held-out windows of 128 tokens.

The perplexity of the *truncated* 2-block model itself is not ordered: its final norm
and head read a residual stream two blocks deep that they were never trained on, so it
is astronomically high for every variant (measured: dense ~8.2e7, svd ~8.1e6, svd-llm
~1.2e9, cospadi ~1.0e9) and its order says nothing about compression quality. It is
only checked to be finite; the spliced 30-block perplexity is the meaningful one."""

import copy
import math

import pytest
import torch

from cospadi import api
from cospadi.adapters import adapter_for
from cospadi.evaluation.perplexity import perplexity
from cospadi.layers.linear import DictLinear, LowRankLinear
from cospadi.methods import get_method, method_names
from cospadi.pipeline import Recipe, compress_blocks
from cospadi.solvers import SolverOptions

RATIO = 0.3
OPTIONS = SolverOptions(iters=2)
METHODS = method_names()
BLOCKS = 2
CALIB_SAMPLES, SEQ_LEN, EVAL_WINDOWS = 4, 128, 2


def truncate(model: torch.nn.Module, blocks: int) -> torch.nn.Module:
    """A deep copy of `model` keeping only its first `blocks` decoder blocks."""
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:blocks]
    small.config.num_hidden_layers = blocks
    if getattr(small.config, "layer_types", None):
        small.config.layer_types = small.config.layer_types[:blocks]
    return small.eval()


@torch.no_grad()
def last_block_output(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Hidden states leaving the last decoder block (before the final norm), float64."""
    seen = {}

    def hook(module, args, output):
        seen["h"] = output[0] if isinstance(output, tuple) else output

    handle = model.model.layers[-1].register_forward_hook(hook)
    try:
        model(input_ids=windows, use_cache=False)
    finally:
        handle.remove()
    return seen["h"].double()


@torch.no_grad()
def spliced_perplexity(full: torch.nn.Module, blocks: torch.nn.ModuleList, windows: torch.Tensor) -> float:
    """Perplexity of `full` with its first len(blocks) decoder blocks swapped for `blocks`
    (restored afterwards)."""
    originals = [full.model.layers[i] for i in range(len(blocks))]
    try:
        for i, block in enumerate(blocks):
            full.model.layers[i] = block
        return perplexity(full, windows, progress=False)
    finally:
        for i, block in enumerate(originals):
            full.model.layers[i] = block


@pytest.fixture(scope="module")
def e2e(smollm2):
    model, tokenizer = smollm2
    fingerprint = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    dense = truncate(model, BLOCKS)
    full = copy.deepcopy(model).eval()
    calib = api.calibration_ids(dense, tokenizer, None, CALIB_SAMPLES, SEQ_LEN, seed=42)
    windows = api.evaluation_ids(dense, tokenizer, None, SEQ_LEN, EVAL_WINDOWS)
    result = dict(dense=dense, calib=calib, windows=windows, adapter=adapter_for(dense),
                  shapes={(i, name): (layer.get_submodule(name).in_features, layer.get_submodule(name).out_features)
                          for i, layer in enumerate(dense.model.layers) for name in adapter_for(dense).targets},
                  dense_ppl=perplexity(dense, windows, progress=False),
                  dense_full_ppl=perplexity(full, windows, progress=False),
                  dense_block_out=last_block_output(dense, windows), methods={})
    for method in METHODS:
        compressed = copy.deepcopy(dense)
        report = compress_blocks(compressed, calib, Recipe(method, RATIO, OPTIONS), batch_size=4, progress=False)
        with torch.no_grad():
            logits = compressed(input_ids=windows, use_cache=False).logits
        block_out = last_block_output(compressed, windows)
        result["methods"][method] = dict(
            model=compressed, report=report, logits_finite=bool(torch.isfinite(logits).all()),
            ppl=perplexity(compressed, windows, progress=False),
            full_ppl=spliced_perplexity(full, compressed.model.layers, windows),
            block_error=float((block_out - result["dense_block_out"]).norm() / result["dense_block_out"].norm()),
            errors={(m.layer, m.name): m.output_error for m in report.matrices})
    del full
    result["fixture_intact"] = (len(model.model.layers) == 30 and model.config.num_hidden_layers == 30
                                and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
                                and torch.equal(model.model.layers[0].self_attn.q_proj.weight, fingerprint))
    return result


def mean_error(e2e, method: str) -> float:
    errors = e2e["methods"][method]["errors"]
    return sum(errors.values()) / len(errors)


def summary(e2e) -> str:
    parts = [f"dense: ppl(2 blocks) {e2e['dense_ppl']:.4g}, ppl(30 blocks) {e2e['dense_full_ppl']:.4g}"]
    for method, r in e2e["methods"].items():
        parts.append(f"{method}: mean matrix error {mean_error(e2e, method):.4f}, block-{BLOCKS} output error "
                     f"{r['block_error']:.4f}, ppl(2 blocks) {r['ppl']:.4g}, ppl(30 blocks, first 2 compressed) "
                     f"{r['full_ppl']:.4g}")
    return "\n".join(parts)


def test_inputs_are_wiki_windows_and_the_fixture_is_untouched(e2e, smollm2):
    assert e2e["calib"].shape == (CALIB_SAMPLES, SEQ_LEN)
    assert e2e["windows"].shape == (EVAL_WINDOWS, SEQ_LEN)
    assert e2e["fixture_intact"], "compressing the truncated copy changed the session's SmolLM2"
    assert len(e2e["dense"].model.layers) == BLOCKS
    assert len(smollm2[0].model.layers) == 30


@pytest.mark.parametrize("method", METHODS)
def test_every_compressed_module_holds_its_budget(e2e, method):
    r = e2e["methods"][method]
    expected_type = DictLinear if method == "cospadi" else LowRankLinear
    assert len(r["report"].matrices) == BLOCKS * len(e2e["adapter"].targets) == 14
    for m in r["report"].matrices:
        module = r["model"].model.layers[m.layer].get_submodule(m.name)
        assert type(module) is expected_type, f"block {m.layer} {m.name}"
        d1, d2 = e2e["shapes"][(m.layer, m.name)]
        budget = get_method(method).budget(d1, d2, RATIO, OPTIONS)
        count = sum(p.numel() for p in module.parameters())  # SmolLM2 has no biases
        assert count == budget.effective_params == m.effective_params, f"block {m.layer} {m.name}"
        assert (1 - RATIO) * d1 * d2 - 2 * (d1 + d2) < count <= (1 - RATIO) * d1 * d2  # removes ~the asked fraction


def test_matrix_errors_order_cospadi_svd_llm_svd(e2e):
    means = {method: mean_error(e2e, method) for method in METHODS}
    assert means["cospadi"] < means["svd-llm"] < means["svd"], summary(e2e)
    for method in METHODS:
        assert all(0 <= e < 1 for e in e2e["methods"][method]["errors"].values()), method
    # block 0 sees the same inputs under every method: the whitened optimum wins everywhere
    svd, svd_llm = e2e["methods"]["svd"]["errors"], e2e["methods"]["svd-llm"]["errors"]
    for name in e2e["adapter"].targets:
        assert svd_llm[(0, name)] <= svd[(0, name)] * (1 + 1e-6), name


@pytest.mark.parametrize("method", METHODS)
def test_logits_and_perplexity_stay_finite(e2e, method):
    r = e2e["methods"][method]
    assert r["logits_finite"]
    assert math.isfinite(r["ppl"]) and math.isfinite(r["full_ppl"])
    assert math.isfinite(e2e["dense_ppl"])


def test_last_block_output_error_orders_like_the_matrices(e2e):
    errors = {method: e2e["methods"][method]["block_error"] for method in METHODS}
    assert 0 < errors["cospadi"] < errors["svd-llm"] < errors["svd"], summary(e2e)


def test_perplexity_with_compressed_blocks_orders_dense_cospadi_svd_llm_svd(e2e):
    ppl = {method: e2e["methods"][method]["full_ppl"] for method in METHODS}
    assert 5 < e2e["dense_full_ppl"] < 40, summary(e2e)  # the real model on wiki, 128-token windows
    assert e2e["dense_full_ppl"] <= ppl["cospadi"] <= ppl["svd-llm"] <= ppl["svd"], summary(e2e)
