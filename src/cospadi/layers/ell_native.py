"""The compiled ELL kernel: `y = z S` for S in ELL form (values and row indices (d2, s)),
a small C++ torch operator built on first use with the system C++ compiler and cached.

    y[r, j] = sum_t values[j, t] * z[r, rows[j, t]]        z (n, k), y (n, d2)

Values may be float32, bfloat16 or float16 and rows int16 or int32; sums run in float32
and y comes back at z's dtype. One row (decoding) gathers z by the indices; several rows
are processed 16 at a time from a transposed copy of z, so each stored entry feeds a
16-wide multiply-add without a gather. Threads: torch's own (at::parallel_for over the
columns of y).

`load()` returns the operator, or None when there is no compiler, the build fails, or
COSPADI_NATIVE=0; kernels.ell_matmul then runs its pure-PyTorch fallback (same results
up to float rounding: the order of the additions differs). The shared library is built
once per source, torch version and CPU (`-march=native`), into cospadi's cache
(`$COSPADI_CACHE/kernels`, or ~/.cache/cospadi/kernels), written under a temporary name
and renamed, so concurrent processes never load a half-written file."""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import torch

SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t TILE = 16;  // rows of z per multiply-add in the batched kernel

inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// One row: y[j] = sum_t v[j, t] * z[idx[j, t]], 16 partial sums per column.
template <typename V, typename I>
void gather_columns(const float* z, const V* vals, const I* idx, float* y, int64_t s, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j) {
    const V* v = vals + j * s;
    const I* ix = idx + j * s;
    float acc[16] = {0};
    int64_t t = 0;
    for (; t + 16 <= s; t += 16)
      for (int l = 0; l < 16; ++l) acc[l] += to_float(v[t + l]) * z[ix[t + l]];
    float total = 0;
    for (; t < s; ++t) total += to_float(v[t]) * z[ix[t]];
    for (int l = 0; l < 16; ++l) total += acc[l];
    y[j] = total;
  }
}

// Several rows: zt holds z transposed in tiles of TILE rows, (tiles, k, TILE); each stored
// entry (j, t) adds v * zt[tile, idx, :] to TILE outputs at once.
template <typename V, typename I>
void tiled_columns(const float* zt, const V* vals, const I* idx, float* y, int64_t n, int64_t k, int64_t d2,
                   int64_t s, int64_t begin, int64_t end) {
  const int64_t tiles = (n + TILE - 1) / TILE;
  for (int64_t jb = begin; jb < end; jb += 64) {
    const int64_t je = std::min(end, jb + 64);
    for (int64_t c = 0; c < tiles; ++c) {
      const float* tile = zt + c * k * TILE;
      const int64_t rows = std::min(TILE, n - c * TILE);
      for (int64_t j = jb; j < je; ++j) {
        const V* v = vals + j * s;
        const I* ix = idx + j * s;
        float acc[TILE] = {0};
        for (int64_t t = 0; t < s; ++t) {
          const float w = to_float(v[t]);
          const float* zr = tile + static_cast<int64_t>(ix[t]) * TILE;
          for (int64_t l = 0; l < TILE; ++l) acc[l] += w * zr[l];
        }
        for (int64_t l = 0; l < rows; ++l) y[(c * TILE + l) * d2 + j] = acc[l];
      }
    }
  }
}

template <typename V, typename I>
void run(const at::Tensor& zf, const at::Tensor& vals, const at::Tensor& idx, at::Tensor& out) {
  const int64_t n = zf.size(0), k = zf.size(1), d2 = vals.size(0), s = vals.size(1);
  const V* vp = vals.data_ptr<V>();
  const I* ip = idx.data_ptr<I>();
  float* op = out.data_ptr<float>();
  if (n == 1) {
    const float* zp = zf.data_ptr<float>();
    at::parallel_for(0, d2, 64, [&](int64_t b, int64_t e) { gather_columns(zp, vp, ip, op, s, b, e); });
    return;
  }
  const int64_t tiles = (n + TILE - 1) / TILE;
  auto zt = at::zeros({tiles * TILE, k}, zf.options());
  zt.narrow(0, 0, n).copy_(zf);
  zt = zt.view({tiles, TILE, k}).transpose(1, 2).contiguous();  // (tiles, k, TILE)
  const float* zp = zt.data_ptr<float>();
  at::parallel_for(0, d2, 64, [&](int64_t b, int64_t e) { tiled_columns(zp, vp, ip, op, n, k, d2, s, b, e); });
}

