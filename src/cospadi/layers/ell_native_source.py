"""The C++ source of the compiled sparse-path kernels (ell_native.py builds and loads it;
the algorithms are described there and in docs/inference.md), in four parts: this file's
head (includes, constants, the pattern's bit counts) and operators (dict_bitmap,
bitmap_dense and their dispatch), ell_native_walk.py (up to a few rows: z = x D in
registers, then the bit walk), ell_native_tiles.py (more rows at float32, and S^T for
the dense path) and ell_native_panels.py (more rows at bf16)."""

from .ell_native_panels import PANELS_SOURCE
from .ell_native_tiles import TILES_SOURCE
from .ell_native_walk import WALK_SOURCE

# from this many input rows a float32 D held at float32 is zero-padded for torch's GEMM of z = x D (the
# operator's gemm_z and kernels.gemm_dictionary read this one value)
PAD_ROWS = 256
# up to this many input rows a bf16 model's sparse path walks the bits (walk_small); above it the bf16 panels
# (the operator's dispatch and kernels.max_sparse_rows, where the panels are missing, read this one value)
WALK_ROWS_BF16 = 8

SOURCE_HEAD = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <atomic>
#include <cstring>
#include <immintrin.h>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__AVX512VBMI2__) && \
    defined(__BMI2__) && !defined(COSPADI_BITWALK)
#define COSPADI_EXPAND 1  // the vector walks; COSPADI_BITWALK forces the scalar bit walk (for measuring)
#endif

namespace {

constexpr int64_t WORD = 16;  // bits per word of the pattern: column j's rows 16w..16w+15 are word w's bits
constexpr int64_t TILE = 16;  // rows of z per multiply-add in the batched kernel
constexpr int64_t BLOCK = 64;  // columns whose rows are decoded together in the batched kernel
constexpr int WALK_ROWS = 16;  // up to this many rows the bit walk runs (float32 products); above it the tiles
constexpr int WALK_ROWS_BF16 = @WALK_ROWS_BF16@;  // the same for a bf16 model: above it the bf16 panels
constexpr int64_t PAD_ROWS = @PAD_ROWS@;  // from this many rows a float32 D is padded for the GEMM (gemm_z)
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

// The bits of a column's last word that lie inside the k rows.
inline uint32_t tail_bits(int64_t k, int64_t words) {
  const int64_t used = k - (words - 1) * WORD;
  return used >= WORD ? 0xFFFFu : (1u << used) - 1u;
}

// Whether column p (words words) has exactly s bits inside its k rows (tail: the last word's rows).
inline bool column_count(const uint16_t* p, int64_t words, uint32_t tail, int64_t s) {
  int64_t total = __builtin_popcount(p[words - 1] & tail), w = 0;
  for (; w + 4 < words; w += 4) {
    uint64_t chunk;
    std::memcpy(&chunk, p + w, sizeof chunk);
    total += __builtin_popcountll(chunk);
  }
  for (; w + 1 < words; ++w) total += __builtin_popcount(p[w]);
  return total == s;
}

const uint16_t* words_of(const at::Tensor& pattern) {
  return reinterpret_cast<const uint16_t*>(pattern.data_ptr<int16_t>());
}

// f(T{}) with T the C++ type of a float32, bf16 or fp16 tensor (`what` names it otherwise).
template <typename F>
void with_float_type(at::ScalarType type, const char* what, F&& f) {
  switch (type) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, what, " must be float32, bfloat16 or float16");
  }
}

"""

SOURCE_OPS = r"""

// y (n, d2) in float32 from z (n, k) in float32 and S as values and pattern.
at::Tensor bitmap_float(const at::Tensor& zf, const at::Tensor& values, const at::Tensor& pattern) {
  auto vals = values.contiguous();
  auto out = at::empty({zf.size(0), vals.size(0)}, zf.options());
  with_float_type(vals.scalar_type(), "dict_bitmap: values", [&](auto tag) { run<decltype(tag)>(zf, vals, pattern, out); });
  return out;
}

// y (n, d2) from z (n, k): bf16 dot products (y in bf16) when z and the values are bf16,
// there are several rows and the CPU has AVX-512 BF16; float32 products (y in float32) otherwise.
at::Tensor bitmap_any(const at::Tensor& z, const at::Tensor& values, const at::Tensor& pattern) {
#ifdef COSPADI_BF16_PANELS
  const bool bf16 = z.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16;
  if (z.size(0) > WALK_ROWS_BF16 && bf16) return bitmap_panels(z, values, pattern);
#endif
  return bitmap_float(z.to(at::kFloat).contiguous(), values, pattern);
}

