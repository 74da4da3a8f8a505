"""The block dictionary update (MOD, solvers/block.py): its dictionary is the closed-form
least squares, every step of a pass and every pass is monotone on random and planted
problems, a pass that measures worse is undone, unused atoms are re-seeded without moving
the objective, it recovers a planted dictionary on the true support, and the solver
built on it is deterministic and fits no worse than the K-SVD sweeps it replaces."""

import pytest
import torch

import cospadi.solvers.block as block
from cospadi.solvers import PAPER, SolverOptions, learn_dictionary
from cospadi.solvers.block import block_update, least_squares_dictionary, mod_pass
from cospadi.solvers.orthogonal import hard_threshold
from cospadi.solvers.pursuit import refit_on_support

F64 = torch.float64


def objective(y: torch.Tensor, d: torch.Tensor, coef: torch.Tensor) -> float:
    return float(((y - d @ coef) ** 2).sum())


def random_problem(n: int, k: int, s: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor]:
    """Signals with a decaying spectrum, a random unit dictionary, thresholded codes."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(n, n, generator=g, dtype=F64) * torch.exp(-0.05 * torch.arange(n, dtype=F64))) @ \
        torch.randn(n, m, generator=g, dtype=F64)
    d = torch.randn(n, k, generator=g, dtype=F64)
    d /= d.norm(dim=0)
    coef, support = hard_threshold(d.T @ y, s)
    return y, d, coef, support


def planted_problem(n: int, k: int, s: int, m: int, seed: int, noise: float = 0.05):
    """Y = D0 S0 exactly; a start at D0 + noise (unit atoms) with the least-squares codes on
    the true support. Returns (Y, start D, start codes, support, D0)."""
    g = torch.Generator().manual_seed(seed)
    d0 = torch.randn(n, k, generator=g, dtype=F64)
    d0 /= d0.norm(dim=0)
    support = torch.zeros(k, m, dtype=torch.bool)
    for j in range(m):
        support[torch.randperm(k, generator=g)[:s], j] = True
    s0 = torch.randn(k, m, generator=g, dtype=F64).sign() * (1 + torch.rand(k, m, generator=g, dtype=F64)) * support
    y = d0 @ s0
    d = d0 + noise * torch.randn(n, k, generator=g, dtype=F64)
    d /= d.norm(dim=0)
    coef = refit_on_support(d.T @ d, d.T @ y, support, torch.zeros(k, m, dtype=F64), iters=100, tol=1e-14)
    return y, d, coef, support, d0


def test_the_dictionary_is_the_closed_form_least_squares():
    y, d, coef, _ = random_problem(12, 9, 4, 60, seed=0)
    coef[3] = 0.0  # an atom no code uses keeps its previous column
    got = least_squares_dictionary(y, coef, d)
    live = [i for i in range(9) if i != 3]
    exact = torch.linalg.lstsq(coef[live].T, y.T).solution.T  # argmin_D ||Y - D C||_F
    assert torch.allclose(got[:, live], exact, rtol=1e-8, atol=1e-10)
    assert torch.equal(got[:, 3], d[:, 3])
    assert ((y - got @ coef) @ coef[live].T).abs().max() < 1e-9 * float(y.norm()) ** 2  # normal equations


@pytest.mark.parametrize("kind", ["random", "planted"])
@pytest.mark.parametrize("seed", [1, 2])
def test_every_step_of_a_pass_is_monotone(kind, seed):
    if kind == "random":
        y, d, coef, support = random_problem(16, 24, 5, 120, seed)
    else:
        y, d, coef, support, _ = planted_problem(16, 24, 5, 120, seed, noise=0.3)
    start = objective(y, d, coef)
    lsq = least_squares_dictionary(y, coef, d)
    after_lsq = objective(y, lsq, coef)
    assert after_lsq <= start * (1 + 1e-12)
    norms = lsq.norm(dim=0)
    assert objective(y, lsq / norms, coef * norms[:, None]) == pytest.approx(after_lsq, rel=1e-10)
    new_d, new_coef = mod_pass(y, d, coef, support)
    assert torch.allclose(new_d.norm(dim=0), torch.ones(24, dtype=F64), rtol=1e-12)
    assert not bool(new_coef[~support].any())
    assert objective(y, new_d, new_coef) <= after_lsq * (1 + 1e-12)
    history = []
    for _ in range(5):
        history.append(block_update(y, d, coef, support, passes=1, tol=0.0))
    assert history[0] <= start and all(b <= a for a, b in zip(history, history[1:]))
    assert history[-1] == pytest.approx(objective(y, d, coef), rel=1e-10)
    assert history[-1] < 0.95 * start


def test_the_true_support_recovers_the_planted_dictionary():
    y, d, coef, support, d0 = planted_problem(20, 16, 3, 300, seed=3)
    start = objective(y, d, coef)
    final = block_update(y, d, coef, support, passes=60, tol=0.0)
    assert final < 1e-12 * start
    assert float((d * d0).sum(0).abs().min()) > 1 - 1e-6  # the planted atoms, up to sign


def test_a_pass_that_measures_worse_is_undone(monkeypatch):
    y, d, coef, support = random_problem(12, 16, 4, 80, seed=4)
    before = (d.clone(), coef.clone())
    start = objective(y, d, coef)
    monkeypatch.setattr(block, "mod_pass", lambda y, d, c, s: (d, 2.0 * c))
    assert block_update(y, d, coef, support, passes=3) == pytest.approx(start, rel=1e-12)
    assert torch.equal(d, before[0]) and torch.equal(coef, before[1])


def test_unused_atoms_are_reseeded_along_distinct_worst_columns():
    y, d, coef, support = random_problem(12, 16, 4, 80, seed=5)
    coef[[2, 7]] = 0.0
    support[[2, 7]] = False
    block_update(y, d, coef, support, passes=1, tol=0.0)
    residual = y - d @ coef  # the unused atoms carry no codes: re-seeding leaves it as it was
    worst = residual.norm(dim=0).topk(2).indices
    assert torch.allclose(d[:, [2, 7]], residual[:, worst] / residual[:, worst].norm(dim=0))


def test_zero_passes_change_nothing():
    y, d, coef, support = random_problem(12, 16, 4, 80, seed=6)
    coef[1] = 0.0
    before = (d.clone(), coef.clone())
    assert block_update(y, d, coef, support, passes=0) == pytest.approx(objective(y, d, coef))
    assert torch.equal(d, before[0]) and torch.equal(coef, before[1])


@pytest.mark.parametrize("atoms", [20, 30])  # complete and overcomplete (n = 24)
def test_the_default_solver_is_deterministic_and_monotone(atoms):
    y = random_problem(24, 8, 2, 200, seed=7)[0].float()
    seen = []
    a = learn_dictionary(y, atoms, 8, SolverOptions(iters=2, update="mod"), on_iter=lambda t, obj: seen.append(obj))
    b = learn_dictionary(y, atoms, 8, SolverOptions(iters=2, update="mod"))
    assert torch.equal(a.dictionary, b.dictionary) and torch.equal(a.values, b.values)
    assert torch.equal(a.indices, b.indices) and a.objective == b.objective == seen
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(a.objective, a.objective[1:]))


@pytest.mark.parametrize("seed", [8, 9])
def test_the_block_update_fits_no_worse_than_the_sweeps_it_replaces(seed):
    y = random_problem(32, 8, 2, 400, seed)[0].float()
    for atoms in (24, 32, 40):
        block_fit = learn_dictionary(y, atoms, 10, SolverOptions(update="mod")).objective[-1]
        sweeps_fit = learn_dictionary(y, atoms, 10, SolverOptions(update="ksvd")).objective[-1]
        assert block_fit <= sweeps_fit * (1 + 1e-4), (atoms, block_fit, sweeps_fit)


def test_the_paper_keeps_its_k_svd_sweeps_and_the_default_is_mod():
    assert PAPER.update == "ksvd" and SolverOptions().update == "mod"
