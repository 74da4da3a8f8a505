"""`cospadi bench-shapes`: the dictionary solver at the shapes of real models, where an
MLP's gate and up make the dictionary overcomplete (k > d1), side by side in one run:

* cases: real SmolLM2 matrices with their Grams (block 15's gate, 576 x 1536), a wide
  matrix made from real ones (gate and up of that block side by side, 576 x 3072, under
  their shared Gram), and random matrices under a synthetic decaying-spectrum Gram at
  Qwen2.5-0.5B's MLP shape (896 x 4864) and Llama-3-8B's (4096 x 14336, time only: hours
  on 2 CPU cores, so not in the default set);
* solvers: svd-llm at the same ratio; "complete", the default solver with k = d1 atoms
  and the same s (the error the overcomplete solver must not exceed, and its time
  reference); "default", the overcomplete default (with the dictionary update --update
  names: block (MOD) updates of all atoms at once unless told otherwise); "mod" and
  "sweeps", the default with the MOD update or the atom-by-atom K-SVD sweeps; "before",
  what the default did for k > d1 before the overcomplete start (an SVD start and one
  Batch-OMP alternation, then K-SVD sweeps).

`--estimate` adds the whole-model estimate: the solver time of every matrix of one block
of a model with Qwen2.5-0.5B's shapes (hidden 896, MLP 4864, 14 heads of 64, 2 KV heads)
for svd-llm and the cospadi default, times its 24 blocks."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from ..budget import DictBudget, dict_budget, lowrank_budget
from ..errors import CospadiError
from ..solvers import SolverOptions, cospadi, output_error, svd_llm
from .solver import block_matrices, time_solver

Case = tuple[torch.Tensor, torch.Tensor]  # W (d1, d2), Gram (d1, d1), float64
BEFORE = SolverOptions(init="svd", iters=1, coder="omp", update="ksvd")  # k > d1 before the overcomplete start
CASES = ("smollm2-gate", "smollm2-gate-up", "random-896x4864", "random-4096x14336")
DEFAULT_CASES = CASES[:3]
CONFIGS = ("svd-llm", "complete", "default", "mod", "sweeps", "before")
DEFAULT_CONFIGS = ("svd-llm", "complete", "default", "sweeps")
QWEN05 = {"self_attn.q_proj": (896, 896), "self_attn.k_proj": (896, 128), "self_attn.v_proj": (896, 128),
          "self_attn.o_proj": (896, 896), "mlp.gate_proj": (896, 4864), "mlp.up_proj": (896, 4864),
          "mlp.down_proj": (4864, 896)}
QWEN05_BLOCKS = 24


def synthetic_case(d1: int, d2: int, seed: int) -> Case:
    """A Gaussian weight (d1, d2) scaled by 1/sqrt(d1) and a Gram with a decaying spectrum
    (eigenvalues exp(-5 i / d1) + 1e-3 on a random basis), like real layer inputs."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d1, d2, generator=gen, dtype=torch.float64) / math.sqrt(d1)
    basis = torch.linalg.qr(torch.randn(d1, d1, generator=gen, dtype=torch.float64)).Q
    spectrum = torch.exp(-5.0 * torch.arange(d1, dtype=torch.float64) / d1) + 1e-3
    return weight, (basis * spectrum) @ basis.T


