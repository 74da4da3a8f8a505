"""Per-matrix allocation through the pipeline, the API, resume, saved folders and the
command line, on tiny random models."""

import importlib.util
import json

import pytest
import torch
from torch import nn

import cospadi
from cospadi import api
from cospadi.adapters import decoder_layers
from cospadi.bench.sweep import Sweep, parse_label
from cospadi.errors import CospadiError
from cospadi.layers.base import CompressedLinear
from cospadi.pipeline import Recipe, compress_blocks
from cospadi.solvers import SolverOptions

OPTIONS = SolverOptions(iters=2, sweeps=1, rounds=2)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_ratio_zero_keeps_a_linear_dense_and_counts_it(tiny_llama, tiny_ids):
    model = tiny_llama(2)
    dense_q = decoder_layers(model)[1].self_attn.q_proj.weight.detach().clone()
    targets = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]
    ratios = {(b, n): 0.5 for b in range(2) for n in targets}
    ratios[(1, "self_attn.q_proj")] = 0.0
    report = compress_blocks(model, tiny_ids, Recipe("svd-llm", 0.3, OPTIONS, ratios=ratios), progress=False)
    kept = decoder_layers(model)[1].self_attn.q_proj
    assert type(kept) is nn.Linear and torch.equal(kept.weight, dense_q)
    assert isinstance(decoder_layers(model)[0].self_attn.q_proj, CompressedLinear)
    row = next(m for m in report.matrices if (m.layer, m.name) == (1, "self_attn.q_proj"))
    assert (row.ratio, row.effective_params, row.output_error) == (0.0, row.d1 * row.d2, 0.0)
    assert len(report.matrices) == 14


@pytest.mark.parametrize("method,group_size", [("svd", 1), ("svd-llm", 1), ("basis-sharing", 2), ("cospadi", 1),
                                               ("cospadi", 2)])
def test_knapsack_end_to_end_keeps_the_budget(tiny_llama, tiny_ids, tmp_path, method, group_size):
    """The knapsack is the default allocation (no `allocation` argument)."""
    model = tiny_llama(4)
    _, report = api.compress(model, None, input_ids=tiny_ids, method=method, ratio=0.3, group_size=group_size,
                             profile_cache=str(tmp_path), progress=False, **vars(OPTIONS))
    assert 0.3 <= report.linear_ratios["effective"] < 0.3 + 0.02  # never over the budget; tiny jobs are coarse
    assert len({m.ratio for m in report.matrices}) > 1
    assert report.allocation["allocation"] == "knapsack" and report.allocation["cost"] == "fisher"
    for m in report.matrices:  # members of a shared job get one ratio
        if m.shared:
            assert {n.ratio for n in report.matrices if n.shared == m.shared} == {m.ratio}
    assert torch.isfinite(_logits(model, tiny_ids)).all()


