"""bench-infer's random-weight models at larger shapes (bench/synthetic.py): the factors
have the budget's shapes and the product the dense weights' scale; the saved folders hold
each method's modules at the budget of every linear's shape, and reload."""

import pytest
import torch
from torch import nn

import cospadi
from cospadi.bench import infer as bench_infer
from cospadi.bench import synthetic
from cospadi.layers.linear import DictLinear, LowRankLinear
from cospadi.methods import get_method
from cospadi.solvers import SolverOptions

TINY = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}


@pytest.mark.parametrize("method", ["cospadi", "svd-llm"])
def test_random_factors_have_the_budgets_shapes_and_the_weights_scale(method):
    budget = get_method(method).budget(96, 256, 0.3, SolverOptions())
    factors = synthetic.random_factors(budget, torch.Generator().manual_seed(0))
    if method == "cospadi":
        k, s = budget.atoms, budget.sparsity
        assert factors.dictionary.shape == (96, k) and factors.values.shape == factors.indices.shape == (s, 256)
        assert torch.allclose(factors.dictionary.norm(dim=0), torch.ones(k))
        rows = factors.indices
        assert bool((rows[1:] > rows[:-1]).all()) and int(rows.min()) >= 0 and int(rows.max()) < k  # distinct, ascending
        assert factors.coefficients().count_nonzero(dim=0).eq(s).all()
    else:
        assert factors.left.shape == (96, budget.rank) and factors.right.shape == (budget.rank, 256)
    std = float(factors.weight().std())
    assert abs(std / synthetic.INIT_STD - 1) < 0.1, std


def test_unknown_shapes_are_refused_before_any_work(tmp_path):
    with pytest.raises(cospadi.CospadiError, match="--shapes 'nope' is unknown"):
        bench_infer.run(bench_infer.InferBench(shapes="nope"), tmp_path / "work", None, "cmd")
    assert not (tmp_path / "work").exists()


def test_shapes_bench_saves_each_method_at_its_budget_once(tmp_path, monkeypatch, smollm2):
    monkeypatch.setitem(synthetic.SHAPES, "tiny", TINY)
    bench = bench_infer.InferBench(shapes="tiny", methods=("svd-llm", "cospadi"))
    assert bench.key.startswith("tiny-random-r0.3-bfloat16-c14-s42-")
    folders = bench_infer.prepare_folders(bench, tmp_path, progress=False)
    linears = [f"model.layers.{b}.{n}" for b in range(2) for n in ("self_attn.q_proj", "self_attn.k_proj",
               "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    dense_bytes = bench_infer.folder_bytes(folders["dense"], linears)[0]
    assert dense_bytes == 2 * sum(m.numel() for m in _weights(folders["dense"], linears))  # bf16, every linear
    for method, kind in (("svd-llm", LowRankLinear), ("cospadi", DictLinear)):
        model, _ = cospadi.load(folders[method])
        assert model.config.hidden_size == 64 and len(model.model.layers) == 2
        for name in linears:
            module = model.get_submodule(name)
            assert isinstance(module, kind), (method, name)
            budget = get_method(method).budget(module.in_features, module.out_features, 0.3, bench.options)
            held = (module.atoms, module.sparsity) if kind is DictLinear else (module.rank,)
            assert held == ((budget.atoms, budget.sparsity) if kind is DictLinear else (budget.rank,)), name
        logits = model(torch.tensor([[5, 6, 7, 8]])).logits
        assert bool(torch.isfinite(logits).all())
        ratio = bench_infer.folder_bytes(folders[method], linears)[0] / dense_bytes
        assert 0.6 < ratio <= 0.71, (method, ratio)
    monkeypatch.setattr(synthetic, "random_dense", lambda *a: pytest.fail("rebuilt a saved model"))
    assert bench_infer.prepare_folders(bench, tmp_path, progress=False) == folders


def _weights(folder, linears) -> list[torch.Tensor]:
    model = cospadi.load_model(str(folder))[0]
    modules = [model.get_submodule(name) for name in linears]
    assert all(type(m) is nn.Linear for m in modules)
    return [m.weight for m in modules]


def test_section_names_the_run_dtypes_only_when_they_are_not_the_default():
    default = bench_infer.InferBench()
    assert default.section == f"infer-{default.key}"
    bf16 = bench_infer.InferBench(compute_dtypes=("bfloat16",))
    assert bf16.key == default.key and bf16.section == f"infer-{default.key}-bfloat16"  # the same saved folders
