"""Overcomplete dictionaries (k > d1): sparse coding for large s (hard thresholding pursuit
with a least-squares refit) matches exhaustive least squares on its support and never
fits a column worse than its start; the overcomplete solver starts from the complete
solution and never ends above it, fits no worse with more atoms, is deterministic; the
single-step solver works there; the orthogonal solver refuses at once."""

import pytest
import torch

from cospadi import cli
from cospadi.budget import dict_budget
from cospadi.errors import CospadiError
from cospadi.layers.base import compressed_modules
from cospadi.pipeline import Recipe, compress_blocks
from cospadi.solvers import SolverOptions, cospadi, learn_dictionary, output_error, single_step
from cospadi.solvers.options import UPDATES
from cospadi.solvers.orthogonal import hard_threshold
from cospadi.solvers.pursuit import column_objective, htp_code, refit_on_support

F64 = torch.float64


def objective(y: torch.Tensor, d: torch.Tensor, coef: torch.Tensor) -> float:
    return float(((y - d @ coef) ** 2).sum())


def result_error(y, result) -> float:
    coef = torch.zeros(result.dictionary.shape[1], y.shape[1], dtype=y.dtype).scatter_(0, result.indices,
                                                                                     result.values.to(y.dtype))
    return objective(y, result.dictionary.to(y.dtype), coef)