// z (n rows, ldz floats apart, zeroed past k by the caller) = x (n, d1) float32 D (d1, k)
// at D's width. One row: each thread streams its own rows of D into its own z (the parts
// summed at the end); more rows: register panels, columns split across threads.
void form_z(const float* x, const at::Tensor& dict, float* z, int64_t ldz, int64_t n) {
  const int64_t d1 = dict.size(0), k = dict.size(1);
  with_float_type(dict.scalar_type(), "dict_bitmap: the dictionary", [&](auto tag) {
    const auto* dp = reinterpret_cast<const decltype(tag)*>(dict.data_ptr());
    if (n > 1) {
      at::parallel_for(0, k, 128, [&](int64_t b, int64_t e) { dictionary_rows(x, dp, z, ldz, n, d1, k, b, e); });
      return;
    }
    std::fill(z, z + k, 0.0f);
    const int64_t parts = std::clamp<int64_t>(at::get_num_threads(), 1, std::max<int64_t>(1, d1 / 64));
    std::vector<float> partial((parts - 1) * k, 0.0f);
    at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p)
        dictionary_stream(x, dp, p == 0 ? z : partial.data() + (p - 1) * k, k, p * d1 / parts, (p + 1) * d1 / parts);
    });
    for (int64_t p = 1; p < parts; ++p)
      for (int64_t c = 0; c < k; ++c) z[c] += partial[(p - 1) * k + c];
  });
}

// z = x D (n, k or words * 16) at x's dtype by torch's GEMM, on a copy of D at x's dtype.
// At float32 the copy is zero-padded to whole words of columns: torch's float32 GEMM ran
// 1.2-1.5x slower per column here when the column count was off a multiple of 8 (339 or 460
// atoms against 344 or 464). A float32 D is copied only for PAD_ROWS rows or more (the copy
// then costs a few percent of the product). The padded columns of z are zero and no bit
// selects them.
at::Tensor gemm_z(const at::Tensor& x, const at::Tensor& dict, int64_t words) {
  const int64_t k = dict.size(1), padded = words * WORD;
  const bool copied = dict.scalar_type() != x.scalar_type();
  if (x.scalar_type() != at::kFloat || k == padded || (!copied && x.size(0) < PAD_ROWS))
    return at::mm(x.contiguous(), dict.to(x.scalar_type()));
  auto wide = at::empty({dict.size(0), padded}, x.options());
  wide.narrow(1, 0, k).copy_(dict);
  wide.narrow(1, k, padded - k).zero_();
  return at::mm(x.contiguous(), wide);
}

// Up to the walk's rows (decoding): z = x D in float32, each row whole words long and zero
// past k, then the bit walk of every column, in buffers of this call (the only tensor made
// is y, at x's dtype).
at::Tensor walk_small(const at::Tensor& x, const at::Tensor& dict, const at::Tensor& values, const at::Tensor& pat) {
  const int64_t n = x.size(0), d1 = x.size(1), k = dict.size(1), d2 = values.size(0), s = values.size(1);
  const int64_t words = pat.size(1), ld = words * WORD;
  std::vector<float> xf(n * d1), z(n * ld, 0.0f), y(n * d2);
  const auto xc = x.contiguous();
  with_float_type(xc.scalar_type(), "dict_bitmap: x", [&](auto tag) {
    const auto* p = reinterpret_cast<const decltype(tag)*>(xc.data_ptr());
    for (int64_t i = 0; i < n * d1; ++i) xf[i] = to_float(p[i]);
  });
  form_z(xf.data(), dict, z.data(), ld, n);
  std::atomic<bool> ok{true};
  const auto vals = values.contiguous();
  with_float_type(vals.scalar_type(), "dict_bitmap: values", [&](auto tag) {
    const auto* vp = reinterpret_cast<const decltype(tag)*>(vals.data_ptr());
    at::parallel_for(0, d2, 64, [&](int64_t b, int64_t e) {
      if (!walk_rows(n, z.data(), ld, vp, words_of(pat), y.data(), k, d2, s, words, b, e)) ok = false;
    });
  });
  TORCH_CHECK(ok.load(), "dict_bitmap: a column of the pattern does not have exactly s = ", s, " bits");
  auto out = at::empty({n, d2}, x.options());
  with_float_type(out.scalar_type(), "dict_bitmap: x", [&](auto tag) {
    using O = decltype(tag);
    auto* o = reinterpret_cast<O*>(out.data_ptr());
    for (int64_t i = 0; i < n * d2; ++i) o[i] = O(y[i]);
  });
  return out;
}

