"""Storage codecs of S: the packed bitmask of its pattern (bitmask.py) and the packed
14-bit values (coefficients.py). Property-based round trips on random patterns, shapes
and values, the exact byte layout, and clear errors for corrupt inputs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cospadi.errors import CospadiError
from cospadi.layers.bitmask import mask_to_words, pack_bits, packed_size, pattern_to_mask, unpack_bits, words_to_rows
from cospadi.layers.coefficients import pack14, packed14_size, truncate14, unpack14


@st.composite
def patterns(draw):
    """(rows (s, width) ascending per column, height): a random column-sparse pattern."""
    height = draw(st.integers(1, 40))
    width = draw(st.integers(1, 30))
    s = draw(st.integers(1, height))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(height, generator=g)[:s].sort().values for _ in range(width)], 1)
    return rows, height


def mask_to_rows(mask, height, width, s):
    """The rows of every column of a packed bitmask, as the held form decodes them."""
    return words_to_rows(mask_to_words(mask, height, width, s), height, s)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.booleans(), min_size=0, max_size=200))
def test_pack_unpack_bits_round_trip(bits):
    tensor = torch.tensor(bits, dtype=torch.bool)
    packed = pack_bits(tensor)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(len(bits)) == math.ceil(len(bits) / 8)
    assert torch.equal(unpack_bits(packed, len(bits)), tensor)
    if len(bits) % 8:  # padding bits are zero
        assert int(packed[-1]) >> (len(bits) % 8) == 0


@settings(max_examples=150, deadline=None)
@given(patterns())
def test_pattern_mask_round_trip(pattern):
    rows, height = pattern
    s, width = rows.shape
    mask = pattern_to_mask(rows, height)
    assert mask.numel() == packed_size(height * width)
    columns = mask_to_rows(mask, height, width, s)
    assert columns.dtype == torch.int64 and columns.shape == (width, s)
    assert torch.equal(columns.T.long(), rows.long())
    # the layout of the module doc: column-major bits, least significant first
    bits = unpack_bits(mask, height * width).view(width, height)
    expected = torch.zeros(width, height, dtype=torch.bool)
    expected.scatter_(1, rows.T.long(), True)
    assert torch.equal(bits, expected)


def test_mask_layout_is_column_major_lsb_first():
    rows = torch.tensor([[0, 1], [2, 2]])  # (s=2, width=2): column 0 holds rows 0, 2; column 1 rows 1, 2
    mask = pattern_to_mask(rows, 3)
    # bits: column 0 -> positions 0, 2; column 1 -> positions 3 + 1, 3 + 2
    assert mask.tolist() == [0b110101]


def test_mask_with_a_wrong_column_count_is_reported_as_corrupt():
    rows = torch.tensor([[0, 1, 2], [3, 4, 5]])
    mask = pattern_to_mask(rows, 8)
    broken = mask.clone()
    broken[0] ^= 0b10  # set a third bit in column 0
    with pytest.raises(CospadiError, match=r"3 entries in column 0, expected 2.*corrupt"):
        mask_to_rows(broken, 8, 3, 2)
    with pytest.raises(CospadiError, match=r"needs 3 uint8 bytes"):
        mask_to_rows(mask[:2], 8, 3, 2)


def test_mask_with_bits_past_its_end_is_corrupt():
    rows = torch.tensor([[0], [1]])  # height 3, width 1: 3 bits in one byte
    mask = pattern_to_mask(rows, 3)
    mask[0] |= 0b10000000
    with pytest.raises(CospadiError, match="past its end"):
        mask_to_rows(mask, 3, 1, 2)


def test_pattern_to_mask_rejects_bad_rows():
    with pytest.raises(ValueError, match="distinct"):
        pattern_to_mask(torch.tensor([[1, 0], [1, 2]]), 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pattern_to_mask(torch.tensor([[0], [4]]), 4)


finite_floats = st.floats(min_value=-(2.0 ** 100), max_value=2.0 ** 100, allow_nan=False, width=32)


@settings(max_examples=150, deadline=None)
@given(st.lists(finite_floats, min_size=0, max_size=60))
def test_pack14_round_trip_is_truncate14(values):
    tensor = torch.tensor(values, dtype=torch.float32)
    packed = pack14(tensor)
    assert packed.dtype == torch.uint8 and packed.numel() == packed14_size(len(values))
    assert packed.numel() * 8 >= 14 * len(values) and packed.numel() * 8 < 14 * len(values) + 56
    decoded = unpack14(packed, len(values))
    assert decoded.dtype == torch.bfloat16
    assert torch.equal(decoded.view(torch.int16), truncate14(tensor).view(torch.int16))
    assert torch.equal(pack14(decoded), packed)  # lossless once truncated


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=2.0 ** -100, max_value=2.0 ** 100, width=32), min_size=1, max_size=40),
       st.booleans())
def test_truncate14_keeps_five_mantissa_bits(values, negative):
    tensor = torch.tensor(values) * (-1 if negative else 1)
    truncated = truncate14(tensor)
    raw = truncated.view(torch.int16)
    assert bool(((raw & 3) == 0).all())  # the two lowest mantissa bits are gone
    rounded = tensor.to(torch.bfloat16).float()
    error = (truncated.float() - rounded).abs()
    assert bool((error <= rounded.abs() * 2.0 ** -5).all())  # chopped 2 of 7 mantissa bits
    assert bool((truncated.float().abs() <= rounded.abs()).all())  # towards zero
    assert torch.equal(truncate14(truncated).view(torch.int16), raw)


def test_unpack14_rejects_wrong_sizes():
    packed = pack14(torch.ones(9))
    with pytest.raises(CospadiError, match="corrupt"):
        unpack14(packed[:-1], 9)
    with pytest.raises(CospadiError, match="corrupt"):
        unpack14(packed.to(torch.int16), 9)
