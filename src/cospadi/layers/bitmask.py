"""Where the nonzeros of a column-sparse S (k, d2) are, in two bit layouts.

The packed bitmask (the on-disk form, docs/method.md "Budget": k * d2 bits): the (k, d2)
pattern is read column by column, so bit `p = j * k + i` says whether S[i, j] is stored;
bit p lives in byte p // 8 at position p % 8 (least significant bit first); the bits after
the last one, up to the byte boundary, are zero.

The word pattern (the held form the kernels walk, kernels.py): (d2, W) int16, W =
ceil(k / 16); bit b of word w of row j (read as an unsigned 16-bit word) says whether
S[16 w + b, j] is stored; the bits past k in a column's last word are zero. So each column
starts on a word boundary and costs ceil(k / 16) * 2 bytes.

With the values stored column by column in ascending row order, either is all S needs:
no index lists."""
from __future__ import annotations

import torch

from ..errors import CospadiError

_SHIFTS = torch.arange(8, dtype=torch.uint8)
WORD_BITS = 16  # bits per word of the held pattern


def packed_size(bits: int) -> int:
    """Bytes that hold `bits` bits: ceil(bits / 8)."""
    return (bits + 7) // 8


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A 1-D boolean tensor of n bits -> a uint8 tensor of packed_size(n) bytes."""
    flat = bits.reshape(-1).to(torch.uint8)
    padded = torch.zeros(packed_size(flat.numel()) * 8, dtype=torch.uint8, device=flat.device)
    padded[: flat.numel()] = flat
    weights = (1 << _SHIFTS.to(torch.int32)).to(padded.device)
    return (padded.view(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` bits of a uint8 tensor, as a 1-D boolean tensor."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_size(count):
        raise CospadiError(f"a bitmask of {count} bits needs {packed_size(count)} uint8 bytes, got "
                           f"{tuple(packed.shape)} {packed.dtype}: the weights are corrupt")
    bits = (packed[:, None] >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:count].bool()


def _pattern_bits(rows: torch.Tensor, height: int) -> torch.Tensor:
    """Rows (s, d2) of the stored entries of every column -> the (d2, height) boolean
    pattern; ValueError when a row is out of range or listed twice in a column."""
    s, width = rows.shape
    if s and (int(rows.min()) < 0 or int(rows.max()) >= height):
        raise ValueError(f"row indices must lie in [0, {height})")
    dense = torch.zeros(width, height, dtype=torch.bool, device=rows.device)
    dense.scatter_(1, rows.T.long(), True)
    if s and int(dense.sum()) != s * width:
        raise ValueError("every column must list s distinct rows")
    return dense


def pattern_to_mask(rows: torch.Tensor, height: int) -> torch.Tensor:
    """Rows (s, d2) of the stored entries of every column of a (height, d2) matrix -> its
    packed bitmask, packed_size(height * d2) uint8 bytes (layout in the module doc)."""
    return pack_bits(_pattern_bits(rows, height).reshape(-1))


def pattern_to_words(rows: torch.Tensor, height: int) -> torch.Tensor:
    """Rows (s, d2) of the stored entries of every column -> the held word pattern
    (d2, words_per_column(height)) int16 (layout in the module doc); ValueError as
    pattern_to_mask."""
    return bits_to_words(_pattern_bits(rows, height))


def words_per_column(height: int) -> int:
    """Words of the held pattern per column of a height-row matrix: ceil(height / 16)."""
    return (height + WORD_BITS - 1) // WORD_BITS


def _word_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(WORD_BITS, dtype=torch.int32, device=device)


def bits_to_words(bits: torch.Tensor) -> torch.Tensor:
    """A (d2, height) boolean pattern -> the word pattern (d2, words_per_column(height)) int16."""
    width, height = bits.shape
    words = words_per_column(height)
    padded = torch.zeros(width, words * WORD_BITS, dtype=torch.int32, device=bits.device)
    padded[:, :height] = bits
    value = (padded.view(width, words, WORD_BITS) << _word_shifts(bits.device)).sum(-1)  # [0, 65535]
    return torch.where(value >= 1 << 15, value - (1 << 16), value).to(torch.int16)


def words_to_bits(words: torch.Tensor, height: int) -> torch.Tensor:
    """The inverse of bits_to_words: (d2, W) int16 -> the (d2, height) boolean pattern."""
    if words.dtype != torch.int16 or words.dim() != 2 or words.shape[1] != words_per_column(height):
        raise CospadiError(f"a word pattern of {height}-row columns must be (d2, {words_per_column(height)}) "
                           f"int16, got {tuple(words.shape)} {words.dtype}")
    bits = (words.to(torch.int32)[..., None] >> _word_shifts(words.device)) & 1
    return bits.view(words.shape[0], -1)[:, :height].bool()


def words_to_mask(words: torch.Tensor, height: int) -> torch.Tensor:
    """The held word pattern (d2, W) -> the packed bitmask of the storage form, the
    bytes pattern_to_mask writes for the same pattern."""
    return pack_bits(words_to_bits(words, height).reshape(-1))


def words_to_rows(words: torch.Tensor, height: int, sparsity: int) -> torch.Tensor:
    """The held word pattern (d2, W) -> (d2, sparsity) int64, row j holding column j's
    ascending stored rows (every column must have exactly `sparsity` bits)."""
    return torch.nonzero(words_to_bits(words, height))[:, 1].view(words.shape[0], sparsity)


def _checked_bits(mask: torch.Tensor, height: int, width: int, sparsity: int) -> torch.Tensor:
    """The (width, height) boolean pattern of a packed bitmask. CospadiError when a column
    does not have exactly `sparsity` bits set or a padding bit is set (a corrupt or
    mismatched mask)."""
    bits = unpack_bits(mask, height * width).view(width, height)
    counts = bits.sum(1)
    bad = torch.nonzero(counts != sparsity)
    if bad.numel():
        j = int(bad[0, 0])
        raise CospadiError(f"the bitmask of S has {int(counts[j])} entries in column {j}, expected {sparsity}: "
                           "the weights are corrupt or belong to another model; compress again")
    if _tail_nonzero(mask, height * width):
        raise CospadiError("the bitmask of S has bits set past its end: the weights are corrupt; compress again")
    return bits


def mask_to_words(mask: torch.Tensor, height: int, width: int, sparsity: int) -> torch.Tensor:
    """The inverse of pattern_to_mask: the packed bitmask -> the held word pattern (width,
    words_per_column(height)) int16 (words_to_rows gives the rows). CospadiError when a
    column does not have exactly `sparsity` bits set or a padding bit is set (a corrupt
    or mismatched mask)."""
    return bits_to_words(_checked_bits(mask, height, width, sparsity))


def _tail_nonzero(mask: torch.Tensor, count: int) -> bool:
    """Whether any padding bit after the first `count` bits is set."""
    tail = count % 8
    return bool(tail) and bool(int(mask[-1]) >> tail)