at::Tensor ell_matmul(const at::Tensor& z, const at::Tensor& values, const at::Tensor& rows) {
  TORCH_CHECK(z.dim() == 2 && values.dim() == 2 && rows.sizes() == values.sizes(),
              "ell_matmul: z must be (n, k), values and rows (d2, s)");
  TORCH_CHECK(z.device().is_cpu() && values.device().is_cpu() && rows.device().is_cpu(), "ell_matmul: CPU only");
  auto zf = z.to(at::kFloat).contiguous();
  auto vals = values.contiguous();
  auto idx = rows.contiguous();
  auto out = at::empty({zf.size(0), vals.size(0)}, zf.options());
  if (zf.size(0) == 0 || vals.size(0) == 0) return out.to(z.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, vals.scalar_type(), "ell_matmul", [&] {
    if (idx.scalar_type() == at::kShort) {
      run<scalar_t, int16_t>(zf, vals, idx, out);
    } else {
      TORCH_CHECK(idx.scalar_type() == at::kInt, "ell_matmul: rows must be int16 or int32");
      run<scalar_t, int32_t>(zf, vals, idx, out);
    }
  });
  return out.to(z.scalar_type());
}

}  // namespace

TORCH_LIBRARY(cospadi_ell, m) { m.def("ell_matmul(Tensor z, Tensor values, Tensor rows) -> Tensor"); }
TORCH_LIBRARY_IMPL(cospadi_ell, CPU, m) { m.impl("ell_matmul", &ell_matmul); }
"""

FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fPIC", "-shared", "-std=c++20", "-w")


def _cpu_signature() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return "\n".join(wanted) or platform.machine()


def library_path() -> Path:
    """Where the shared library for this source, torch build and CPU lives."""
    from ..models import cache_dir  # lazy: layers do not depend on the model code otherwise

    key = hashlib.sha256("\n".join((SOURCE, torch.__version__, " ".join(FLAGS), _cpu_signature())).encode())
    return cache_dir() / "kernels" / f"cospadi_ell-{key.hexdigest()[:16]}.so"


def _build(target: Path) -> None:
    """Compile SOURCE into `target` (atomically); CalledProcessError / OSError on failure."""
    from torch.utils.cpp_extension import include_paths, library_paths

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise OSError("no C++ compiler (c++, g++ or $CXX) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    source = target.with_name(f".{target.stem}.{os.getpid()}.cpp")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    try:
        source.write_text(SOURCE)
        command = [compiler, *FLAGS, abi, *(f"-I{p}" for p in include_paths()), str(source), "-o", str(tmp),
                   *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu"]
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        source.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


@cache
def load() -> Any:
    """torch.ops.cospadi_ell.ell_matmul, built on first call if needed; None when the
    native kernel is disabled (COSPADI_NATIVE=0) or cannot be built or loaded (a warning
    says why, once per process)."""
    if os.environ.get("COSPADI_NATIVE", "1") == "0":
        return None
    try:
        target = library_path()
        if not target.is_file():
            _build(target)
        torch.ops.load_library(str(target))
        return torch.ops.cospadi_ell.ell_matmul
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.strip().splitlines()[-1:] if isinstance(exc, subprocess.CalledProcessError) else [str(exc)]
        warnings.warn(f"cospadi: the compiled ELL kernel is unavailable ({(detail or ['?'])[0]}); "
                      "using the PyTorch fallback", RuntimeWarning, stacklevel=2)
        return None
