"""The two ways a DictLinear computes y = (x D) S + b, and which one runs.

* dense: S is scattered into a (d2, k) buffer for the call, then two GEMMs. Best for
  long inputs (prefill) and on GPUs; differentiable.
* sparse: S^T as a CSR matrix (d2 rows of s entries) times (x D)^T. It reads the
  nonzeros only, so it wins for a few rows (decoding) on the CPU. torch's CPU CSR
  kernels take float32/float64 only: half-precision modules run it in float32 on a
  float32 copy of the values.
Both give the same result up to float rounding."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

PATHS = ("auto", "dense", "sparse")
SPARSE_MAX_ROWS = 32  # rows (tokens) up to which the CPU uses the sparse path; see BENCHMARKS.md


def choose_path(rows: int, device: torch.device, needs_grad: bool) -> str:
    """'sparse' for at most SPARSE_MAX_ROWS input rows on the CPU without autograd,
    'dense' otherwise (long inputs, GPUs, training)."""
    if needs_grad or device.type != "cpu" or rows > SPARSE_MAX_ROWS:
        return "dense"
    return "sparse"


def dense_forward(x: torch.Tensor, dictionary: torch.Tensor, columns: torch.Tensor, coefs: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x (n, d1), dictionary (d1, k), columns and coefs (d2, s): column j of S holds
    coefs[j] at rows columns[j]. Returns (n, d2)."""
    s_t = torch.zeros(columns.shape[0], dictionary.shape[1], dtype=coefs.dtype, device=coefs.device)
    s_t = s_t.scatter(1, columns.long(), coefs)
    return F.linear(x @ dictionary, s_t, bias)


def csr_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU CSR kernels run in for modules of `dtype`."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def build_csr(columns: torch.Tensor, coefs: torch.Tensor, atoms: int) -> torch.Tensor:
    """S^T (d2, k) as a sparse CSR tensor from columns, coefs (d2, s). Its values share
    memory with `coefs` when coefs is contiguous and already of csr_dtype."""
    width, s = columns.shape
    crow = torch.arange(0, (width + 1) * s, s, dtype=torch.int32, device=columns.device)
    values = coefs.detach().to(csr_dtype(coefs.dtype)).reshape(-1)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, columns.reshape(-1), values, (width, atoms),
                                       check_invariants=False)


def sparse_forward(x: torch.Tensor, dictionary: torch.Tensor, csr: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """x (n, d1), dictionary (d1, k), csr = S^T (d2, k) from build_csr. Returns (n, d2)."""
    z = x @ dictionary
    if z.dtype != csr.dtype:
        z = z.to(csr.dtype)
    y = torch.mv(csr, z.view(-1)).view(1, -1) if z.shape[0] == 1 else (csr @ z.T).T
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y + bias if bias is not None else y
