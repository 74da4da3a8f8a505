"""Per-matrix allocation: the knapsack (against brute force), the error curves (against the
solvers they stand for), the costs, the budget on the real model's shapes, sensitivities
(against an independent gradient), and the profile cache."""

import itertools
import random

import pytest
import torch

from cospadi.allocation import check_ratio_map, job_costs, knapsack_ratios, ratio_grid
from cospadi.budget import dict_budget, lowrank_budget
from cospadi.errors import CospadiError
from cospadi.knapsack import solve_mckp
from cospadi.methods import get_method
from cospadi.pipeline.profile import (
    DEFAULT_GRID,
    JobProfile,
    Profile,
    job_candidates,
    profile_model,
    read_cached,
    write_cached,
)
from cospadi.pipeline.sensitivity import output_sensitivities
from cospadi.solvers import SolverOptions, basis_sharing, svd, svd_llm
from cospadi.solvers.grouped import mean_gram
from cospadi.solvers.orthogonal import hard_threshold
from cospadi.solvers.profile import thresholded_errors, whitened_spectrum
from cospadi.solvers.whitening import cholesky_upper

# ---------------------------------------------------------------------------- knapsack

def _brute_force(costs, weights, capacity):
    best, choice = float("inf"), None
    for picks in itertools.product(*[range(len(c)) for c in costs]):
        if sum(w[p] for w, p in zip(weights, picks)) <= capacity:
            total = sum(c[p] for c, p in zip(costs, picks))
            if total < best:
                best, choice = total, picks
    return best, choice


@pytest.mark.parametrize("seed", range(25))
def test_knapsack_matches_brute_force(seed):
    rng = random.Random(seed)
    items = rng.randint(1, 5)
    costs = [[rng.uniform(0, 10) for _ in range(rng.randint(1, 4))] for _ in range(items)]
    weights = [[rng.randint(0, 12) for _ in c] for c in costs]
    capacity = rng.randint(sum(min(w) for w in weights), sum(max(w) for w in weights))
    best, _ = _brute_force(costs, weights, capacity)
    picked = solve_mckp(costs, weights, capacity, steps=capacity or 1)  # unit 1: exact on integers
    assert sum(w[p] for w, p in zip(weights, picked)) <= capacity
    assert sum(c[p] for c, p in zip(costs, picked)) == pytest.approx(best)


def test_knapsack_default_resolution_is_feasible_and_near_optimal():
    rng = random.Random(7)
    costs = [[rng.uniform(0, 5) for _ in range(3)] for _ in range(4)]
    weights = [[rng.uniform(0, 100) for _ in range(3)] for _ in range(4)]
    capacity = 180.0
    picked = solve_mckp(costs, weights, capacity)
    assert sum(w[p] for w, p in zip(weights, picked)) <= capacity
    tighter, _ = _brute_force(costs, weights, capacity * (1 - 1e-3))  # the stated bound
    assert sum(c[p] for c, p in zip(costs, picked)) <= tighter + 1e-12


def test_knapsack_refuses_an_impossible_budget():
    with pytest.raises(CospadiError, match="below the smallest possible size"):
        solve_mckp([[1.0, 2.0]], [[5.0, 6.0]], 4.0)


def _job(block, name, d1, d2, errors_at, energy=1.0, sensitivity=None):
    """A JobProfile of the real candidate ratios of a (d1, d2) svd-llm matrix with errors
    errors_at(ratio)."""
    ratios, budgets = job_candidates(get_method("svd-llm"), d1, d2, 1, list(DEFAULT_GRID), SolverOptions())
    params = [d1 * d2 if b is None else b.effective_params for b in budgets]
    return JobProfile([(block, name)], d1, d2, ratios, params, [errors_at(r) for r in ratios], energy, sensitivity)


@pytest.mark.parametrize("target", [0.2, 0.3, 0.45])
def test_equal_cost_curves_give_the_uniform_allocation(target):
    """Identical jobs whose stored size is exactly (1 - r) of dense and whose cost is
    strictly convex in r: any departure from uniform costs more."""
    grid = [round(0.05 * i, 2) for i in range(19)]
    jobs = [JobProfile([(b, "mlp.up_proj")], 10, 10, grid, [round(100 * (1 - r)) for r in grid],
                       [r * r for r in grid], 1.0) for b in range(6)]
    ratios = knapsack_ratios(jobs, target, "normalized")
    assert set(ratios.values()) == {target}