def random_signals(n: int, m: int, seed: int, decay: float = 0.05) -> torch.Tensor:
    """(n, m) signals with a decaying spectrum, like whitened weights."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(-decay * torch.arange(n, dtype=F64))
    return (torch.randn(n, n, generator=g, dtype=F64) * scales) @ torch.randn(n, m, generator=g, dtype=F64)


def planted(n: int, k: int, s: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Y = D S exactly, D (n, k) unit atoms (an orthonormal basis plus random extra atoms),
    S with s random nonzeros per column."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64)).Q
    extra = torch.randn(n, k - n, generator=g, dtype=F64)
    d = torch.cat([basis, extra / extra.norm(dim=0)], 1)
    codes = torch.zeros(k, m, dtype=F64)
    for j in range(m):
        rows = torch.randperm(k, generator=g)[:s]
        codes[rows, j] = torch.randn(s, generator=g, dtype=F64)
    return d, codes, d @ codes


def test_refit_matches_exhaustive_least_squares_on_the_support():
    g = torch.Generator().manual_seed(0)
    n, k, s, m = 48, 80, 30, 40
    d = torch.randn(n, k, generator=g, dtype=F64)
    d /= d.norm(dim=0)
    y = torch.randn(n, m, generator=g, dtype=F64)
    support = torch.zeros(k, m, dtype=torch.bool)
    for j in range(m):
        support[torch.randperm(k, generator=g)[:s], j] = True
    got = refit_on_support(d.T @ d, d.T @ y, support, torch.zeros(k, m, dtype=F64), iters=200, tol=1e-13)
    for j in range(m):
        rows = torch.nonzero(support[:, j]).squeeze(1)
        exact = torch.linalg.lstsq(d[:, rows], y[:, j : j + 1]).solution.squeeze(1)
        assert torch.allclose(got[rows, j], exact, rtol=1e-8, atol=1e-9)
        assert not bool(got[~support[:, j], j].any())


def test_htp_never_fits_a_column_worse_than_its_start_and_improves_thresholding():
    y = random_signals(40, 120, seed=1)
    g = torch.Generator().manual_seed(2)
    d = torch.cat([torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=F64)).Q,
                   torch.randn(40, 20, generator=g, dtype=F64)], 1)
    d /= d.norm(dim=0)
    s = 25
    start, support = hard_threshold(d.T @ y, s)
    gram, corr, energy = d.T @ d, d.T @ y, (y * y).sum(0)
    before = column_objective(gram, corr, energy, start)
    coef, new_support = htp_code(d, y, s, start, support)
    after = column_objective(gram, corr, energy, coef)
    assert bool((after <= before + 1e-9).all())
    assert float(after.sum()) < 0.8 * float(before.sum())
    assert bool((new_support.sum(0) == s).all()) and not bool(coef[~new_support].any())
    assert float(after.sum()) == pytest.approx(objective(y, d, coef), rel=1e-9)


def test_htp_recovers_a_planted_sparse_code():
    d, codes, y = planted(n=32, k=40, s=6, m=60, seed=3)
    start, support = hard_threshold(d.T @ y, 6)
    coef, _ = htp_code(d, y, 6, start, support, steps=20)
    assert objective(y, d, coef) < 1e-10 * float((y * y).sum())


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("seed", [0, 1])
def test_overcomplete_is_never_worse_than_the_complete_dictionary(seed, update):
    y = random_signals(32, 400, seed=seed).float()
    s = 20
    complete = learn_dictionary(y, 32, s, SolverOptions(update=update))
    over = learn_dictionary(y, 44, s, SolverOptions(update=update))
    assert over.dictionary.shape == (32, 44)
    assert bool((over.indices.sort(0).values == over.indices).all())
    assert result_error(y, over) <= result_error(y, complete) * (1 + 1e-6)
    # three coding alternations: the objective never rises
    longer = learn_dictionary(y, 44, s, SolverOptions(iters=3, update=update))
    assert len(longer.objective) == 3 and longer.objective[0] <= result_error(y, complete) * (1 + 1e-6)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(longer.objective, longer.objective[1:]))


@pytest.mark.parametrize("update", UPDATES)
def test_more_atoms_at_the_same_sparsity_never_fit_worse(update):
    for y in (random_signals(24, 300, seed=5).float(), planted(24, 40, 10, 300, seed=6)[2].float()):
        errors = [result_error(y, learn_dictionary(y, k, 10, SolverOptions(update=update))) for k in (24, 28, 32, 40)]
        for smaller, larger in zip(errors, errors[1:]):
            assert larger <= smaller * (1 + 1e-5), errors


def test_overcomplete_solver_is_deterministic():
    y = random_signals(20, 150, seed=7).float()
    a = learn_dictionary(y, 30, 12, SolverOptions(seed=3))
    b = learn_dictionary(y, 30, 12, SolverOptions(seed=3))
    assert torch.equal(a.dictionary, b.dictionary) and torch.equal(a.values, b.values)
    assert torch.equal(a.indices, b.indices)


def test_single_step_handles_more_atoms_than_the_rank():
    y = random_signals(24, 200, seed=8).float()
    result = single_step(y, 34, 12)
    assert torch.isfinite(result.dictionary).all() and torch.isfinite(result.values).all()
    assert result_error(y, result) < float((y * y).sum())
    w = random_signals(24, 200, seed=9)
    gram = torch.eye(24, dtype=F64)
    budget = dict_budget(24, 200, 0.2, 2.0)
    assert budget.atoms > 24
    factors = cospadi(w, gram, budget, SolverOptions(solver="single-step"))
    assert output_error(gram, w, factors.weight()) < 1.0


def test_orthogonal_solver_refuses_an_overcomplete_budget_before_any_work(tiny_llama, tiny_ids, monkeypatch):
    import cospadi.pipeline.run as run

    calls = []
    monkeypatch.setattr(run, "calibrate_block", lambda *a, **k: calls.append(1))
    model = tiny_llama(2)
    with pytest.raises(CospadiError, match="orthogonal solver needs at most d1 = 32 atoms"):
        compress_blocks(model, tiny_ids, Recipe("cospadi", 0.2, SolverOptions(solver="orthogonal"), group_size=2),
                        progress=False)
    assert calls == [] and not list(compressed_modules(model))


def test_orthogonal_refusal_is_one_line_from_the_cli(cli_files, capsys, tmp_path):
    code = cli.main(["compress", "--model", str(cli_files["model"]), "--data", str(cli_files["txt"]), "--method",
                     "cospadi", "--solver", "orthogonal", "--ratio", "0.2", "--group-size", "2", "--calib-samples",
                     "2", "--seq-len", "16", "--eval-windows", "0", "--quiet", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "orthogonal solver" in err[0]
    assert not (tmp_path / "out").exists()
