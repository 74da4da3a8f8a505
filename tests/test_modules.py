"""DictLinear and LowRankLinear: the dense and sparse forward paths agree with x W + b in
fp32, bf16 and fp16 (with and without 14-bit values), the automatic choice follows input
size, device and autograd, gradients flow through the dense path, and the ELL form
follows in-place changes, dtype moves and reloads (tests/test_ell.py has the rest)."""

import copy

import pytest
import torch

from cospadi.errors import CospadiError
from cospadi.layers import kernels
from cospadi.layers.linear import DictLinear, LowRankLinear, forward_path
from cospadi.solvers.factors import LowRankFactors, SparseDictFactors

D1, D2, K, S = 48, 40, 20, 7
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def factors(seed: int = 0, d1: int = D1, d2: int = D2, k: int = K, s: int = S) -> SparseDictFactors:
    g = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(k, generator=g)[:s].sort().values for _ in range(d2)], 1)
    return SparseDictFactors(torch.randn(d1, k, generator=g), rows, torch.randn(s, d2, generator=g))


def module(dtype=torch.float32, bias=True, coef_bits=None, seed=0) -> DictLinear:
    f = factors(seed)
    b = torch.randn(D2, generator=torch.Generator().manual_seed(seed + 1)) if bias else None
    return DictLinear.from_factors(f, b, dtype).compact_(coef_bits).eval()


def reference(m: DictLinear, x: torch.Tensor) -> torch.Tensor:
    """x W + b in float64 from the module's own stored (rounded) numbers."""
    w = m.dictionary.double() @ m.coefficients().double()
    y = x.double() @ w
    return y + m.bias.double() if m.bias is not None else y


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("coef_bits", [None, 14])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, D1), (1, 1, D1), (3, 5, D1), (2, 40, D1)])
def test_every_path_matches_x_w_plus_b(shape, bias, dtype, coef_bits):
    m = module(dtype, bias, coef_bits)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    expected = reference(m, x)
    outputs = {}
    with torch.no_grad():
        for path in kernels.PATHS:
            m.path = path
            outputs[path] = m(x)
            assert outputs[path].shape == (*shape[:-1], D2) and outputs[path].dtype == dtype, path
            assert rel_error(outputs[path], expected) < TOLERANCE[dtype], path
    assert rel_error(outputs["dense"], outputs["sparse"]) < TOLERANCE[dtype]


def test_14_bit_values_are_the_truncated_bf16_values():
    full, packed = module(), module(coef_bits=14)
    from cospadi.layers.coefficients import truncate14

    assert packed.coef_bits == 14 and "coefs" not in dict(packed.named_parameters())
    assert torch.equal(packed.values, truncate14(full.values).float())
    assert torch.equal(packed.indices, full.indices)
    assert packed.mask.dtype == torch.uint8 and torch.equal(packed.mask, full.mask)
    assert packed.coefs14.numel() * 8 < full.values.numel() * 14 + 56
    assert module(coef_bits=14).compact_(14).coefs14.equal(packed.coefs14)  # idempotent


def test_choose_path_by_rows_device_autograd_and_dtype():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    limit = kernels.max_sparse_rows(torch.float32)
    assert kernels.choose_path(1, cpu, False) == "sparse"
    assert kernels.choose_path(limit, cpu, False) == "sparse"
    assert kernels.choose_path(limit + 1, cpu, False) == "dense"
    assert kernels.choose_path(1, gpu, False) == "dense"
    assert kernels.choose_path(1, cpu, True) == "dense"
    bf16 = kernels.max_sparse_rows(torch.bfloat16)
    assert kernels.choose_path(bf16, cpu, False, torch.bfloat16) == "sparse"
    assert kernels.choose_path(bf16 + 1, cpu, False, torch.bfloat16) == "dense"
    assert kernels.max_sparse_rows(torch.float16) == limit


def test_bf16_switch_point_follows_the_compiled_panels(monkeypatch):
    """With the bf16 panels a bf16 model's sparse path takes up to 512 rows; without them
    (no compiler, no AVX-512 BF16) it stops at the walk's rows."""
    from cospadi.layers import ell_native

    monkeypatch.setattr(ell_native, "has_bf16_panels", lambda: True)
    assert kernels.max_sparse_rows(torch.bfloat16) == kernels.BF16_PANEL_ROWS == 512
    monkeypatch.setattr(ell_native, "has_bf16_panels", lambda: False)
    assert kernels.max_sparse_rows(torch.bfloat16) == kernels.WALK_ROWS_BF16 == 8
    assert kernels.max_sparse_rows(torch.float32) == 4096


