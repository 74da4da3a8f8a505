"""The `cospadi` command line, driven in-process through cospadi.cli.main on a tiny random
Llama saved as a Hugging Face folder with the real SmolLM2 tokenizer, and a small .txt
corpus: compress prints a table and writes a loadable output folder and a per-matrix
JSON report; eval of that folder reproduces the compressed perplexity; bad input exits
with status 2 and a single `error:` line, leaving nothing behind; bench caches its cells
and writes one table row per cell."""

import contextlib
import io
import json
import math

import pytest

import cospadi
from cospadi import api, cli
from cospadi.layers.linear import DictLinear
from cospadi.storage.checkpoint import DESCRIPTION

SEQ_LEN = 32
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYERS = 2  # the blocks of cli_files' tiny Llama


def compress_args(cli_files, out=None, json_path=None, **overrides) -> list[str]:
    options = {"--model": str(cli_files["model"]), "--data": str(cli_files["txt"]), "--method": "cospadi",
               "--iters": "2", "--ratio": "0.3", "--calib-samples": "4", "--seq-len": str(SEQ_LEN),
               "--eval-windows": "2", "--batch-size": "2", "--rounds": "7", "--allocation": "uniform"}
    options.update({k: str(v) for k, v in overrides.items()})
    argv = ["compress"] + [item for pair in options.items() for item in pair] + ["--quiet"]
    if out is not None:
        argv += ["--out", str(out)]
    if json_path is not None:
        argv += ["--json", str(json_path)]
    return argv


@pytest.fixture(scope="module")
def compressed_run(cli_files, tmp_path_factory):
    """One successful `cospadi compress` run (module-scoped, so captured with
    contextlib rather than capsys): exit code, stdout, stderr, printed rows, paths."""
    root = tmp_path_factory.mktemp("cli-compress")
    out, json_path = root / "out", root / "report.json"
    seen: list[list[dict]] = []
    real = cli.results_table
    patch = pytest.MonkeyPatch()
    patch.setattr(cli, "results_table", lambda rows: seen.append([dict(r) for r in rows]) or real(rows))
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(compress_args(cli_files, out, json_path))
    finally:
        patch.undo()
    return dict(code=code, stdout=stdout.getvalue(), stderr=stderr.getvalue(), rows=seen, out=out,
                json=json_path, root=root)


def test_compress_prints_a_table_with_numeric_perplexities(compressed_run, parse_table):
    r = compressed_run
    assert r["code"] == 0, r["stderr"]
    assert "error" not in r["stderr"].lower()
    rows = parse_table(r["stdout"])
    assert len(rows) == 1
    row = rows[0]
    assert row["method"] == "cospadi"
    assert float(row["ratio"]) == 0.3
    dense, ppl = float(row["dense ppl"]), float(row["ppl"])
    assert math.isfinite(dense) and dense > 1
    assert math.isfinite(ppl) and ppl > 1
    # the table shows what the run returned, rounded
    full = r["rows"][-1][0]
    assert math.isclose(float(row["ppl"]), full["ppl"], rel_tol=1e-3)


