"""The stored form of quantized factors (docs/quantization.md "Storage layout").

A QuantTensor (solvers/quantize.py: int8 codes (d, n) of `bits` bits, bf16 scales
(ceil(d / group), n)) is saved as two tensors:

* `<name>_codes`: uint8, packed_codes_size(d * n, bits) bytes. The codes are read row-major,
  offset to unsigned (code + 2^(bits-1)) and written as a continuous little-endian bit
  stream, `bits` bits per code, least significant bit first: int8 one code per byte, int4
  two per byte (the first in the low nibble), int3 eight per three bytes; the bits after
  the last code, up to the byte boundary, are zero.
* `<name>_scales`: int16 (ceil(d / group), n), the bf16 scales by their bit pattern, so
  that no dtype cast of the model (save --dtype, from_pretrained(dtype=...)) touches them."""
from __future__ import annotations

import math

import torch

from ..errors import CospadiError
from ..solvers.quantize import QuantTensor, code_range
from .bitmask import pack_bits, packed_size, unpack_bits


def packed_codes_size(count: int, bits: int) -> int:
    """Bytes holding `count` codes of `bits` bits: ceil(count * bits / 8)."""
    return packed_size(count * bits)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in code_range(bits) (any shape, read row-major) -> packed uint8 bytes,
    packed_codes_size(numel, bits) of them (layout in the module doc)."""
    low, high = code_range(bits)
    flat = codes.reshape(-1).to(torch.int16)
    if flat.numel() and (int(flat.min()) < low or int(flat.max()) > high):
        raise ValueError(f"codes must lie in [{low}, {high}] for {bits} bits")
    unsigned = (flat - low).to(torch.uint8)
    if bits == 8:
        return unsigned.clone()
    if bits == 4:
        padded = torch.zeros(2 * packed_codes_size(flat.numel(), 4), dtype=torch.uint8, device=flat.device)
        padded[: flat.numel()] = unsigned
        return padded[0::2] | (padded[1::2] << 4)
    stream = (unsigned[:, None] >> torch.arange(bits, dtype=torch.uint8, device=flat.device)) & 1
    return pack_bits(stream.reshape(-1).bool())


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The inverse of pack_codes: the first `count` codes as a 1-D int8 tensor.
    CospadiError when `packed` is not the uint8 vector of the expected length."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_codes_size(count, bits):
        raise CospadiError(f"{count} packed {bits}-bit codes need {packed_codes_size(count, bits)} uint8 bytes, got "
                           f"{tuple(packed.shape)} {packed.dtype}: the weights are corrupt")
    low = code_range(bits)[0]
    if bits == 8:
        unsigned = packed.to(torch.int16)
    elif bits == 4:
        unsigned = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:count].to(torch.int16)
    else:
        stream = unpack_bits(packed, count * bits).view(count, bits).to(torch.int16)
        unsigned = (stream << torch.arange(bits, dtype=torch.int16, device=packed.device)).sum(1)
    return (unsigned[:count] + low).to(torch.int8)


def slot_shapes(name: str, shape: tuple[int, int], bits: int, group: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the two stored tensors of a quantized (d, n) tensor called `name`."""
    d, n = shape
    return {f"{name}_codes": (packed_codes_size(d * n, bits),), f"{name}_scales": (math.ceil(d / group), n)}


def to_stored(name: str, tensor: QuantTensor) -> dict[str, torch.Tensor]:
    """The two stored tensors of `tensor` (module doc)."""
    return {f"{name}_codes": pack_codes(tensor.codes, tensor.bits),
            f"{name}_scales": tensor.scales.to(torch.bfloat16).contiguous().view(torch.int16)}


def from_stored(codes: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int], bits: int,
                group: int) -> QuantTensor:
    """The QuantTensor of shape `shape` that to_stored wrote as `codes` and `scales`;
    CospadiError when their sizes do not match."""
    d, n = shape
    if scales.dtype != torch.int16 or tuple(scales.shape) != (math.ceil(d / group), n):
        raise CospadiError(f"quantization scales of a {d}x{n} factor in groups of {group} must be int16 "
                           f"{[math.ceil(d / group), n]}, got {list(scales.shape)} {scales.dtype}: the weights are corrupt")
    values = unpack_codes(codes, bits, d * n).view(d, n)
    return QuantTensor(values, scales.contiguous().view(torch.bfloat16), bits, group)
