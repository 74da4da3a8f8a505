"""Accuracy beyond perplexity and the bench that reports it: the local lm-eval tasks
(LAMBADA-style last-word accuracy and word perplexity built from held-out text) load and
score a model exactly as an independent computation does; `cospadi eval --tasks` prints
their metrics; `cospadi bench` caches every cell, grouped ones included, skips finished
cells on a rerun, and writes the table and a PNG plot."""
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from cospadi import api, cli
from cospadi.evaluation.lm_eval_runner import evaluate_tasks
from cospadi.evaluation.lm_eval_tasks import LASTWORD, WORDPPL, lastword_passage, lastword_passages, write_tasks

SEQ_LEN = 32

DOCS = [
    "The harbour town of Kessel grew around a deep natural bay. Fishermen sold their catch on the quay, and "
    "merchants built warehouses along the water. In winter the bay froze, so every ship left before December "
    "and returned to the harbour.",
    "Short text without enough words.",
    "Marta learned to play the violin from her uncle, who repaired instruments in a small workshop. She "
    "practised every evening after school, and by the age of twelve she performed in the village church "
    "on her own violin.",
    "A river crosses the valley from north to south. Its water feeds the mills and the farms along both banks. "
    "Nobody remembers when the first bridge was built, but the present one is made of stone.",
    "The library opened in the spring with four hundred books donated by families of the parish. Readers "
    "borrowed novels, atlases and almanacs, and the shelves soon held more than a thousand volumes in the "
    "new library.",
]


# ---------------------------------------------------------------------------- the task data

def test_lastword_passages_end_on_a_word_the_context_contains():
    passages = lastword_passages(DOCS, 10)
    assert len(passages) == 3  # the short text and the stone bridge (no earlier "stone") yield none
    assert [p.split(" ")[-1] for p in passages] == ["harbour", "violin", "library"]
    for passage in passages:
        *context, target = passage.split(" ")
        assert target.isalpha() and target.lower() in {w.strip(".,").lower() for w in context}
        assert "  " not in passage and 20 <= len(context) + 1 <= 120
    assert lastword_passages(DOCS, 2) == passages[:2]  # in document order, capped
    assert lastword_passage(DOCS[1]) is None and lastword_passage(DOCS[3]) is None


def test_write_tasks_writes_lm_eval_configs_that_load(tmp_path):
    from lm_eval.tasks import TaskManager

    folder = write_tasks(tmp_path / "tasks", DOCS, lastword_examples=2, wordppl_docs=3)
    rows = [json.loads(line)["text"] for line in (folder / f"{LASTWORD}.jsonl").read_text().splitlines()]
    assert rows == lastword_passages(DOCS, 2)
    docs = [json.loads(line)["text"] for line in (folder / f"{WORDPPL}.jsonl").read_text().splitlines()]
    assert docs == DOCS[:3]
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    tasks = manager.load([LASTWORD, WORDPPL])["tasks"]
    lastword = next(t for name, t in tasks.items() if LASTWORD in str(name))
    doc = next(iter(lastword.test_docs()))
    assert lastword.doc_to_text(doc) + lastword.doc_to_target(doc) == rows[0]
    assert lastword.doc_to_target(doc) == " harbour"


def test_write_tasks_refuses_text_without_passages(tmp_path):
    from cospadi.errors import CospadiError

    with pytest.raises(CospadiError, match="passages"):
        write_tasks(tmp_path / "t", ["too short"], 5, 5)


# ---------------------------------------------------------------------------- scoring

def _logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return F.log_softmax(logits, dim=-1)


