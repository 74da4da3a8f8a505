"""The packed bitmask that stores where the nonzeros of a column-sparse S (k, d2) are
(docs/method.md "Budget": k * d2 bits, i.e. k * d2 / 16 sixteen-bit words).

Layout: the (k, d2) pattern is read column by column, so bit `p = j * k + i` says whether
S[i, j] is stored; bit p lives in byte p // 8 at position p % 8 (least significant bit
first); the bits after the last one, up to the byte boundary, are zero. With the values
stored column by column in ascending row order, this is all S needs: no index lists."""
from __future__ import annotations

import torch

from ..errors import CospadiError

_SHIFTS = torch.arange(8, dtype=torch.uint8)


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


def pattern_to_mask(rows: torch.Tensor, height: int) -> torch.Tensor:
    """Rows (s, d2) of the stored entries of every column of a (height, d2) matrix -> its
    packed bitmask, packed_size(height * d2) uint8 bytes (layout in the module doc)."""
    s, width = rows.shape
    if s and (int(rows.min()) < 0 or int(rows.max()) >= height):
        raise ValueError(f"row indices must lie in [0, {height})")
    dense = torch.zeros(width, height, dtype=torch.bool, device=rows.device)
    dense.scatter_(1, rows.T.long(), True)
    if s and int(dense.sum()) != s * width:
        raise ValueError("every column must list s distinct rows")
    return pack_bits(dense.reshape(-1))


def mask_to_columns(mask: torch.Tensor, height: int, width: int, sparsity: int) -> torch.Tensor:
    """The inverse of pattern_to_mask, transposed: (width, sparsity) int32, row j holding
    the ascending rows of column j's stored entries. CospadiError when a column does not
    have exactly `sparsity` bits set (a corrupt or mismatched mask)."""
    bits = unpack_bits(mask, height * width).view(width, height)
    counts = bits.sum(1)
    bad = torch.nonzero(counts != sparsity)
    if bad.numel():
        j = int(bad[0, 0])
        raise CospadiError(f"the bitmask of S has {int(counts[j])} entries in column {j}, expected {sparsity}: "
                           "the weights are corrupt or belong to another model; compress again")
    if _tail_nonzero(mask, height * width):
        raise CospadiError("the bitmask of S has bits set past its end: the weights are corrupt; compress again")
    return torch.nonzero(bits)[:, 1].to(torch.int32).view(width, sparsity)


def _tail_nonzero(mask: torch.Tensor, count: int) -> bool:
    """Whether any padding bit after the first `count` bits is set."""
    tail = count % 8
    return bool(tail) and bool(int(mask[-1]) >> tail)
