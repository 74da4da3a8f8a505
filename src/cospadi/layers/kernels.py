"""The two ways a DictLinear computes y = (x D) S + b, and which one runs.

S (k, d2) has exactly s nonzeros per column, held as `values` (d2, s), column j's values
in ascending row order (the module's dtype, or bf16 for 14-bit values), and `pattern`
(d2, ceil(k / 16)) int16, column j's k bits in 16-bit words (bitmask.py: bit b of word w
is row 16 w + b). D may be held narrower than the module's dtype (bf16 in a float32 model
when exact there).

* sparse: one compiled operator (ell_native's dict_bitmap) forms z = x D in float32,
  reading D at its stored width, then y[:, j] = sum over column j's set bits i of
  values[j, t] z[:, i] (t counting the bits), walking the bits; the pure-PyTorch fallback
  does x @ D at x's dtype, then a gather by the rows decoded from the bits. No float32
  copy of D or of the values, and no row indices, are held. On the CPU for up to
  max_sparse_rows(dtype) rows.
* dense: S^T is built in a (d2, k) buffer at the compute dtype for the call (the values
  scattered into the set bits), then two GEMMs. For long inputs, GPUs and autograd.
Both give the same result up to float rounding (docs/inference.md)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import ell_native
from .bitmask import words_to_bits, words_to_rows
from .ell_native_source import PAD_ROWS, WALK_ROWS_BF16

PATHS = ("auto", "dense", "sparse")
# input rows (tokens x batch) up to which the CPU takes the sparse path, chosen from bench-infer's crossover
# tables (whole-model time, sparse path / dense path; docs/inference.md has every run). float32: 0.22-0.83
# from 1 to 128 tokens and 0.80-1.00 at 512 (540d8f9, 15d4060). bf16 with the panels (ell_native_panels.py):
# 0.37-0.99 from 1 to 128 tokens on SmolLM2-135M; at 512 tokens 0.88-1.06 over seven runs at 135M and at
# SmolLM2-360M's and SmolLM2-1.7B's shapes (bench-infer --shapes), below 1 in five, so bf16
# switches at 512. 4096 rows (batch-8 prefill) stay dense: 0.951x dense on the panels against 0.973x on the
# dense path in the one run that measured both. Where the compiled kernels have no bf16 panels (no compiler,
# or a CPU without AVX-512 BF16) a bf16 model's many-row sparse path would run float32 products (or the
# gather), so it stops at the walk's rows.
SPARSE_MAX_ROWS = 4096
BF16_PANEL_ROWS = 512


def max_sparse_rows(dtype: torch.dtype) -> int:
    """The switch point of `dtype`: the most input rows the sparse path takes on the CPU."""
    if dtype == torch.bfloat16:
        return BF16_PANEL_ROWS if ell_native.has_bf16_panels() else WALK_ROWS_BF16
    return SPARSE_MAX_ROWS


def choose_path(rows: int, device: torch.device, needs_grad: bool, dtype: torch.dtype = torch.float32) -> str:
    """'sparse' (the bit walk) for at most max_sparse_rows(dtype) input rows on the CPU without
    autograd, 'dense' otherwise (long inputs, GPUs, training)."""
    if needs_grad or device.type != "cpu" or rows > max_sparse_rows(dtype):
        return "dense"
    return "sparse"


def scatter_dense(values: torch.Tensor, pattern: torch.Tensor, atoms: int, dtype: torch.dtype) -> torch.Tensor:
    """S^T as a dense (d2, k) tensor of `dtype` from values (d2, s) and the word pattern
    (d2, ceil(k / 16)): row j's set bits receive values[j] in order. The compiled
    bitmap_dense where it applies and no gradient is wanted; otherwise a masked_scatter
    (differentiable in values)."""
    native = None if values.requires_grad and torch.is_grad_enabled() else _native(values)
    if native is not None and dtype in (torch.float32, torch.bfloat16, torch.float16):
        return native.bitmap_dense(values, pattern, atoms, dtype)
    buffer = torch.zeros(values.shape[0], atoms, dtype=dtype, device=values.device)
    return buffer.masked_scatter(words_to_bits(pattern, atoms), values.to(dtype))


def gemm_dictionary(dictionary: torch.Tensor, dtype: torch.dtype, words: int, rows: int) -> torch.Tensor:
    """D (d1, k) at `dtype` for torch's GEMM over `rows` input rows: on the CPU at float32,
    zero-padded to 16 * words columns when a copy is made anyway (D held narrower) or from
    PAD_ROWS rows on, since torch's float32 GEMM ran 1.2-1.5x slower per column here with a
    column count off a multiple of 8 (the compiled operator's gemm_z does the same)."""
    atoms, wide = dictionary.shape[1], 16 * words
    copied = dictionary.dtype != dtype
    if dtype != torch.float32 or not dictionary.is_cpu or atoms == wide or (not copied and rows < PAD_ROWS):
        return dictionary.to(dtype)
    return F.pad(dictionary.to(dtype), (0, wide - atoms))


def dense_forward(x: torch.Tensor, dictionary: torch.Tensor, values: torch.Tensor, pattern: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x (n, d1), dictionary (d1, k) (cast to x's dtype for the call when held narrower,
    padded as gemm_dictionary says), values (d2, s) and pattern (d2, ceil(k / 16)).
    Returns (n, d2) at x's dtype."""
    z = x @ gemm_dictionary(dictionary, x.dtype, pattern.shape[1], x.shape[0])
    return F.linear(z, scatter_dense(values, pattern, z.shape[1], x.dtype), bias)


def ell_matmul_reference(z: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch y = z S: z (n, k), values and rows (d2, s) -> (n, d2) at z's dtype,
    summed in float32 (float64 for float64 inputs). Builds an (n, d2, s) temporary, in
    chunks of rows."""
    acc = torch.float64 if torch.float64 in (z.dtype, values.dtype) else torch.float32
    zf, vf, index = z.to(acc), values.to(acc), rows.long()
    step = max(1, (1 << 22) // max(1, values.numel()))
    parts = [(zf[start:start + step, index] * vf).sum(-1) for start in range(0, z.shape[0], step)]
    out = torch.cat(parts) if parts else zf.new_zeros(0, values.shape[0])
    return out.to(z.dtype)


def _native(*tensors: torch.Tensor) -> Any:
    """The compiled operators when they apply to these tensors (CPU, no float64), else None."""
    if not tensors[0].is_cpu:
        return None
    for tensor in tensors:  # a loop, not any(generator): this runs on every decoding step of every linear
        if tensor.dtype == torch.float64:
            return None
    return ell_native.load()


def sparse_forward(x: torch.Tensor, dictionary: torch.Tensor, values: torch.Tensor, pattern: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """The sparse path: x (n, d1), dictionary (d1, k) at any float width (a bf16 dictionary
    in a float32 model is read as it is, products in float32), values (d2, s) and pattern
    (d2, ceil(k / 16)). Returns (n, d2) at x's dtype: the compiled kernel, or x D at x's
    dtype then the pure-PyTorch gather by the rows decoded from the pattern."""
    native = _native(x, dictionary, values)
    if native is not None:
        y = native.dict_bitmap(x, dictionary, values, pattern)
    else:
        rows = words_to_rows(pattern, dictionary.shape[1], values.shape[1])
        y = ell_matmul_reference(x @ dictionary.to(x.dtype), values, rows)
    return y + bias if bias is not None else y
