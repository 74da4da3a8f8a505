"""Contracts of the fast solvers: orthogonal (threshold + Procrustes), single-step, and
K-SVD started from the orthogonal solution."""
import pytest
import torch

from cospadi.budget import dict_budget, lowrank_budget
from cospadi.errors import CospadiError
from cospadi.methods import get_method
from cospadi.solvers import (
    PAPER,
    SolverOptions,
    cholesky_upper,
    learn_dictionary,
    learn_orthogonal,
    output_error,
    single_step,
    svd_llm,
    whiten,
)
from cospadi.solvers.orthogonal import hard_threshold

COSPADI = get_method("cospadi")


def planted(n=40, k=24, m=300, s=4, orthonormal=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(n, k, generator=gen, dtype=torch.float64)
    d = torch.linalg.qr(d).Q if orthonormal else d / d.norm(dim=0)
    codes = torch.zeros(k, m, dtype=torch.float64)
    for j in range(m):
        rows = torch.randperm(k, generator=gen)[:s]
        signs = torch.randn(s, generator=gen, dtype=torch.float64).sign()
        codes[rows, j] = signs * (1 + torch.rand(s, generator=gen, dtype=torch.float64))
    return d, codes, d @ codes


def dense(result, k):
    return torch.zeros(k, result.values.shape[1], dtype=result.values.dtype).scatter_(0, result.indices, result.values)


def test_hard_threshold_keeps_the_largest_entries():
    c = torch.tensor([[3.0, -1.0], [-5.0, 0.5], [1.0, 2.0]])
    kept, support = hard_threshold(c, 2)
    assert torch.equal(kept, torch.tensor([[3.0, -1.0], [-5.0, 0.0], [0.0, 2.0]]))
    assert support.sum(0).tolist() == [2, 2]


def test_orthogonal_solver_contract():
    y = torch.randn(30, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    r = learn_orthogonal(y, 20, 5, iters=30, tol=0.0)
    eye = torch.eye(20, dtype=torch.float64)
    assert torch.allclose(r.dictionary.T @ r.dictionary, eye, atol=1e-10)
    assert (r.indices.diff(dim=0) > 0).all() and r.indices.shape == (5, 200)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(r.objective, r.objective[1:]))
    s = dense(r, 20)
    assert r.objective[-1] == pytest.approx(float(((y - r.dictionary @ s) ** 2).sum()), rel=1e-9)
    # For an orthonormal dictionary, thresholding D^T Y is the optimal s-sparse code.
    best, _ = hard_threshold(r.dictionary.T @ y, 5)
    assert torch.allclose(s, best, atol=1e-12)


def test_orthogonal_solver_recovers_a_planted_orthonormal_dictionary():
    d0, codes, y = planted(orthonormal=True, n=30, k=20, m=400, s=3)
    r = learn_orthogonal(y, 20, 3, iters=50, tol=0.0)
    assert r.objective[-1] ** 0.5 / float(y.norm()) < 1e-6


def test_orthogonal_solver_needs_k_at_most_n():
    with pytest.raises(ValueError, match="k <= n"):
        learn_orthogonal(torch.randn(5, 50), 6, 2, iters=3)


def test_single_step_dictionary_is_least_squares_optimal_for_its_codes():
    y = torch.randn(30, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    r = single_step(y, 20, 5)
    s = dense(r, 20)
    assert (r.indices.diff(dim=0) > 0).all()
    residual = y - r.dictionary @ s
    assert (residual @ s.T).abs().max() < 1e-9 * float(y.norm()) ** 2  # normal equations hold
    assert torch.allclose(r.dictionary.norm(dim=0), torch.ones(20, dtype=torch.float64))
    # It never loses to the thresholded SVD codes it starts from.
    u, sig, vh = torch.linalg.svd(y, full_matrices=False)
    start, _ = hard_threshold(sig[:20, None] * vh[:20], 5)
    assert r.objective[0] <= float(((y - u[:, :20] @ start) ** 2).sum()) * (1 + 1e-12)


def test_ksvd_from_the_orthogonal_start_is_monotone_and_improves_on_it():
    y = torch.randn(40, 300, generator=torch.Generator().manual_seed(3))
    ortho = learn_orthogonal(y, 24, 8, iters=40)
    r = learn_dictionary(y, 24, 8, PAPER.but(iters=0, power_iters=2, init="orthogonal", sweeps=6))
    assert r.objective[0] <= ortho.objective[-1] * (1 + 1e-6)
    r2 = learn_dictionary(y, 24, 8, PAPER.but(iters=3, power_iters=2, init="orthogonal", sweeps=2))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(r2.objective, r2.objective[1:]))
    assert (r2.indices.diff(dim=0) > 0).all() and r2.indices.shape == (8, 300)


def test_orthogonal_start_falls_back_to_svd_when_k_exceeds_n():
    y = torch.randn(10, 100, generator=torch.Generator().manual_seed(4))
    r = learn_dictionary(y, 14, 3, PAPER.but(iters=2, power_iters=2, init="orthogonal"))
    assert r.dictionary.shape == (10, 14) and r.indices.shape == (3, 100)


@pytest.mark.parametrize("options", [SolverOptions(), SolverOptions(solver="orthogonal"),
                                     SolverOptions(solver="single-step"),
                                     SolverOptions(init="random", iters=3, sweeps=1, power_iters=8)])
def test_every_solver_option_meets_the_budget_beats_svd_llm_and_is_deterministic(options):
    d0, codes, w = planted(n=48, k=32, m=160, s=6, seed=5)
    w = w + 0.01 * torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x = torch.randn(500, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * torch.linspace(0.2, 3, 48)
    gram = x.T @ x
    budget = dict_budget(48, 160, 0.4, options.rho)
    first = COSPADI.solve([w], [gram], budget, options)[0]
    again = COSPADI.solve([w], [gram], budget, options)[0]
    assert torch.equal(first.dictionary, again.dictionary) and torch.equal(first.values, again.values)
    assert first.indices.shape == (budget.sparsity, 160) and (first.indices.diff(dim=0) > 0).all()
    low = svd_llm(w, gram, lowrank_budget(48, 160, 0.4))
    assert output_error(gram, w, first.weight()) < output_error(gram, w, low.weight())


def test_solver_options_reject_bad_combinations():
    with pytest.raises(CospadiError, match="iters 0 needs"):
        SolverOptions(init="random", iters=0)
    with pytest.raises(CospadiError, match="solver"):
        SolverOptions(solver="magic")
    with pytest.raises(CospadiError, match="sweeps"):
        SolverOptions(sweeps=-1)
    with pytest.raises(CospadiError, match="rounds"):
        SolverOptions(rounds=0)


@pytest.mark.parametrize("solver", ["orthogonal", "ksvd"])
def test_rounds_caps_the_orthogonal_rounds(solver):
    """More rounds never fit worse for the orthogonal solver (its objective is monotone);
    for ksvd the cap reaches the orthogonal start: 1 round and 25 give different factors."""
    w = torch.randn(40, 90, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    gram = torch.eye(40, dtype=torch.float64)
    budget = dict_budget(40, 90, 0.3)
    errors = [output_error(gram, w, COSPADI.solve([w], [gram], budget,
                                                  SolverOptions(solver=solver, rounds=r, sweeps=2))[0].weight())
              for r in (1, 3, 25)]
    assert errors[0] != errors[2]
    if solver == "orthogonal":
        assert errors[0] >= errors[1] >= errors[2]


def test_whitened_learning_runs_on_the_whitened_weight():
    # cospadi's error equals the learner's own objective on L W (no hidden rescaling).
    d0, codes, w = planted(n=32, k=20, m=120, s=5, seed=8)
    x = torch.randn(400, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    gram = x.T @ x
    budget = dict_budget(32, 120, 0.3)
    f = COSPADI.solve([w], [gram], budget, SolverOptions())[0]
    wl = whiten(cholesky_upper(gram), w).float()
    r = learn_dictionary(wl, budget.atoms, budget.sparsity, SolverOptions())  # the default learner on L W
    assert output_error(gram, w, f.weight()) == pytest.approx(r.objective[-1] ** 0.5 / float(wl.norm()), rel=1e-4)


@pytest.mark.parametrize("options", [SolverOptions(), SolverOptions(init="svd", iters=3, sweeps=1),
                                     SolverOptions(solver="orthogonal"), SolverOptions(solver="single-step")],
                         ids=["default", "ksvd-omp", "orthogonal", "single-step"])
def test_tall_weights_learn_in_their_row_space_with_the_same_result(options):
    # W (60, 16) has rank 16: cospadi learns on R of W = Q R and maps D back by Q; with an
    # identity Gram that must give the same factors as learning on W itself.
    from cospadi.solvers import dictionary

    d0, codes, w = planted(n=60, k=12, m=16, s=3, seed=12)
    w = w + 0.01 * torch.randn(60, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    budget = dict_budget(60, 16, 0.3)
    assert budget.atoms <= 16
    f = dictionary.cospadi(w, torch.eye(60, dtype=torch.float64), budget, options, dtype=torch.float64)
    if options.solver == "orthogonal":
        r = learn_orthogonal(w, budget.atoms, budget.sparsity, SolverOptions().rounds)
    elif options.solver == "single-step":
        r = single_step(w, budget.atoms, budget.sparsity)
    else:
        r = learn_dictionary(w, budget.atoms, budget.sparsity, options)
    assert torch.equal(f.indices, r.indices)
    assert torch.allclose(f.weight(), r.dictionary @ dense(r, budget.atoms), atol=1e-9)
