"""`cospadi bench-shapes`: every solver of a cell side by side on the same matrix, the
overcomplete default (the MOD update) never above the complete dictionary's error nor
the K-SVD sweeps' (its previous dictionary update), the relative columns
consistent with the absolute ones, and the whole-model estimate summing its blocks."""

import pytest

from cospadi import cli
from cospadi.bench import shapes
from cospadi.errors import CospadiError


def test_a_cell_compares_every_solver_on_one_matrix():
    cases = {"wide": shapes.synthetic_case(24, 96, seed=0)}
    rows = shapes.compare_shapes(cases, [0.2], list(shapes.CONFIGS), repeats=1)
    by = {r["solver"]: r for r in rows}
    assert list(by) == list(shapes.CONFIGS)
    assert by["default"]["k"] > 24 and by["complete"]["k"] == 24
    assert by["default"]["s"] == by["complete"]["s"] == by["before"]["s"] == by["mod"]["s"] == by["sweeps"]["s"]
    assert by["default"]["error"] == by["mod"]["error"]  # mod is the default
    assert by["default"]["error"] <= by["complete"]["error"] * (1 + 1e-6)
    assert by["mod"]["error"] <= by["complete"]["error"] * (1 + 1e-6)
    assert by["mod"]["error"] <= by["sweeps"]["error"] * (1 + 1e-6)  # the block update fits no worse
    assert by["svd-llm"]["error"] > by["complete"]["error"]
    for r in rows:
        assert r["error / complete"] == pytest.approx(r["error"] / by["complete"]["error"])
        assert r["error / default"] == pytest.approx(r["error"] / by["default"]["error"])
        assert r["time / default"] == pytest.approx(r["seconds"] / by["default"]["seconds"])
        assert r["time / svd-llm"] == pytest.approx(r["seconds"] / by["svd-llm"]["seconds"])
    assert by["complete"]["time / complete"] == by["default"]["time / default"] == 1.0


def test_the_estimate_multiplies_one_block_by_the_block_count(monkeypatch):
    monkeypatch.setattr(shapes, "QWEN05", {"self_attn.q_proj": (16, 16), "mlp.up_proj": (16, 160)})
    rows = shapes.estimate_model(0.3, repeats=1)
    block = rows[:-1]
    assert [r["overcomplete"] for r in block] == [False, True]
    total = rows[-1]
    assert total["svd-llm (s)"] == pytest.approx(shapes.QWEN05_BLOCKS * sum(r["svd-llm (s)"] for r in block))
    assert total["cospadi (s)"] == pytest.approx(shapes.QWEN05_BLOCKS * sum(r["cospadi (s)"] for r in block))
    assert total["cospadi / svd-llm"] == pytest.approx(total["cospadi (s)"] / total["svd-llm (s)"])


def test_unknown_cases_and_configs_are_one_line_errors(capsys, tmp_path):
    with pytest.raises(CospadiError, match="unknown case 'llama'"):
        shapes.load_cases(["llama"], "smollm2-135m", tmp_path, 0)
    code = cli.main(["bench-shapes", "--configs", "default,fast", "--output", str(tmp_path / "B.md")])
    assert code == 2 and "unknown config 'fast'" in capsys.readouterr().err
    assert not (tmp_path / "B.md").exists()


def test_the_estimate_alone_gets_its_own_section(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(shapes, "QWEN05", {"self_attn.q_proj": (16, 16), "mlp.up_proj": (16, 160)})
    updates = []
    monkeypatch.setattr(shapes, "pipeline_estimate", lambda ratio, seed, options: updates.append(options.update) or
                        shapes._estimate_row("pipeline", "-", "-", 10.0, 30.0))
    out = tmp_path / "B.md"
    assert cli.main(["bench-shapes", "--cases", "none", "--estimate", "--output", str(out)]) == 0
    assert cli.main(["bench-shapes", "--cases", "none", "--estimate", "--update", "ksvd", "--output", str(out)]) == 0
    assert updates == ["mod", "ksvd"]  # the default update, then the one asked for
    text = out.read_text()
    # figures taken with the old default (ksvd) keep their section; the default's gets its own
    assert "<!-- bench:shapes-estimate-qwen2.5-0.5b -->" in text and "bench:shapes-none" not in text
    assert "<!-- bench:shapes-estimate-qwen2.5-0.5b-mod -->" in text
    assert "cospadi with --update mod" in text and "cospadi with --update ksvd" in text
    assert "| pipeline | - | - | 10 | 30 | 3 |" in text
    assert "Reproduce: `cospadi bench-shapes" in text
