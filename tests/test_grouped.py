"""Per-group mode: consecutive blocks share one dictionary (cospadi) or basis (Basis
Sharing) for q/k/v/gate/up. The grouped solvers reconstruct each member as the budget
promises and reduce to the per-layer ones for one member; the pipeline shares one
Parameter per kind and group, counts it once, and handles a group size that does not
divide the number of blocks (the last group is shorter)."""
import math

import pytest
import torch

from cospadi.adapters import ATTENTION, GATE_UP
from cospadi.budget import DictBudget, LowRankBudget, dict_budget, lowrank_budget
from cospadi.errors import CospadiError
from cospadi.groups import block_groups, check_group_size, resolve_group_size
from cospadi.layers.linear import DictLinear, LowRankLinear
from cospadi.methods import get_method
from cospadi.pipeline import Recipe, compress_blocks, unique_param_count
from cospadi.solvers import (
    PAPER,
    SolverOptions,
    basis_sharing,
    cholesky_upper,
    cospadi,
    cospadi_grouped,
    mean_gram,
    output_error,
    svd_llm,
    whiten,
)

TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SHARED = ATTENTION + GATE_UP  # the Llama family's linears that share a factor across a group (Basis Sharing)
SHARED_KINDS = ("q", "k", "v", "gate", "up")  # the same as --share kinds (cospadi's default shares gate/up only)
RATIO = 0.3


