"""14-bit coefficients: bf16 values with their 2 lowest mantissa bits dropped (sign, 8
exponent bits, 5 mantissa bits), packed 4 to 7 bytes. At rho = k / s = 2 the 2 bits saved
on each of the s * d2 values pay exactly for the k * d2 bits of the mask, so the full
storage count (docs/method.md "Budget", eq. 10) equals the effective one (eq. 11)."""
from __future__ import annotations

import torch

from ..errors import CospadiError

COEF_BITS = (None, 14)  # None: values kept at the module's dtype
_GROUP_VALUES, _GROUP_BYTES = 4, 7  # 4 x 14 bits = 56 bits = 7 bytes


def check_coef_bits(bits: int | None) -> None:
    """CospadiError unless `bits` is a supported coefficient width (None or 14)."""
    if bits not in COEF_BITS:
        raise CospadiError(f"coefficient bits {bits!r} are not supported: use 14 (packed) or leave them unset")


def packed14_size(count: int) -> int:
    """Bytes holding `count` 14-bit values: 7 per group of 4, the last group zero-padded."""
    return -(-count // _GROUP_VALUES) * _GROUP_BYTES


def truncate14(values: torch.Tensor) -> torch.Tensor:
    """`values` rounded to bf16, then the 2 lowest mantissa bits cleared (towards zero).
    Returns a bf16 tensor of the same shape; applying it twice changes nothing."""
    raw = values.detach().to(torch.bfloat16).contiguous().view(torch.int16)
    return (raw & -4).view(torch.bfloat16)


def pack14(values: torch.Tensor) -> torch.Tensor:
    """Any float tensor of n values -> packed14_size(n) uint8 bytes of their truncate14
    codes, in the tensor's (row-major) order."""
    codes = (truncate14(values).reshape(-1).view(torch.int16).to(torch.int64) & 0xFFFF) >> 2
    padded = torch.zeros(packed14_size(codes.numel()) // _GROUP_BYTES * _GROUP_VALUES, dtype=torch.int64,
                         device=codes.device)
    padded[: codes.numel()] = codes
    shifts = torch.arange(_GROUP_VALUES, device=codes.device) * 14
    words = (padded.view(-1, _GROUP_VALUES) << shifts).sum(1)  # 56-bit groups, no overlap
    byte_shifts = torch.arange(_GROUP_BYTES, device=codes.device) * 8
    return ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack14(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The inverse of pack14: the first `count` values, as a 1-D bf16 tensor."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed14_size(count):
        raise CospadiError(f"{count} packed 14-bit coefficients need {packed14_size(count)} uint8 bytes, got "
                           f"{tuple(packed.shape)} {packed.dtype}: the weights are corrupt")
    byte_shifts = torch.arange(_GROUP_BYTES, device=packed.device) * 8
    words = (packed.view(-1, _GROUP_BYTES).to(torch.int64) << byte_shifts).sum(1)
    shifts = torch.arange(_GROUP_VALUES, device=packed.device) * 14
    codes = ((words[:, None] >> shifts) & 0x3FFF).reshape(-1)[:count] << 2
    signed = torch.where(codes >= 0x8000, codes - 0x10000, codes).to(torch.int16)
    return signed.view(torch.bfloat16)
