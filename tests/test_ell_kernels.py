"""The compiled kernels' inner paths against brute force: the bf16 panels (more rows than
the bf16 walk: 48-column panels of S decoded into atom pairs, 8 rows of z at a time) on
random, all-ones and single-bit columns, odd k, k under and over whole 16-pair blocks,
column counts that leave partial panels, row counts that leave runs of 4, 2 and 1; and the register panels of z = x D
(one row streamed in parts; 1-4 rows at a time in whole and partial 128-column panels) for every
dictionary width; the float32 GEMM on a dictionary padded to whole words of columns."""

import pytest
import torch

from cospadi.layers import ell_native
from cospadi.layers.bitmask import pattern_to_words
from test_ell import brute_force_product, rel


@pytest.fixture
def native():
    op = ell_native.load()
    if op is None:
        pytest.skip("no C++ compiler: the compiled kernel is unavailable")
    return op


def bf16_exact(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random bf16 values (products and sums of them are then exact in float64)."""
    return torch.randn(*shape, generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("height", [1, 2, 17, 33, 100])
def test_bf16_panels_equal_brute_force(native, height):
    """x bf16 with D = I: rows 9-32 reach the panels through z = x D in float32 registers,
    more rows through torch's GEMM; y is the exact sum rounded once to bf16."""
    g = torch.Generator().manual_seed(height)
    eye = torch.eye(height, dtype=torch.bfloat16)
    for s in sorted({1, max(1, height // 2), height}):  # single-bit, half and all-ones columns
        for width in (1, 5, 48, 67):  # one partial panel of 48 columns, one whole, a whole and a partial
            rows = torch.stack([torch.randperm(height, generator=g)[:s].sort().values for _ in range(width)], 1)
            words = pattern_to_words(rows, height)
            values = bf16_exact((width, s), g)
            for n in (9, 31, 33, 70):  # 8 + 1, 24 + 4 + 2 + 1, 32 + 1, 64 + 4 + 2 rows
                z = bf16_exact((n, height), g)
                got = native.dict_bitmap(z, eye, values, words)
                expected = brute_force_product(z, values, words, height)
                assert got.dtype == torch.bfloat16 and got.shape == (n, width)
                assert torch.equal(got, expected.to(torch.bfloat16)) or rel(got, expected) < 4e-3, (s, width, n)


def test_bf16_panels_reuse_their_buffer_across_panels_on_one_thread(native):
    """One thread runs every panel in one buffer: the last, partial panel (100 = 48 + 48 + 4
    columns) holds the previous panel's columns past its width, and only its own reach y."""
    g = torch.Generator().manual_seed(7)
    rows = torch.stack([torch.randperm(33, generator=g)[:9].sort().values for _ in range(100)], 1)
    words, values, z = pattern_to_words(rows, 33), bf16_exact((100, 9), g), bf16_exact((40, 33), g)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = native.dict_bitmap(z, torch.eye(33, dtype=torch.bfloat16), values, words)
    finally:
        torch.set_num_threads(threads)
    assert rel(got, brute_force_product(z, values, words, 33)) < 4e-3


@pytest.mark.parametrize("atoms", [32768, 32769])
def test_bf16_panels_at_the_int16_limit(native, atoms):
    """k at and past the old int16 limit (16384 atom pairs, the last one half empty at odd k):
    x D S through the panels equals the float64 product up to bf16 rounding of z and y."""
    g = torch.Generator().manual_seed(atoms)
    rows = torch.stack([torch.cat([torch.tensor([0]), torch.randperm(atoms - 2, generator=g)[:5].sort().values + 1,
                                   torch.tensor([atoms - 1])]) for _ in range(50)], 1)
    words, values = pattern_to_words(rows, atoms), bf16_exact((50, 7), g)
    dictionary = bf16_exact((4, atoms), g)
    for n in (9, 40):  # z in float32 registers, then torch's GEMM
        x = bf16_exact((n, 4), g)
        got = native.dict_bitmap(x, dictionary, values, words)
        expected = brute_force_product(x.double() @ dictionary.double(), values, words, atoms)
        assert got.dtype == torch.bfloat16 and rel(got, expected) < 2e-2, n


@pytest.mark.parametrize("dict_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("atoms", [16, 128, 300])
def test_dictionary_panels_equal_the_product(native, atoms, dict_dtype):
    """z = x D for 1-8 rows (one row: D streamed row by row, in parts across threads; more:
    groups of 4, then 3, 2 or 1) over whole and partial panels,
    then S = I (column j holds atom j alone): y = x D in float32, every column of z checked."""
    g = torch.Generator().manual_seed(atoms)
    words = pattern_to_words(torch.arange(atoms)[None, :], atoms)
    values = torch.ones(atoms, 1)
    for d1 in (40, 200):  # one row: 200 rows of D split between threads, their partial z summed
        dictionary = torch.randn(d1, atoms, generator=g).to(dict_dtype)
        for n in range(1, 9):
            x = torch.randn(n, d1, generator=g)
            got = native.dict_bitmap(x, dictionary, values, words)
            expected = x.double() @ dictionary.double()
            assert got.dtype == torch.float32 and rel(got, expected) < 1e-6, (d1, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_no_rows_and_no_columns_give_empty_outputs(native, dtype):
    """An empty batch (0 rows) and a linear with no outputs come back empty at x's dtype."""
    g = torch.Generator().manual_seed(5)
    words = pattern_to_words(torch.stack([torch.randperm(20, generator=g)[:4].sort().values for _ in range(6)], 1), 20)
    values, dictionary = torch.randn(6, 4).to(dtype), torch.randn(8, 20).to(dtype)
    got = native.dict_bitmap(torch.randn(0, 8).to(dtype), dictionary, values, words)
    assert got.shape == (0, 6) and got.dtype == dtype
    got = native.dict_bitmap(torch.randn(3, 8).to(dtype), dictionary, values[:0], words[:0])
    assert got.shape == (3, 0) and got.dtype == dtype


@pytest.mark.parametrize("dict_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("atoms", [37, 48])
def test_float32_gemm_on_a_padded_dictionary_equals_the_product(native, atoms, dict_dtype):
    """From kernels.PAD_ROWS rows on (and whenever D is held narrower), a float32 z = x D runs
    on D zero-padded to whole words of columns: both paths still give x D S for k off and on a
    multiple of 16, below and above the threshold; gemm_dictionary pads with zeros only."""
    from cospadi.layers import kernels

    g = torch.Generator().manual_seed(atoms)
    s, d2 = 5, 23
    rows = torch.stack([torch.randperm(atoms, generator=g)[:s].sort().values for _ in range(d2)], 1)
    words, values = pattern_to_words(rows, atoms), torch.randn(d2, s, generator=g)
    dictionary = torch.randn(30, atoms, generator=g).to(dict_dtype)
    dense_s = torch.zeros(atoms, d2, dtype=torch.float64).scatter(0, rows, values.T.double())
    for n in (kernels.PAD_ROWS - 1, kernels.PAD_ROWS + 3):
        x = torch.randn(n, 30, generator=g)
        expected = x.double() @ dictionary.double() @ dense_s
        wide = kernels.gemm_dictionary(dictionary, torch.float32, words.shape[1], n)
        padded = atoms % 16 != 0 and (dict_dtype != torch.float32 or n >= kernels.PAD_ROWS)
        assert wide.shape == (30, 48 if padded else atoms) and wide.dtype == torch.float32
        assert torch.equal(wide[:, :atoms], dictionary.float()) and not wide[:, atoms:].any()
        assert rel(native.dict_bitmap(x, dictionary, values, words), expected) < 1e-5, n
        assert rel(kernels.dense_forward(x, dictionary, values, words, None), expected) < 1e-5, n