def load_cases(names: list[str], model: str, cache: Path, seed: int) -> dict[str, Case]:
    """name -> (W, Gram) for each requested case (CospadiError for an unknown one)."""
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise CospadiError(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    out: dict[str, Case] = {}
    if any(n.startswith("smollm2") for n in names):
        real = block_matrices(model, 15, 32, 512, seed, cache)
        gate, gram = real["mlp.gate_proj"]
        up = real["mlp.up_proj"][0]
        out["smollm2-gate"] = (gate.double(), gram)
        out["smollm2-gate-up"] = (torch.cat([gate, up], 1).double(), gram)
    if "random-896x4864" in names:
        out["random-896x4864"] = synthetic_case(896, 4864, seed)
    if "random-4096x14336" in names:
        out["random-4096x14336"] = synthetic_case(4096, 14336, seed)
    return {n: out[n] for n in names}


def _solvers(weight: torch.Tensor, gram: torch.Tensor, ratio: float,
             options: SolverOptions) -> dict[str, tuple[Callable[[], object], DictBudget | None]]:
    """config -> (a call returning factors, its dictionary budget or None for low rank)."""
    d1, d2 = weight.shape
    budget = dict_budget(d1, d2, ratio, options.rho)
    complete = DictBudget(d1, d2, min(d1, budget.atoms), budget.sparsity)
    return {"svd-llm": (lambda: svd_llm(weight, gram, lowrank_budget(d1, d2, ratio)), None),
            "complete": (lambda: cospadi(weight, gram, complete, options), complete),
            "default": (lambda: cospadi(weight, gram, budget, options), budget),
            "mod": (lambda: cospadi(weight, gram, budget, options.but(update="mod")), budget),
            "sweeps": (lambda: cospadi(weight, gram, budget, options.but(update="ksvd")), budget),
            "before": (lambda: cospadi(weight, gram, budget, BEFORE), budget)}


def compare_shapes(cases: dict[str, Case], ratios: list[float], configs: list[str], repeats: int,
                   device: torch.device = torch.device("cpu"), options: SolverOptions = SolverOptions(),
                   progress: Callable[[str], object] = lambda _: None) -> list[dict]:
    """One row per (case, ratio, config): k, s, relative output error, median seconds of
    `repeats` runs, and error and time relative to "complete" and "default" and time
    relative to "svd-llm" (when those configs are in the run)."""
    rows = []
    for name, (weight, gram) in cases.items():
        weight, gram = weight.to(device), gram.to(device)
        for ratio in ratios:
            solvers = _solvers(weight, gram, ratio, options)
            cell = []
            for config in configs:
                call, budget = solvers[config]
                progress(f"{name} @ {ratio}: {config}")
                factors, seconds = time_solver(call, repeats, device)
                cell.append({"case": f"{name} ({weight.shape[0]}x{weight.shape[1]})", "ratio": ratio,
                             "solver": config, "k": budget.atoms if budget else "-",
                             "s": budget.sparsity if budget else "-",
                             "error": output_error(gram, weight, factors.weight()),  # type: ignore[attr-defined]
                             "seconds": seconds})
            _relate(cell)
            rows.extend(cell)
    return rows


def _relate(cell: list[dict]) -> None:
    """Add error and time ratios against the cell's "complete", "default" and "svd-llm" rows."""
    by = {r["solver"]: r for r in cell}
    for r in cell:
        for reference in ("complete", "default"):
            if reference in by:
                r[f"error / {reference}"] = r["error"] / by[reference]["error"]
                r[f"time / {reference}"] = r["seconds"] / by[reference]["seconds"]
        if "svd-llm" in by:
            r["time / svd-llm"] = r["seconds"] / by["svd-llm"]["seconds"]


def estimate_model(ratio: float, repeats: int, device: torch.device = torch.device("cpu"),
                   options: SolverOptions = SolverOptions(), seed: int = 0) -> list[dict]:
    """Per matrix of one block at Qwen2.5-0.5B's shapes (random weights, synthetic Grams):
    svd-llm and cospadi solver seconds, and a row with a block's sum times 24 blocks."""
    rows, totals = [], {"svd-llm": 0.0, "cospadi": 0.0}
    for i, (name, (d1, d2)) in enumerate(QWEN05.items()):
        weight, gram = (t.to(device) for t in synthetic_case(d1, d2, seed + i))
        budget = dict_budget(d1, d2, ratio, options.rho)
        _, low = time_solver(lambda: svd_llm(weight, gram, lowrank_budget(d1, d2, ratio)), repeats, device)
        _, ours = time_solver(lambda: cospadi(weight, gram, budget, options), repeats, device)
        totals["svd-llm"] += low
        totals["cospadi"] += ours
        rows.append(_estimate_row(f"{name} ({d1}x{d2})", budget.atoms, budget.atoms > d1, low, ours))
    rows.append(_estimate_row(f"{QWEN05_BLOCKS} blocks, solver only", "-", "-",
                              QWEN05_BLOCKS * totals["svd-llm"], QWEN05_BLOCKS * totals["cospadi"]))
    return rows


def _estimate_row(matrix: str, k: int | str, overcomplete: bool | str, low: float, ours: float) -> dict:
    return {"matrix": matrix, "k": k, "overcomplete": overcomplete, "svd-llm (s)": low, "cospadi (s)": ours,
            "cospadi / svd-llm": ours / low}


def pipeline_estimate(ratio: float, samples: int = 32, seq_len: int = 512, seed: int = 0,
                      blocks: int = 2, options: SolverOptions = SolverOptions()) -> dict:
    """The whole pipeline (calibration, solving on the default worker threads,
    propagation) run with svd-llm and with cospadi (under `options`) on a random
    `blocks`-block model of Qwen2.5-0.5B's shapes and `samples` x `seq_len` random tokens;
    their seconds per block times 24 blocks, as a row like estimate_model's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ..pipeline import Recipe, compress_blocks

    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=blocks, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2 * seq_len)
    ids = torch.randint(0, config.vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(seed))
    seconds = {}
    for method in ("svd-llm", "cospadi"):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).eval()
        recipe = Recipe(method, ratio, options)
        seconds[method] = compress_blocks(model, ids, recipe, progress=False).seconds / blocks
    return _estimate_row(f"{QWEN05_BLOCKS} blocks through the pipeline (measured on {blocks}, {samples} x {seq_len} "
                         "tokens)", "-", "-", QWEN05_BLOCKS * seconds["svd-llm"], QWEN05_BLOCKS * seconds["cospadi"])