def test_profile_is_reused_across_ratios_and_costs(tiny_llama, tiny_ids, tmp_path, monkeypatch):
    from cospadi.pipeline import allocate

    calls = []
    real = allocate.profile_model
    monkeypatch.setattr(allocate, "profile_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    for ratio, cost in [(0.3, "normalized"), (0.4, "normalized"), (0.4, "fisher"), (0.5, "fisher")]:
        _, report = api.compress(tiny_llama(2), None, input_ids=tiny_ids, method="svd-llm", ratio=ratio,
                                 allocation="knapsack", cost=cost, profile_cache=str(tmp_path), progress=False)
    assert calls == [1]
    summary = report.allocation
    assert summary["cached_profile"] is True  # the fisher sensitivities were cached with it
    assert summary["reused_seconds"] == pytest.approx(summary["profile_seconds"] + summary["sensitivity_seconds"])
    assert summary["sensitivity_seconds"] > 0


def test_knapsack_run_resumes_and_its_folder_refuses_a_uniform_run(tiny_llama, tiny_ids, tmp_path):
    def run(allocation, model):
        return api.compress(model, None, input_ids=tiny_ids, method="svd-llm", ratio=0.3, allocation=allocation,
                            profile_cache=str(tmp_path / "profiles"), resume_dir=str(tmp_path / "resume"),
                            progress=False)[1]
    first_model, second_model = tiny_llama(2), tiny_llama(2)
    first = run("knapsack", first_model)
    second = run("knapsack", second_model)  # replays the finished folder
    assert [m.ratio for m in second.matrices] == [m.ratio for m in first.matrices]
    assert torch.equal(_logits(first_model, tiny_ids), _logits(second_model, tiny_ids))
    with pytest.raises(CospadiError, match="different run"):
        run("uniform", tiny_llama(2))


def test_api_refuses_bad_allocation_settings(tiny_llama, tiny_ids):
    for kwargs, message in [(dict(allocation="greedy"), "unknown allocation"), (dict(cost="l2"), "unknown allocation cost"),
                            (dict(allocation="knapsack", ratios={(0, "x"): 0.3}), "not both"),
                            (dict(ratios={(0, "x"): 0.3}), "must cover every")]:  # a map alone means no knapsack
        with pytest.raises(CospadiError, match=message):
            api.compress(tiny_llama(2), None, input_ids=tiny_ids, method="svd-llm", progress=False, **kwargs)


def test_knapsack_folder_reloads_and_reports_every_ratio(tiny_llama, tiny_ids, tmp_path, smollm2):
    _, tokenizer = smollm2
    model = tiny_llama(2)
    model, report = api.compress(model, None, input_ids=tiny_ids, method="cospadi", ratio=0.4, allocation="knapsack",
                                 progress=False, **vars(OPTIONS))
    dense = [(m.layer, m.name) for m in report.matrices if m.ratio == 0]
    out = cospadi.save(model, tokenizer, tmp_path / "out", report.to_dict())
    loaded, _ = cospadi.load(out)
    assert torch.equal(_logits(loaded, tiny_ids), _logits(model, tiny_ids))
    for block, name in dense:
        assert type(decoder_layers(loaded)[block].get_submodule(name)) is nn.Linear
    text = (out / "REPORT.md").read_text()
    assert "## Per-matrix ratios (knapsack, cost fisher" in text
    table = [line for line in text.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(table) == 2 and all(line.count("|") == 9 for line in table)
    saved = json.loads((out / "cospadi.json").read_text())
    assert sorted(m["ratio"] for m in saved["report"]["matrices"]) == sorted(m.ratio for m in report.matrices)
    if importlib.util.find_spec("matplotlib"):  # the heatmap is saved, and checksummed, with the model
        assert (out / "allocation.png").read_bytes()[:4] == b"\x89PNG" and "allocation.png" in saved["checksums"]


def test_cli_knapsack_writes_the_heatmap_and_the_ratios(cli_files, tmp_path, printed_rows):
    """Without --allocation the CLI runs the knapsack (the default)."""
    pytest.importorskip("matplotlib")
    from cospadi.cli import main

    out, report = tmp_path / "out", tmp_path / "report.json"
    code = main(["compress", "--model", str(cli_files["model"]), "--data", str(cli_files["txt"]), "--method",
                 "svd-llm", "--cost", "normalized", "--calib-samples", "4", "--seq-len",
                 "32", "--eval-windows", "2", "--quiet", "--out", str(out), "--json", str(report),
                 "--profile-cache", str(tmp_path / "profiles")])
    assert code == 0
    png = (out / "allocation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    data = json.loads(report.read_text())
    assert data["report"]["allocation"]["allocation"] == "knapsack"
    assert len({m["ratio"] for m in data["report"]["matrices"]}) > 1
    assert data["summary"]["allocation"] == "knapsack"
    assert list((tmp_path / "profiles").glob("profile-*.json"))


def test_bench_labels_take_a_knapsack_suffix():
    assert parse_label("cospadi+knapsack") == ("cospadi", False, "knapsack")
    assert parse_label("basis-sharing") == ("basis-sharing", True, "uniform")
    with pytest.raises(CospadiError, match="unknown method"):
        parse_label("svd-llm+greedy")
    sweep = Sweep(methods=("svd-llm", "svd-llm+knapsack"))
    assert sweep.cell_name("svd-llm+knapsack", 0.3) == "svd-llm+knapsack-fisher-0.3.json"
    assert sweep.cell_name("svd-llm", 0.3) == "svd-llm-0.3.json"
    ksvd, mod = (Sweep(methods=("cospadi",), options=SolverOptions(update=u)) for u in ("ksvd", "mod"))
    assert ksvd.cell_name("cospadi", 0.3) == "cospadi-rho2-ksvd-orthogonal-r25-it0-sw8-p2-htp-0.3.json"
    assert mod.cell_name("cospadi", 0.3) == "cospadi-rho2-ksvd-orthogonal-r25-it0-sw8-p2-htp-mod-0.3.json"
    # the section of a sweep computed with the default (mod) does not overwrite the ksvd one
    assert mod.section == ksvd.section + "-mod" and ksvd.section == ksvd.key
    assert Sweep(methods=("svd-llm",), options=SolverOptions(update="mod")).section == sweep.key.replace(
        "-msvd-llm+svd-llm+knapsack", "-msvd-llm")  # no solver, no suffix
