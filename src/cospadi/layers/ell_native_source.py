"""The C++ source of the compiled sparse-path kernels (ell_native.py builds and loads it;
the algorithms are described there and in docs/inference.md)."""

SOURCE = r"""
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
constexpr int WALK_ROWS_BF16 = 8;  // the same for a bf16 model: its bf16 tiles overtake the walk sooner
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

// The ascending rows of columns begin..end (s each) into out ((end - begin) s + 16 int32s)
// from their bits; false when a column does not have exactly s bits inside its k rows.
bool column_rows(const uint16_t* pat, int64_t words, int64_t k, int64_t s, int64_t begin, int64_t end,
                 int32_t* out) {
  const uint32_t tail = tail_bits(k, words);
  for (int64_t j = begin; j < end; ++j) {
    const uint16_t* p = pat + j * words;
    if (!column_count(p, words, tail, s)) return false;
    int32_t* o = out + (j - begin) * s;
#ifdef COSPADI_EXPAND
    // each word's set lanes of (16w, ..., 16w + 15) compressed to the front, stored whole;
    // the next store overwrites the unused tail (the 16 int32s of slack after the last column)
    __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(WORD);
    for (int64_t w = 0; w < words; ++w) {
      const uint32_t m = w + 1 < words ? p[w] : p[w] & tail;
      _mm512_storeu_si512(o, _mm512_maskz_compress_epi32(static_cast<__mmask16>(m), lanes));
      o += __builtin_popcount(m);
      lanes = _mm512_add_epi32(lanes, step);
    }
#else
    for (int64_t w = 0; w < words; ++w)
      for (uint32_t m = w + 1 < words ? p[w] : p[w] & tail; m; m &= m - 1)
        *o++ = static_cast<int32_t>(w * WORD + __builtin_ctz(m));
#endif
  }
  return true;
}

#ifdef COSPADI_EXPAND
// The next popcount(m) values of a column placed into the lanes that `m` selects (the
// others zero), as floats: a load of 16 values and a register expand. Masked: the load
// reads no value past them (for the last columns of the array; a masked load is much
// slower than a plain one when its line is not in cache).
template <bool Masked>
inline __m512 expand16(const float* v, uint32_t m) {
  const auto count = static_cast<__mmask16>(_bzhi_u32(0xFFFFu, __builtin_popcount(m)));
  return _mm512_maskz_expand_ps(static_cast<__mmask16>(m), Masked ? _mm512_maskz_loadu_ps(count, v) : _mm512_loadu_ps(v));
}
template <bool Masked>
inline __m256i load_values16(const void* v, uint32_t m) {  // 16 bf16 or fp16 values
  const auto count = static_cast<__mmask16>(_bzhi_u32(0xFFFFu, __builtin_popcount(m)));
  return Masked ? _mm256_maskz_loadu_epi16(count, v) : _mm256_loadu_si256(static_cast<const __m256i*>(v));
}
template <bool Masked>
inline __m512 expand16(const c10::BFloat16* v, uint32_t m) {  // into the high halves: bf16 -> float for free
  const __m512i raw = _mm512_castsi256_si512(load_values16<Masked>(v, m));
  return _mm512_castsi512_ps(_mm512_maskz_expand_epi16(static_cast<__mmask32>(_pdep_u32(m, 0xAAAAAAAAu)), raw));
}
template <bool Masked>
inline __m512 expand16(const c10::Half* v, uint32_t m) {
  return _mm512_cvtph_ps(_mm256_maskz_expand_epi16(static_cast<__mmask16>(m), load_values16<Masked>(v, m)));
}

// One column (values v, words p) against R rows of z: y[r * d2] = sum over the column's
// bits. Word w: its values expanded into their lanes (once), then acc[r] += them *
// z[r, 16w .. 16w + 15]; even and odd words in two sets of chains.
template <int R, bool Masked, typename V>
inline void walk_column(const float* z, int64_t ld, const V* v, const uint16_t* p, uint32_t tail, int64_t words,
                        float* y, int64_t d2) {
  __m512 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  int64_t w = 0;
  for (; R <= 8 && w + 2 < words; w += 2) {  // more rows: their chains suffice (and fill the registers)
    const __m512 e0 = expand16<Masked>(v, p[w]);
    v += __builtin_popcount(p[w]);
    const __m512 e1 = expand16<Masked>(v, p[w + 1]);
    v += __builtin_popcount(p[w + 1]);
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm512_fmadd_ps(e0, _mm512_loadu_ps(z + r * ld + w * WORD), a0[r]);
      a1[r] = _mm512_fmadd_ps(e1, _mm512_loadu_ps(z + r * ld + (w + 1) * WORD), a1[r]);
    }
  }
  for (; w < words; ++w) {
    const uint32_t m = w + 1 < words ? p[w] : p[w] & tail;
    const __m512 e = expand16<Masked>(v, m);
    v += __builtin_popcount(m);
    for (int r = 0; r < R; ++r) a0[r] = _mm512_fmadd_ps(e, _mm512_loadu_ps(z + r * ld + w * WORD), a0[r]);
  }
  for (int r = 0; r < R; ++r) y[r * d2] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
}
#endif

// Up to WALK_ROWS rows: y[r, j] = sum_i S[i, j] z[r, i], walking column j's bits once for
// all R rows; z holds R rows of ld = words * 16 floats (zero past k). Returns false (and
// skips the column) when a column does not have exactly s bits.
template <int R, typename V>
bool walk_columns(const float* z, int64_t ld, const V* vals, const uint16_t* pat, float* y, int64_t k, int64_t d2,
                  int64_t s, int64_t words, int64_t begin, int64_t end) {
  const uint32_t tail = tail_bits(k, words);
  bool ok = true;
  for (int64_t j = begin; j < end; ++j) {
    const V* v = vals + j * s;
    const uint16_t* p = pat + j * words;
    if (!column_count(p, words, tail, s)) {  // the walk below reads exactly s values
      ok = false;
      continue;
    }
#ifdef COSPADI_EXPAND
    if ((j + 1) * s + WORD <= d2 * s)  // 16 values from any point of the column lie inside the array
      walk_column<R, false>(z, ld, v, p, tail, words, y + j, d2);
    else
      walk_column<R, true>(z, ld, v, p, tail, words, y + j, d2);
#else
    float acc[R] = {};
    int64_t t = 0;
    for (int64_t w = 0; w < words; ++w)
      for (uint32_t m = w + 1 < words ? p[w] : p[w] & tail; m; m &= m - 1, ++t) {
        const float value = to_float(v[t]);
        const int64_t i = w * WORD + __builtin_ctz(m);
        for (int r = 0; r < R; ++r) acc[r] += value * z[r * ld + i];
      }
    for (int r = 0; r < R; ++r) y[r * d2 + j] = acc[r];
#endif
  }
  return ok;
}

// walk_columns with R = n, for n = R..WALK_ROWS.
template <typename V, int R = 1>
bool walk_rows(int64_t n, const float* z, int64_t ld, const V* vals, const uint16_t* pat, float* y, int64_t k,
               int64_t d2, int64_t s, int64_t words, int64_t begin, int64_t end) {
  if constexpr (R < WALK_ROWS) {
    if (n != R) return walk_rows<V, R + 1>(n, z, ld, vals, pat, y, k, d2, s, words, begin, end);
  }
  return walk_columns<R>(z, ld, vals, pat, y, k, d2, s, words, begin, end);
}

// S^T as a dense (d2, k) row block: row j holds column j's values at its set bits, zero
// elsewhere; columns begin..end, values V, output O (float32, bf16 or fp16). Returns false
// when a column does not have exactly s bits.
#ifdef COSPADI_EXPAND
inline void put16(float* o, __m512 v) { _mm512_storeu_ps(o, v); }
inline void put16(c10::Half* o, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void put16(c10::BFloat16* o, __m512 v) {  // round to nearest even, as torch's cast
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm512_cvtepi32_epi16(r));
}
#endif

template <typename V, typename O>
bool dense_rows(const V* vals, const uint16_t* pat, O* out, int64_t k, int64_t d2, int64_t s, int64_t words,
                int64_t begin, int64_t end) {
  const uint32_t tail = tail_bits(k, words);
  for (int64_t j = begin; j < end; ++j) {
    const V* v = vals + j * s;
    const uint16_t* p = pat + j * words;
    O* row = out + j * k;
    if (!column_count(p, words, tail, s)) return false;
#ifdef COSPADI_EXPAND
    const bool inside = (j + 1) * s + WORD <= d2 * s;  // unmasked loads stay inside the array (walk_column)
    int64_t w = 0;
    for (; w + 1 < words; ++w) {  // whole words: the expanded values, zeros included, stored as they are
      put16(row + w * WORD, inside ? expand16<false>(v, p[w]) : expand16<true>(v, p[w]));
      v += __builtin_popcount(p[w]);
    }
    O last[WORD];
    put16(last, expand16<true>(v, p[w] & tail));
    std::memcpy(row + w * WORD, last, (k - w * WORD) * sizeof(O));
#else
    std::fill(row, row + k, O(0.0f));
    int64_t t = 0;
    for (int64_t w = 0; w < words; ++w)
      for (uint32_t m = w + 1 < words ? p[w] : p[w] & tail; m; m &= m - 1)
        row[w * WORD + __builtin_ctz(m)] = O(to_float(v[t++]));
#endif
  }
  return true;
}

// Several rows: zt holds z transposed in tiles of TILE rows, (tiles, k, TILE). Columns
// j..j+Q-1 (values v, decoded rows ix, s each) against tiles c..c+NT-1: each stored entry
// (j, t) adds v * zt[tile, ix, :] to TILE outputs per tile at once, no gather. Q x NT
// independent multiply-add chains hide the instruction latency, and every value and row
// read serves NT tiles.
template <int Q, int NT, typename V>
void tile_block(const float* zt, const V* v, const int32_t* ix, float* y, int64_t n, int64_t k, int64_t d2,
                int64_t s, int64_t j, int64_t c) {
  v16f acc[Q][NT] = {};
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

// Columns begin..end of y, BLOCK at a time: the block's rows are decoded from its bits once
// (column_rows) and serve every tile. Returns false when a column does not have exactly s bits.
template <typename V>
bool tiled_columns(const float* zt, const V* vals, const uint16_t* pat, float* y, int64_t n, int64_t k,
                   int64_t d2, int64_t s, int64_t words, int64_t begin, int64_t end) {
  const int64_t tiles = (n + TILE - 1) / TILE;
  std::vector<int32_t> rows(BLOCK * s + 16);
  for (int64_t jb = begin; jb < end; jb += BLOCK) {  // a block's values and rows stay in cache across tiles
    const int64_t je = std::min(end, jb + BLOCK);
    if (!column_rows(pat, words, k, s, jb, je, rows.data())) return false;
    for (int64_t c = 0; c < tiles; c += 2) {
      const bool pair = c + 1 < tiles;
      int64_t j = jb;
      for (; j + 4 <= je; j += 4) {
        const V* v = vals + j * s;
        const int32_t* ix = rows.data() + (j - jb) * s;
        pair ? tile_block<4, 2>(zt, v, ix, y, n, k, d2, s, j, c) : tile_block<4, 1>(zt, v, ix, y, n, k, d2, s, j, c);
      }
      for (; j < je; ++j) {
        const V* v = vals + j * s;
        const int32_t* ix = rows.data() + (j - jb) * s;
        pair ? tile_block<1, 2>(zt, v, ix, y, n, k, d2, s, j, c) : tile_block<1, 1>(zt, v, ix, y, n, k, d2, s, j, c);
      }
    }
  }
  return true;
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

const uint16_t* words_of(const at::Tensor& pattern) {
  return reinterpret_cast<const uint16_t*>(pattern.data_ptr<int16_t>());
}

template <typename V>
void run(const at::Tensor& zf, const at::Tensor& vals, const at::Tensor& pattern, at::Tensor& out) {
  const int64_t n = zf.size(0), k = zf.size(1), d2 = vals.size(0), s = vals.size(1), words = pattern.size(1);
  const V* vp = vals.data_ptr<V>();
  const uint16_t* pp = words_of(pattern);
  float* op = out.data_ptr<float>();
  std::atomic<bool> ok{true};
  if (n <= WALK_ROWS) {
    const int64_t ld = words * WORD;
    auto zpad = at::zeros({n, ld}, zf.options());  // whole words of z, zero past k
    zpad.narrow(1, 0, k).copy_(zf);
    const float* zp = zpad.data_ptr<float>();
    at::parallel_for(0, d2, 64, [&](int64_t b, int64_t e) {
      if (!walk_rows(n, zp, ld, vp, pp, op, k, d2, s, words, b, e)) ok = false;
    });
  } else {
    const int64_t tiles = (n + TILE - 1) / TILE;
    auto zt = at::zeros({tiles * TILE, k}, zf.options());
    zt.narrow(0, 0, n).copy_(zf);
    zt = zt.view({tiles, TILE, k}).transpose(1, 2).contiguous();  // (tiles, k, TILE)
    const float* zp = zt.data_ptr<float>();
    at::parallel_for(0, d2, BLOCK, [&](int64_t b, int64_t e) {
      if (!tiled_columns(zp, vp, pp, op, n, k, d2, s, words, b, e)) ok = false;
    });
  }
  TORCH_CHECK(ok.load(), "dict_bitmap: a column of the pattern does not have exactly s = ", s, " bits");
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define COSPADI_BF16_TILES 1
// bf16 values and bf16 z: zt holds z in tiles (tiles, k, TILE) of bf16. Two stored entries
// (j, t), (j, t + 1) of a column feed one dot-product instruction: every lane l adds
// v_t z[l, i_t] + v_t+1 z[l, i_t+1], products exact and summed in float32.
template <int Q>
void tile_block_bf16(const uint16_t* zt, const uint16_t* vals, const int32_t* idx, float* y, int64_t n, int64_t k,
                     int64_t d2, int64_t s, int64_t j, int64_t c, __m512i interleave) {
  __m512 acc[Q];
  for (int q = 0; q < Q; ++q) acc[q] = _mm512_setzero_ps();
  const uint16_t* base = zt + c * k * TILE;
  int64_t t = 0;
  for (; t + 2 <= s; t += 2)
    for (int q = 0; q < Q; ++q) {
      const uint16_t* v = vals + q * s + t;
      const int32_t* ix = idx + q * s + t;
      int32_t pair;  // v_t in the low half, v_t+1 in the high half, broadcast straight from memory
      std::memcpy(&pair, v, sizeof pair);
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + static_cast<int64_t>(ix[0]) * TILE));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + static_cast<int64_t>(ix[1]) * TILE));
      const __m512i ab = _mm512_permutexvar_epi16(interleave, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
      acc[q] = _mm512_dpbf16_ps(acc[q], (__m512bh)_mm512_set1_epi32(pair), (__m512bh)ab);
    }
  if (t < s)  // odd s: the last entry pairs with a zero
    for (int q = 0; q < Q; ++q) {
      const int32_t single = vals[q * s + t];
      const __m256i a = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(base + static_cast<int64_t>(idx[q * s + t]) * TILE));
      const __m512i ab = _mm512_permutexvar_epi16(interleave, _mm512_zextsi256_si512(a));  // upper half zero
      acc[q] = _mm512_dpbf16_ps(acc[q], (__m512bh)_mm512_set1_epi32(single), (__m512bh)ab);
    }
  const int64_t rows = std::min(TILE, n - c * TILE);
  alignas(64) float out[Q][TILE];
  for (int q = 0; q < Q; ++q) _mm512_store_ps(out[q], acc[q]);
  for (int64_t l = 0; l < rows; ++l)
    for (int q = 0; q < Q; ++q) y[(c * TILE + l) * d2 + j + q] = out[q][l];
}

bool tiled_columns_bf16(const uint16_t* zt, const uint16_t* vals, const uint16_t* pat, float* y, int64_t n,
                        int64_t k, int64_t d2, int64_t s, int64_t words, int64_t begin, int64_t end) {
  alignas(64) int16_t order[32];
  for (int l = 0; l < 16; ++l) order[2 * l] = static_cast<int16_t>(l), order[2 * l + 1] = static_cast<int16_t>(16 + l);
  const __m512i interleave = _mm512_load_si512(order);
  const int64_t tiles = (n + TILE - 1) / TILE;
  std::vector<int32_t> rows(BLOCK * s + 16);
  for (int64_t jb = begin; jb < end; jb += BLOCK) {
    const int64_t je = std::min(end, jb + BLOCK);
    if (!column_rows(pat, words, k, s, jb, je, rows.data())) return false;
    for (int64_t c = 0; c < tiles; ++c) {
      int64_t j = jb;
      for (; j + 4 <= je; j += 4)
        tile_block_bf16<4>(zt, vals + j * s, rows.data() + (j - jb) * s, y, n, k, d2, s, j, c, interleave);
      for (; j < je; ++j)
        tile_block_bf16<1>(zt, vals + j * s, rows.data() + (j - jb) * s, y, n, k, d2, s, j, c, interleave);
    }
  }
  return true;
}

// y (n, d2) in float32 from z (n, k) in bf16 and bf16 values, n > 1.
at::Tensor bitmap_bf16(const at::Tensor& z, const at::Tensor& values, const at::Tensor& pattern) {
  const int64_t n = z.size(0), k = z.size(1), d2 = values.size(0), s = values.size(1), words = pattern.size(1);
  const int64_t tiles = (n + TILE - 1) / TILE;
  auto zt = at::zeros({tiles * TILE, k}, z.options());
  zt.narrow(0, 0, n).copy_(z);
  zt = zt.view({tiles, TILE, k}).transpose(1, 2).contiguous();  // (tiles, k, TILE)
  auto vals = values.contiguous();
  auto out = at::empty({n, d2}, z.options().dtype(at::kFloat));
  const auto* zp = reinterpret_cast<const uint16_t*>(zt.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(vals.data_ptr<at::BFloat16>());
  const uint16_t* pp = words_of(pattern);
  float* op = out.data_ptr<float>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, d2, BLOCK, [&](int64_t b, int64_t e) {
    if (!tiled_columns_bf16(zp, vp, pp, op, n, k, d2, s, words, b, e)) ok = false;
  });
  TORCH_CHECK(ok.load(), "dict_bitmap: a column of the pattern does not have exactly s = ", s, " bits");
  return out;
}
#endif

// y (n, d2) in float32 from z (n, k) in float32 and S as values and pattern.
at::Tensor bitmap_float(const at::Tensor& zf, const at::Tensor& values, const at::Tensor& pattern) {
  auto vals = values.contiguous();
  auto out = at::empty({zf.size(0), vals.size(0)}, zf.options());
  if (zf.size(0) == 0 || vals.size(0) == 0) return out;
  switch (vals.scalar_type()) {
    case at::kFloat: run<float>(zf, vals, pattern, out); break;
    case at::kBFloat16: run<c10::BFloat16>(zf, vals, pattern, out); break;
    case at::kHalf: run<c10::Half>(zf, vals, pattern, out); break;
    default: TORCH_CHECK(false, "dict_bitmap: values must be float32, bfloat16 or float16");
  }
  return out;
}

// y (n, d2) in float32 from z (n, k): bf16 products when z and the values are bf16 and
// there are several rows (and the CPU has AVX-512 BF16), float32 products otherwise.
at::Tensor bitmap_any(const at::Tensor& z, const at::Tensor& values, const at::Tensor& pattern) {
#ifdef COSPADI_BF16_TILES
  const bool bf16 = z.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16;
  if (z.size(0) > WALK_ROWS_BF16 && values.size(0) > 0 && bf16) return bitmap_bf16(z.contiguous(), values, pattern);
#endif
  return bitmap_float(z.to(at::kFloat).contiguous(), values, pattern);
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
  auto pat = pattern.contiguous();
  auto dict = dictionary.contiguous();
  if (n > GEMM_ROWS)  // z at x's dtype (bf16 products for a bf16 model, as its dense path)
    return bitmap_any(at::mm(x.contiguous(), dict.to(x.scalar_type())), values, pat).to(x.scalar_type());
  auto xf = x.to(at::kFloat).contiguous();
  auto z = at::empty({n, k}, xf.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dict.scalar_type(), "dict_bitmap", [&] {
    const scalar_t* dp = dict.data_ptr<scalar_t>();
    const float* xp = xf.data_ptr<float>();
    float* zp = z.data_ptr<float>();
    at::parallel_for(0, k, 128, [&](int64_t b, int64_t e) { dictionary_rows(xp, dp, zp, n, d1, k, b, e); });
  });
  const bool bf16_tiles = n > WALK_ROWS_BF16 && x.scalar_type() == at::kBFloat16;  // the tiles of a bf16 model
  return bitmap_any(bf16_tiles ? z.to(at::kBFloat16) : z, values, pat).to(x.scalar_type());
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
  auto fill = [&](auto v_tag, auto o_tag) {
    using V = decltype(v_tag);
    using O = decltype(o_tag);
    const V* vp = reinterpret_cast<const V*>(vals.data_ptr());
    O* op = reinterpret_cast<O*>(out.data_ptr());
    at::parallel_for(0, d2, 64, [&](int64_t b, int64_t e) {
      if (!dense_rows(vp, pp, op, atoms, d2, s, words, b, e)) ok = false;
    });
  };
  auto with_output = [&](auto v_tag) {
    switch (dtype) {
      case at::kFloat: fill(v_tag, float{}); break;
      case at::kBFloat16: fill(v_tag, c10::BFloat16{}); break;
      case at::kHalf: fill(v_tag, c10::Half{}); break;
      default: TORCH_CHECK(false, "bitmap_dense: dtype must be float32, bfloat16 or float16");
    }
  };
  switch (vals.scalar_type()) {
    case at::kFloat: with_output(float{}); break;
    case at::kBFloat16: with_output(c10::BFloat16{}); break;
    case at::kHalf: with_output(c10::Half{}); break;
    default: TORCH_CHECK(false, "bitmap_dense: values must be float32, bfloat16 or float16");
  }
  TORCH_CHECK(ok.load(), "bitmap_dense: a column of the pattern does not have exactly s = ", s, " bits");
  return out;
}

}  // namespace

TORCH_LIBRARY(cospadi_ell, m) {
  m.def("dict_bitmap(Tensor x, Tensor dictionary, Tensor values, Tensor pattern) -> Tensor");
  m.def("bitmap_dense(Tensor values, Tensor pattern, int atoms, ScalarType dtype) -> Tensor");
}
TORCH_LIBRARY_IMPL(cospadi_ell, CPU, m) {
  m.impl("dict_bitmap", &dict_bitmap);
  m.impl("bitmap_dense", &bitmap_dense);
}
"""
