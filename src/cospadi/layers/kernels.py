"""The two ways a DictLinear computes y = (x D) S + b, and which one runs.

S (k, d2) has exactly s nonzeros per column, so it is held in ELL form: `values` and
`rows`, both (d2, s), column j of S holding values[j, t] at row rows[j, t] (int16 when
k <= 32768, else int32; values at the module's dtype, or bf16 for 14-bit values). D may be
held narrower than the module's dtype (bf16 in a float32 model when exact there).

* sparse (ELL): one compiled operator (ell_native's dict_ell) forms z = x D in float32,
  reading D at its stored width, then y[:, j] = sum_t values[j, t] z[:, rows[j, t]]; the
  pure-PyTorch fallback does x @ D at x's dtype, then the same gather. No float32 copy of
  D or of the values is held. On the CPU for up to max_sparse_rows(dtype) rows.
* dense: S^T is scattered into a (d2, k) buffer at the compute dtype for the call, then
  two GEMMs. For long bf16 inputs, GPUs and autograd.
Both give the same result up to float rounding (docs/inference.md)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import ell_native

PATHS = ("auto", "dense", "sparse")
# input rows (tokens x batch) up to which the CPU takes the ELL path, by compute dtype (others: float32's);
# bf16's dense GEMM (AVX-512 BF16) overtakes the ELL kernel sooner. Measured: docs/inference.md
SPARSE_MAX_ROWS = {torch.float32: 4096, torch.bfloat16: 64}
INT16_MAX_ATOMS = 32768  # rows < 32768 fit int16


def max_sparse_rows(dtype: torch.dtype) -> int:
    """The switch point of `dtype`: the most input rows the ELL path takes on the CPU."""
    return SPARSE_MAX_ROWS.get(dtype, SPARSE_MAX_ROWS[torch.float32])


def choose_path(rows: int, device: torch.device, needs_grad: bool, dtype: torch.dtype = torch.float32) -> str:
    """'sparse' (ELL) for at most max_sparse_rows(dtype) input rows on the CPU without
    autograd, 'dense' otherwise (long inputs, GPUs, training)."""
    if needs_grad or device.type != "cpu" or rows > max_sparse_rows(dtype):
        return "dense"
    return "sparse"


def index_dtype(atoms: int) -> torch.dtype:
    """The narrowest integer dtype the ELL row indices of a k = `atoms` matrix fit: int16
    up to 32768 atoms, int32 beyond."""
    return torch.int16 if atoms <= INT16_MAX_ATOMS else torch.int32


def scatter_dense(values: torch.Tensor, rows: torch.Tensor, atoms: int, dtype: torch.dtype) -> torch.Tensor:
    """S^T as a dense (d2, k) tensor of `dtype` from its ELL form (differentiable in values)."""
    buffer = torch.zeros(values.shape[0], atoms, dtype=dtype, device=values.device)
    return buffer.scatter(1, rows.long(), values.to(dtype))


def dense_forward(x: torch.Tensor, dictionary: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x (n, d1), dictionary (d1, k) (cast to x's dtype for the call when held narrower),
    values and rows (d2, s). Returns (n, d2) at x's dtype."""
    return F.linear(x @ dictionary.to(x.dtype), scatter_dense(values, rows, dictionary.shape[1], x.dtype), bias)


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
    if tensors[0].device.type != "cpu" or any(t.dtype == torch.float64 for t in tensors):
        return None
    return ell_native.load()


def sparse_forward(x: torch.Tensor, dictionary: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """The ELL path: x (n, d1), dictionary (d1, k) at any float width (a bf16 dictionary in
    a float32 model is read as it is, products in float32), values and rows (d2, s).
    Returns (n, d2) at x's dtype: the compiled kernel, or x D at x's dtype then the
    pure-PyTorch gather."""
    native = _native(x, dictionary, values)
    if native is not None:
        y = native.dict_ell(x, dictionary, values, rows)
    else:
        y = ell_matmul_reference(x @ dictionary.to(x.dtype), values, rows)
    return y + bias if bias is not None else y