@pytest.mark.parametrize("rows,expected", [(1, "sparse"), (kernels.max_sparse_rows(torch.float32) + 1, "dense")])
def test_auto_path_runs_the_chosen_kernel(rows, expected, monkeypatch):
    calls = []
    for name in ("sparse", "dense"):
        real = getattr(kernels, f"{name}_forward")
        monkeypatch.setattr(kernels, f"{name}_forward",
                            lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    m = module()
    with torch.no_grad():
        m(torch.randn(rows, D1))
    assert calls == [expected]
    calls.clear()
    m(torch.randn(1, D1))  # autograd on: always the differentiable dense path
    assert calls == ["dense"]


def test_dense_path_gradients_match_autograd_of_the_product():
    m = module()
    x = torch.randn(4, D1)
    m(x).square().sum().backward()
    d = m.dictionary.detach().clone().requires_grad_()
    v = m.values.detach().clone().requires_grad_()
    s = torch.zeros(K, D2).scatter(0, m.indices.long(), v)
    (x @ d @ s + m.bias.detach()).square().sum().backward()
    assert torch.allclose(m.dictionary.grad, d.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(m.coefs.grad.T, v.grad, rtol=1e-4, atol=1e-4)


def test_from_factors_keeps_the_factors():
    f = factors(3)
    m = DictLinear.from_factors(f, None, torch.float32)
    assert torch.equal(m.indices.long(), f.indices) and m.indices.shape == (S, D2)
    assert torch.equal(m.values, f.values) and m.values.shape == (S, D2)
    assert torch.equal(m.dense_weight(), f.weight())
    assert sum(p.numel() for p in m.parameters()) == D1 * K + S * D2
    assert set(m.state_dict()) == {"dictionary", "mask", "coefs"}
    assert set(module(coef_bits=14).state_dict()) == {"dictionary", "mask", "coefs14", "bias"}


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_ell_form_follows_in_place_changes_dtype_moves_and_reloads(path):
    m = module()
    m.path = path
    x = torch.randn(1, D1)
    with torch.no_grad():
        m(x)
        m.coefs.mul_(2)
        assert rel_error(m(x) - m.bias, 2 * (reference(module(), x) - m.bias.double())) < 1e-5
        m.to(torch.float64)
        assert m(x.double()).dtype == torch.float64
        assert rel_error(m(x.double()), reference(m, x)) < 1e-12
        other = module(torch.float64, seed=9)
        other.path = path
        m.load_state_dict(other.state_dict())  # copies into the same tensors
        assert torch.equal(m(x.double()), other(x.double()))
        assert torch.equal(m.indices, other.indices)


def test_deepcopy_and_forward_path_context():
    m = module()
    x = torch.randn(2, D1)
    with torch.no_grad():
        m(x)
        clone = copy.deepcopy(m)
        assert torch.equal(clone(x), m(x))
        outer = torch.nn.Sequential(m)
        with forward_path(outer, "sparse"):
            assert m.path == "sparse"
        assert m.path == "auto"
        with pytest.raises(CospadiError, match="unknown path"), forward_path(outer, "fast"):
            pass
        m.path = "fast"
        with pytest.raises(CospadiError, match="unknown path"):
            m(x)


def test_bad_construction_arguments():
    with pytest.raises(CospadiError, match="sparsity"):
        DictLinear(4, 4, atoms=3, sparsity=4)
    with pytest.raises(CospadiError, match="coefficient bits"):
        DictLinear(4, 4, atoms=3, sparsity=2, coef_bits=12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_rank_linear_matches_its_product(dtype):
    g = torch.Generator().manual_seed(0)
    f = LowRankFactors(torch.randn(D1, 6, generator=g), torch.randn(6, D2, generator=g))
    m = LowRankLinear.from_factors(f, torch.randn(D2, generator=g), dtype)
    x = torch.randn(3, D1, generator=g).to(dtype)
    expected = x.double() @ (m.left.double() @ m.right.double()) + m.bias.double()
    with torch.no_grad():
        assert rel_error(m(x), expected) < TOLERANCE[dtype]
    assert torch.allclose(m.dense_weight().float(), (m.left.float() @ m.right.float()).to(dtype).float())


def test_modules_built_or_used_in_inference_mode():
    with torch.inference_mode():
        m = module()
        x = torch.randn(1, D1)
        for path in ("sparse", "dense"):
            m.path = path
            assert rel_error(m(x), reference(m, x)) < 1e-5
    m, x = module(), torch.randn(2, D1)
    with torch.inference_mode():
        assert rel_error(m(x), reference(m, x)) < 1e-5