def test_local_tasks_score_smollm2_as_an_independent_computation(smollm2):
    """lm-eval's acc / target perplexity / word perplexity of the local tasks equal the
    same quantities computed here with plain forward passes."""
    model, tok = smollm2
    results = evaluate_tasks(model, tok, [LASTWORD, WORDPPL], DOCS, lastword_examples=10, wordppl_docs=2)
    hits, target_lls = [], []
    for passage in lastword_passages(DOCS, 10):
        context, word = passage.rsplit(" ", 1)
        ctx = tok(context, add_special_tokens=False).input_ids
        cont = tok(context + " " + word, add_special_tokens=False).input_ids[len(ctx):]
        logp = _logprobs(model, ctx + cont[:-1])[len(ctx) - 1:]
        target_lls.append(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()))
        hits.append(logp.argmax(-1).tolist() == cont)
    lastword = results[LASTWORD]
    assert lastword["n"] == 3
    assert lastword["acc"] == pytest.approx(sum(hits) / len(hits))
    assert lastword["target ppl"] == pytest.approx(math.exp(-sum(target_lls) / len(target_lls)), rel=1e-4)
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    total, words = 0.0, 0
    for doc in DOCS[:2]:
        ids = tok(doc, add_special_tokens=False).input_ids
        logp = _logprobs(model, [prefix] + ids[:-1])
        total += float(logp.gather(1, torch.tensor(ids)[:, None]).sum())
        words += len(re.split(r"\s+", doc))
    assert results[WORDPPL]["word ppl"] == pytest.approx(math.exp(-total / words), rel=1e-4)


# ---------------------------------------------------------------------------- command line

