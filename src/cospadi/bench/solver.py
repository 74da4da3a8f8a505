"""`cospadi bench-solver`: solver configurations on real weight matrices with their real
calibration Grams, side by side. The Grams of one block (computed on the dense model's
calibration activations) are cached, so later runs only time the solvers."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .. import api
from ..adapters import adapter_for, decoder_layers
from ..budget import dict_budget, lowrank_budget
from ..devices import synchronize
from ..errors import CospadiError
from ..files import atomic_file
from ..methods import get_method
from ..models import load_model
from ..pipeline import accumulate_grams, capture_block_inputs, run_block
from ..solvers import PAPER, SolverOptions, output_error, svd_llm


def configs(update: str) -> dict[str, SolverOptions]:
    """Each configuration's options; "default" and its variants use the dictionary update
    `update` (--update), "sweeps" and "mod" name theirs."""
    base = SolverOptions(update=update)
    return {"default": base,
            "default-16": base.but(sweeps=16),  # twice the update passes
            "default-40": base.but(rounds=40),  # a longer orthogonal start
            "sweeps": base.but(update="ksvd"),  # atom-by-atom K-SVD sweeps
            "mod": base.but(update="mod"),  # block (MOD) updates of all atoms at once
            "mod-16": base.but(update="mod", sweeps=16),
            "paper": PAPER,
            "orthogonal": SolverOptions(solver="orthogonal"),
            "single-step": SolverOptions(solver="single-step")}


CONFIG_NAMES = tuple(configs(SolverOptions().update))  # every configuration's name, in order


def describe_options(o: SolverOptions) -> str:
    """A short label of what a configuration runs."""
    if o.solver == "orthogonal":
        return f"orthogonal, {o.rounds} rounds"
    if o.solver != "ksvd":
        return o.solver
    start = f"orthogonal start ({o.rounds} rounds)" if o.init == "orthogonal" else f"{o.init} start"
    update = f"{o.sweeps} MOD passes" if o.update == "mod" else f"{o.sweeps} sweeps, {o.power_iters} power it."
    return f"ksvd {start}, {o.iters} {o.coder.upper()} alt., {update}"


def block_matrices(model_name: str, block: int, calib_samples: int, seq_len: int, seed: int,
                   cache: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (W (d1, d2), Gram (d1, d1)) for every target linear of dense block `block`,
    read from `cache` or computed (dense blocks 0..block-1 feed it) and cached."""
    path = cache / f"{Path(model_name).name}-block{block}-c{calib_samples}x{seq_len}-s{seed}.pt"
    if path.exists():
        return torch.load(path)
    model, tokenizer = load_model(model_name)
    layers = decoder_layers(model)
    if not 0 <= block < len(layers):
        raise CospadiError(f"--block {block} is out of range: the model has blocks 0..{len(layers) - 1}")
    adapter = adapter_for(model)
    ids = api.calibration_ids(model, tokenizer, None, calib_samples, seq_len, seed)
    with torch.no_grad():
        states, kwargs = capture_block_inputs(model, layers, ids, 8)
        for i in range(block):
            states = run_block(layers[i], states, kwargs[i])
        grams = accumulate_grams(layers[block], adapter, states, kwargs[block])
    out = {name: (layers[block].get_submodule(name).weight.detach().T.clone(), grams[group])
           for group in adapter.groups for name in group}
    with atomic_file(path) as tmp:
        torch.save(out, tmp)
    return out


def time_solver(solve, repeats: int, device: torch.device = torch.device("cpu")) -> tuple[object, float]:
    """(result of the last call, median wall seconds over `repeats` calls), each timed
    until `device` has finished its queued work."""
    times, result = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = solve()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def compare(matrices: dict[str, tuple[torch.Tensor, torch.Tensor]], names: list[str], ratios: list[float],
            configs: dict[str, SolverOptions], repeats: int, paper_repeats: int | None = None,
            device: torch.device = torch.device("cpu")) -> list[dict]:
    """One row per (matrix, ratio, solver): relative whitened error and median seconds
    (`paper_repeats` timed runs for the "paper" reference, which is slow; `repeats` for
    the rest), every solver running on `device`. svd-llm rows are the low-rank reference
    at the same ratio. With "paper" among `configs`, every row also gets its error and
    speed relative to that reference."""
    rows = []
    cospadi = get_method("cospadi")
    for name in names:
        if name not in matrices:
            raise CospadiError(f"unknown matrix {name!r}; choose from {', '.join(matrices)}")
        weight, gram = (t.to(device) for t in matrices[name])
        d1, d2 = weight.shape
        for ratio in ratios:
            factors, seconds = time_solver(lambda: svd_llm(weight, gram, lowrank_budget(d1, d2, ratio)), repeats, device)
            base = output_error(gram, weight, factors.weight())
            cell = [{"matrix": name, "ratio": ratio, "solver": "svd-llm", "error": base, "x svd-llm": 1.0,
                     "seconds": seconds}]
            for label, o in configs.items():
                budget = dict_budget(d1, d2, ratio, o.rho)
                runs = paper_repeats if label == "paper" and paper_repeats else repeats
                factors, seconds = time_solver(lambda: cospadi.solve([weight], [gram], budget, o)[0], runs, device)
                err = output_error(gram, weight, factors.weight())
                cell.append({"matrix": name, "ratio": ratio, "solver": f"{label}: {describe_options(o)}",
                             "error": err, "x svd-llm": err / base, "seconds": seconds})
            if "paper" in configs:
                paper = cell[1 + list(configs).index("paper")]
                for r in cell:
                    r["error / paper"] = r["error"] / paper["error"]
                    r["speed-up vs paper"] = paper["seconds"] / r["seconds"]
            rows.extend(cell)
    return rows
