"""The compiled ELL kernel: y = (x D) S for S in ELL form (values and row indices (d2, s)),
a small C++ torch operator, torch.ops.cospadi_ell.dict_ell, built on first use with the
system C++ compiler and cached.

    z = x D                                                   x (n, d1), D (d1, k)
    y[r, j] = sum_t values[j, t] * z[r, rows[j, t]]        y (n, d2)

z is formed in float32 inside for up to GEMM_ROWS rows, reading D at its stored width (a
bf16 D in a float32 model is never copied to float32); longer inputs use torch's GEMM.
Values may be float32, bfloat16 or float16 and rows int16 or int32; sums run in float32
and y comes back at x's dtype. One row (decoding) gathers z by the indices; several rows
are processed 16 at a time from a transposed copy of z, so each stored entry feeds a
16-wide multiply-add without a gather (bf16 dot products for a bf16 model where the CPU
has AVX-512 BF16). Threads: torch's own (at::parallel_for over the columns of y).

`load()` returns the operator namespace, or None when there is no compiler, the build
fails, or COSPADI_NATIVE=0; kernels.sparse_forward then runs its pure-PyTorch fallback
(same results up to float rounding: the order of the additions differs). The shared
library is built once per source, torch version and CPU (`-march=native`), into cospadi's
cache (`$COSPADI_CACHE/kernels`, or ~/.cache/cospadi/kernels), written under a temporary
name and renamed, so concurrent processes never load a half-written file."""
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
#include <immintrin.h>
#include <vector>

