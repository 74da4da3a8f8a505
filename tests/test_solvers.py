"""Numerical tests of the budgets and the pure solvers (whitening, low rank, Batch-OMP,
K-SVD dictionary learning, CoSpaDi). Every test asserts a concrete numerical property
on small float64 problems, so it could fail if the arithmetic were wrong."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cospadi.budget import DictBudget, LowRankBudget, dict_budget, lowrank_budget, ratios
from cospadi.errors import CospadiError
from cospadi.solvers import (
    PAPER,
    SparseDictFactors,
    batch_omp,
    cholesky_upper,
    cospadi,
    learn_dictionary,
    output_error,
    svd,
    svd_llm,
    unwhiten,
    whiten,
)
from cospadi.solvers.options import SolverOptions

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def spd_gram(d: int, seed: int, tokens: int = 200, spread: float = 2.0) -> torch.Tensor:
    """X^T X for X (tokens, d) whose columns have scales from 1 to 10**spread."""
    x = randn(tokens, d, seed=seed) * torch.logspace(0, spread, d, dtype=F64)
    return x.T @ x


def planted(n: int, k: int, s: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm random dictionary D0 (n, k) and S0 (k, m) with exactly s nonzeros per
    column, magnitudes in [1, 2] with random signs."""
    g = gen(seed)
    d0 = torch.randn(n, k, generator=g, dtype=F64)
    d0 = d0 / d0.norm(dim=0)
    s0 = torch.zeros(k, m, dtype=F64)
    for j in range(m):
        rows = torch.randperm(k, generator=g)[:s]
        signs = torch.randint(0, 2, (s,), generator=g).to(F64) * 2 - 1
        s0[rows, j] = signs * (1 + torch.rand(s, generator=g, dtype=F64))
    return d0, s0