def test_compress_writes_a_loadable_output_folder(compressed_run, cli_files):
    out = compressed_run["out"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", DESCRIPTION, "tokenizer.json", "tokenizer_config.json"} <= names
    assert sorted(p.name for p in compressed_run["root"].iterdir()) == ["out", "report.json"]  # no temp folder
    model, tokenizer = cospadi.load(out)
    assert tokenizer is not None and len(tokenizer) == cli_files["vocab"]
    for i, layer in enumerate(model.model.layers):
        for name in TARGETS:
            assert isinstance(layer.get_submodule(name), DictLinear), f"block {i} {name}"
    description = json.loads((out / DESCRIPTION).read_text())
    assert description["report"]["summary"]["method"] == description["report"]["method"] == "cospadi"
    entry = json.loads((out / "config.json").read_text())["quantization_config"]
    assert entry["quant_method"] == "cospadi" and len(entry["modules"]) == LAYERS * len(TARGETS)


def test_compress_json_has_one_entry_per_compressed_linear(compressed_run):
    data = json.loads(compressed_run["json"].read_text())
    summary, report = data["summary"], data["report"]
    assert summary["method"] == report["method"] == "cospadi"
    assert report["ratio"] == 0.3
    assert report["calibration"] == {"samples": 4, "seq_len": SEQ_LEN}
    assert report["options"]["rounds"] == 7  # --rounds reaches the solver options
    matrices = report["matrices"]
    assert len(matrices) == LAYERS * len(TARGETS)
    assert {(m["layer"], m["name"]) for m in matrices} == {(i, n) for i in range(LAYERS) for n in TARGETS}
    model, _ = cospadi.load(compressed_run["out"])
    for m in matrices:
        module = model.model.layers[m["layer"]].get_submodule(m["name"])
        assert (m["d1"], m["d2"]) == (module.in_features, module.out_features)
        assert (m["atoms"], m["sparsity"]) == (module.atoms, module.sparsity)
        assert m["effective_params"] == module.dictionary.numel() + module.values.numel()
        assert 0 <= m["output_error"] < 1
    assert math.isfinite(summary["ppl"]) and math.isfinite(summary["dense ppl"])


def test_eval_of_the_output_folder_reproduces_the_compressed_perplexity(compressed_run, cli_files, capsys, parse_table,
                                                                       printed_rows):
    code = cli.main(["eval", "--model", str(compressed_run["out"]), "--data", str(cli_files["txt"]),
                     "--seq-len", str(SEQ_LEN), "--eval-windows", "2", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = parse_table(captured.out)
    assert len(rows) == 1
    compressed_ppl = json.loads(compressed_run["json"].read_text())["summary"]["ppl"]
    printed = float(rows[0]["token ppl"])
    assert math.isclose(printed, compressed_ppl, rel_tol=1e-3)
    full = printed_rows[-1][0]["token ppl"]
    assert math.isclose(full, compressed_ppl, rel_tol=1e-6), (full, compressed_ppl)


def test_eval_of_the_dense_folder_matches_the_dense_perplexity(compressed_run, cli_files, capsys, printed_rows):
    code = cli.main(["eval", "--model", str(cli_files["model"]), "--data", str(cli_files["txt"]),
                     "--seq-len", str(SEQ_LEN), "--eval-windows", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    dense_ppl = json.loads(compressed_run["json"].read_text())["summary"]["dense ppl"]
    assert math.isclose(printed_rows[-1][0]["token ppl"], dense_ppl, rel_tol=1e-6)


BAD_COMPRESS = {
    "ratio-0": {"--ratio": 0},
    "ratio-1": {"--ratio": 1},
    "ratio-1.5": {"--ratio": 1.5},
    "rho-0": {"--rho": 0},
    "rho-negative": {"--rho": -1},
    "method-foo": {"--method": "foo"},
    "iters-negative": {"--iters": -1},
    "rounds-0": {"--rounds": 0},
    "missing-model": {"--model": "MISSING"},
    "gpt2": {"--model": "GPT2"},
    "nan-weights": {"--model": "NAN"},
    "too-little-text": {"--calib-samples": 1000},
    "csv-data": {"--data": "CSV"},
    "missing-data": {"--data": "MISSING"},
}
EXPECTED_WORDS = {
    "ratio-0": "ratio", "ratio-1": "ratio", "ratio-1.5": "ratio", "rho-0": "rho", "rho-negative": "rho",
    "method-foo": "unknown method", "iters-negative": "iters", "rounds-0": "rounds", "missing-model": "does not exist",
    "gpt2": "not supported", "nan-weights": "non-finite", "too-little-text": "calibration",
    "csv-data": "extension", "missing-data": "does not exist",
}


def _resolve(value, cli_files, tmp_path):
    return {"MISSING": str(tmp_path / "no-such-thing"), "GPT2": str(cli_files["gpt2"]),
            "NAN": str(cli_files["nan"]), "CSV": str(cli_files["csv"])}.get(value, value)


def assert_clean_failure(code: int, captured, parent) -> str:
    assert code == 2, f"exit {code}; stderr:\n{captured.err}"
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"expected one error line, got:\n{captured.err}"
    assert captured.err.rstrip("\n").splitlines()[-1] == lines[0]  # the error line ends the output
    assert "\n" not in lines[0] and len(lines[0]) > len("error: ") + 10
    assert list(parent.iterdir()) == [], f"left behind: {sorted(p.name for p in parent.iterdir())}"
    return lines[0]


@pytest.mark.parametrize("case", list(BAD_COMPRESS))
def test_bad_compress_input_exits_2_with_one_error_line(case, cli_files, tmp_path, capsys):
    overrides = {k: _resolve(v, cli_files, tmp_path) for k, v in BAD_COMPRESS[case].items()}
    parent = tmp_path / "outs"
    parent.mkdir()
    code = cli.main(compress_args(cli_files, parent / "out", parent / "report.json", **overrides))
    line = assert_clean_failure(code, capsys.readouterr(), parent)
    assert EXPECTED_WORDS[case] in line.lower(), line


@pytest.mark.parametrize("folder", ["empty", "no-tokenizer"])
def test_model_folder_that_is_not_a_usable_model_exits_2(folder, cli_files, tmp_path, capsys):
    """An existing folder that holds no model (a --model pointing at the wrong folder), or
    a model saved without its tokenizer, is bad input like a missing path: one error line,
    status 2, no traceback (today transformers' ValueError escapes load_model)."""
    parent = tmp_path / "outs"
    parent.mkdir()
    code = cli.main(compress_args(cli_files, parent / "out", **{"--model": str(cli_files[folder])}))
    line = assert_clean_failure(code, capsys.readouterr(), parent)
    assert str(cli_files[folder]) in line


def test_quiet_compress_prints_no_progress_bars(compressed_run):
    """--quiet means "no progress bars": stderr of a successful quiet run stays empty
    (transformers' own "Loading weights" bar included)."""
    assert compressed_run["code"] == 0
    assert compressed_run["stderr"] == "", compressed_run["stderr"]


@pytest.mark.parametrize("argv", [["--seq-len", "0"], ["--eval-windows", "0"], ["--data", "CSV"],
                                  ["--model", "MISSING"]])
def test_bad_eval_input_exits_2_with_one_error_line(argv, cli_files, tmp_path, capsys):
    argv = [_resolve(a, cli_files, tmp_path) for a in argv]
    base = {"--model": str(cli_files["model"]), "--data": str(cli_files["txt"]), "--seq-len": str(SEQ_LEN),
            "--eval-windows": "2"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    parent = tmp_path / "empty"
    parent.mkdir()
    code = cli.main(["eval"] + [x for pair in base.items() for x in pair] + ["--quiet"])
    assert_clean_failure(code, capsys.readouterr(), parent)


# ---------------------------------------------------------------------------- bench

def bench_args(cli_files, cache, output, methods="svd,cospadi", ratios="0.3") -> list[str]:
    return ["bench", "--model", str(cli_files["model"]), "--data", str(cli_files["txt"]), "--methods", methods,
            "--ratios", ratios, "--iters", "2", "--calib-samples", "4", "--seq-len", str(SEQ_LEN),
            "--eval-windows", "2", "--cache", str(cache), "--output", str(output), "--quiet"]


def test_bench_uses_the_data_file(cli_files, tmp_path, capsys, printed_rows):
    """`bench --data FILE` must calibrate and evaluate on FILE: its dense row is the
    dense perplexity that `eval --data FILE` measures on the same windows."""
    code = cli.main(bench_args(cli_files, tmp_path / "cache", tmp_path / "B.md", methods="svd"))
    assert code == 0, capsys.readouterr().err
    bench_dense = printed_rows[-1][0]["token ppl"]
    code = cli.main(["eval", "--model", str(cli_files["model"]), "--data", str(cli_files["txt"]), "--seq-len",
                     str(SEQ_LEN), "--eval-windows", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    eval_dense = printed_rows[-1][0]["token ppl"]
    assert math.isclose(bench_dense, eval_dense, rel_tol=1e-6), (
        f"bench's dense perplexity {bench_dense:.4f} is not that of --data {cli_files['txt'].name} "
        f"({eval_dense:.4f}): bench ignores --data")


def test_bench_caches_cells_and_writes_one_row_per_cell(cli_files, tmp_path, capsys, monkeypatch, parse_table):
    calls = []
    real = api.compress

    def counting(model, tokenizer, *args, **kwargs):
        calls.append((kwargs["method"], kwargs["ratio"]))
        return real(model, tokenizer, *args, **kwargs)

    monkeypatch.setattr(api, "compress", counting)
    cache, output = tmp_path / "cache", tmp_path / "BENCH.md"
    output.write_text("# Benchmarks\n\nHand-written notes that must survive.\n")
    argv = bench_args(cli_files, cache, output, methods="svd,cospadi", ratios="0.3,0.5")

    assert cli.main(argv) == 0, capsys.readouterr().err
    first_out = capsys.readouterr().out
    assert sorted(calls) == [("cospadi", 0.3), ("cospadi", 0.5), ("svd", 0.3), ("svd", 0.5)]
    cells = sorted(p.name for p in cache.rglob("*.json"))
    solver = "-rho2-ksvd-orthogonal-r25-it2-sw8-p2-htp-mod"  # the solver options (--iters 2) name the dictionary cells only
    assert cells == [f"cospadi{solver}-0.3.json", f"cospadi{solver}-0.5.json", "dense.json", "svd-0.3.json",
                     "svd-0.5.json"]
    text = output.read_text()
    assert "Hand-written notes that must survive." in text
    rows = parse_table(text[text.index("<!-- bench:"):])
    assert [(r["method"], r["ratio"]) for r in rows] == [("dense", "0"), ("svd", "0.3"), ("cospadi", "0.3"),
                                                         ("svd", "0.5"), ("cospadi", "0.5")]
    for r in rows:
        assert math.isfinite(float(r["token ppl"])), r
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.json")}

    calls.clear()
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert calls == []  # every cell came from the cache
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.json")} == stamps
    assert parse_table(capsys.readouterr().out) == parse_table(first_out)
    again = output.read_text()
    assert again.count("<!-- bench:") == 1 and again.count("<!-- /bench:") == 1  # section replaced, not appended
    assert parse_table(again[again.index("<!-- bench:"):]) == rows

    # an interrupted sweep resumes: only the missing cell is computed
    next(cache.rglob(f"cospadi{solver}-0.5.json")).unlink()
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert calls == [("cospadi", 0.5)]


@pytest.mark.parametrize("methods,ratios,word", [("svd,foo", "0.3", "unknown method"), ("svd", "0.3,1.5", "ratio"),
                                                 ("svd", "a,b", "ratios")])
def test_bad_bench_input_exits_2_and_writes_nothing(methods, ratios, word, cli_files, tmp_path, capsys):
    parent = tmp_path / "outs"
    parent.mkdir()
    code = cli.main(bench_args(cli_files, parent / "cache", parent / "BENCH.md", methods=methods, ratios=ratios))
    line = assert_clean_failure(code, capsys.readouterr(), parent)
    assert word in line.lower(), line