def test_knapsack_moves_budget_to_the_sensitive_matrix():
    flat = _job(0, "mlp.up_proj", 64, 64, lambda r: r * r, sensitivity=1.0)
    steep = _job(1, "mlp.up_proj", 64, 64, lambda r: r * r, sensitivity=50.0)
    ratios = knapsack_ratios([flat, steep], 0.3, "fisher")
    assert ratios[(1, "mlp.up_proj")] < 0.3 < ratios[(0, "mlp.up_proj")]


def test_costs_normalize_or_weigh_the_errors():
    job = _job(0, "self_attn.v_proj", 32, 16, lambda r: 2.0 * r, energy=4.0, sensitivity=3.0)
    assert job_costs(job, "normalized") == pytest.approx([e / 4.0 for e in job.errors])
    assert job_costs(job, "fisher") == pytest.approx([e * 3.0 for e in job.errors])
    job.sensitivity = None
    with pytest.raises(CospadiError, match="sensitivities"):
        job_costs(job, "fisher")


@pytest.mark.parametrize("method", ["svd-llm", "cospadi"])
@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.4, 0.5])
def test_budget_holds_to_a_thousandth_on_smollm2_shapes(smollm2, method, ratio):
    """Every q/k/v/o/gate/up/down of SmolLM2 with its real candidate budgets and random
    decreasing error curves: the stored numbers stay within (1 - ratio) and come within
    0.1% of it."""
    model, _ = smollm2
    layer, rng = model.model.layers[0], random.Random(3)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    jobs = []
    for block in range(len(model.model.layers)):
        for name in names:
            linear = layer.get_submodule(name)
            d1, d2 = linear.in_features, linear.out_features
            ratios, budgets = job_candidates(get_method(method), d1, d2, 1, list(DEFAULT_GRID), SolverOptions())
            scale = rng.uniform(0.1, 10)
            jobs.append(JobProfile([(block, name)], d1, d2, ratios,
                                   [d1 * d2 if b is None else b.effective_params for b in budgets],
                                   [scale * r ** rng.uniform(1.2, 3) for r in ratios], 1.0, 1.0))
    allocated = knapsack_ratios(jobs, ratio, "fisher")
    dense = sum(job.dense_params for job in jobs)
    stored = sum(job.params[job.ratios.index(allocated[job.members[0]])] for job in jobs)
    assert stored <= (1 - ratio) * dense
    assert stored >= (1 - ratio) * dense * (1 - 1e-3)
    assert len(set(allocated.values())) > 3


def test_ratio_map_accepts_dense_matrices_only_at_zero():
    targets = ["a", "b"]
    check_ratio_map({(0, "a"): 0.0, (0, "b"): 0.5}, 1, targets)
    for bad in (1.0, -0.1):
        with pytest.raises(CospadiError):
            check_ratio_map({(0, "a"): bad, (0, "b"): 0.5}, 1, targets)


def test_ratio_grid_places_rows():
    rows = [{"layer": 1, "name": "q", "ratio": 0.2}, {"layer": 0, "name": "q", "ratio": 0.0},
            {"layer": 0, "name": "up", "ratio": 0.6}]
    assert ratio_grid(rows) == ([0, 1], ["q", "up"], [[0.0, 0.6], [0.2, None]])


# ---------------------------------------------------------------------------- error curves

def _problem(d1=24, d2=40, members=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(d1, d2, generator=g, dtype=torch.float64) for _ in range(members)]
    grams = []
    for _ in range(members):
        x = torch.randn(3 * d1, d1, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, d1, dtype=torch.float64)
        grams.append(x.T @ x)
    return weights, grams


def _whitened_error(grams, weights, approximations):
    upper = cholesky_upper(mean_gram(grams))
    return sum(float(((upper @ (w - a)) ** 2).sum()) for w, a in zip(weights, approximations))


@pytest.mark.parametrize("method", ["svd-llm", "svd"])
def test_lowrank_curves_are_the_solvers_exact_errors(method):
    weights, grams = _problem()
    budgets = [lowrank_budget(24, 40, r) for r in (0.1, 0.3, 0.6, 0.9)]
    curve = get_method(method).error_curve(weights, grams, budgets, SolverOptions())
    solver = svd_llm if method == "svd-llm" else svd
    for budget, predicted in zip(budgets, curve):
        factors = solver(weights[0], grams[0], budget)
        assert predicted == pytest.approx(_whitened_error(grams, weights, [factors.weight()]), rel=1e-9)