def test_eval_tasks_prints_lm_eval_columns(cli_files, capsys, printed_rows):
    argv = ["eval", "--model", str(cli_files["model"]), "--data", str(cli_files["txt"]), "--seq-len", str(SEQ_LEN),
            "--eval-windows", "2", "--tasks", f"{LASTWORD},{WORDPPL}", "--wordppl-docs", "3", "--quiet"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    row = printed_rows[-1][0]
    assert 0.0 <= row[f"{LASTWORD} acc"] <= 1.0 and row[f"{LASTWORD} n"] >= 1
    assert row[f"{WORDPPL} n"] == 3 and math.isfinite(row[f"{WORDPPL} word ppl"]) and row[f"{WORDPPL} word ppl"] > 1
    assert math.isfinite(row["token ppl"])
    assert capsys.readouterr().err == ""  # --quiet: no bars from lm-eval or datasets


@pytest.mark.parametrize("tasks,word", [("", "no task"), ("no_such_task_xyz", "no task 'no_such_task_xyz'")])
def test_eval_with_bad_tasks_exits_2(tasks, word, cli_files, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model loaded before the task check"))
    argv = ["eval", "--model", str(cli_files["model"]), "--data", str(cli_files["txt"]), "--seq-len", str(SEQ_LEN),
            "--eval-windows", "1", "--tasks", tasks, "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and word in err[0], err


def test_bench_caches_grouped_cells_with_every_measure_and_draws_the_plot(cli_files, tmp_path, capsys, monkeypatch,
                                                                          parse_table):
    calls = []
    real = api.compress

    def counting(model, tokenizer, *args, **kwargs):
        calls.append((kwargs["method"], kwargs["ratio"], kwargs["group_size"]))
        return real(model, tokenizer, *args, **kwargs)

    monkeypatch.setattr(api, "compress", counting)
    cache, output, plot = tmp_path / "cache", tmp_path / "BENCH.md", tmp_path / "plots" / "p.png"
    argv = ["bench", "--model", str(cli_files["model"]), "--data", str(cli_files["txt"]), "--methods",
            "svd-llm,basis-sharing,cospadi-group", "--ratios", "0.4", "--calib-samples", "4", "--seq-len",
            str(SEQ_LEN), "--eval-windows", "2", "--lastword-examples", "4", "--wordppl-docs", "2", "--cache",
            str(cache), "--output", str(output), "--plot", str(plot), "--quiet"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert sorted(calls) == [("basis-sharing", 0.4, 2), ("cospadi", 0.4, 2), ("svd-llm", 0.4, 1)]
    names = sorted(p.name for p in cache.rglob("*.json"))
    assert names == ["basis-sharing-g2-0.4.json",
                     "cospadi-group-g2-shgate+up-rho2-ksvd-orthogonal-r25-it0-sw8-p2-htp-mod-0.4.json",
                     "dense.json", "svd-llm-0.4.json"]
    for path in cache.rglob("*.json"):
        cell = json.loads(path.read_text())
        assert math.isfinite(cell["token_ppl"]) and math.isfinite(cell["word_ppl"]) and cell["wordppl_docs"] == 2
        assert 0.0 <= cell["lastword_acc"] <= 1.0 and cell["lastword_n"] >= 1
        if cell["method"] != "dense":
            assert cell["seconds"] > 0 and 0.35 < cell["linear_ratios"]["effective"] < 0.45
            assert cell["group_size"] == (1 if cell["method"] == "svd-llm" else 2)
    text = output.read_text()
    rows = parse_table(text[text.index("<!-- bench:"):])
    assert [r["method"] for r in rows] == ["dense", "svd-llm", "basis-sharing", "cospadi-group"]
    assert {"token ppl", "word ppl", "last-word acc", "eff. ratio", "storage ratio", "model eff. / storage",
            "time (s)"} <= set(rows[0])
    assert "](plots/p.png)" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    assert imread(plot).shape[0] > 100
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.json")}

    calls.clear()
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert calls == [] and {p: p.stat().st_mtime_ns for p in cache.rglob("*.json")} == stamps
    # another group size is another cell for the grouped methods only
    assert cli.main(argv[:-1] + ["--group-size", "1", "--quiet"]) == 0, capsys.readouterr().err
    assert sorted(calls) == [("basis-sharing", 0.4, 1), ("cospadi", 0.4, 1)]


@pytest.mark.parametrize("extra,word", [(["--group-size", "0"], "group size"), (["--lastword-examples", "-1"],
                                                                                 "lastword-examples")])
def test_bad_bench_settings_exit_2_before_any_work(extra, word, cli_files, tmp_path, capsys):
    argv = ["bench", "--model", str(cli_files["model"]), "--data", str(cli_files["txt"]), "--methods", "cospadi-group",
            "--ratios", "0.3", "--cache", str(tmp_path / "cache"), "--output", str(tmp_path / "B.md"), "--quiet"]
    assert cli.main(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_sweep_keys_name_the_lm_eval_settings_and_solver_options_name_only_dictionary_cells():
    from cospadi.bench.sweep import Sweep
    from cospadi.solvers import SolverOptions

    plain, other = Sweep(lastword_examples=0, wordppl_docs=0), Sweep(options=SolverOptions(sweeps=3, power_iters=1))
    assert "-lw" not in plain.key and "-lw300-wd100-" in Sweep().key and Sweep(lastword_examples=50).key != Sweep().key
    assert other.key == Sweep().key  # one cache folder: the baselines are shared across solver settings
    for label in ("svd", "svd-llm", "basis-sharing"):
        assert other.cell_name(label, 0.3) == Sweep().cell_name(label, 0.3)
    for label in ("cospadi", "cospadi-group"):
        assert other.cell_name(label, 0.3) != Sweep().cell_name(label, 0.3)
    assert Sweep().cell_name("cospadi-group", 0.3) == \
        "cospadi-group-g2-shgate+up-rho2-ksvd-orthogonal-r25-it0-sw8-p2-htp-mod-0.3.json"
    ksvd = Sweep(options=SolverOptions(update="ksvd"))  # the cells taken before mod became the default keep their names
    assert ksvd.cell_name("cospadi-group", 0.3) == \
        "cospadi-group-g2-shgate+up-rho2-ksvd-orthogonal-r25-it0-sw8-p2-htp-0.3.json"


def test_plot_clips_collapsed_methods_to_the_top_edge():
    from cospadi.bench.plot import clip_to_scale

    points, off = clip_to_scale([(0.2, 30.0), (0.3, 2e8)], ceiling=1e4)
    assert points == [(0.2, 30.0), (0.3, 1e4)] and off
    assert clip_to_scale([(0.2, 30.0)], ceiling=1e4) == ([(0.2, 30.0)], False)
