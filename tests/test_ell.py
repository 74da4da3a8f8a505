"""The ELL form of S (issue 15): the ELL path (compiled kernel and PyTorch fallback) equals
the dense path for every dtype, value width and shape, k at the int16 limit included;
bitmask -> ELL -> bitmask round trips bit-exactly; a loaded model holds D, the ELL
values and indices and nothing else per linear; the on-disk form is unchanged, so
folders written from the storage form (as before this change) load and resave alike."""

import warnings

import pytest
import torch
from safetensors.torch import load_file

import cospadi
from cospadi.layers import compressed_modules, ell_native, kernels
from cospadi.layers.bitmask import mask_to_columns, pattern_to_mask
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
    """Runs a test with the compiled ELL kernel, then with the pure-PyTorch fallback."""
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


def test_compiled_kernel_and_fallback_agree_on_every_value_and_index_dtype():
    if ell_native.load() is None:
        pytest.skip("no C++ compiler: the compiled kernel is unavailable")
    f = random_factors(8, 300, 64, 33, seed=4)
    z, identity = torch.randn(5, 64), torch.eye(64)  # x I = x exactly: the ELL product alone
    for values in (f.values.T.float(), f.values.T.bfloat16(), f.values.T.half()):
        for index in (f.indices.T.to(torch.int16), f.indices.T.to(torch.int32)):
            for rows in (1, 5):
                compiled = ell_native.load().dict_ell(z[:rows], identity, values.contiguous(), index.contiguous())
                reference = kernels.ell_matmul_reference(z[:rows], values, index)
                assert torch.allclose(compiled, reference, rtol=1e-5, atol=1e-5)
    x, dictionary = torch.randn(5, 8), torch.randn(8, 64)  # the fused (x D) S at every width of D
    values, index = f.values.T.contiguous(), f.indices.T.to(torch.int16).contiguous()
    for width in (torch.float32, torch.bfloat16, torch.float16):
        d = dictionary.to(width)
        reference = kernels.ell_matmul_reference(x.double() @ d.double(), values, index).float()
        for rows in (1, 2, 5):
            fused = ell_native.load().dict_ell(x[:rows], d, values, index)
            assert torch.allclose(fused, reference[:rows], rtol=1e-5, atol=1e-5), (width, rows)


@pytest.mark.parametrize("atoms,dtype", [(32768, torch.int16), (32769, torch.int32)])
def test_int16_limit(kernel, atoms, dtype):
    g = torch.Generator().manual_seed(1)
    rows = torch.stack([torch.cat([torch.tensor([0]), torch.randperm(atoms - 2, generator=g)[:2].sort().values + 1,
                                   torch.tensor([atoms - 1])]) for _ in range(6)], 1)  # 0 and k - 1 in every column
    m = DictLinear.from_factors(SparseDictFactors(torch.randn(3, atoms, generator=g), rows, torch.randn(4, 6)), None,
                                torch.float32)
    assert m.rows.dtype == dtype == kernels.index_dtype(atoms) and int(m.indices.max()) == atoms - 1
    assert torch.equal(m.indices.long(), rows)
    x = torch.randn(2, 3)
    expected = x.double() @ m.dictionary.double() @ m.coefficients().double()
    with torch.no_grad():
        for path in ("sparse", "dense"):
            m.path = path
            assert rel(m(x), expected) < 1e-6, path


def test_bitmask_to_ell_to_bitmask_round_trip():
    f = random_factors(5, 33, 29, 11, seed=2)
    mask = pattern_to_mask(f.indices, 29)
    rows = mask_to_columns(mask, 29, 33, 11).to(kernels.index_dtype(29))
    assert rows.dtype == torch.int16 and torch.equal(rows.long(), f.indices.T)
    assert torch.equal(pattern_to_mask(rows.T, 29), mask)
    # through a module: storage slots -> prepare (ELL) -> state_dict, bit-exact, 14-bit values too
    for bits in (None, 14):
        prepared = DictLinear.from_factors(f, None, torch.bfloat16).compact_(bits)
        slots = DictLinear(5, 33, 29, 11, dtype=torch.bfloat16, coef_bits=bits)
        slots.load_state_dict(prepared.state_dict())
        assert not slots.prepared and torch.equal(slots.mask, mask)
        saved = slots.state_dict()
        slots.prepare()
        assert slots.prepared and set(slots.state_dict()) == set(saved)
        for name, tensor in slots.state_dict().items():
            assert torch.equal(tensor, saved[name]), name
    assert torch.equal(prepared.coefs14, pack14(truncate14(f.values.T)))


def test_prepared_module_holds_only_the_ell_form_and_keeps_bf16_values_through_casts():
    m = DictLinear.from_factors(random_factors(12, 20, 10, 4), torch.randn(20), torch.float32).compact_(14)
    assert sorted(n for n, _ in m.named_parameters()) == ["bias", "dictionary"]
    assert sorted(n for n, _ in m.named_buffers()) == ["coefs", "rows"]
    assert m.coefs.dtype == torch.bfloat16 and m.rows.dtype == torch.int16 and m.coefs.shape == (20, 4)
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
def test_loaded_model_holds_dictionary_values_and_indices_only(tiny_model, tmp_path, load_dtype):
    model = dict_model(tiny_model)
    folder = cospadi.save(model, None, tmp_path / "m", {"method": "cospadi"}, dtype="bfloat16", coef_bits=14)
    loaded, _ = cospadi.load(folder, dtype=load_dtype)
    modules = [m for m in loaded.modules() if isinstance(m, DictLinear)]
    assert len(modules) == 2 * 7
    for m in modules:
        held = {n: t for n, t in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False))}
        assert sorted(held) == ["coefs", "dictionary", "rows"]
        assert held["rows"].dtype == torch.int16 and held["coefs"].dtype == torch.bfloat16  # no float32 copy
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