// y = (x D) S: x (n, d1), dictionary (d1, k) at any float width, S as values (d2, s) and
// its column bits, pattern (d2, ceil(k / 16)) int16; z = x D is formed in float32 inside,
// D read at its width, for up to GEMM_ROWS rows (decoding); longer inputs use torch's GEMM
// on a copy of D at x's dtype made for the call. y at x's dtype.
at::Tensor dict_bitmap(const at::Tensor& x, const at::Tensor& dictionary, const at::Tensor& values,
                       const at::Tensor& pattern) {
  TORCH_CHECK(x.dim() == 2 && dictionary.dim() == 2 && x.size(1) == dictionary.size(0),
              "dict_bitmap: x must be (n, d1) and dictionary (d1, k)");
  const int64_t n = x.size(0), d1 = x.size(1), k = dictionary.size(1);
  TORCH_CHECK(k >= 1 && values.dim() == 2 && values.size(1) >= 1 && values.size(1) <= k,
              "dict_bitmap: values must be (d2, s) with 1 <= s <= k");
  TORCH_CHECK(pattern.dim() == 2 && pattern.size(0) == values.size(0) && pattern.size(1) == (k + WORD - 1) / WORD &&
              pattern.scalar_type() == at::kShort, "dict_bitmap: pattern must be (d2, ceil(k / 16)) int16");
  TORCH_CHECK(x.device().is_cpu() && dictionary.device().is_cpu() && values.device().is_cpu() &&
              pattern.device().is_cpu(), "dict_bitmap: CPU only");
  // no rows or no columns: nothing to walk (the kernels below assume both)
  if (n == 0 || values.size(0) == 0) return at::zeros({n, values.size(0)}, x.options());
  auto pat = pattern.contiguous();
  auto dict = dictionary.contiguous();
  if (n > GEMM_ROWS)  // z at x's dtype (bf16 products for a bf16 model, as its dense path)
    return bitmap_any(gemm_z(x, dict, pat.size(1)), values, pat).to(x.scalar_type());
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (n <= (bf16 ? WALK_ROWS_BF16 : WALK_ROWS)) return walk_small(x, dict, values, pat);
  auto xf = x.to(at::kFloat).contiguous();
  auto z = at::empty({n, k}, xf.options());
  form_z(xf.data_ptr<float>(), dict, z.data_ptr<float>(), k, n);
  return bitmap_any(bf16 ? z.to(at::kBFloat16) : z, values, pat).to(x.scalar_type());  // bf16: the panels
}

// S^T (d2, k) at `dtype` (float32, bf16 or fp16) from values (d2, s) and pattern (d2, ceil(k / 16)).
at::Tensor bitmap_dense(const at::Tensor& values, const at::Tensor& pattern, int64_t atoms, at::ScalarType dtype) {
  TORCH_CHECK(atoms >= 1 && values.dim() == 2 && values.size(1) >= 1 && values.size(1) <= atoms,
              "bitmap_dense: values must be (d2, s) with 1 <= s <= atoms");
  TORCH_CHECK(pattern.dim() == 2 && pattern.size(0) == values.size(0) && pattern.size(1) == (atoms + WORD - 1) / WORD &&
              pattern.scalar_type() == at::kShort, "bitmap_dense: pattern must be (d2, ceil(atoms / 16)) int16");
  TORCH_CHECK(values.device().is_cpu() && pattern.device().is_cpu(), "bitmap_dense: CPU only");
  auto vals = values.contiguous();
  auto pat = pattern.contiguous();
  const int64_t d2 = vals.size(0), s = vals.size(1), words = pat.size(1);
  auto out = at::empty({d2, atoms}, vals.options().dtype(dtype));
  const uint16_t* pp = words_of(pat);
  std::atomic<bool> ok{true};
  with_float_type(vals.scalar_type(), "bitmap_dense: values", [&](auto v_tag) {
    with_float_type(dtype, "bitmap_dense: dtype", [&](auto o_tag) {
      const auto* vp = reinterpret_cast<const decltype(v_tag)*>(vals.data_ptr());
      auto* op = reinterpret_cast<decltype(o_tag)*>(out.data_ptr());
      at::parallel_for(0, d2, 64, [&](int64_t b, int64_t e) {
        if (!dense_rows(vp, pp, op + b * atoms, atoms, d2, s, words, b, e, atoms)) ok = false;
      });
    });
  });
  TORCH_CHECK(ok.load(), "bitmap_dense: a column of the pattern does not have exactly s = ", s, " bits");
  return out;
}

// Whether this build has the bf16 panels (the CPU has AVX-512 BF16): without them a bf16
// model's many-row sparse path would run float32 products.
bool bf16_panels() {
#ifdef COSPADI_BF16_PANELS
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(cospadi_ell, m) {
  m.def("dict_bitmap(Tensor x, Tensor dictionary, Tensor values, Tensor pattern) -> Tensor");
  m.def("bitmap_dense(Tensor values, Tensor pattern, int atoms, ScalarType dtype) -> Tensor");
  m.def("bf16_panels", &bf16_panels);  // no tensor argument: a catch-all kernel
}
TORCH_LIBRARY_IMPL(cospadi_ell, CPU, m) {
  m.impl("dict_bitmap", &dict_bitmap);
  m.impl("bitmap_dense", &bitmap_dense);
}
"""

HEAD = SOURCE_HEAD.replace("@PAD_ROWS@", str(PAD_ROWS)).replace("@WALK_ROWS_BF16@", str(WALK_ROWS_BF16))
SOURCE = HEAD + WALK_SOURCE + TILES_SOURCE + PANELS_SOURCE + SOURCE_OPS
