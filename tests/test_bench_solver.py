"""`cospadi bench-solver` on a tiny random Llama: the Grams of one block are computed once
and cached, every configuration is timed side by side with svd-llm, the slow paper
reference runs its own (smaller) number of times, and each row carries its error and
speed relative to that reference."""
import math

import pytest
import torch

from cospadi import cli
from cospadi.bench import solver as bench_solver
from cospadi.budget import lowrank_budget
from cospadi.solvers import output_error, svd_llm

SEQ_LEN = 32


def argv(cli_files, tmp_path, *extra):
    return ["bench-solver", "--model", str(cli_files["model"]), "--block", "1", "--matrices",
            "self_attn.q_proj,mlp.down_proj", "--ratios", "0.3,0.5", "--configs", "default,paper", "--repeats", "2",
            "--calib-samples", "4", "--seq-len", str(SEQ_LEN), "--cache", str(tmp_path / "grams"),
            "--output", str(tmp_path / "B.md"), "--quiet", *extra]


def test_bench_solver_rows_cache_and_relative_columns(cli_files, tmp_path, printed_rows, parse_table, monkeypatch):
    calls: list[int] = []
    real = bench_solver.time_solver
    monkeypatch.setattr(bench_solver, "time_solver",
                        lambda solve, repeats, device: calls.append(repeats) or real(solve, repeats, device))
    assert cli.main(argv(cli_files, tmp_path)) == 0
    rows = printed_rows[-1]
    assert [(r["matrix"], r["ratio"], r["solver"].split(":")[0]) for r in rows] == [
        (m, q, s) for m in ("self_attn.q_proj", "mlp.down_proj") for q in (0.3, 0.5)
        for s in ("svd-llm", "default", "paper")]
    assert calls == [2, 2, 1] * 4  # the paper reference is timed once (--paper-repeats 1), the rest twice

    matrices = bench_solver.block_matrices(str(cli_files["model"]), 1, 4, SEQ_LEN, 42, tmp_path / "grams")
    for r in rows:
        weight, gram = matrices[r["matrix"]]
        low = svd_llm(weight, gram, lowrank_budget(*weight.shape, r["ratio"]))
        assert r["x svd-llm"] == pytest.approx(r["error"] / output_error(gram, weight, low.weight()), rel=1e-9)
        paper = next(p for p in rows if (p["matrix"], p["ratio"]) == (r["matrix"], r["ratio"])
                     and p["solver"].startswith("paper:"))
        assert r["error / paper"] == pytest.approx(r["error"] / paper["error"], rel=1e-12)
        assert r["speed-up vs paper"] == pytest.approx(paper["seconds"] / r["seconds"], rel=1e-12)
        assert 0 < r["error"] < 1 and math.isfinite(r["seconds"])
    table = parse_table((tmp_path / "B.md").read_text())
    assert len(table) == len(rows) and "paper reference: 1" in (tmp_path / "B.md").read_text()

    # a second run reads the cached Grams: no model is loaded
    monkeypatch.setattr(bench_solver, "load_model", lambda *a: pytest.fail("recomputed the cached Grams"))
    assert cli.main(argv(cli_files, tmp_path, "--configs", "default")) == 0
    again = {(r["matrix"], r["ratio"]): r["error"] for r in printed_rows[-1] if r["solver"].startswith("default")}
    first = {(r["matrix"], r["ratio"]): r["error"] for r in rows if r["solver"].startswith("default")}
    assert again == first  # same seed, same matrices: the same factors


def test_bench_solver_cached_grams_are_the_block_inputs_grams(cli_files, tmp_path):
    matrices = bench_solver.block_matrices(str(cli_files["model"]), 0, 4, SEQ_LEN, 42, tmp_path / "grams")
    weight, gram = matrices["self_attn.q_proj"]
    assert weight.shape == (32, 32) and gram.dtype == torch.float64
    assert torch.allclose(gram, gram.T) and float(torch.linalg.eigvalsh(gram)[0]) >= -1e-8 * float(gram.diagonal().max())
    assert torch.equal(matrices["self_attn.k_proj"][1], gram)  # q, k and v read one input
    assert matrices["mlp.down_proj"][0].shape == (64, 32)


@pytest.mark.parametrize("extra,word", [(["--paper-repeats", "0"], "paper-repeats"), (["--configs", "magic"], "magic"),
                                        (["--block", "7"], "block")])
def test_bench_solver_bad_settings_exit_2(extra, word, cli_files, tmp_path, capsys):
    assert cli.main(argv(cli_files, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0], err
    assert not (tmp_path / "B.md").exists()
