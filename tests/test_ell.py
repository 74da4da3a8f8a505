"""The held form of S (issue 15): values (d2, s) and a per-column bit pattern in 16-bit
words. The sparse path (compiled bit walk and PyTorch fallback) equals the dense path and a
brute-force product for every dtype, value width and shape, any k (1, not a multiple of
16, past the old int16 limit); bitmask -> held pattern -> bitmask round trips bit-exactly;
a loaded model holds D, the values and the pattern (k d2 / 8 bytes, rounded up per column)
and nothing else per linear; the on-disk form is unchanged, so folders written from the
storage form (as before this change) load and resave alike."""

import warnings

import pytest
import torch
from safetensors.torch import load_file

import cospadi
from cospadi.layers import compressed_modules, ell_native, kernels
from cospadi.layers.bitmask import (
    mask_to_words,
    pattern_to_mask,
    pattern_to_words,
    words_per_column,
    words_to_bits,
    words_to_mask,
    words_to_rows,
)
from cospadi.layers.coefficients import pack14, truncate14
from cospadi.layers.linear import DictLinear
from cospadi.solvers.factors import SparseDictFactors

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def random_factors(d1: int, d2: int, k: int, s: int, seed: int = 0) -> SparseDictFactors:
    g = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(k, generator=g)[:s].sort().values for _ in range(d2)], 1)
    return SparseDictFactors(torch.randn(d1, k, generator=g), rows, torch.randn(s, d2, generator=g))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(params=["compiled", "fallback"])
def kernel(request, monkeypatch):
    """Runs a test with the compiled kernels, then with the pure-PyTorch fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(ell_native, "load", lambda: None)
    elif ell_native.load() is None:
        pytest.skip("no C++ compiler: the compiled kernel is unavailable")
    return request.param


@pytest.mark.parametrize("coef_bits", [None, 14])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 15, 16, 17, 40])
def test_ell_path_equals_dense_path(kernel, rows, dtype, coef_bits):
    m = DictLinear.from_factors(random_factors(48, 70, 37, 19), torch.randn(70), dtype).compact_(coef_bits)
    x = torch.randn(rows, 48).to(dtype)
    with torch.no_grad():
        m.path = "dense"
        dense = m(x)
        m.path = "sparse"
        ell = m(x)
    assert ell.dtype == dense.dtype == dtype and ell.shape == (rows, 70)
    assert rel(ell, dense) < TOLERANCE[dtype]


@pytest.mark.parametrize("rows", [1, 3, 17, 40])
def test_bf16_held_dictionary_in_a_float32_module_gives_the_float32_products(kernel, rows):
    """A D that is exact at bf16 (a bf16 folder loaded at float32) is held at bf16 by
    prepare(); both paths still compute in float32, so the outputs match the float32
    module's up to summation order. An inexact D is left at float32."""
    f = random_factors(48, 70, 37, 19, seed=6)
    f = SparseDictFactors(f.dictionary.bfloat16().float(), f.indices, f.values)
    wide = DictLinear.from_factors(f, torch.randn(70), torch.float32).compact_(14)
    narrow = DictLinear.from_factors(f, wide.bias.detach(), torch.float32).compact_(14)
    narrow._narrow_dictionary()
    assert narrow.dictionary.dtype == torch.bfloat16 and narrow.compute_dtype == torch.float32
    x = torch.randn(rows, 48)
    with torch.no_grad():
        for path in ("sparse", "dense"):
            wide.path = narrow.path = path
            got = narrow(x)
            assert got.dtype == torch.float32 and rel(got, wide(x)) < 1e-6, path
    assert narrow.dense_weight().dtype == torch.float32 and torch.equal(narrow.dense_weight(), wide.dense_weight())
    saved = narrow.state_dict()["dictionary"]  # written at the module's dtype
    assert saved.dtype == torch.float32 and torch.equal(saved, wide.state_dict()["dictionary"])
    inexact = DictLinear.from_factors(random_factors(8, 9, 6, 3), None, torch.float32)
    inexact._narrow_dictionary()
    assert inexact.dictionary.dtype == torch.float32


