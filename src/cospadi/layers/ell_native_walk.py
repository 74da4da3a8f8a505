"""C++ source of the few-row part of the sparse path (spliced into ell_native_source.SOURCE):
z = x D in float32 with accumulators in registers, D's rows streamed once per group of up
to 4 rows of x and read at their stored width; then each column's bit walk against z
(each 16-bit word places the column's next values into its lanes with one register
expand, no gather and no index). docs/inference.md describes both."""

WALK_SOURCE = r"""
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

// z (n, k) = x (n, d1) D (d1, k) in float32, D read at its stored width; columns begin..end.
#ifdef COSPADI_EXPAND
// 16 entries of D from p as floats (the first `count` of them; zeros past it when Masked).
template <bool Masked>
inline __m512 load_dict16(const float* p, __mmask16 count) {
  return Masked ? _mm512_maskz_loadu_ps(count, p) : _mm512_loadu_ps(p);
}
template <bool Masked>
inline __m512 load_dict16(const c10::BFloat16* p, __mmask16 count) {  // bf16: the high half of a float
  const __m256i raw = Masked ? _mm256_maskz_loadu_epi16(count, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
template <bool Masked>
inline __m512 load_dict16(const c10::Half* p, __mmask16 count) {
  const __m256i raw = Masked ? _mm256_maskz_loadu_epi16(count, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_cvtph_ps(raw);
}

// R rows of z, columns c..c+16V-1 (`width` of them inside k): accumulators in registers,
// D's rows streamed once for the R rows.
template <int R, int V, bool Masked, typename W>
inline void dictionary_panel(const float* x, int64_t d1, const W* dict, int64_t k, float* z, int64_t ldz, int64_t c,
                             int64_t width) {
  __m512 acc[R][V];
  __mmask16 count[V];
  #pragma GCC unroll 16
  for (int v = 0; v < V; ++v) {
    count[v] = static_cast<__mmask16>(_bzhi_u32(0xFFFFu, static_cast<uint32_t>(std::clamp<int64_t>(width - 16 * v, 0, 16))));
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < d1; ++i) {
    const W* row = dict + i * k + c;
    if (i + 8 < d1)  // D's rows stream from memory: ask for the panel's lines 8 rows ahead
      for (int64_t b = 0; b < 16 * V * static_cast<int64_t>(sizeof(W)); b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(row + 8 * k) + b, _MM_HINT_T0);
    __m512 xi[R];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) xi[r] = _mm512_set1_ps(x[r * d1 + i]);
    #pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      const __m512 d = load_dict16<Masked>(row + 16 * v, count[v]);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r][v] = _mm512_fmadd_ps(xi[r], d, acc[r][v]);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 16
    for (int v = 0; v < V; ++v) _mm512_mask_storeu_ps(z + r * ldz + c + 16 * v, count[v], acc[r][v]);
}

// Rows r..r+R-1 of z over columns begin..end, in panels of 16V columns.
template <int R, typename W>
void dictionary_group(const float* x, int64_t d1, const W* dict, int64_t k, float* z, int64_t ldz, int64_t begin,
                      int64_t end) {
  constexpr int V = R <= 2 ? 8 : 4;
  int64_t c = begin;
  for (; c + 16 * V <= end; c += 16 * V) dictionary_panel<R, V, false>(x, d1, dict, k, z, ldz, c, 16 * V);
  if (c < end) dictionary_panel<R, V, true>(x, d1, dict, k, z, ldz, c, end - c);
}

// z's rows are ldz floats apart.
template <typename W>
void dictionary_rows(const float* x, const W* dict, float* z, int64_t ldz, int64_t n, int64_t d1, int64_t k,
                     int64_t begin, int64_t end) {
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) dictionary_group<4>(x + r * d1, d1, dict, k, z + r * ldz, ldz, begin, end);
  switch (n - r) {
    case 3: dictionary_group<3>(x + r * d1, d1, dict, k, z + r * ldz, ldz, begin, end); break;
    case 2: dictionary_group<2>(x + r * d1, d1, dict, k, z + r * ldz, ldz, begin, end); break;
    case 1: dictionary_group<1>(x + r * d1, d1, dict, k, z + r * ldz, ldz, begin, end); break;
    default: break;
  }
}

// One row of x (decoding): z (k floats, zeroed by the caller) += x[i] D[i, :] for the rows
// i0..i1 of D, each row read whole and in order, so D streams through memory without
// partial lines; z stays in L1.
template <typename W>
void dictionary_stream(const float* x, const W* dict, float* z, int64_t k, int64_t i0, int64_t i1) {
  const auto tail = static_cast<__mmask16>(_bzhi_u32(0xFFFFu, static_cast<uint32_t>(k % 16)));
  const int64_t whole = k - k % 16;
  for (int64_t i = i0; i < i1; ++i) {
    const W* row = dict + i * k;
    const __m512 xi = _mm512_set1_ps(x[i]);
    int64_t c = 0;
    for (; c < whole; c += 16)
      _mm512_storeu_ps(z + c, _mm512_fmadd_ps(xi, load_dict16<false>(row + c, 0xFFFF), _mm512_loadu_ps(z + c)));
    if (tail)
      _mm512_mask_storeu_ps(z + c, tail, _mm512_fmadd_ps(xi, load_dict16<true>(row + c, tail),
                                                         _mm512_maskz_loadu_ps(tail, z + c)));
  }
}
#else
// Four rows of D are converted per step and applied to every row of x, so z's block
// (n x 128 floats) is read and written once per four rows of D.
template <typename W>
void dictionary_rows(const float* x, const W* dict, float* z, int64_t ldz, int64_t n, int64_t d1, int64_t k,
                     int64_t begin, int64_t end) {
  constexpr int64_t CB = 128;
  float buf[4][CB];
  for (int64_t cb = begin; cb < end; cb += CB) {
    const int64_t w = std::min(CB, end - cb);
    for (int64_t r = 0; r < n; ++r) std::fill(z + r * ldz + cb, z + r * ldz + cb + w, 0.0f);
    for (int64_t i = 0; i < d1; i += 4) {
      const int64_t m = std::min<int64_t>(4, d1 - i);
      for (int q = 0; q < 4; ++q)
        for (int64_t c = 0; c < w; ++c) buf[q][c] = q < m ? to_float(dict[(i + q) * k + cb + c]) : 0.0f;
      for (int64_t r = 0; r < n; ++r) {
        const float* xr = x + r * d1 + i;
        const float a0 = xr[0], a1 = m > 1 ? xr[1] : 0.0f, a2 = m > 2 ? xr[2] : 0.0f, a3 = m > 3 ? xr[3] : 0.0f;
        float* zr = z + r * ldz + cb;
        for (int64_t c = 0; c < w; ++c) zr[c] += a0 * buf[0][c] + a1 * buf[1][c] + a2 * buf[2][c] + a3 * buf[3][c];
      }
    }
  }
}

template <typename W>
void dictionary_stream(const float* x, const W* dict, float* z, int64_t k, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t c = 0; c < k; ++c) z[c] += x[i] * to_float(dict[i * k + c]);
}
#endif

"""