namespace {

constexpr int64_t TILE = 16;  // rows of z per multiply-add in the batched kernel
constexpr int64_t GEMM_ROWS = 32;  // above this many rows, z = x D goes to torch's GEMM (a float32 copy of D)
typedef float v16f __attribute__((vector_size(64)));  // one AVX-512 register of floats (TILE of them)
inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

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

// Several rows: zt holds z transposed in tiles of TILE rows, (tiles, k, TILE). Columns
// j..j+Q-1 against tiles c..c+NT-1: each stored entry (j, t) adds v * zt[tile, idx, :] to
// TILE outputs per tile at once, no gather. Q x NT independent multiply-add chains hide
// the instruction latency, and every value and index read serves NT tiles.
template <int Q, int NT, typename V, typename I>
void tile_block(const float* zt, const V* vals, const I* idx, float* y, int64_t n, int64_t k, int64_t d2, int64_t s,
                int64_t j, int64_t c) {
  v16f acc[Q][NT] = {};
  const V* v = vals + j * s;
  const I* ix = idx + j * s;
  const float* base = zt + c * k * TILE;
  for (int64_t t = 0; t < s; ++t)
    for (int q = 0; q < Q; ++q) {
      const float w = to_float(v[q * s + t]);
      const float* zr = base + static_cast<int64_t>(ix[q * s + t]) * TILE;
      for (int u = 0; u < NT; ++u) acc[q][u] += w * load16(zr + u * k * TILE);
    }
  for (int u = 0; u < NT; ++u) {
    const int64_t rows = std::min(TILE, n - (c + u) * TILE);
    for (int64_t l = 0; l < rows; ++l)
      for (int q = 0; q < Q; ++q) y[((c + u) * TILE + l) * d2 + j + q] = acc[q][u][l];
  }
}

template <typename V, typename I>
void tiled_columns(const float* zt, const V* vals, const I* idx, float* y, int64_t n, int64_t k, int64_t d2,
                   int64_t s, int64_t begin, int64_t end) {
  const int64_t tiles = (n + TILE - 1) / TILE;
  for (int64_t jb = begin; jb < end; jb += 64) {  // a block's values and indices stay in cache across tiles
    const int64_t je = std::min(end, jb + 64);
    for (int64_t c = 0; c < tiles; c += 2) {
      const bool pair = c + 1 < tiles;
      int64_t j = jb;
      for (; j + 4 <= je; j += 4)
        pair ? tile_block<4, 2>(zt, vals, idx, y, n, k, d2, s, j, c) : tile_block<4, 1>(zt, vals, idx, y, n, k, d2, s, j, c);
      for (; j < je; ++j)
        pair ? tile_block<1, 2>(zt, vals, idx, y, n, k, d2, s, j, c) : tile_block<1, 1>(zt, vals, idx, y, n, k, d2, s, j, c);
    }
  }
}

// z (n, k) = x (n, d1) D (d1, k) in float32, D read at its stored width; columns begin..end.
// Four rows of D are converted per step and applied to every row of x, so z's block
// (n x 128 floats) is read and written once per four rows of D.
template <typename W>
void dictionary_rows(const float* x, const W* dict, float* z, int64_t n, int64_t d1, int64_t k, int64_t begin,
                     int64_t end) {
  constexpr int64_t CB = 128;
  float buf[4][CB];
  for (int64_t cb = begin; cb < end; cb += CB) {
    const int64_t w = std::min(CB, end - cb);
    for (int64_t r = 0; r < n; ++r) std::fill(z + r * k + cb, z + r * k + cb + w, 0.0f);
    for (int64_t i = 0; i < d1; i += 4) {
      const int64_t m = std::min<int64_t>(4, d1 - i);
      for (int q = 0; q < 4; ++q)
        for (int64_t c = 0; c < w; ++c) buf[q][c] = q < m ? to_float(dict[(i + q) * k + cb + c]) : 0.0f;
      for (int64_t r = 0; r < n; ++r) {
        const float* xr = x + r * d1 + i;
        const float a0 = xr[0], a1 = m > 1 ? xr[1] : 0.0f, a2 = m > 2 ? xr[2] : 0.0f, a3 = m > 3 ? xr[3] : 0.0f;
        float* zr = z + r * k + cb;
        for (int64_t c = 0; c < w; ++c) zr[c] += a0 * buf[0][c] + a1 * buf[1][c] + a2 * buf[2][c] + a3 * buf[3][c];
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

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define COSPADI_BF16_TILES 1
// bf16 values and bf16 z: zt holds z in tiles (tiles, k, TILE) of bf16. Two stored entries
// (j, t), (j, t + 1) of a column feed one dot-product instruction: every lane l adds
// v_t z[l, i_t] + v_t+1 z[l, i_t+1], products exact and summed in float32.
template <int Q, typename I>
void tile_block_bf16(const uint16_t* zt, const uint16_t* vals, const I* idx, float* y, int64_t n, int64_t k,
                     int64_t d2, int64_t s, int64_t j, int64_t c, __m512i interleave) {
  __m512 acc[Q];
  for (int q = 0; q < Q; ++q) acc[q] = _mm512_setzero_ps();
  const uint16_t* base = zt + c * k * TILE;
  int64_t t = 0;
  for (; t + 2 <= s; t += 2)
    for (int q = 0; q < Q; ++q) {
      const uint16_t* v = vals + (j + q) * s + t;
      const I* ix = idx + (j + q) * s + t;
      int32_t pair;  // v_t in the low half, v_t+1 in the high half, broadcast straight from memory
      std::memcpy(&pair, v, sizeof pair);
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + static_cast<int64_t>(ix[0]) * TILE));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + static_cast<int64_t>(ix[1]) * TILE));
      const __m512i ab = _mm512_permutexvar_epi16(interleave, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
      acc[q] = _mm512_dpbf16_ps(acc[q], (__m512bh)_mm512_set1_epi32(pair), (__m512bh)ab);
    }
  if (t < s)  // odd s: the last entry pairs with a zero
    for (int q = 0; q < Q; ++q) {
      const int32_t single = vals[(j + q) * s + t];
      const __m256i a = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(base + static_cast<int64_t>(idx[(j + q) * s + t]) * TILE));
      const __m512i ab = _mm512_permutexvar_epi16(interleave, _mm512_zextsi256_si512(a));  // upper half zero
      acc[q] = _mm512_dpbf16_ps(acc[q], (__m512bh)_mm512_set1_epi32(single), (__m512bh)ab);
    }
  const int64_t rows = std::min(TILE, n - c * TILE);
  alignas(64) float out[Q][TILE];
  for (int q = 0; q < Q; ++q) _mm512_store_ps(out[q], acc[q]);
  for (int64_t l = 0; l < rows; ++l)
    for (int q = 0; q < Q; ++q) y[(c * TILE + l) * d2 + j + q] = out[q][l];
}

template <typename I>
void tiled_columns_bf16(const uint16_t* zt, const uint16_t* vals, const I* idx, float* y, int64_t n, int64_t k,
                        int64_t d2, int64_t s, int64_t begin, int64_t end) {
  alignas(64) int16_t order[32];
  for (int l = 0; l < 16; ++l) order[2 * l] = static_cast<int16_t>(l), order[2 * l + 1] = static_cast<int16_t>(16 + l);
  const __m512i interleave = _mm512_load_si512(order);
  const int64_t tiles = (n + TILE - 1) / TILE;
  for (int64_t jb = begin; jb < end; jb += 64) {
    const int64_t je = std::min(end, jb + 64);
    for (int64_t c = 0; c < tiles; ++c) {
      int64_t j = jb;
      for (; j + 4 <= je; j += 4) tile_block_bf16<4>(zt, vals, idx, y, n, k, d2, s, j, c, interleave);
      for (; j < je; ++j) tile_block_bf16<1>(zt, vals, idx, y, n, k, d2, s, j, c, interleave);
    }
  }
}

// y (n, d2) in float32 from z (n, k) in bf16 and bf16 values, n > 1.
at::Tensor ell_bf16(const at::Tensor& z, const at::Tensor& values, const at::Tensor& rows) {
  const int64_t n = z.size(0), k = z.size(1), d2 = values.size(0), s = values.size(1);
  const int64_t tiles = (n + TILE - 1) / TILE;
  auto zt = at::zeros({tiles * TILE, k}, z.options());
  zt.narrow(0, 0, n).copy_(z);
  zt = zt.view({tiles, TILE, k}).transpose(1, 2).contiguous();  // (tiles, k, TILE)
  auto vals = values.contiguous();
  auto idx = rows.contiguous();
  auto out = at::empty({n, d2}, z.options().dtype(at::kFloat));
  const auto* zp = reinterpret_cast<const uint16_t*>(zt.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(vals.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  if (idx.scalar_type() == at::kShort) {
    const int16_t* ip = idx.data_ptr<int16_t>();
    at::parallel_for(0, d2, 64, [&](int64_t b, int64_t e) { tiled_columns_bf16(zp, vp, ip, op, n, k, d2, s, b, e); });
  } else {
    const int32_t* ip = idx.data_ptr<int32_t>();
    at::parallel_for(0, d2, 64, [&](int64_t b, int64_t e) { tiled_columns_bf16(zp, vp, ip, op, n, k, d2, s, b, e); });
  }
  return out;
}
#endif

// y (n, d2) in float32 from z (n, k) in float32 and S in ELL form.
at::Tensor ell_float(const at::Tensor& zf, const at::Tensor& values, const at::Tensor& rows) {
  auto vals = values.contiguous();
  auto idx = rows.contiguous();
  auto out = at::empty({zf.size(0), vals.size(0)}, zf.options());
  if (zf.size(0) == 0 || vals.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, vals.scalar_type(), "dict_ell", [&] {
    if (idx.scalar_type() == at::kShort) {
      run<scalar_t, int16_t>(zf, vals, idx, out);
    } else {
      TORCH_CHECK(idx.scalar_type() == at::kInt, "dict_ell: rows must be int16 or int32");
      run<scalar_t, int32_t>(zf, vals, idx, out);
    }
  });
  return out;
}

void check_ell(const at::Tensor& values, const at::Tensor& rows) {
  TORCH_CHECK(values.dim() == 2 && rows.sizes() == values.sizes(), "dict_ell: values and rows must be (d2, s)");
  TORCH_CHECK(values.device().is_cpu() && rows.device().is_cpu(), "dict_ell: CPU only");
}

// y (n, d2) in float32 from z (n, k): bf16 products when z and the values are bf16 and
// there are several rows (and the CPU has AVX-512 BF16), float32 products otherwise.
at::Tensor ell_any(const at::Tensor& z, const at::Tensor& values, const at::Tensor& rows) {
#ifdef COSPADI_BF16_TILES
  if (z.size(0) > 1 && values.size(0) > 0 && z.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16)
    return ell_bf16(z.contiguous(), values, rows);
#endif
  return ell_float(z.to(at::kFloat).contiguous(), values, rows);
}

// y = (x D) S: x (n, d1), dictionary (d1, k) at any float width, S in ELL form; z = x D is
// formed in float32 inside, D read at its width, for up to GEMM_ROWS rows (decoding);
// longer inputs use torch's GEMM on a float32 copy of D made for the call. y at x's dtype.
at::Tensor dict_ell(const at::Tensor& x, const at::Tensor& dictionary, const at::Tensor& values,
                    const at::Tensor& rows) {
  check_ell(values, rows);
  TORCH_CHECK(x.dim() == 2 && dictionary.dim() == 2 && x.size(1) == dictionary.size(0),
              "dict_ell: x must be (n, d1) and dictionary (d1, k)");
  TORCH_CHECK(x.device().is_cpu() && dictionary.device().is_cpu(), "dict_ell: CPU only");
  const int64_t n = x.size(0), d1 = x.size(1), k = dictionary.size(1);
  auto dict = dictionary.contiguous();
  if (n > GEMM_ROWS)  // z at x's dtype (bf16 products for a bf16 model, as its dense path)
    return ell_any(at::mm(x.contiguous(), dict.to(x.scalar_type())), values, rows).to(x.scalar_type());
  auto xf = x.to(at::kFloat).contiguous();
  auto z = at::empty({n, k}, xf.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dict.scalar_type(), "dict_ell", [&] {
    const scalar_t* dp = dict.data_ptr<scalar_t>();
    const float* xp = xf.data_ptr<float>();
    float* zp = z.data_ptr<float>();
    at::parallel_for(0, k, 128, [&](int64_t b, int64_t e) { dictionary_rows(xp, dp, zp, n, d1, k, b, e); });
  });
  const bool bf16_tiles = n > 1 && x.scalar_type() == at::kBFloat16;  // several rows of a bf16 model
  return ell_any(bf16_tiles ? z.to(at::kBFloat16) : z, values, rows).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(cospadi_ell, m) { m.def("dict_ell(Tensor x, Tensor dictionary, Tensor values, Tensor rows) -> Tensor"); }
TORCH_LIBRARY_IMPL(cospadi_ell, CPU, m) { m.impl("dict_ell", &dict_ell); }
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
    """The operator namespace torch.ops.cospadi_ell (dict_ell(x, dictionary, values,
    rows)), built on first call if needed; None when the
    native kernel is disabled (COSPADI_NATIVE=0) or cannot be built or loaded (a warning
    says why, once per process)."""
    if os.environ.get("COSPADI_NATIVE", "1") == "0":
        return None
    try:
        target = library_path()
        if not target.is_file():
            _build(target)
        torch.ops.load_library(str(target))
        return torch.ops.cospadi_ell
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.strip().splitlines()[-1:] if isinstance(exc, subprocess.CalledProcessError) else [str(exc)]
        warnings.warn(f"cospadi: the compiled ELL kernel is unavailable ({(detail or ['?'])[0]}); "
                      "using the PyTorch fallback", RuntimeWarning, stacklevel=2)
        return None