def test_compiled_kernel_and_fallback_agree_on_every_value_dtype():
    if ell_native.load() is None:
        pytest.skip("no C++ compiler: the compiled kernel is unavailable")
    f = random_factors(8, 300, 64, 33, seed=4)
    z, identity = torch.randn(5, 64), torch.eye(64)  # x I = x exactly: the sparse product alone
    pattern, index = pattern_to_words(f.indices, 64), f.indices.T
    for values in (f.values.T.float(), f.values.T.bfloat16(), f.values.T.half()):
        for rows in (1, 5):
            compiled = ell_native.load().dict_bitmap(z[:rows], identity, values.contiguous(), pattern)
            reference = kernels.ell_matmul_reference(z[:rows], values, index)
            assert torch.allclose(compiled, reference, rtol=1e-5, atol=1e-5)
    x, dictionary = torch.randn(5, 8), torch.randn(8, 64)  # the fused (x D) S at every width of D
    values = f.values.T.contiguous()
    for width in (torch.float32, torch.bfloat16, torch.float16):
        d = dictionary.to(width)
        reference = kernels.ell_matmul_reference(x.double() @ d.double(), values, index).float()
        for rows in (1, 2, 5):
            fused = ell_native.load().dict_bitmap(x[:rows], d, values, pattern)
            assert torch.allclose(fused, reference[:rows], rtol=1e-5, atol=1e-5), (width, rows)