def random_gram(d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    x = torch.randn(4 * d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x = x * torch.linspace(0.2, 3.0, d, dtype=torch.float64)  # anisotropic inputs
    return scale * x.T @ x


# ---------------------------------------------------------------------------- groups

def test_block_groups_cut_consecutive_blocks_and_shorten_the_last():
    assert block_groups(30, 2) == [[i, i + 1] for i in range(0, 30, 2)]
    assert block_groups(5, 2) == [[0, 1], [2, 3], [4]]
    assert block_groups(30, 4)[-1] == [28, 29] and len(block_groups(30, 4)) == 8
    assert block_groups(3, 5) == [[0, 1, 2]]
    assert block_groups(4, 1) == [[0], [1], [2], [3]]
    with pytest.raises(CospadiError):
        block_groups(4, 0)


def test_group_size_checks_and_defaults():
    assert resolve_group_size(get_method("basis-sharing"), None) == 2
    assert resolve_group_size(get_method("cospadi"), None) == 1
    assert resolve_group_size(get_method("cospadi"), 3) == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(CospadiError, match="group size"):
            check_group_size(bad, get_method("cospadi"))
    with pytest.raises(CospadiError, match="svd-llm"):
        check_group_size(2, get_method("svd-llm"))


def test_shared_budget_formulas_hand_computed():
    # docs/method.md "Per-group mode": k = (1 - g) m d1 d2 / (d1 + m d2 / rho); r (d1 + m d2) = (1 - g) m d1 d2.
    b = dict_budget(576, 1536, 0.3, 2.0, members=2)
    assert b.atoms == math.floor(0.7 * 2 * 576 * 1536 / (576 + 2 * 1536 / 2))  # 1029
    assert b.sparsity == b.atoms // 2
    assert b.effective_params == 576 * b.atoms + 2 * b.sparsity * 1536  # the dictionary once
    assert b.effective_params <= 0.7 * 2 * 576 * 1536
    lr = lowrank_budget(576, 576, 0.3, members=2)
    assert lr.rank == 268  # floor(0.7 * 2 * 576 * 576 / 1728) = floor(268.8)
    assert lr.effective_params == 268 * (576 + 2 * 576) <= 0.7 * 2 * 576 * 576
    with pytest.raises(CospadiError):
        lowrank_budget(8, 8, 0.3, members=0)


# ---------------------------------------------------------------------------- solvers

def planted_group(d1=24, d2=40, k=12, s=3, m=2, seed=0):
    """m weights with an exact shared s-sparse representation in the whitened space of the
    mean Gram: W_l = L_bar^{-1} D_w S_l with D_w orthonormal (d1, k)."""
    gen = torch.Generator().manual_seed(seed)
    grams = [random_gram(d1, seed + 10 + j, scale=1.0 + j) for j in range(m)]
    upper = cholesky_upper(mean_gram(grams))
    d_w = torch.linalg.qr(torch.randn(d1, k, generator=gen, dtype=torch.float64)).Q
    weights = []
    for _ in range(m):
        codes = torch.zeros(k, d2, dtype=torch.float64)
        for j in range(d2):
            rows = torch.randperm(k, generator=gen)[:s]
            codes[rows, j] = torch.randn(s, generator=gen, dtype=torch.float64).sign() * (
                1 + torch.rand(s, generator=gen, dtype=torch.float64))
        weights.append(torch.linalg.solve_triangular(upper, d_w @ codes, upper=True))
    return weights, grams


@pytest.mark.parametrize("options", [dict(solver="orthogonal"), dict(solver="ksvd", init="orthogonal", iters=0, sweeps=8),
                                     dict(solver="ksvd", init="orthogonal", iters=2, sweeps=2, power_iters=8)])
def test_grouped_cospadi_reconstructs_every_member_within_its_budget(options):
    weights, grams = planted_group()
    budget = DictBudget(24, 40, 12, 3, members=2)
    factors = cospadi_grouped(weights, grams, budget, PAPER.but(**options))
    assert len(factors) == 2
    assert factors[0].dictionary is factors[1].dictionary  # one shared tensor
    assert factors[0].dictionary.shape == (24, 12)
    for f, w, g in zip(factors, weights, grams):
        assert f.indices.shape == f.values.shape == (3, 40)
        assert bool((f.indices[1:] > f.indices[:-1]).all())  # exactly s distinct atoms per column
        # the planted representation is found (float32 learning; the orthogonal solver stops at a 1e-4 gain)
        assert output_error(g, w, f.weight()) < 1e-3
    assert budget.effective_params == 24 * 12 + 2 * 3 * 40


def test_grouped_cospadi_on_generic_weights_meets_the_ratio_and_fits_each_member():
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(32, 96, generator=gen, dtype=torch.float64) for _ in range(2)]
    grams = [random_gram(32, 20), random_gram(32, 21, scale=3.0)]
    budget = dict_budget(32, 96, RATIO, 2.0, members=2)
    assert budget.effective_params <= (1 - RATIO) * 2 * 32 * 96
    factors = cospadi_grouped(weights, grams, budget, PAPER.but(solver="ksvd", init="orthogonal", iters=1, sweeps=4,
                                                                power_iters=4))
    upper = cholesky_upper(mean_gram(grams))
    whole = torch.cat([whiten(upper, w) for w in weights], 1)
    approx = torch.cat([whiten(upper, f.weight()) for f in factors], 1)
    relative = float((whole - approx).norm() / whole.norm())
    for f, w, g in zip(factors, weights, grams):
        error = output_error(g, w, f.weight())
        assert 0 < error < 0.25, error  # about 0.15 here; 1.0 would be nothing kept
    # the shared fit beats the best rank that the same storage would buy a shared basis
    low = basis_sharing(weights, grams, lowrank_budget(32, 96, RATIO, members=2))
    low_relative = float((whole - torch.cat([whiten(upper, f.weight()) for f in low], 1)).norm() / whole.norm())
    assert relative < low_relative


def test_one_member_groups_are_the_per_layer_solvers_exactly():
    gen = torch.Generator().manual_seed(5)
    w, g = torch.randn(20, 30, generator=gen, dtype=torch.float64), random_gram(20, 6)
    budget = dict_budget(20, 30, RATIO)
    options = PAPER.but(solver="ksvd", init="orthogonal", iters=1, sweeps=2, power_iters=2)
    (grouped,) = cospadi_grouped([w], [g], budget, options)
    single = cospadi(w, g, budget, options)
    assert torch.equal(grouped.dictionary, single.dictionary) and torch.equal(grouped.values, single.values)
    (shared,) = basis_sharing([w], [g], lowrank_budget(20, 30, RATIO))
    alone = svd_llm(w, g, lowrank_budget(20, 30, RATIO))
    assert torch.equal(shared.left, alone.left) and torch.equal(shared.right, alone.right)


def test_basis_sharing_is_the_optimal_shared_basis_under_the_mean_gram():
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(16, 24, generator=gen, dtype=torch.float64) for _ in range(3)]
    grams = [random_gram(16, 30 + j) for j in range(3)]
    budget = lowrank_budget(16, 24, 0.5, members=3)
    factors = basis_sharing(weights, grams, budget)
    assert all(f.left is factors[0].left for f in factors) and factors[0].left.shape == (16, budget.rank)
    upper = cholesky_upper(mean_gram(grams))
    whole = torch.cat([whiten(upper, w) for w in weights], 1)
    residual = whole - torch.cat([whiten(upper, f.weight()) for f in factors], 1)
    tail = torch.linalg.svdvals(whole)[budget.rank:]
    assert float((residual ** 2).sum()) == pytest.approx(float((tail ** 2).sum()), rel=1e-9)  # Eckart-Young
    # planted: weights that share a rank-r basis are reconstructed exactly
    basis = torch.randn(16, budget.rank, generator=gen, dtype=torch.float64)
    planted = [basis @ torch.randn(budget.rank, 24, generator=gen, dtype=torch.float64) for _ in range(3)]
    for f, w, g in zip(basis_sharing(planted, grams, budget), planted, grams):
        assert output_error(g, w, f.weight()) < 1e-10


