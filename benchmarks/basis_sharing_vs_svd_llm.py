"""Why Basis Sharing does not beat svd-llm on SmolLM2-135M: per-matrix calibration output
errors of group (14, 15), each layer judged on its own inputs, at ratios 0.2 and 0.4.

    .venv/bin/python benchmarks/basis_sharing_vs_svd_llm.py

Uses the Gram cache of `cospadi bench-solver` (runs/grams), computing blocks 14 and 15
there if missing. Prints one Markdown row per matrix and ratio."""
from pathlib import Path

import torch

from cospadi.bench.solver import block_matrices
from cospadi.budget import lowrank_budget
from cospadi.solvers import basis_sharing, output_error, svd_llm

SHARED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")


def main() -> None:
    torch.set_num_threads(1)
    first, second = (block_matrices("smollm2-135m", b, 32, 512, 42, Path("runs/grams")) for b in (14, 15))
    print("| matrix | ratio | rank per layer / shared | svd-llm error (14, 15) | basis-sharing error (14, 15) |")
    print("|---|---|---|---|---|")
    for name in SHARED:
        pair = (first[name], second[name])
        d1, d2 = pair[0][0].shape
        for ratio in (0.2, 0.4):
            own = [output_error(g, w, svd_llm(w, g, lowrank_budget(d1, d2, ratio)).weight()) for w, g in pair]
            budget = lowrank_budget(d1, d2, ratio, members=2)
            shared = basis_sharing([w for w, _ in pair], [g for _, g in pair], budget)
            errors = [output_error(g, w, f.weight()) for f, (w, g) in zip(shared, pair)]
            print(f"| {name} | {ratio} | {lowrank_budget(d1, d2, ratio).rank} / {budget.rank} | "
                  f"{own[0]:.4f}, {own[1]:.4f} | {errors[0]:.4f}, {errors[1]:.4f} |")


if __name__ == "__main__":
    main()