def test_basis_sharing_curve_is_the_grouped_solvers_error():
    weights, grams = _problem(members=2)
    budgets = [lowrank_budget(24, 40, r, members=2) for r in (0.2, 0.5)]
    curve = get_method("basis-sharing").error_curve(weights, grams, budgets, SolverOptions())
    for budget, predicted in zip(budgets, curve):
        factors = basis_sharing(weights, grams, budget)
        assert predicted == pytest.approx(_whitened_error(grams, weights, [f.weight() for f in factors]), rel=1e-9)


def test_thresholded_errors_match_the_orthogonal_dictionary_by_hand():
    weights, grams = _problem()
    upper = cholesky_upper(grams[0])
    z = upper @ weights[0]
    u, _, _ = torch.linalg.svd(z, full_matrices=False)
    for atoms, sparsity in [(10, 5), (24, 12), (30, 15), (5, 5)]:
        d = u[:, :min(atoms, 24)]
        codes, _ = hard_threshold(d.T @ z, min(sparsity, d.shape[1]))
        expected = float(((z - d @ codes) ** 2).sum())
        got = thresholded_errors(whitened_spectrum(weights, grams), [(atoms, sparsity)])[0]
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_dictionary_proxy_bounds_the_solver_and_falls_with_the_budget():
    weights, grams = _problem(d1=32, d2=64)
    method, options = get_method("cospadi"), SolverOptions()
    budgets = [dict_budget(32, 64, r) for r in (0.2, 0.4, 0.6)]
    curve = method.error_curve(weights, grams, budgets, options)
    assert curve == sorted(curve)  # more removed, more error
    for budget, predicted in zip(budgets, curve):
        learned = method.solve(weights, grams, budget, options)[0]
        assert _whitened_error(grams, weights, [learned.weight()]) <= predicted * (1 + 1e-6)


def test_candidates_keep_dense_and_drop_infeasible_budgets():
    ratios, budgets = job_candidates(get_method("cospadi"), 8, 8, 1, list(DEFAULT_GRID), SolverOptions())
    assert ratios[0] == 0.0 and budgets[0] is None
    assert 0.9 not in ratios  # too few atoms for one nonzero per column of an 8 x 8 matrix
    assert all(b.sparsity >= 1 for b in budgets[1:])


# ---------------------------------------------------------------------------- sensitivities and the profile

def test_sensitivity_is_the_mean_squared_output_gradient(tiny_llama, tiny_ids):
    model = tiny_llama(2)
    got = output_sensitivities(model, tiny_ids, batch_size=4)
    linear = model.model.layers[1].mlp.down_proj
    captured = []
    handle = linear.register_forward_hook(lambda m, a, out: captured.append(out.retain_grad() or out))
    for p in model.parameters():
        p.requires_grad_(False)
    embeds = model.get_input_embeddings()(tiny_ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, labels=tiny_ids).loss * (tiny_ids.numel() - tiny_ids.shape[0])
    loss.backward()
    handle.remove()
    grad = captured[0].grad
    assert got[(1, "mlp.down_proj")] == pytest.approx(float((grad ** 2).mean()), rel=1e-4)
    assert len(got) == 2 * 7 and all(v > 0 for v in got.values())
    assert all(p.requires_grad is False for p in model.parameters())


def test_profile_round_trips_through_the_cache(tiny_llama, tiny_ids, tmp_path):
    model = tiny_llama(2)
    profile = profile_model(model, tiny_ids, "cospadi", SolverOptions(), group_size=2, progress=False)
    assert [len(j.members) for j in profile.jobs] == [1] * 8 + [2, 2, 1, 1]  # q/k/v/o x2, gate/up shared, down x2
    full = profile_model(model, tiny_ids, "cospadi", SolverOptions(), group_size=2, share=("q", "k", "v", "gate", "up"),
                         progress=False)
    assert [len(j.members) for j in full.jobs] == [2, 2, 2, 1, 1, 2, 2, 1, 1]  # q/k/v, o x2, gate/up, down x2
    assert all(j.ratios[0] == 0 and j.errors[0] == 0 for j in profile.jobs)
    assert all(j.errors[1:] == sorted(j.errors[1:]) for j in profile.jobs)
    profile.jobs[0].sensitivity = 0.25
    write_cached(tmp_path, "key", profile)
    again = read_cached(tmp_path, "key")
    assert again == profile and isinstance(again, Profile)
    assert read_cached(tmp_path, "other") is None
    (tmp_path / "profile-key.json").write_text("{garbled")
    assert read_cached(tmp_path, "key") is None
