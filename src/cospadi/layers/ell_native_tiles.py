"""C++ source of the many-row float32 part of the sparse path and of the dense path's S^T
build (spliced into ell_native_source.SOURCE): a block of columns' rows decoded from the
bits once, then 16-row tiles of a transposed z multiply-added per stored entry; and S^T
(d2, k) written from the values and the bits. docs/inference.md describes both."""

TILES_SOURCE = r"""
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

// S^T's rows begin..end (out: row `begin`, rows ld apart, ld >= k): row j holds column j's
// values at its set bits, zero elsewhere up to k; values V, output O (float32, bf16 or fp16).
// Returns false when a column does not have exactly s bits.
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
                int64_t begin, int64_t end, int64_t ld) {
  const uint32_t tail = tail_bits(k, words);
  for (int64_t j = begin; j < end; ++j) {
    const V* v = vals + j * s;
    const uint16_t* p = pat + j * words;
    O* row = out + (j - begin) * ld;
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

// More rows than the walk takes: tiles of a transposed z (float32 products).
template <typename V>
void run(const at::Tensor& zf, const at::Tensor& vals, const at::Tensor& pattern, at::Tensor& out) {
  const int64_t n = zf.size(0), k = zf.size(1), d2 = vals.size(0), s = vals.size(1), words = pattern.size(1);
  const V* vp = vals.data_ptr<V>();
  const uint16_t* pp = words_of(pattern);
  float* op = out.data_ptr<float>();
  std::atomic<bool> ok{true};
  const int64_t tiles = (n + TILE - 1) / TILE;
  auto zt = at::zeros({tiles * TILE, k}, zf.options());
  zt.narrow(0, 0, n).copy_(zf);
  zt = zt.view({tiles, TILE, k}).transpose(1, 2).contiguous();  // (tiles, k, TILE)
  const float* zp = zt.data_ptr<float>();
  at::parallel_for(0, d2, BLOCK, [&](int64_t b, int64_t e) {
    if (!tiled_columns(zp, vp, pp, op, n, k, d2, s, words, b, e)) ok = false;
  });
  TORCH_CHECK(ok.load(), "dict_bitmap: a column of the pattern does not have exactly s = ", s, " bits");
}

"""
