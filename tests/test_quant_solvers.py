"""The quantization solvers (solvers/quantize.py) and codes (layers/quantized_codes.py):
GPTQ against brute force on tiny cases and against round-to-nearest, the exact
least-squares refit of S's values, partial groups, and the packing round trip."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cospadi.errors import CospadiError
from cospadi.layers.bitmask import pack_bits
from cospadi.layers.quantized_codes import from_stored, pack_codes, packed_codes_size, to_stored, unpack_codes
from cospadi.solvers.factors import LowRankFactors, SparseDictFactors
from cospadi.solvers.quantize import (
    QuantSpec,
    code_range,
    coefficient_rms,
    gptq,
    gptq_rows,
    inverse_hessian_factor,
    parse_quant,
    quantize_dict,
    quantize_lowrank,
    refit_values,
    rtn,
)


def objective(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """trace((W - Q)^T H (W - Q)), the calibration objective."""
    delta = (weight - approx).double()
    return float(((hessian.double() @ delta) * delta).sum())


def random_spd(d: int, seed: int, tokens: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, d, generator=g, dtype=torch.float64) @ mix  # correlated inputs
    return x.T @ x


def fixed_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    return (weight.abs().amax(0, keepdim=True) / code_range(bits)[1]).to(torch.bfloat16)


def residual_cost(weight: torch.Tensor, fixed: torch.Tensor, hessian: torch.Tensor) -> float:
    """min over the free rows x of (w - [fixed; x])^T H (w - [fixed; x]) for one column:
    the Schur complement of H on the fixed rows."""
    i = fixed.numel()
    e = weight[:i] - fixed
    h = hessian
    if i == h.shape[0]:
        return float(e @ h @ e)
    schur = h[:i, :i] - h[:i, i:] @ torch.linalg.solve(h[i:, i:], h[i:, :i])
    return float(e @ schur @ e)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_is_the_sequential_optimum_found_by_brute_force(seed, bits):
    """GPTQ (damp 0, fixed scales) picks, row by row, the grid code that minimises the
    objective with the later rows still free: checked by trying every code."""
    d, n = 3, 5
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(d, n, generator=g, dtype=torch.float64)
    hessian = random_spd(d, seed + 100)
    scales = fixed_scales(weight, bits)
    got = gptq_rows(weight, inverse_hessian_factor(hessian, damp=0.0), bits, d, scales)
    low, high = code_range(bits)
    step = scales.double()[0]
    for j in range(n):
        chosen: list[float] = []
        for _ in range(d):
            costs = {c: residual_cost(weight[:, j], torch.tensor(chosen + [c * float(step[j])], dtype=torch.float64),
                                      hessian) for c in range(low, high + 1)}
            best = min(costs, key=costs.get)
            chosen.append(best * float(step[j]))
            assert int(got.codes[len(chosen) - 1, j]) == best


@pytest.mark.parametrize("seed", range(3))
def test_gptq_with_a_diagonal_hessian_reaches_the_exhaustive_optimum(seed):
    """Uncorrelated inputs make the objective separable: GPTQ must hit the best of all
    grid points; with correlated ones the exhaustive optimum is never above GPTQ's."""
    bits, d, n = 3, 3, 4
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(d, n, generator=g, dtype=torch.float64)
    scales = fixed_scales(weight, bits)
    low, high = code_range(bits)
    grid = torch.tensor(list(itertools.product(range(low, high + 1), repeat=d)), dtype=torch.float64)  # (8^3, d)
    for hessian, exact in ((torch.diag(torch.rand(d, generator=g, dtype=torch.float64) + 0.1), True),
                           (random_spd(d, seed + 7), False)):
        got = gptq_rows(weight, inverse_hessian_factor(hessian, damp=0.0), bits, d, scales)
        for j in range(n):
            step = float(scales[0, j])
            deltas = weight[:, j][None, :] - grid * step
            best = float(((deltas @ hessian) * deltas).sum(1).min())
            mine = objective(weight[:, j:j + 1], got.dequantize(torch.float64)[:, j:j + 1], hessian)
            assert mine >= best - 1e-12
            if exact:
                assert mine == pytest.approx(best, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bits,group", [(3, 16), (4, 24), (8, 64)])
def test_gptq_beats_round_to_nearest_on_the_calibration_objective(seed, bits, group):
    weight = torch.randn(48, 40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    hessian = random_spd(48, seed + 50, tokens=256)
    by_gptq = objective(weight, gptq(weight, hessian, bits, group).dequantize(torch.float64), hessian)
    by_rtn = objective(weight, rtn(weight, bits, group).dequantize(torch.float64), hessian)
    assert by_gptq < by_rtn


def test_partial_last_group_and_dead_inputs():
    """40 rows in groups of 16: scales (3, n), the last from its 8 rows alone; a row whose
    input never fires (zero diagonal) becomes zero."""
    weight = torch.randn(40, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = rtn(weight, 4, 16)
    assert q.scales.shape == (3, 6) and q.codes.shape == (40, 6)
    expected = (weight[32:].abs().amax(0) / 7).to(torch.bfloat16)
    assert torch.equal(q.scales[2], expected)
    assert int(q.codes.min()) >= -8 and int(q.codes.max()) <= 7
    hessian = random_spd(40, 3)
    hessian[5, :] = 0
    hessian[:, 5] = 0
    dq = gptq(weight, hessian, 4, 16).dequantize(torch.float64)
    assert torch.isfinite(dq).all() and bool((dq[5] == 0).all())


def test_refit_equals_least_squares_on_the_fixed_support():
    g = torch.Generator().manual_seed(1)
    d1, k, d2, s = 20, 12, 9, 4
    x = torch.randn(64, d1, generator=g, dtype=torch.float64)
    gram = x.T @ x
    dictionary = torch.randn(d1, k, generator=g, dtype=torch.float64)
    weight = torch.randn(d1, d2, generator=g, dtype=torch.float64)
    indices = torch.stack([torch.randperm(k, generator=g)[:s].sort().values for _ in range(d2)], dim=1)
    values = refit_values(dictionary, gram, weight, indices)
    torch.testing.assert_close(refit_values(dictionary, gram, weight, indices, chunk=2), values, rtol=1e-12, atol=1e-14)
    for j in range(d2):
        expected = torch.linalg.lstsq(x @ dictionary[:, indices[:, j]], (x @ weight[:, j])[:, None]).solution[:, 0]
        torch.testing.assert_close(values[:, j], expected, rtol=1e-7, atol=1e-9)


def test_dictionary_and_low_rank_quantization_keep_shapes_and_lower_the_error_with_bits():
    g = torch.Generator().manual_seed(2)
    d1, d2 = 24, 30
    x = torch.randn(128, d1, generator=g, dtype=torch.float64)
    gram, weight = x.T @ x, torch.randn(d1, d2, generator=g, dtype=torch.float64)
    indices = torch.stack([torch.randperm(16, generator=g)[:6].sort().values for _ in range(d2)], dim=1)
    dictionary = torch.randn(d1, 16, generator=g, dtype=torch.float64)
    exact = SparseDictFactors(dictionary, indices, refit_values(dictionary, gram, weight, indices))
    low_rank = LowRankFactors(torch.randn(d1, 8, generator=g, dtype=torch.float64),
                              torch.randn(8, d2, generator=g, dtype=torch.float64))
    for factors, quantize in ((exact, quantize_dict), (low_rank, quantize_lowrank)):
        errors = [objective(weight, quantize(weight, gram, factors, QuantSpec(bits, 8)).weight(), gram)
                  for bits in (3, 4, 8)]
        assert errors[0] > errors[1] > errors[2]
    q = quantize_dict(weight, gram, exact, QuantSpec(8, 8))
    assert q.dictionary.scales.shape == (3, 16) and q.values.scales.shape == (1, d2)
    assert torch.equal(q.indices, indices)


def test_parse_quant_errors():
    assert parse_quant("none") is None and parse_quant("int4", 64) == QuantSpec(4, 64)
    for name, group, word in (("int5", 128, "unknown quantization"), ("int4", 0, "group size"),
                              ("int8", -3, "group size")):
        with pytest.raises(CospadiError, match=word):
            parse_quant(name, group)


@settings(max_examples=150, deadline=None)
@given(bits=st.sampled_from([3, 4, 8]), data=st.data())
def test_codes_pack_and_unpack_round_trip(bits, data):
    low, high = code_range(bits)
    values = data.draw(st.lists(st.integers(low, high), max_size=97))
    codes = torch.tensor(values, dtype=torch.int8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_codes_size(len(values), bits)
    assert packed.numel() == math.ceil(len(values) * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, len(values)), codes)
    # the layout: offset codes as an LSB-first bit stream (the int4 / int8 fast paths agree with it)
    unsigned = (codes.to(torch.int16) - low).to(torch.uint8)
    stream = ((unsigned[:, None] >> torch.arange(bits, dtype=torch.uint8)) & 1).reshape(-1).bool()
    assert torch.equal(packed, pack_bits(stream))


def test_stored_form_round_trip_and_corrupt_sizes():
    weight = torch.randn(30, 7, generator=torch.Generator().manual_seed(3))
    q = rtn(weight, 4, 8)
    stored = to_stored("w", q)
    assert stored["w_codes"].shape == (105,) and stored["w_scales"].dtype == torch.int16
    back = from_stored(stored["w_codes"], stored["w_scales"], (30, 7), 4, 8)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.dequantize(), q.dequantize())
    with pytest.raises(CospadiError, match="corrupt"):
        unpack_codes(stored["w_codes"][:-1], 4, 210)
    with pytest.raises(CospadiError, match="corrupt"):
        from_stored(stored["w_codes"], stored["w_scales"][:-1], (30, 7), 4, 8)


@pytest.mark.parametrize("seed", range(3))
def test_dictionary_quantization_balances_the_rows_of_s_only_when_it_helps(seed):
    """Rows of S of very different sizes (atom i's coefficients ~ 1.5^-i, as an SVD start
    gives) share each column's group scales. quantize_dict keeps D's codes, refits the
    values exactly, and rounds them plainly or with the rows balanced by powers of two
    (D's scales the other way: the same product before rounding), whichever is better:
    never worse than the plain path."""
    g = torch.Generator().manual_seed(seed)
    d1, k, d2, s = 32, 24, 40, 12
    x = torch.randn(256, d1, generator=g, dtype=torch.float64)
    gram = x.T @ x
    dictionary = torch.randn(d1, k, generator=g, dtype=torch.float64)
    indices = torch.stack([torch.randperm(k, generator=g)[:s].sort().values for _ in range(d2)], dim=1)
    truth = torch.randn(s, d2, generator=g, dtype=torch.float64) * 1.5 ** -indices.double()
    factors = SparseDictFactors(dictionary, indices, truth)
    weight = factors.weight()
    rms = coefficient_rms(indices, truth, k)
    expected = torch.stack([truth[indices == i].pow(2).mean().sqrt() for i in range(k)])
    torch.testing.assert_close(rms, expected)
    quantized = quantize_dict(weight, gram, factors, QuantSpec(4, 128))
    dq = gptq(dictionary, gram, 4, 128)
    assert torch.equal(quantized.dictionary.codes, dq.codes)
    ratio = quantized.dictionary.scales.double() / dq.scales.double()
    assert bool((torch.log2(ratio) == torch.round(torch.log2(ratio))).all())  # powers of two (or 1)
    exact = refit_values(dq.dequantize(torch.float64), gram, weight, indices)
    plain = rtn(exact, 4, 128).dequantize(torch.float64)
    plain_error = objective(weight, SparseDictFactors(dq.dequantize(torch.float64), indices, plain).weight(), gram)
    assert objective(weight, quantized.weight(), gram) <= plain_error * (1 + 1e-9)
