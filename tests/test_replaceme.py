"""ReplaceMe depth pruning (src/cospadi/pruning, docs/pruning.md): the run of blocks with the
smallest cosine distance is cut (a run of identity blocks exactly), the map is the
least-squares solution on activations gathered independently through transformers'
hidden states, merging it into down_proj equals applying it as an extra linear layer,
the pruned model saves as a plain transformers folder that reloads bit-identically and
generates with a cache, bad ratios are one-line errors, and a combination removes the
total ratio it was given."""

import contextlib
import copy
import io
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import cospadi
from cospadi import cli
from cospadi.bench.sweep import Sweep, describe, parse_label
from cospadi.errors import CospadiError
from cospadi.evaluation.perplexity import perplexity
from cospadi.layers.base import compressed_modules
from cospadi.layers.linear import DictLinear
from cospadi.pruning import blocks_for_ratio, cosine_map, lstsq_map, merge_map, remove_blocks, replaceme
from cospadi.pruning.plan import parse_depth_method
from cospadi.pruning.replaceme import MapData, mean_cosine_distance
from cospadi.pruning.save import save_model
from cospadi.storage.export import EXPORT_DESCRIPTION


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def make_identity(layer: nn.Module) -> None:
    """A Llama block with zero o_proj and down_proj adds nothing to the residual stream."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


# ---------------------------------------------------------------- selection and the map


def test_a_run_of_identity_blocks_is_chosen_and_cut_exactly(tiny_llama, tiny_ids):
    model = tiny_llama(6)
    for i in (3, 4):
        make_identity(model.model.layers[i])
    reference = logits(model, tiny_ids)
    down = model.model.layers[2].mlp.down_proj.weight.clone()
    pruned = replaceme(model, tiny_ids, 2, batch_size=3, progress=False)
    assert pruned.blocks == [3, 4]
    assert pruned.distances[3] == pytest.approx(0.0, abs=1e-12)
    assert min(d for s, d in pruned.distances.items() if s != 3) > 0.01
    assert sorted(pruned.distances) == [1, 2, 3, 4]  # every start s >= 1 of a 2-block run in 6 blocks
    # across identity blocks z = x, so the least-squares map is the identity and nothing changes
    assert torch.allclose(pruned.transform, torch.eye(32, dtype=torch.float64), atol=1e-8)
    assert pruned.map_error == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(model.model.layers[2].mlp.down_proj.weight, down, atol=1e-6)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    assert torch.allclose(logits(model, tiny_ids), reference, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("fit", ["normalized", "lstsq"])
def test_distances_and_map_match_transformers_hidden_states(tiny_llama, tiny_ids, fit):
    """An independent route to the same numbers: output_hidden_states gives h_j, a hook on
    down_proj gives x; the map is torch.linalg.lstsq's on the rows (normalized: each row
    divided by ||z_t||), the distances the mean 1 - cos."""
    model = tiny_llama(5, seed=3)
    original = copy.deepcopy(model)
    pruned = replaceme(model, tiny_ids, 2, fit=fit, batch_size=4, progress=False)
    start = pruned.blocks[0]
    xs = []
    handle = original.model.layers[start - 1].mlp.down_proj.register_forward_hook(lambda m, a, out: xs.append(out))
    hidden = original(input_ids=tiny_ids, output_hidden_states=True, use_cache=False).hidden_states
    handle.remove()
    for s, distance in pruned.distances.items():
        if s + 2 < 5:  # transformers' last hidden state has the final norm applied
            assert distance == pytest.approx(mean_cosine_distance([hidden[s]], [hidden[s + 2]]), rel=1e-5)
    x = xs[0].reshape(-1, 32).double()
    z = (hidden[start + 2] - hidden[start]).reshape(-1, 32).double() + x
    w = 1 / z.norm(dim=1, keepdim=True) if fit == "normalized" else torch.ones(len(z), 1, dtype=torch.float64)
    expected = torch.linalg.lstsq(x * w, z * w).solution
    assert pruned.ridge == 0.0
    assert torch.allclose(pruned.transform, expected, atol=1e-7, rtol=1e-6)
    assert pruned.map_error == pytest.approx(float((x @ expected - z).norm() / z.norm()), rel=1e-6)
    token = float((((x @ expected - z).norm(dim=1) / z.norm(dim=1)) ** 2).mean().sqrt())
    assert pruned.token_error == pytest.approx(token, rel=1e-6)
    # each fit is best in its own measure, and both beat plain removal there
    best = pruned.token_error if fit == "normalized" else pruned.map_error
    assert best < (pruned.identity_token_error if fit == "normalized" else pruned.identity_error)


def test_auto_keeps_the_map_with_the_lower_calibration_perplexity(tiny_llama, tiny_ids):
    fixed = {}
    for fit in ("lstsq", "normalized"):
        other = tiny_llama(6, seed=7)
        fixed[fit] = (other, replaceme(other, tiny_ids, 3, fit=fit, batch_size=3, progress=False))
    model = tiny_llama(6, seed=7)
    pruned = replaceme(model, tiny_ids, 3, batch_size=3, progress=False)
    assert set(pruned.calibration_ppl) == {"lstsq", "normalized"}
    assert pruned.fit == min(pruned.calibration_ppl, key=pruned.calibration_ppl.get)
    assert torch.equal(pruned.transform, fixed[pruned.fit][1].transform)
    for fit, (other, _) in fixed.items():  # each score is the perplexity of the model cut with that map
        assert perplexity(other, tiny_ids, progress=False) == pytest.approx(pruned.calibration_ppl[fit], rel=1e-6)
    assert perplexity(model, tiny_ids, progress=False) == pytest.approx(min(pruned.calibration_ppl.values()), rel=1e-6)


def test_lstsq_map_is_the_least_squares_solution_with_a_ridge_only_when_ill_conditioned():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(400, 12, generator=g, dtype=torch.float64), torch.randn(400, 12, generator=g, dtype=torch.float64)
    z[:5] *= 1000  # a few tokens with massive activations dominate the plain fit, not the normalized one
    data = MapData(12)
    for rows in range(0, 400, 150):  # the sums over batches are the sums over all tokens
        data.add(x[rows:rows + 150], z[rows:rows + 150])
    transform, ridge = lstsq_map(data.plain.gram, data.plain.cross)
    assert ridge == 0.0
    assert torch.allclose(transform, torch.linalg.lstsq(x, z).solution, atol=1e-9)
    assert data.relative_error(transform) == pytest.approx(float((x @ transform - z).norm() / z.norm()), rel=1e-9)
    w = 1 / z.norm(dim=1, keepdim=True)
    normalized, _ = lstsq_map(data.normalized.gram, data.normalized.cross)
    assert torch.allclose(normalized, torch.linalg.lstsq(x * w, z * w).solution, atol=1e-9)
    assert data.token_error(normalized) < data.token_error(transform)
    singular = torch.cat([x[:, :6], x[:, :6]], dim=1)  # duplicated columns: X^T X is singular
    gram, cross = singular.T @ singular, singular.T @ z
    transform, ridge = lstsq_map(gram, cross)
    assert ridge > 0
    expected = torch.linalg.solve(gram + ridge * torch.eye(12, dtype=torch.float64), cross)
    assert torch.allclose(transform, expected, atol=1e-8)
    assert torch.isfinite(transform).all()


def test_the_cosine_variant_raises_the_mean_cosine_from_the_least_squares_start():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 8, generator=g, dtype=torch.float64)
    z = x @ torch.randn(8, 8, generator=g, dtype=torch.float64) + 0.5 * torch.randn(600, 8, generator=g,
                                                                                      dtype=torch.float64)
    z[::2] *= 10  # the least-squares map favours the large tokens; the cosine weighs every token alike
    start = torch.linalg.lstsq(x, z).solution
    tuned = cosine_map([x], [z], start, epochs=20, lr=1e-2, batch=100)

    def mean_cos(t: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(x @ t, z, dim=1).mean())
    assert mean_cos(tuned) > mean_cos(start) + 1e-3


@pytest.mark.parametrize("bias", [False, True])
def test_the_merged_map_equals_the_map_as_an_extra_linear_layer(tiny_llama, tiny_ids, bias):
    model = tiny_llama(5, seed=1, mlp_bias=bias)
    if bias:  # transformers initialises biases to zero, where any orientation of b T passes
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.bias.normal_(generator=torch.Generator().manual_seed(5))
    transform = torch.randn(32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64) / 32 ** 0.5
    hooked = copy.deepcopy(model)
    extra = nn.Linear(32, 32, bias=False)
    with torch.no_grad():
        extra.weight.copy_(transform.T.float())  # y = out @ T
    layer = hooked.model.layers[1].mlp
    layer.down_proj = nn.Sequential(layer.down_proj, extra)
    remove_blocks(hooked, hooked.model.layers, [2, 3])
    merge_map(model.model.layers[1].mlp.down_proj, transform)
    remove_blocks(model, model.model.layers, [2, 3])
    assert torch.allclose(logits(model, tiny_ids), logits(hooked, tiny_ids), atol=1e-5)


def test_replaceme_equals_the_original_model_with_its_map_hooked_in(tiny_llama, tiny_ids):
    model = tiny_llama(6, seed=5)
    reference = copy.deepcopy(model)
    pruned = replaceme(model, tiny_ids, 3, batch_size=3, progress=False)
    start = pruned.blocks[0]
    t = pruned.transform.float()
    reference.model.layers[start - 1].mlp.down_proj.register_forward_hook(lambda m, a, out: out @ t)
    remove_blocks(reference, reference.model.layers, pruned.blocks)
    assert torch.allclose(logits(model, tiny_ids), logits(reference, tiny_ids), atol=1e-5)


# ---------------------------------------------------------------- a plain transformers model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_pruned_model_saves_plain_and_reloads_bit_identically(family, tiny_model, calibration_ids, tmp_path):
    model = tiny_model(family, layers=4, **({"tie_word_embeddings": True} if family == "llama" else {}))
    model, report = cospadi.compress(model, None, input_ids=calibration_ids, method="replaceme", ratio=0.5,
                                     batch_size=4, progress=False)
    assert len(report.pruned["blocks"]) == 2 and model.config.num_hidden_layers == 2
    assert report.compressed_params == sum(p.numel() for p in model.parameters())
    folder = save_model(model, None, tmp_path / "out", report.to_dict())
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 2
    if family == "qwen2":
        assert len(config["layer_types"]) == 2
    assert json.loads((folder / EXPORT_DESCRIPTION).read_text())["report"]["pruned"]["blocks"] == report.pruned["blocks"]
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not list(compressed_modules(loaded)) and getattr(loaded, "hf_quantizer", None) is None
    assert torch.equal(logits(loaded, calibration_ids), logits(model, calibration_ids))
    prompt = calibration_ids[:1, :6]
    cached = loaded.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False))


@torch.no_grad()
def test_removing_gemma3_blocks_keeps_its_layer_types_and_caches_consistent(tiny_model, calibration_ids):
    model = tiny_model("gemma3", layers=4)
    skipped = copy.deepcopy(model)
    skipped.model.layers[1].register_forward_hook(lambda m, args, kwargs, out: kwargs.get("hidden_states", args[0]),
                                                  with_kwargs=True)
    types = list(model.config.layer_types)
    remove_blocks(model, model.model.layers, [1])
    assert model.config.layer_types == [types[0], types[2], types[3]] and model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    assert torch.allclose(logits(model, calibration_ids), logits(skipped, calibration_ids), atol=1e-5)
    prompt = calibration_ids[:1, :12]  # beyond the sliding window of 8
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False),
                       model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))


def test_gemma3_is_refused_in_one_line(tiny_model, calibration_ids):
    with pytest.raises(CospadiError, match="normalise the MLP output") as info:
        cospadi.compress(tiny_model("gemma3", layers=4), None, input_ids=calibration_ids, method="replaceme",
                         ratio=0.3, progress=False)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- ratios and bad input


def test_ratios_round_to_the_nearest_whole_block():
    assert [blocks_for_ratio(r, 30) for r in (0.2, 0.25, 0.3, 0.5)] == [6, 8, 9, 15]
    assert blocks_for_ratio(0.5 / 30, 30) == 1 and blocks_for_ratio(0.98, 30) == 29


@pytest.mark.parametrize("ratio, blocks, message", [
    (0.9, 2, "would cut 2 of the 2 blocks.*below 0.75"),
    (0.1, 4, "rounds to 0 blocks.*at least 0.125"),
    (1.5, 4, r"outside \(0, 1\)"),
    (0.0, 4, r"outside \(0, 1\)"),
])
def test_bad_ratios_are_one_line_errors(ratio, blocks, message):
    with pytest.raises(CospadiError, match=message) as info:
        blocks_for_ratio(ratio, blocks)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method, ratio, message", [
    ("replaceme", 0.95, "would cut"),
    ("replaceme5+cospadi", 0.3, "cuts 5 blocks but the model has 4"),
    ("replaceme2+cospadi", 0.4, "already removes 0.5"),
    ("replaceme3", 0.4, "a block count goes with a combination"),
    ("replaceme+pca", 0.4, "unknown method 'pca'"),
])
def test_bad_depth_requests_fail_before_any_work(tiny_llama, tiny_ids, method, ratio, message):
    model = tiny_llama(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CospadiError, match=message) as info:
        cospadi.compress(model, None, input_ids=tiny_ids, method=method, ratio=ratio, progress=False)
    assert "\n" not in str(info.value)
    assert len(model.model.layers) == 4 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_compressed_model_is_refused(tiny_llama, tiny_ids):
    model, _ = cospadi.compress(tiny_llama(4), None, input_ids=tiny_ids, method="svd-llm", ratio=0.3, progress=False)
    with pytest.raises(CospadiError, match="compressed already"):
        replaceme(model, tiny_ids, 1, progress=False)


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, err.getvalue()


def cli_args(cli_files, ratio: str, *extra: str) -> list[str]:
    return ["compress", "--model", str(cli_files["model"]), "--data", str(cli_files["txt"]), "--method", "replaceme",
            "--ratio", ratio, "--calib-samples", "4", "--seq-len", "32", "--eval-windows", "2", "--batch-size", "2",
            "--quiet", *extra]


def test_the_cli_prunes_saves_a_plain_folder_and_refuses_bad_ratios(cli_files, tmp_path):
    code, err = run_cli(cli_args(cli_files, "0.2"))  # 0.2 of 2 blocks rounds to 0
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "rounds to 0 blocks" in err
    code, err = run_cli(cli_args(cli_files, "0.5", "--group-size", "2"))
    assert code == 2 and err.count("\n") == 1 and "takes no --group-size" in err
    out = tmp_path / "pruned"
    code, err = run_cli(cli_args(cli_files, "0.5", "--out", str(out)))
    assert code == 0, err
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model, _ = cospadi.load_model(str(out))  # a plain folder: transformers alone loads it
    assert len(model.model.layers) == 1
    code, err = run_cli(cli_args(cli_files, "0.5", "--out", str(out), "--overwrite"))
    assert code == 0, err  # an earlier pruned output may be replaced


# ---------------------------------------------------------------- the combination


def test_the_combination_removes_the_total_ratio(tiny_llama, tiny_ids):
    """Cut 2 of 6 blocks (1/3 of the linear weights), cospadi at 1 - 0.5 x 6/4 = 0.25 on
    the 4 kept: the total is 0.5 up to cospadi's own budget rounding at these tiny shapes
    (tolerance 0.03; its rest ratio is exactly the budget's)."""
    model = tiny_llama(6)
    model, report = cospadi.compress(model, None, input_ids=tiny_ids, method="replaceme2+cospadi", ratio=0.5,
                                     batch_size=3, progress=False, iters=2, allocation="uniform")
    assert len(report.pruned["blocks"]) == 2 and len(model.model.layers) == 4
    assert report.options["rest_ratio"] == pytest.approx(0.25)
    modules = dict(compressed_modules(model))
    assert len(modules) == 28 and all(type(m) is DictLinear for m in modules.values())
    kept = sum(m.d1 * m.d2 for m in report.matrices)
    rest = 1 - sum(m.effective_params for m in report.matrices) / kept
    total = report.linear_ratios["effective"]
    assert total == pytest.approx(1 - (kept / report.linear_params) * (1 - rest), abs=1e-12)
    assert abs(total - 0.5) < 0.03
    assert report.method == "replaceme2+cospadi" and report.ratio == 0.5


def test_bench_labels_for_depth_methods():
    assert parse_label("replaceme") == ("replaceme", False, "uniform")
    assert parse_label("replaceme2+cospadi+knapsack") == ("replaceme2+cospadi", False, "knapsack")
    with pytest.raises(CospadiError, match="no per-matrix ratios"):
        parse_label("replaceme+knapsack")
    sweep = Sweep(methods=("replaceme", "replaceme+cospadi", "cospadi+knapsack"))
    assert "-rho" not in sweep.cell_name("replaceme", 0.3) and "-rho" in sweep.cell_name("replaceme+cospadi", 0.3)
    assert "Reproduce: `cospadi bench`" in describe(sweep, "cospadi bench")  # every label kind, +knapsack too
    assert parse_depth_method("cospadi") is None