def test_grouped_solvers_reject_mismatched_groups():
    w = torch.randn(8, 10, dtype=torch.float64)
    g = random_gram(8, 1)
    with pytest.raises(ValueError):
        cospadi_grouped([w, w], [g], DictBudget(8, 10, 4, 2, members=2))
    with pytest.raises(ValueError):
        basis_sharing([w, w[:, :9]], [g, g], LowRankBudget(8, 10, 2, members=2))
    with pytest.raises(ValueError):
        basis_sharing([w, w], [g, g], LowRankBudget(8, 10, 2, members=3))


# ---------------------------------------------------------------------------- pipeline

OPTIONS = SolverOptions(sweeps=3)


def factor_of(module):
    return module.dictionary if isinstance(module, DictLinear) else module.left


@pytest.mark.parametrize("method", ["cospadi", "basis-sharing"])
def test_a_group_size_that_does_not_divide_the_blocks_shortens_the_last_group(method, tiny_llama, tiny_ids):
    model = tiny_llama(3)
    report = compress_blocks(model, tiny_ids, Recipe(method, RATIO, OPTIONS, group_size=2, share=SHARED_KINDS),
                             batch_size=3, progress=False)
    layers = model.model.layers
    for name in TARGETS:
        first, second, third = (layer.get_submodule(name) for layer in layers)
        if name in SHARED:
            assert factor_of(first) is factor_of(second)  # one Parameter for blocks 0 and 1
        else:
            assert factor_of(first) is not factor_of(second)
        assert factor_of(third) is not factor_of(second)
        d1, d2 = third.in_features, third.out_features
        alone = dict_budget(d1, d2, RATIO) if method == "cospadi" else lowrank_budget(d1, d2, RATIO)
        assert factor_of(third).shape[1] == (alone.atoms if method == "cospadi" else alone.rank)  # per layer
    by_key = {(m.layer, m.name): m for m in report.matrices}
    assert list(by_key) == [(i, n) for i in range(3) for n in TARGETS]
    for name in SHARED:
        a, b = by_key[(0, name)], by_key[(1, name)]
        assert a.members == b.members == 2 and a.shared == b.shared == f"blocks 0-1 {name}"
        group = (dict_budget(a.d1, a.d2, RATIO, 2.0, members=2) if method == "cospadi"
                 else lowrank_budget(a.d1, a.d2, RATIO, members=2))
        assert a.effective_params + b.effective_params == pytest.approx(group.effective_params)
        module = layers[0].get_submodule(name)
        stored = factor_of(module).numel() + sum(p.numel() for p in (
            [layers[i].get_submodule(name).coefs for i in (0, 1)] if method == "cospadi"
            else [layers[i].get_submodule(name).right for i in (0, 1)]))
        assert stored == group.effective_params  # what memory holds is what the budget counts
        assert by_key[(2, name)].members == 1 and by_key[(2, name)].shared is None
    assert unique_param_count(model) == report.compressed_params  # shared Parameters counted once
    assert RATIO <= report.linear_ratios["effective"] < RATIO + 0.05
    assert report.group_size == 2
    assert all(0 <= m.output_error < 1 for m in report.matrices)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=tiny_ids).logits).all()