def support_mask(indices: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros(k, indices.shape[1], dtype=torch.bool).scatter_(0, indices.long(), True)


def assert_exact_sparsity(indices: torch.Tensor, values: torch.Tensor, s: int, m: int, k: int) -> None:
    assert indices.shape == (s, m) and values.shape == (s, m)
    assert int(indices.min()) >= 0 and int(indices.max()) < k
    if s > 1:
        assert bool((indices[1:] > indices[:-1]).all()), "indices must be strictly ascending (distinct) per column"
    assert bool((support_mask(indices, k).sum(0) == s).all())
    assert bool(torch.isfinite(values).all())


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("d1, d2, atoms, sparsity", [
    (576, 576, 268, 134),    # floor(0.7*576*576/(576+288)) = floor(268.8)
    (576, 1536, 460, 230),   # floor(0.7*576*1536/(576+768)) = floor(460.8)
    (1536, 576, 339, 169),   # floor(0.7*1536*576/(1536+288)) = floor(339.5)
])
def test_dict_budget_hand_computed(d1, d2, atoms, sparsity):
    b = dict_budget(d1, d2, 0.3, 2.0)
    assert (b.atoms, b.sparsity, b.members) == (atoms, sparsity, 1)
    assert b.effective_params == d1 * atoms + sparsity * d2
    assert b.storage_words == pytest.approx(d1 * atoms + sparsity * d2 + atoms * d2 / 16, abs=0)
    # The budget never exceeds the requested share of the matrix.
    assert b.effective_params <= 0.7 * d1 * d2


def test_dict_budget_rho_changes_split():
    # rho = 4 at 576x576, ratio 0.3: floor(0.7*331776/(576+144)) = floor(322.56) = 322, s = floor(80.5) = 80.
    b = dict_budget(576, 576, 0.3, 4.0)
    assert (b.atoms, b.sparsity) == (322, 80)
    # rho = 1: k = floor(0.7*331776/1152) = floor(201.6) = 201 = s.
    b1 = dict_budget(576, 576, 0.3, 1.0)
    assert (b1.atoms, b1.sparsity) == (201, 201)


def test_lowrank_budget_hand_computed():
    b = lowrank_budget(576, 1536, 0.3)
    assert b.rank == 293  # floor(0.7*576*1536/2112) = floor(293.24)
    assert b.effective_params == 293 * (576 + 1536)
    assert b.storage_words == b.effective_params
    assert lowrank_budget(576, 576, 0.3).rank == 201  # floor(0.7*576/2) = floor(201.6)


@pytest.mark.parametrize("d1, d2, ratio, rank", [
    (180, 180, 0.3, 63),  # 0.7 * 180 * 180 / 360 = 63 exactly
    (20, 20, 0.8, 2),     # 0.2 * 20 * 20 / 40 = 2 exactly
    (14, 35, 0.3, 7),     # 0.7 * 490 / 49 = 7 exactly
])
def test_lowrank_budget_exact_integer_cases(d1, d2, ratio, rank):
    """When (1 - ratio) d1 d2 / (d1 + d2) is an integer, r is that integer (docs/method.md "Budget":
    r (d1 + d2) = (1 - gamma) d1 d2), not one less from float rounding of 1 - ratio.
    dict_budget guards its floor with + 1e-9; lowrank_budget must too."""
    assert lowrank_budget(d1, d2, ratio).rank == rank


def test_grouped_dict_budget_members_2():
    # k = floor(0.7 * 2 * 576 * 576 / (576 + 2 * 576 / 2)) = floor(403.2) = 403, s = 201.
    b = dict_budget(576, 576, 0.3, 2.0, members=2)
    assert (b.atoms, b.sparsity, b.members) == (403, 201, 2)
    assert b.effective_params == 576 * 403 + 2 * 201 * 576 == 463680
    assert b.storage_words == pytest.approx(463680 + 2 * 403 * 576 / 16) == 492696
    r = ratios(2 * 576 * 576, b.effective_params, b.storage_words)
    assert r["effective"] == pytest.approx(1 - 463680 / 663552, rel=1e-12)
    assert r["storage"] == pytest.approx(1 - 492696 / 663552, rel=1e-12)
    # Sharing buys more atoms than two separate dictionaries would have in total per matrix.
    assert b.atoms > dict_budget(576, 576, 0.3, 2.0).atoms


def test_ratios_both_accountings():
    b = dict_budget(576, 576, 0.3, 2.0)
    dense = 576 * 576
    r = ratios(dense, b.effective_params, b.storage_words)
    eff = 576 * 268 + 134 * 576
    assert r["effective"] == pytest.approx(1 - eff / dense, rel=1e-12)
    assert r["storage"] == pytest.approx(1 - (eff + 268 * 576 / 16) / dense, rel=1e-12)
    assert 0.3 <= r["effective"] < 0.31
    assert r["storage"] < r["effective"]  # the bitmask costs storage
    lr = lowrank_budget(576, 576, 0.3)
    r2 = ratios(dense, lr.effective_params, lr.storage_words)
    assert r2["effective"] == r2["storage"] == pytest.approx(1 - 201 * 1152 / dense, rel=1e-12)


@pytest.mark.parametrize("ratio", [0, 0.0, 1, 1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_ratio_raises(ratio):
    with pytest.raises(CospadiError):
        dict_budget(64, 64, ratio)
    with pytest.raises(CospadiError):
        lowrank_budget(64, 64, ratio)


@pytest.mark.parametrize("rho", [0, 0.0, -1, -1.0, float("nan"), float("inf"), 0.5])
def test_bad_rho_raises(rho):
    with pytest.raises(CospadiError):
        dict_budget(64, 64, 0.3, rho)
    with pytest.raises(CospadiError, match="rho"):  # refused when the options are made, before any work
        SolverOptions(rho=rho)


def test_budget_too_small_raises():
    # 2x2 at ratio 0.9: k = floor(0.1*4/(2+1)) = 0 atoms.
    with pytest.raises(CospadiError):
        dict_budget(2, 2, 0.9, 2.0)


@settings(max_examples=60, deadline=None)
@given(d1=st.integers(8, 4096), d2=st.integers(8, 4096), ratio=st.floats(0.05, 0.8),
       rho=st.sampled_from([1.0, 1.5, 2.0, 3.0, 5.0]), members=st.integers(1, 4))
def test_budgets_stay_within_ratio(d1, d2, ratio, rho, members):
    lr = lowrank_budget(d1, d2, ratio)
    cap = (1 - ratio) * d1 * d2
    if lr.rank > 1:
        assert lr.effective_params <= cap * (1 + 1e-12)
        assert (lr.rank + 1) * (d1 + d2) > cap * (1 - 1e-9)
    try:
        b = dict_budget(d1, d2, ratio, rho, members)
    except CospadiError:
        return
    assert 1 <= b.sparsity <= b.atoms
    assert b.sparsity == math.floor(b.atoms / rho + 1e-9)
    assert b.effective_params <= members * cap * (1 + 1e-9)
    # One more atom (at its own share of s) would exceed the budget.
    assert d1 * (b.atoms + 1) + members * d2 * (b.atoms + 1) / rho > members * cap * (1 - 1e-9)


# --------------------------------------------------------------------------- whitening


def test_cholesky_upper_spd():
    g = spd_gram(12, seed=1)
    upper = cholesky_upper(g)
    assert upper.dtype == F64 and upper.shape == (12, 12)
    assert torch.equal(upper, upper.triu())
    assert torch.allclose(upper.T @ upper, g, rtol=1e-12, atol=1e-10 * float(g.abs().max()))
    assert bool((upper.diagonal() > 0).all())


def test_cholesky_upper_rank_deficient_gets_jitter():
    x = randn(5, 12, seed=2)
    g = x.T @ x  # rank 5 of 12
    upper = cholesky_upper(g)
    assert torch.equal(upper, upper.triu())
    assert bool(torch.isfinite(upper).all())
    assert bool((upper.diagonal() > 0).all())
    err = float((upper.T @ upper - g).norm() / g.norm())
    assert err < 1e-4


def test_cholesky_upper_slightly_indefinite():
    q, _ = torch.linalg.qr(randn(10, 10, seed=3))
    eig = torch.tensor([-1e-9] + [float(i) for i in range(1, 10)], dtype=F64)
    g = q @ torch.diag(eig) @ q.T
    upper = cholesky_upper(g)
    assert torch.equal(upper, upper.triu())
    assert float((upper.T @ upper - g).norm() / g.norm()) < 1e-4


def test_cholesky_upper_rejects_zero_and_nan():
    with pytest.raises(CospadiError):
        cholesky_upper(torch.zeros(6, 6, dtype=F64))
    g = spd_gram(6, seed=4)
    g[2, 3] = float("nan")
    with pytest.raises(CospadiError):
        cholesky_upper(g)
    g = spd_gram(6, seed=4)
    g[0, 0] = float("inf")
    with pytest.raises(CospadiError):
        cholesky_upper(g)


def test_whiten_unwhiten_roundtrip():
    g = spd_gram(10, seed=5)
    upper = cholesky_upper(g)
    a = randn(10, 7, seed=6)
    assert torch.allclose(whiten(upper, unwhiten(upper, a)), a, rtol=1e-10, atol=1e-10)
    assert torch.allclose(unwhiten(upper, whiten(upper, a)), a, rtol=1e-8, atol=1e-8)


def test_output_error_matches_cholesky_form_and_activations():
    x = randn(50, 10, seed=7) * torch.logspace(0, 1, 10, dtype=F64)
    g = x.T @ x
    w = randn(10, 6, seed=8)
    approx = w + 0.1 * randn(10, 6, seed=9)
    upper = cholesky_upper(g)
    expected = float((upper @ (w - approx)).norm() / (upper @ w).norm())
    direct = float((x @ (w - approx)).norm() / (x @ w).norm())
    got = output_error(g, w, approx)
    assert got == pytest.approx(expected, rel=1e-10)
    assert got == pytest.approx(direct, rel=1e-10)
    assert output_error(g, w, w) == 0.0
    assert output_error(g, w, torch.zeros_like(w)) == pytest.approx(1.0, rel=1e-12)


# --------------------------------------------------------------------------- low rank


def test_svd_llm_reaches_whitened_optimum_and_beats_svd():
    d1, d2 = 16, 24
    g = spd_gram(d1, seed=10, spread=2.0)  # very unequal input scales
    w = randn(d1, d2, seed=11)
    budget = LowRankBudget(d1, d2, 5)
    upper = cholesky_upper(g)
    f = svd_llm(w, g, budget)
    assert f.left.shape == (d1, 5) and f.right.shape == (5, d2)
    assert f.left.dtype == F64 and f.right.dtype == F64
    err = float((upper @ (w - f.weight())).norm())
    sigma = torch.linalg.svdvals(upper @ w)
    optimum = float(sigma[5:].square().sum().sqrt())
    assert err == pytest.approx(optimum, rel=1e-8)
    plain = svd(w, g, budget)
    err_svd = float((upper @ (w - plain.weight())).norm())
    assert err < 0.9 * err_svd
    assert output_error(g, w, f.weight()) < output_error(g, w, plain.weight())


def test_svd_reaches_eckart_young():
    w = randn(20, 13, seed=12)
    budget = LowRankBudget(20, 13, 4)
    f = svd(w, None, budget)
    sigma = torch.linalg.svdvals(w)
    err = float((w - f.weight()).norm())
    assert err == pytest.approx(float(sigma[4:].square().sum().sqrt()), rel=1e-10)
    # The factors share sqrt(sigma): both have column / row norms sqrt(sigma_i).
    assert torch.allclose(f.left.norm(dim=0), sigma[:4].sqrt(), rtol=1e-10)
    assert torch.allclose(f.right.norm(dim=1), sigma[:4].sqrt(), rtol=1e-10)


def test_svd_llm_with_identity_gram_equals_svd():
    w = randn(12, 9, seed=13)
    budget = LowRankBudget(12, 9, 3)
    eye = torch.eye(12, dtype=F64)
    assert torch.allclose(svd_llm(w, eye, budget).weight(), svd(w, eye, budget).weight(), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- Batch-OMP


def naive_omp(d: torch.Tensor, y: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook OMP, one column at a time: pick the atom with the largest normalised
    correlation with the residual, refit least squares on the support."""
    m = y.shape[1]
    norms = d.norm(dim=0)
    indices = torch.empty(s, m, dtype=torch.long)
    values = torch.empty(s, m, dtype=y.dtype)
    for j in range(m):
        chosen: list[int] = []
        residual = y[:, j].clone()
        coef = None
        for _ in range(s):
            score = (d.T @ residual).abs() / norms
            score[chosen] = -1.0
            chosen.append(int(score.argmax()))
            sub = d[:, chosen]
            coef = torch.linalg.lstsq(sub, y[:, j : j + 1]).solution.squeeze(1)
            residual = y[:, j] - sub @ coef
        order = torch.tensor(chosen).argsort()
        indices[:, j] = torch.tensor(chosen)[order]
        values[:, j] = coef[order]
    return indices, values


def test_batch_omp_exact_sparsity_and_shapes():
    d = randn(20, 15, seed=20)
    y = randn(20, 37, seed=21)
    for s in (1, 4, 15):
        idx, val = batch_omp(d, y, s)
        assert idx.dtype == torch.long
        assert_exact_sparsity(idx, val, s, 37, 15)


def test_batch_omp_rejects_bad_sparsity():
    d = randn(8, 5, seed=22)
    y = randn(8, 3, seed=23)
    for s in (0, 6):
        with pytest.raises(ValueError):
            batch_omp(d, y, s)


def test_batch_omp_recovers_planted_codes():
    n, k, s, m = 64, 48, 3, 300
    d0, s0 = planted(n, k, s, m, seed=24)
    y = d0 @ s0
    idx, val = batch_omp(d0, y, s)
    recovered = support_mask(idx, k) == (s0 != 0)
    assert float(recovered.all(0).double().mean()) >= 0.99
    coef = torch.zeros(k, m, dtype=F64).scatter_(0, idx, val)
    ok = recovered.all(0)
    assert torch.allclose(coef[:, ok], s0[:, ok], rtol=1e-9, atol=1e-9)
    rel = (y - d0 @ coef).norm(dim=0) / y.norm(dim=0)
    assert float(rel[ok].max()) < 1e-10


def test_batch_omp_matches_naive_omp():
    # Unnormalised atoms exercise the norm scaling of the selection rule.
    d = randn(24, 30, seed=25) * torch.linspace(0.5, 2.0, 30, dtype=F64)
    y = randn(24, 40, seed=26)
    for s in (1, 3, 6):
        idx, val = batch_omp(d, y, s)
        ref_idx, ref_val = naive_omp(d, y, s)
        assert torch.equal(idx, ref_idx)
        assert torch.allclose(val, ref_val, rtol=1e-8, atol=1e-8)


def test_batch_omp_coefficients_are_least_squares_on_support():
    d = randn(16, 24, seed=27)
    y = randn(16, 50, seed=28)
    s = 5
    idx, val = batch_omp(d, y, s)
    sub = d.T[idx.T].transpose(1, 2)  # (m, n, s): the chosen atoms of each column
    ls = torch.linalg.lstsq(sub, y.T.unsqueeze(-1)).solution.squeeze(-1)  # (m, s)
    assert torch.allclose(val.T, ls, rtol=1e-9, atol=1e-9)
    # Normal equations: the residual is orthogonal to every chosen atom.
    residual = y.T.unsqueeze(-1) - sub @ val.T.unsqueeze(-1)
    assert float((sub.transpose(1, 2) @ residual).abs().max()) < 1e-9 * float(y.abs().max())


def test_batch_omp_columns_are_independent():
    """Coding a slice of the columns gives the same codes as coding them all at once
    (whatever internal chunking is used: s * k here is large enough for several chunks
    of a few hundred columns)."""
    d = randn(64, 200, seed=29)
    y = randn(64, 1600, seed=30)
    idx, val = batch_omp(d, y, 20)
    for start, stop in ((0, 7), (700, 900), (1500, 1600)):
        part_idx, part_val = batch_omp(d, y[:, start:stop], 20)
        assert torch.equal(part_idx, idx[:, start:stop])
        assert torch.allclose(part_val, val[:, start:stop], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- dictionary learning


def test_learn_dictionary_objective_non_increasing_and_consistent():
    y = randn(20, 150, seed=40)
    k, s = 12, 3
    seen: list[tuple[int, float]] = []
    r = learn_dictionary(y, k, s, PAPER.but(iters=10), on_iter=lambda t, obj: seen.append((t, obj)))
    assert len(r.objective) == 10
    assert seen == list(enumerate(r.objective))
    for before, after in zip(r.objective, r.objective[1:]):
        assert after <= before * (1 + 1e-10)
    assert r.objective[-1] < r.objective[0]
    assert r.dictionary.shape == (20, k)
    assert torch.allclose(r.dictionary.norm(dim=0), torch.ones(k, dtype=F64), rtol=1e-10)
    assert_exact_sparsity(r.indices, r.values, s, 150, k)
    # The last recorded objective is the true residual of the returned factors.
    coef = torch.zeros(k, 150, dtype=F64).scatter_(0, r.indices, r.values)
    actual = float((y - r.dictionary @ coef).square().sum())
    assert actual == pytest.approx(r.objective[-1], rel=1e-9)


def test_learn_dictionary_seeded():
    y = randn(16, 80, seed=41)
    a = learn_dictionary(y, 10, 2, PAPER.but(iters=3, seed=7))
    b = learn_dictionary(y, 10, 2, PAPER.but(iters=3, seed=7))
    c = learn_dictionary(y, 10, 2, PAPER.but(iters=3, seed=8))
    assert torch.equal(a.dictionary, b.dictionary)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.values, b.values)
    assert a.objective == b.objective
    assert not torch.equal(a.dictionary, c.dictionary)


def test_learn_dictionary_from_perturbed_truth_converges():
    n, k, s, m = 64, 48, 3, 400
    d0, s0 = planted(n, k, s, m, seed=42)
    y = d0 @ s0
    init = d0 + 1e-3 * randn(n, k, seed=43)
    r = learn_dictionary(y, k, s, PAPER.but(iters=12), start=init)
    rel = math.sqrt(r.objective[-1]) / float(y.norm())
    assert rel < 1e-6
    # The learned atoms are the planted ones (up to sign).
    cos = (r.dictionary * d0).sum(0).abs()
    assert float(cos.min()) > 1 - 1e-6


def test_learn_dictionary_random_init_beats_rank_s_svd_on_union_of_subspaces():
    n, k, s, m = 30, 20, 3, 600
    d0, s0 = planted(n, k, s, m, seed=44)
    y = d0 @ s0
    r = learn_dictionary(y, k, s, PAPER.but(iters=40))
    rel = math.sqrt(r.objective[-1]) / float(y.norm())
    sigma = torch.linalg.svdvals(y)
    svd_rel = float(sigma[s:].square().sum().sqrt() / sigma.square().sum().sqrt())
    assert svd_rel > 0.6
    assert rel < 0.4 * svd_rel


# --------------------------------------------------------------------------- CoSpaDi


def union_of_subspaces_problem(d1: int, d2: int, ratio: float, seed: int):
    budget = dict_budget(d1, d2, ratio, 2.0)
    d0, s0 = planted(d1, budget.atoms, budget.sparsity, d2, seed)
    w = d0 @ s0 + 1e-3 * randn(d1, d2, seed=seed + 1)
    x = randn(200, d1, seed=seed + 2) * torch.logspace(0, 1, d1, dtype=F64)
    return w, x.T @ x, budget


def test_cospadi_factors_shape_sparsity_and_weight():
    w, g, budget = union_of_subspaces_problem(24, 100, 0.5, seed=50)
    f = cospadi(w, g, budget, PAPER.but(iters=4))
    assert isinstance(f, SparseDictFactors)
    k, s = budget.atoms, budget.sparsity
    assert f.dictionary.shape == (24, k) and f.dictionary.dtype == F64
    assert f.values.dtype == F64 and f.atoms == k
    assert_exact_sparsity(f.indices, f.values, s, 100, k)
    dense = f.coefficients()
    assert dense.shape == (k, 100)
    assert bool(((dense != 0).sum(0) == s).all())  # exactly s nonzeros, none vanished
    assert torch.equal(f.weight(), f.dictionary @ dense)
    # The whitened dictionary L D has unit-norm atoms (learning normalises them).
    upper = cholesky_upper(g)
    assert torch.allclose((upper @ f.dictionary).norm(dim=0), torch.ones(k, dtype=F64), rtol=1e-5)


def test_cospadi_beats_svd_llm_on_union_of_subspaces():
    d1, d2, ratio = 32, 256, 0.6
    w, g, budget = union_of_subspaces_problem(d1, d2, ratio, seed=51)
    lr = lowrank_budget(d1, d2, ratio)
    # Same budget family: both keep about 40% of the numbers.
    assert abs(budget.effective_params - lr.effective_params) <= 0.05 * d1 * d2
    e_dict = output_error(g, w, cospadi(w, g, budget, PAPER.but(iters=15)).weight())
    e_llm = output_error(g, w, svd_llm(w, g, lr).weight())
    e_svd = output_error(g, w, svd(w, g, lr).weight())
    assert e_llm < e_svd
    assert e_dict < 0.8 * e_llm


def test_cospadi_identity_gram_is_plain_dictionary_learning():
    w = randn(12, 40, seed=52)
    budget = DictBudget(12, 40, 8, 3)
    f = cospadi(w, torch.eye(12, dtype=F64), budget, PAPER.but(iters=3, seed=5), dtype=F64)
    r = learn_dictionary(w, 8, 3, PAPER.but(iters=3, seed=5))
    assert torch.allclose(f.dictionary, r.dictionary, rtol=1e-12, atol=1e-12)
    assert torch.equal(f.indices, r.indices)
    assert torch.allclose(f.values, r.values, rtol=1e-12, atol=1e-12)


def test_cospadi_error_matches_whitened_objective():
    w, g, budget = union_of_subspaces_problem(16, 60, 0.5, seed=53)
    history: list[float] = []
    f = cospadi(w, g, budget, PAPER.but(iters=5), dtype=F64, on_iter=lambda t, obj: history.append(obj))
    upper = cholesky_upper(g)
    # ||L (W - D S)||^2 is the objective the learner minimised on L W.
    whitened_sq = float((upper @ (w - f.weight())).square().sum())
    assert whitened_sq == pytest.approx(history[-1], rel=1e-8)
    assert output_error(g, w, f.weight()) == pytest.approx(
        math.sqrt(history[-1]) / float((upper @ w).norm()), rel=1e-8)
