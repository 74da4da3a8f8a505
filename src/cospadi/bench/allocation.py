"""`cospadi bench-allocation`: the two measurements behind the knapsack allocation
(docs/allocation.md).

1. Costs: per method and ratio, uniform against the knapsack under each cost, scored by
   token perplexity on a VALIDATION split carved from the calibration text (its last
   documents, which the calibration windows never see), never the held-out evaluation
   split; the cost with the lower validation perplexity is the default.
2. Proxy: for the dictionary method, how well the profile's cheap error (the orthogonal
   dictionary, solvers/profile.py) ranks against the default solver's real error on real
   matrices and Grams of a few blocks (Spearman rank correlation)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from .. import api
from ..allocation import COSTS
from ..data import load_corpus
from ..errors import CospadiError
from ..evaluation.perplexity import perplexity
from ..methods import get_method
from ..models import load_model
from ..solvers import SolverOptions, output_error
from .solver import block_matrices

VALIDATION_SHARE = 0.1  # the last tenth of the calibration documents


def split_validation(texts: list[str]) -> tuple[list[str], list[str]]:
    """(calibration documents, validation documents): the last VALIDATION_SHARE of `texts`
    (at least one document) is held out for choosing the cost."""
    if len(texts) < 2:
        raise CospadiError("the calibration text needs at least 2 documents to carve a validation split")
    cut = len(texts) - max(1, round(len(texts) * VALIDATION_SHARE))
    return texts[:cut], texts[cut:]


def compare_costs(model_name: str, data: str, methods: list[str], ratios: list[float], calib_samples: int,
                  seq_len: int, windows: int, options: SolverOptions, cache: Path,
                  progress: bool = True) -> list[dict]:
    """One row per (method, ratio, allocation/cost): validation token perplexity and
    compression seconds (profiling included; the profile is measured once per method and
    shared by the costs, so the first knapsack row of a method carries it)."""
    calib_texts, _ = load_corpus(data)
    calib_texts, validation_texts = split_validation(calib_texts)
    model, tokenizer = load_model(model_name)
    ids = api.calibration_ids(model, tokenizer, calib_texts, calib_samples, seq_len, options.seed)
    valid = api.evaluation_ids(model, tokenizer, validation_texts, seq_len, windows)
    rows = [{"method": "dense", "ratio": 0.0, "allocation": "-",
             "validation ppl": perplexity(model, valid, progress=progress), "eff. ratio": 0.0, "seconds": 0.0}]
    for method in methods:
        for ratio in ratios:
            for allocation, cost in [("uniform", "-")] + [("knapsack", c) for c in COSTS]:
                model, _ = load_model(model_name)
                start = time.perf_counter()
                model, report = api.compress(model, tokenizer, input_ids=ids, method=method, ratio=ratio,
                                             allocation=allocation, cost=cost if cost != "-" else "fisher",
                                             profile_cache=str(cache), progress=progress, **vars(options))
                rows.append({"method": method, "ratio": ratio, "allocation": f"{allocation} {cost}".strip(" -"),
                             "validation ppl": perplexity(model, valid, progress=progress),
                             "eff. ratio": report.linear_ratios["effective"],
                             "seconds": time.perf_counter() - start})
    return rows


def time_allocations(model_name: str, data: str, methods: list[str], ratio: float, calib_samples: int,
                     seq_len: int, repeats: int, options: SolverOptions, progress: bool = True) -> list[dict]:
    """One row per (method, allocation): median whole-model compression seconds over
    `repeats` alternating runs (uniform, knapsack, uniform, ...), the knapsack's profiling
    share, and the knapsack / uniform ratio of the medians. Calibration: the usual windows
    from the whole calibration text."""
    model, tokenizer = load_model(model_name)
    ids = api.calibration_ids(model, tokenizer, load_corpus(data)[0], calib_samples, seq_len, options.seed)
    rows = []
    for method in methods:
        seconds: dict[str, list[float]] = {"uniform": [], "knapsack": []}
        allocating: list[float] = []
        for _ in range(repeats):
            for allocation in seconds:
                model, _ = load_model(model_name)
                start = time.perf_counter()
                _, report = api.compress(model, tokenizer, input_ids=ids, method=method, ratio=ratio,
                                         allocation=allocation, profile_cache=None, progress=progress, **vars(options))
                seconds[allocation].append(time.perf_counter() - start)
                if allocation == "knapsack":
                    allocating.append(report.allocation["seconds"])
        uniform = float(torch.tensor(seconds["uniform"]).median())
        knapsack = float(torch.tensor(seconds["knapsack"]).median())
        rows += [{"method": method, "ratio": ratio, "allocation": "uniform", "seconds (median)": uniform,
                  "of which allocating": 0.0, "x uniform": 1.0, "runs": repeats},
                 {"method": method, "ratio": ratio, "allocation": "knapsack", "seconds (median)": knapsack,
                  "of which allocating": float(torch.tensor(allocating).median()), "x uniform": knapsack / uniform,
                  "runs": repeats}]
    return rows


def proxy_agreement(model_name: str, blocks: list[int], ratios: list[float], calib_samples: int, seq_len: int,
                    seed: int, cache: Path, options: SolverOptions) -> tuple[list[dict], dict]:
    """Per (block, matrix, ratio): the dictionary's relative error from the profile's proxy
    and from the default solver; and the Spearman rank correlations between them, over
    all pairs and, averaged, among matrices at one ratio (what the knapsack trades)."""
    method = get_method("cospadi")
    rows = []
    for block in blocks:
        for name, (weight, gram) in block_matrices(model_name, block, calib_samples, seq_len, seed, cache).items():
            d1, d2 = weight.shape
            energy = float(((gram.double() @ weight.double()) * weight.double()).sum())
            budgets = [method.budget(d1, d2, r, options) for r in ratios]
            proxy = method.error_curve([weight], [gram], budgets, options)
            for ratio, budget, estimate in zip(ratios, budgets, proxy):
                factors = method.solve([weight], [gram], budget, options)[0]
                rows.append({"block": block, "matrix": name, "ratio": ratio, "proxy error": (estimate / energy) ** 0.5,
                             "solver error": output_error(gram, weight, factors.weight())})
    pairs = [(r["proxy error"], r["solver error"]) for r in rows]
    per_ratio = [spearmanr(*zip(*[(r["proxy error"], r["solver error"]) for r in rows if r["ratio"] == ratio]))[0]
                 for ratio in ratios]
    summary = {"pairs": len(pairs), "spearman (all pairs)": float(spearmanr(*zip(*pairs))[0]),
               "spearman (matrices at one ratio, mean)": float(sum(per_ratio) / len(per_ratio)),
               "solver / proxy error (median)": float(torch.tensor([s / p for p, s in pairs]).median())}
    return rows, summary
