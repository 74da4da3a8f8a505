"""`--quant` on the command line and in the API: compress writes a quantized folder that
eval and `export --dense` read; bench runs the quantized grid with rtn / gptq baselines,
names the cells by their quantization and writes the perplexity-against-bytes table and
plot with the Pareto front; bad combinations stop with one `error:` line."""

import json
import math

import pytest

import cospadi
from cospadi import cli
from cospadi.bench.pareto import front, front_gap, pareto_rows
from cospadi.errors import CospadiError
from cospadi.layers.quantized import QuantDictLinear
from test_cli_export_bench_infer import one_error_line  # the one `error:` line check

SEQ_LEN = 32


def compress_argv(cli_files, out, *extra) -> list[str]:
    return ["compress", "--model", str(cli_files["model"]), "--data", str(cli_files["txt"]), "--calib-samples", "4",
            "--seq-len", str(SEQ_LEN), "--eval-windows", "1", "--allocation", "uniform", "--out", str(out),
            "--quiet", *extra]


def test_compress_quant_then_eval_and_export(cli_files, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli.main(compress_argv(cli_files, out, "--quant", "int4", "--quant-group", "16")) == 0, \
        capsys.readouterr().err
    model, _ = cospadi.load(out)
    module = model.model.layers[0].mlp.gate_proj
    assert isinstance(module, QuantDictLinear) and (module.bits, module.group) == (4, 16)
    assert "int4 codes" in (out / "REPORT.md").read_text()
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(out), "--data", str(cli_files["txt"]), "--seq-len", str(SEQ_LEN),
                     "--eval-windows", "1", "--quiet"]) == 0, capsys.readouterr().err
    assert cli.main(["export", "--dense", str(out), str(tmp_path / "dense"), "--quiet"]) == 0, capsys.readouterr().err
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())


@pytest.mark.parametrize("extra,word", [
    (["--quant", "int4", "--coef-bits", "14"], "--coef-bits 14"),
    (["--quant", "int4", "--quant-group", "0"], "group size 0"),
    (["--quant", "int8", "--lazy"], "--lazy"),
    (["--quant", "int8", "--method", "basis-sharing"], "--group-size"),
    (["--quant", "int8", "--method", "cospadi", "--group-size", "2"], "--group-size"),
    (["--method", "rtn"], "--quant"),
    (["--method", "gptq", "--quant", "none"], "--quant"),
    (["--quant", "int8", "--method", "replaceme"], "depth pruning"),
])
def test_bad_quant_combinations_stop_with_one_line(extra, word, cli_files, tmp_path, capsys):
    line = one_error_line(cli.main(compress_argv(cli_files, tmp_path / "out", *extra)), capsys.readouterr())
    assert word in line, line
    assert not (tmp_path / "out").exists()


def test_api_refuses_bad_quant_in_one_line(tiny_llama, tiny_ids):
    model = tiny_llama(2)
    for kwargs, word in ((dict(method="rtn"), "--quant"), (dict(method="cospadi", quant="int4", quant_group=-1),
                                                            "group size"),
                         (dict(method="rtn", quant="int4", allocation="knapsack"), "allocation")):
        with pytest.raises(CospadiError, match=word) as info:
            cospadi.compress(model, None, input_ids=tiny_ids, progress=False, **kwargs)
        assert "\n" not in str(info.value)


def bench_argv(cli_files, tmp_path, *extra) -> list[str]:
    return ["bench", "--model", str(cli_files["model"]), "--data", str(cli_files["txt"]), "--ratios", "0.3",
            "--calib-samples", "4", "--seq-len", str(SEQ_LEN), "--eval-windows", "2", "--lastword-examples", "0",
            "--wordppl-docs", "0", "--cache", str(tmp_path / "cache"), "--output", str(tmp_path / "B.md"),
            "--quiet", *extra]


def test_bench_quant_grid_with_baselines_and_pareto(cli_files, tmp_path, capsys, parse_table):
    argv = bench_argv(cli_files, tmp_path, "--methods", "cospadi,rtn,gptq", "--quant", "none,int8",
                      "--baseline-quant", "int4,int3", "--pareto")
    assert cli.main(argv) == 0, capsys.readouterr().err
    names = sorted(p.name for p in (tmp_path / "cache").rglob("*.json"))
    assert [n for n in names if n.startswith(("rtn", "gptq"))] == ["gptq-0-int3.json", "gptq-0-int4.json",
                                                                   "rtn-0-int3.json", "rtn-0-int4.json"]
    cospadi_cells = [n for n in names if n.startswith("cospadi")]
    assert len(cospadi_cells) == 2 and sum(n.endswith("-0.3-int8.json") for n in cospadi_cells) == 1
    assert sum(n.endswith("-0.3.json") for n in cospadi_cells) == 1  # unquantized cells keep their names
    text = (tmp_path / "B.md").read_text()
    pareto = text[text.index("-pareto -->"):]
    rows = parse_table(pareto)
    assert len(rows) == 7 and "dense (bf16)" in [r["method"] for r in rows]
    sizes = [float(r["linear MiB"]) for r in rows]
    assert sizes == sorted(sizes) and any(r["Pareto front"] == "yes" for r in rows)
    pngs = sorted(p.name for p in (tmp_path / "benchmarks").iterdir())
    assert len(pngs) == 2 and sum(name.endswith("-pareto.png") for name in pngs) == 1


def test_bench_refuses_baselines_without_quantization(cli_files, tmp_path, capsys):
    line = one_error_line(cli.main(bench_argv(cli_files, tmp_path, "--methods", "cospadi,rtn")), capsys.readouterr())
    assert "--quant" in line and not (tmp_path / "cache").exists()


def test_pareto_front_by_brute_force():
    points = [(1.0, 10.0), (2.0, 5.0), (2.0, 6.0), (3.0, 5.0), (4.0, 1.0), (0.5, math.nan)]
    assert front(points) == [True, True, False, False, True, False]
    cells = [{"method": "dense", "ratio": 0.0, "token_ppl": 2.0, "linear_bytes": 100},
             {"method": "a", "ratio": 0.3, "token_ppl": 3.0, "linear_bytes": 50, "quant": "int8"},
             {"method": "b", "ratio": 0.3, "token_ppl": 4.0, "linear_ratios": {"storage": 0.4, "effective": 0.4}}]
    rows = pareto_rows(cells)
    assert [r["method"] for r in rows] == ["a", "b", "dense (bf16)"]
    assert rows[1]["linear MiB"] * 2**20 == pytest.approx(60.0) and rows[1]["Pareto front"] == ""
    assert rows[1]["ppl to join the front"] == "< 3 (-25.0%)" and rows[0]["ppl to join the front"] == ""
    # the gap is the best perplexity among the points no larger: brute force on the points above
    assert front_gap(points) == [None, None, 5.0, 5.0, None, None]
