"""The command line of this issue, driven in-process through cospadi.cli.main on a tiny
random Llama with the real SmolLM2 tokenizer: `compress --dtype --coef-bits` writes a
compact folder that `eval` and `export --dense` read; `bench-infer` saves the three
models once, measures them in worker processes and writes one marked section (rows,
ratios to dense, target verdicts) into the Markdown file; bad input exits with status 2
and one `error:` line, leaving nothing behind."""

import json
import random

import pytest
import torch

import cospadi
from cospadi import api, cli
from cospadi.bench import infer as bench_infer
from cospadi.bench import infer_worker
from cospadi.layers.linear import DictLinear

SEQ_LEN = 32


def corpus(paragraphs: int = 80, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["river", "village", "library", "engineer", "council", "museum", "orchestra", "railway", "harbour",
             "bridge", "meadow", "archive", "festival", "century", "merchants", "travellers", "valley", "summer",
             "winter", "storms", "buildings", "square"]
    return "\n\n".join(" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(paragraphs)) + "\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory, cli_files):
    """The tiny Llama folder of conftest.py's cli_files, and this module's corpus."""
    root = tmp_path_factory.mktemp("cli-infer")
    (root / "corpus.txt").write_text(corpus())
    return {"model": cli_files["model"], "txt": root / "corpus.txt"}


def compress_argv(files, out, *extra) -> list[str]:
    return ["compress", "--model", str(files["model"]), "--data", str(files["txt"]), "--method", "cospadi",
            "--iters", "1", "--calib-samples", "4", "--seq-len", str(SEQ_LEN), "--eval-windows", "0",
            "--out", str(out), "--quiet", *extra]


def one_error_line(code: int, captured) -> str:
    assert code == 2, captured.err
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, captured.err
    return lines[0]


def test_compress_with_compact_storage_then_eval_and_export(files, tmp_path, capsys):
    out = tmp_path / "compact"
    assert cli.main(compress_argv(files, out, "--dtype", "bfloat16", "--coef-bits", "14")) == 0, \
        capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["quantization_config"]["coef_bits"] == 14
    model, tokenizer = cospadi.load(out)
    module = model.model.layers[0].mlp.gate_proj
    assert isinstance(module, DictLinear) and module.coef_bits == 14 and model.dtype == torch.bfloat16
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(out), "--data", str(files["txt"]), "--seq-len", str(SEQ_LEN),
                     "--eval-windows", "1", "--quiet"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(["export", "--dense", str(out), str(tmp_path / "dense"), "--quiet"]) == 0, \
        capsys.readouterr().err
    assert "exported" in capsys.readouterr().out
    exported = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in exported and (tmp_path / "dense" / "tokenizer.json").is_file()


@pytest.mark.parametrize("argv,word", [
    (["export", "FOLDER", "OUT"], "--dense"),
    (["export", "--dense", "DENSE", "OUT"], "not a cospadi output folder"),
    (["export", "--dense", "MISSING", "OUT"], "does not exist"),
    (["bench-infer", "--batches", "1,x"], "--batches"),
    (["bench-infer", "--methods", "svd,foo"], "unknown method"),
    (["bench-infer", "--repeats", "0"], "--repeats"),
    (["bench-infer", "--storage-dtype", "int4"], "dtype"),
    (["bench-infer", "--ratio", "1.5"], "ratio"),
    (["bench-infer", "--rho", "0.5"], "rho"),
])
def test_bad_export_and_bench_infer_input_exits_2(argv, word, files, tmp_path, capsys):
    parent = tmp_path / "outs"
    parent.mkdir()
    paths = {"FOLDER": str(files["model"]), "DENSE": str(files["model"]), "MISSING": str(tmp_path / "missing"),
             "OUT": str(parent / "out")}
    argv = [paths.get(a, a) for a in argv]
    if argv[0] == "bench-infer":
        argv += ["--model", str(files["model"]), "--work", str(parent / "work"), "--output", str(parent / "B.md")]
    line = one_error_line(cli.main(argv), capsys.readouterr())
    assert word in line, line
    assert list(parent.iterdir()) == []


def bench_argv(files, work, output) -> list[str]:
    return ["bench-infer", "--model", str(files["model"]), "--data", str(files["txt"]), "--calib-samples", "4",
            "--seq-len", str(SEQ_LEN), "--prompt-len", "8", "--new-tokens", "4", "--prefill-len", "16",
            "--batches", "1,2", "--repeats", "2", "--threads", "1", "--work", str(work), "--output", str(output),
            "--quiet"]


def test_bench_infer_measures_three_models_and_writes_one_section(files, tmp_path, capsys, monkeypatch):
    """Workers run in-process here (a fresh process each costs seconds of imports); the
    next test runs one through its own process."""
    output = tmp_path / "BENCH.md"
    output.write_text("# Benchmarks\n\nNotes that must survive.\n")
    work = tmp_path / "work"
    specs = []
    monkeypatch.setattr(bench_infer, "run_worker", lambda spec: specs.append(spec) or infer_worker.measure(spec))
    assert cli.main(bench_argv(files, work, output)) == 0, capsys.readouterr().err
    # per run dtype: one interleaved speed run, then memory per model
    assert [s["mode"] for s in specs] == (["speed"] + ["memory"] * 4) * 2
    assert [s["compute_dtype"] for s in specs] == ["float32"] * 5 + ["bfloat16"] * 5
    labels = ["dense", "svd-llm", "cospadi", "cospadi (dense path only)"]
    assert [(m["label"], m["path"]) for m in specs[0]["models"]] == list(zip(labels, ["auto"] * 3 + ["dense"]))
    assert specs[0]["batches"] == [1, 2] and specs[0]["detail_label"] == "cospadi"
    assert [s["path"] for s in specs[1:5]] == ["auto", "auto", "auto", "dense"]
    assert all(s["threads"] == 1 and s["new_tokens"] == 4 for s in specs)
    text = output.read_text()
    assert "Notes that must survive." in text and text.count("<!-- bench:infer-") == 1
    section = text[text.index("<!-- bench:infer-"):]
    assert "Reproduce: `cospadi bench-infer" in section or "Reproduce: `cospadi " in section
    table = section[section.index("| model"):].split("\n\n")[0]  # the first table: one row per model
    rows = [line for line in table.splitlines()[2:]]
    keys = [tuple(c.strip() for c in row.split("|")[1:3]) for row in rows]
    assert keys == [(label, dtype) for dtype in ("float32", "bfloat16") for label in labels]
    cells = {key: [c.strip() for c in row.split("|")[3:-1]] for key, row in zip(keys, rows)}
    header = [c.strip() for c in table.splitlines()[0].split("|")[1:-1]]
    assert "first token b2 x dense" in header and "prefill b2 x dense" in header
    for dtype in ("float32", "bfloat16"):
        peak_x_dense = header.index("peak RSS x dense") - 2  # the cells start after model and run dtype
        assert cells["dense", dtype][1] == "1" and cells["dense", dtype][peak_x_dense] == "1"  # bytes and peak RSS
        assert 0.5 < float(cells["cospadi", dtype][1]) < 0.8 and 0.5 < float(cells["svd-llm", dtype][1]) < 0.8
    runtime = [i - 2 for i, name in enumerate(header) if "above runtime" in name]  # what the model adds: any sign
    for key, values in cells.items():
        assert all(float(c) > 0 for i, c in enumerate(values) if i not in runtime), (key, values)
    assert "linear-weight bytes" in section and "prefill batch 2" in section and "decode vs svd-llm" in section
    assert "peak RSS generating" in section and section.count("sparse / dense") == 2
    assert "| 64 |" in section and "Load average" in section and "cospadi with rho=2 and update=" in section
    folders = sorted(p.name for p in next(work.iterdir()).iterdir())
    assert folders == ["cospadi", "dense", "svd-llm"]

    # a second run reuses the saved models and replaces the section, now with the profiles
    monkeypatch.setattr(api, "compress", lambda *a, **k: pytest.fail("recompressed a saved model"))
    assert cli.main(bench_argv(files, work, output) + ["--profile"]) == 0, capsys.readouterr().err
    again = output.read_text()
    assert again.count("<!-- bench:infer-") == 1 and "Notes that must survive." in again
    for dtype in ("float32", "bfloat16"):  # cospadi's decode and prefill, and dense's decode beside them
        for title in ("decode** (cospadi", "decode** (dense", "prefill** (cospadi"):
            assert f"{title} at {dtype}, top operators" in again, (title, dtype)
    assert "aten::" in again and "profile" not in section


def test_worker_process_measures_a_saved_model(files, tmp_path):
    model, tokenizer = cospadi.load_model(str(files["model"]))
    ids = torch.randint(0, 300, (8, 24), generator=torch.Generator().manual_seed(1))
    model, report = api.compress(model, tokenizer, input_ids=ids, method="cospadi", ratio=0.3, iters=1,
                                 progress=False)
    cospadi.save(model, tokenizer, tmp_path / "m", report.to_dict())
    spec = {"mode": "speed", "models": [{"label": "a", "folder": str(tmp_path / "m"), "path": "auto"},
                                        {"label": "b", "folder": str(tmp_path / "m"), "path": "dense"}],
            "threads": 1, "compute_dtype": "float32", "tokens": list(range(40, 80)), "prompt_len": 4, "new_tokens": 3,
            "prefill_len": 10, "batches": [1, 2], "repeats": 2, "detail_label": "a", "crossover": [1, 3],
            "profile": True}
    result = bench_infer.run_worker(spec)
    for label in ("a", "b"):
        assert len(result[label]["decode_s"]) == 2 and result[label]["generated"] == 8  # the warm-up's count
        for kind in ("prefill_s", "first_token_s"):
            assert sorted(result[label][kind]) == ["1", "2"]
            assert all(len(v) == 2 and min(v) > 0 for v in result[label][kind].values())
    assert sorted(result["detail"]["crossover"]) == ["1", "3"]
    assert "aten::" in result["detail"]["profile_decode"] and "aten::" in result["detail"]["profile_prefill"]
    common = {k: spec[k] for k in ("threads", "compute_dtype", "tokens", "prompt_len", "new_tokens")}
    rss = bench_infer.run_worker(common | {"mode": "memory", "folder": str(tmp_path / "m"), "path": "auto"})
    assert rss["peak_rss_mib"] > 50 and rss["peak_rss_scope"] in ("while generating", "whole process")
    assert 0 < rss["tensor_mib"] < rss["peak_rss_mib"]
    assert 50 < rss["runtime_rss_mib"] < rss["peak_rss_mib"] + 1  # torch and transformers loaded, the model not yet
    with pytest.raises(cospadi.CospadiError, match="measuring .* failed"):
        bench_infer.run_worker(spec | {"models": [{"label": "a", "folder": str(tmp_path / "missing"), "path": "auto"}]})
