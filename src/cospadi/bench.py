"""`cospadi bench`: a methods x ratios sweep on one model with the same calibration and
evaluation windows for every cell. Each finished cell is cached as JSON under the run
folder, so an interrupted sweep resumes where it stopped; the table goes into
BENCHMARKS.md between markers that name the sweep."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import api
from .budget import check_ratio
from .data import load_corpus
from .evaluate import perplexity
from .methods import METHODS, SolverOptions, check_method
from .models import load_model
from .report import results_table


@dataclass(frozen=True)
class Sweep:
    """What one sweep runs; `key` names its cache folder and its BENCHMARKS.md section."""

    model: str = "smollm2-135m"
    data: str = "wiki"
    methods: tuple[str, ...] = METHODS
    ratios: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5)
    calib_samples: int = api.DEFAULT_CALIB_SAMPLES
    seq_len: int = api.DEFAULT_SEQ_LEN
    eval_windows: int = api.DEFAULT_EVAL_WINDOWS
    options: SolverOptions = SolverOptions()

    @property
    def key(self) -> str:
        """Readable names plus a digest of the full model and data paths (two files both
        called corpus.txt must not share a cache)."""
        o = self.options
        digest = hashlib.sha1(f"{Path(self.model).resolve() if Path(self.model).exists() else self.model}|"
                              f"{Path(self.data).resolve() if Path(self.data).exists() else self.data}".encode())
        return (f"{Path(self.model).name}-{Path(self.data).stem}-{digest.hexdigest()[:8]}-c{self.calib_samples}x{self.seq_len}-e{self.eval_windows}"
                f"-rho{o.rho:g}-{o.solver}-{o.init}-it{o.iters}-sw{o.sweeps}-p{o.power_iters}-s{o.seed}")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run_sweep(sweep: Sweep, cache: Path, progress: bool = True) -> list[dict]:
    """Run (or read from `cache`) the dense cell and every method x ratio cell; return
    the rows in sweep order. A cell is written only once it has finished."""
    for method in sweep.methods:
        check_method(method)
    for ratio in sweep.ratios:
        check_ratio(ratio)
    calib_texts, eval_texts = load_corpus(sweep.data)
    model, tokenizer = load_model(sweep.model)
    folder = cache / sweep.key
    folder.mkdir(parents=True, exist_ok=True)
    ids = api.calibration_ids(model, tokenizer, calib_texts, sweep.calib_samples, sweep.seq_len, sweep.options.seed)
    windows = api.evaluation_ids(model, tokenizer, eval_texts, sweep.seq_len, sweep.eval_windows)
    dense_path = folder / "dense.json"
    if not dense_path.exists():
        _write_json(dense_path, {"method": "dense", "ratio": 0.0, "token_ppl": perplexity(model, windows, progress=progress)})
    rows = [json.loads(dense_path.read_text())]
    for ratio in sweep.ratios:
        for method in sweep.methods:
            path = folder / f"{method}-{ratio:g}.json"
            if not path.exists():
                model, _ = load_model(sweep.model)  # fresh dense weights for every cell
                start = time.perf_counter()
                _, report = api.compress(model, tokenizer, input_ids=ids, method=method, ratio=ratio,
                                         progress=progress, **asdict(sweep.options))
                seconds = time.perf_counter() - start
                _write_json(path, {"method": method, "ratio": ratio, "token_ppl": perplexity(model, windows, progress=progress),
                                   "seconds": seconds, "linear_ratios": report.linear_ratios,
                                   "model_ratios": report.model_ratios, "peak_rss_mb": report.peak_rss_mb})
            rows.append(json.loads(path.read_text()))
    return rows


def table_rows(rows: list[dict]) -> list[dict]:
    """Rows for results_table: one per cell, dense first."""
    dense = rows[0]["token_ppl"]
    out = [{"method": "dense", "ratio": "0", "eff. ratio": "-", "storage ratio": "-", "token ppl": dense,
            "x dense": 1.0, "time (s)": "-"}]
    for r in rows[1:]:
        out.append({"method": r["method"], "ratio": f"{r['ratio']:g}",
                    "eff. ratio": f"{r['linear_ratios']['effective']:.3f}",
                    "storage ratio": f"{r['linear_ratios']['storage']:.3f}", "token ppl": r["token_ppl"],
                    "x dense": r["token_ppl"] / dense, "time (s)": round(r["seconds"])})
    return out


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the part of `path` between the markers of section `name`."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def describe(sweep: Sweep, command: str) -> str:
    """The header that says exactly what a sweep measured and how to reproduce it."""
    o = sweep.options
    return (f"Model `{sweep.model}`; calibration {sweep.calib_samples} x {sweep.seq_len} tokens ({sweep.data}, "
            f"seed {o.seed}); "
            f"token perplexity on {sweep.eval_windows} x {sweep.seq_len} held-out tokens; cospadi rho={o.rho:g}, "
            f"solver={o.solver}, init={o.init}, iters={o.iters}, sweeps={o.sweeps}, power_iters={o.power_iters}. Ratios are over the compressed linears "
            f"(eff. = eq. 11, storage = eq. 10 with the bitmask). {torch.get_num_threads()} CPU threads.\n\n"
            f"Reproduce: `{command}`\n")