def brute_force_words(rows: torch.Tensor, height: int) -> torch.Tensor:
    """The held pattern of rows (s, d2), bit by bit in Python (int16 words, unsigned bits)."""
    words = []
    for column in rows.T.tolist():
        value = [0] * words_per_column(height)
        for i in column:
            value[i // 16] |= 1 << (i % 16)
        words.append([v - (1 << 16) if v >= 1 << 15 else v for v in value])
    return torch.tensor(words, dtype=torch.int16)


def brute_force_product(z: torch.Tensor, values: torch.Tensor, words: torch.Tensor, height: int) -> torch.Tensor:
    """y = z S in float64 with S built by walking every bit of every word in Python."""
    dense = torch.zeros(height, words.shape[0], dtype=torch.float64)
    for j, column in enumerate(words.tolist()):
        t = 0
        for w, word in enumerate(column):
            for b in range(16):
                if (word & 0xFFFF) >> b & 1:
                    dense[16 * w + b, j] = float(values[j, t])
                    t += 1
        assert t == values.shape[1]
    return z.double() @ dense


@pytest.mark.parametrize("height", [1, 5, 15, 16, 17, 33, 64, 100])
def test_bit_walk_equals_brute_force_on_random_all_ones_and_single_bit_columns(kernel, height):
    g = torch.Generator().manual_seed(height)
    for s in sorted({1, max(1, height // 3), height}):  # single-bit, random and all-ones columns
        width = 37
        rows = torch.stack([torch.randperm(height, generator=g)[:s].sort().values for _ in range(width)], 1)
        words = pattern_to_words(rows, height)
        assert torch.equal(words, brute_force_words(rows, height))
        assert torch.equal(words_to_rows(words, height, s), rows.T)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            values = torch.randn(width, s, generator=g).to(dtype)
            for n in (1, 3, 17, 40):
                z = torch.randn(n, height, generator=g)
                got = kernels.sparse_forward(z, torch.eye(height), values, words, None)
                assert rel(got, brute_force_product(z, values, words, height)) < 1e-5, (s, dtype, n)


def test_compiled_dense_build_equals_the_pytorch_one_bit_for_bit():
    """bitmap_dense (the dense path's S^T) against masked_scatter, every value and output
    width; k = 37 leaves a partial last word, s = 19 puts the last columns' loads at the array's end."""
    if ell_native.load() is None:
        pytest.skip("no C++ compiler: the compiled kernel is unavailable")
    f = random_factors(4, 70, 37, 19, seed=9)
    words = pattern_to_words(f.indices, 37)
    bits = words_to_bits(words, 37)
    for value_dtype in (torch.float32, torch.bfloat16, torch.float16):
        values = f.values.T.to(value_dtype).contiguous()
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            expected = torch.zeros(70, 37, dtype=dtype).masked_scatter(bits, values.to(dtype))
            assert torch.equal(ell_native.load().bitmap_dense(values, words, 37, dtype), expected), (value_dtype, dtype)


def test_compiled_kernel_refuses_a_pattern_with_a_wrong_bit_count():
    if ell_native.load() is None:
        pytest.skip("no C++ compiler: the compiled kernel is unavailable")
    f = random_factors(4, 70, 37, 5, seed=8)
    free = sorted(set(range(37)) - set(f.indices[:, 69].tolist()))
    for row in (free[0], free[-1], None):  # a sixth bit in the last column; one bit fewer
        words = pattern_to_words(f.indices, 37)
        row = int(f.indices[0, 69]) if row is None else row
        words[69] = brute_force_words(f.indices[:, 69:], 37)[0] ^ torch.tensor(
            [(1 << (row % 16)) if w == row // 16 else 0 for w in range(3)]).to(torch.int16)
        for n in (1, 5):
            with pytest.raises(RuntimeError, match="exactly s = 5 bits"):
                ell_native.load().dict_bitmap(torch.randn(n, 4), torch.randn(4, 37), f.values.T.contiguous(), words)


@pytest.mark.parametrize("atoms", [1, 17, 32768, 32769, 40001])
def test_any_atom_count(kernel, atoms):
    """k = 1, k not a multiple of the 16-bit word, k at and past the old int16 limit."""
    g = torch.Generator().manual_seed(1)
    if atoms == 1:
        rows = torch.zeros(1, 6, dtype=torch.long)
    else:  # 0 and k - 1 in every column
        middle = [torch.randperm(atoms - 2, generator=g)[:2].sort().values + 1 for _ in range(6)]
        rows = torch.stack([torch.cat([torch.tensor([0]), m, torch.tensor([atoms - 1])]) for m in middle], 1)
    m = DictLinear.from_factors(SparseDictFactors(torch.randn(3, atoms, generator=g), rows,
                                                  torch.randn(rows.shape[0], 6)), None, torch.float32)
    assert m.pattern.dtype == torch.int16 and m.pattern.shape == (6, -(-atoms // 16))
    assert int(m.indices.max()) == atoms - 1 and torch.equal(m.indices, rows)
    x = torch.randn(2, 3)
    expected = x.double() @ m.dictionary.double() @ m.coefficients().double()
    with torch.no_grad():
        for path in ("sparse", "dense"):
            for n in (1, 2):
                m.path = path
                assert rel(m(x[:n]), expected[:n]) < 1e-6, (path, n)


def test_bitmask_to_held_pattern_to_bitmask_round_trip():
    f = random_factors(5, 33, 29, 11, seed=2)
    mask = pattern_to_mask(f.indices, 29)
    words = mask_to_words(mask, 29, 33, 11)
    assert words.dtype == torch.int16 and words.shape == (33, 2)
    assert torch.equal(words, brute_force_words(f.indices, 29))
    assert torch.equal(words_to_rows(words, 29, 11), f.indices.T.long())
    assert torch.equal(words_to_mask(words, 29), mask)
    # through a module: storage slots -> prepare (held form) -> state_dict, bit-exact, 14-bit values too
    for bits in (None, 14):
        prepared = DictLinear.from_factors(f, None, torch.bfloat16).compact_(bits)
        slots = DictLinear(5, 33, 29, 11, dtype=torch.bfloat16, coef_bits=bits)
        slots.load_state_dict(prepared.state_dict())
        assert not slots.prepared and torch.equal(slots.mask, mask)
        saved = slots.state_dict()
        slots.prepare()
        assert slots.prepared and torch.equal(slots.pattern, words) and set(slots.state_dict()) == set(saved)
        for name, tensor in slots.state_dict().items():
            assert torch.equal(tensor, saved[name]), name
    assert torch.equal(prepared.coefs14, pack14(truncate14(f.values.T)))


def test_prepared_module_holds_only_values_and_pattern_and_keeps_bf16_values_through_casts():
    m = DictLinear.from_factors(random_factors(12, 20, 10, 4), torch.randn(20), torch.float32).compact_(14)
    assert sorted(n for n, _ in m.named_parameters()) == ["bias", "dictionary"]
    assert sorted(n for n, _ in m.named_buffers()) == ["coefs", "pattern"]
    assert m.coefs.dtype == torch.bfloat16 and m.coefs.shape == (20, 4)
    assert m.pattern.dtype == torch.int16 and m.pattern.shape == (20, 1)
    assert set(m.state_dict()) == {"dictionary", "bias", "mask", "coefs14"}  # the storage form, computed
    x = torch.randn(3, 12)
    before = m(x).detach()
    for cast in (torch.float64, torch.float32):  # exact round trip of D
        m.to(cast)
        assert m.coefs.dtype == torch.bfloat16 and m.dictionary.dtype == cast
    assert torch.equal(m(x), before)
    assert m.half().coefs.dtype == torch.bfloat16 and m(x.half()).dtype == torch.float16


def dict_model(tiny_model, seed: int = 0):
    """A tiny Llama whose seven linears per block are DictLinear of random factors."""
    model = tiny_model("llama", tie_word_embeddings=True)
    for layer_index, layer in enumerate(model.model.layers):
        for i, name in enumerate(TARGETS):
            linear = layer.get_submodule(name)
            d1, d2 = linear.in_features, linear.out_features
            f = random_factors(d1, d2, d1 // 2, d1 // 4, seed=seed + 10 * layer_index + i)
            layer.set_submodule(name, DictLinear.from_factors(f, None, torch.float32))
    return model


@pytest.mark.parametrize("load_dtype", [None, "float32"])
def test_loaded_model_holds_dictionary_values_and_pattern_only(tiny_model, tmp_path, load_dtype):
    model = dict_model(tiny_model)
    folder = cospadi.save(model, None, tmp_path / "m", {"method": "cospadi"}, dtype="bfloat16", coef_bits=14)
    loaded, _ = cospadi.load(folder, dtype=load_dtype)
    modules = [m for m in loaded.modules() if isinstance(m, DictLinear)]
    assert len(modules) == 2 * 7
    for m in modules:
        held = {n: t for n, t in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False))}
        assert sorted(held) == ["coefs", "dictionary", "pattern"]
        assert held["coefs"].dtype == torch.bfloat16  # no float32 copy
        # the pattern: k d2 / 8 bytes, each column rounded up to whole 16-bit words; no row indices
        assert held["pattern"].nbytes == m.out_features * 2 * -(-m.atoms // 16)
        assert held["pattern"].nbytes < m.out_features * (m.atoms / 8 + 2)
        # a bf16 folder's D is exact at bf16, so a float32 model holds it there too (no float32 duplicate)
        assert held["dictionary"].dtype == torch.bfloat16
        assert m.compute_dtype == (torch.float32 if load_dtype else torch.bfloat16)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = loaded(ids).logits, model.to(loaded.dtype)(ids).logits
    assert got.dtype == want.dtype == loaded.dtype
    if load_dtype is None:
        assert torch.equal(got, want)
    else:  # the same products in float32, summed in another order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_folders_written_from_the_storage_form_load_and_resave_identically(tiny_model, tmp_path):
    """The on-disk form is the one written before the ELL change (format version 2): a
    model whose modules still hold the storage slots (as the old code always did) writes
    the same tensors as a prepared one, and its folder loads."""
    model = dict_model(tiny_model, seed=5)
    new = cospadi.save(model, None, tmp_path / "new", {}, dtype="bfloat16", coef_bits=14)
    for _, m in compressed_modules(model):  # back to the slots, filled from the state dict
        m.load_state_dict(m.state_dict())
        assert not m.prepared
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # saving from the slots needs no conversion
        old = cospadi.save(model, None, tmp_path / "old", {}, dtype="bfloat16", coef_bits=14)
    assert not any(m.prepared for _, m in compressed_modules(model))
    a, b = load_file(new / "model.safetensors"), load_file(old / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[key], b[key]) for key in a)
    reloaded, _ = cospadi.load(old)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_no_compiler_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("COSPADI_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    ell_native.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="PyTorch fallback"):
            assert ell_native.load() is None
        m = DictLinear.from_factors(random_factors(6, 9, 5, 2), None, torch.float32)
        m.path = "sparse"
        x = torch.randn(1, 6)
        with torch.no_grad():
            assert torch.allclose(m(x), x @ m.dense_weight(), rtol=1e-5, atol=1e-6)
        monkeypatch.setenv("COSPADI_NATIVE", "0")
        ell_native.load.cache_clear()
        assert ell_native.load() is None
    finally:
        ell_native.load.cache_clear()