def test_a_group_larger_than_the_model_is_one_group_and_size_one_is_per_layer(tiny_llama, tiny_ids):
    model = tiny_llama(2)
    compress_blocks(model, tiny_ids, Recipe("basis-sharing", RATIO, group_size=5), progress=False)
    q = [layer.self_attn.q_proj for layer in model.model.layers]
    assert isinstance(q[0], LowRankLinear) and q[0].left is q[1].left
    per_layer, plain = tiny_llama(2), tiny_llama(2)
    compress_blocks(per_layer, tiny_ids, Recipe("basis-sharing", RATIO, group_size=1), progress=False)
    compress_blocks(plain, tiny_ids, Recipe("svd-llm", RATIO), progress=False)
    with torch.no_grad():
        assert torch.equal(per_layer(input_ids=tiny_ids).logits, plain(input_ids=tiny_ids).logits)


def test_the_first_group_is_calibrated_on_the_dense_model(tiny_llama, tiny_ids):
    """Within a group every block is calibrated on its dense predecessor's outputs (the
    shared factor needs all the Grams before any block can change): the first group's
    shared basis is Basis Sharing on the dense model's own q_proj inputs."""
    dense, model = tiny_llama(2), tiny_llama(2)
    inputs = {}
    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(
        lambda mod, args, i=i: inputs.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1]).double()))
        for i, layer in enumerate(dense.model.layers)]
    with torch.no_grad():
        dense(input_ids=tiny_ids)
    for h in hooks:
        h.remove()
    grams = [torch.cat(inputs[i]).T @ torch.cat(inputs[i]) for i in (0, 1)]
    weights = [layer.self_attn.q_proj.weight.detach().T for layer in dense.model.layers]
    expected = basis_sharing(weights, grams, lowrank_budget(32, 32, RATIO, members=2))
    compress_blocks(model, tiny_ids, Recipe("basis-sharing", RATIO, group_size=2), batch_size=3, progress=False)
    for layer, f in zip(model.model.layers, expected):
        got = layer.self_attn.q_proj.dense_weight().double()
        assert torch.allclose(got, f.weight(), atol=1e-4 * float(f.weight().abs().max()))


def test_svd_with_a_group_size_is_refused(tiny_llama, tiny_ids):
    with pytest.raises(CospadiError, match="group"):
        compress_blocks(tiny_llama(2), tiny_ids, Recipe("svd", RATIO, group_size=2), progress=False)


def test_an_overcomplete_shared_dictionary_runs_with_the_default_solver():
    """Shared budgets can exceed d1 atoms (SmolLM2's gate/up in pairs below ratio 0.35):
    the default orthogonal start then needs one Batch-OMP pass; the orthogonal solver
    cannot hold more than d1 atoms and says so."""
    gen = torch.Generator().manual_seed(11)
    weights = [torch.randn(16, 40, generator=gen, dtype=torch.float64) for _ in range(2)]
    grams = [random_gram(16, 40), random_gram(16, 41)]
    method = get_method("cospadi")
    budget = method.budget(16, 40, 0.2, SolverOptions(), members=2)
    assert budget.atoms > 16  # floor(0.8 * 2 * 16 * 40 / (16 + 40)) = 18
    factors = method.solve(weights, grams, budget, SolverOptions())
    assert factors[0].dictionary.shape == (16, budget.atoms) and factors[0].dictionary is factors[1].dictionary
    for f, w, g in zip(factors, weights, grams):
        assert 0 < output_error(g, w, f.weight()) < 0.3
    with pytest.raises(CospadiError, match="overcomplete"):
        method.solve(weights, grams, budget, SolverOptions(solver="orthogonal"))
