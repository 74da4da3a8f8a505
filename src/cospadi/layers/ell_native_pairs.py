"""C++ source of the many-row bf16 kernel of the sparse path (spliced into
ell_native_source.SOURCE; ell_native.py builds it). docs/inference.md describes it.

y (n, d2) = z (n, k) S for a bf16 model and more than a few rows, with bf16 dot products
(`vdpbf16ps`: each float32 lane adds a0 b0 + a1 b1 of two bf16 pairs, products exact):
- z is laid out as row pairs: zt[c, m, l] is one 32-bit pair (z[16c + l, 2m], z[16c + l,
  2m + 1]), so one 64-byte load is 16 rows' values of atoms 2m and 2m + 1;
- each column's set bits are read as atom pairs: every pair m with at least one of its two
  bits set becomes one entry (m, (S[2m, j], S[2m + 1, j])), the absent one zero. With half
  the bits set that is about 3/4 of s entries, and one instruction serves two stored values
  of most of them, with no gather or shuffle in the inner loop;
- Q columns run together, each entry broadcast from memory and applied to NT tiles of 16
  rows, Q x NT independent chains; the columns' entry lists are padded with zeros to the
  longest of the Q."""

PAIRS_SOURCE = r"""
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__BMI2__)
#define COSPADI_BF16_PAIRS 1
constexpr int PAIR_Q = 4;  // columns per run of the inner loop
constexpr int PAIR_NT = 2;  // tiles of 16 rows per run
constexpr int64_t PAIR_BLOCK = 64;  // columns whose entries are decoded together

// Column p's entries (words words, tail: the last word's rows inside k, s values v) into
// off (16 m: the pair's place in a tile of zt) and val (the two values as one 32-bit word);
// returns the count, or -1 when the column does not have exactly s bits. Each of off and
// val needs room for ceil(k / 2) + 8 entries.
inline int64_t column_pairs(const uint16_t* p, int64_t words, uint32_t tail, int64_t s, const uint16_t* v,
                            int32_t* off, int32_t* val) {
  if (!column_count(p, words, tail, s)) return -1;
  int64_t count = 0;
  for (int64_t w = 0; w < words; ++w) {
    const uint32_t m = w + 1 < words ? p[w] : p[w] & tail;
    const uint32_t present = _pext_u32(m | (m >> 1), 0x5555u);  // pair i present: bit 2i or 2i + 1 set
#ifdef COSPADI_EXPAND
    const auto taken = static_cast<__mmask16>(_bzhi_u32(0xFFFFu, __builtin_popcount(m)));
    const __m256i spread = _mm256_maskz_expand_epi16(static_cast<__mmask16>(m), _mm256_maskz_loadu_epi16(taken, v));
    const __m256i places = _mm256_slli_epi32(_mm256_add_epi32(_mm256_set1_epi32(8 * w),
                                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), 4);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(val + count),
                        _mm256_maskz_compress_epi32(static_cast<__mmask8>(present), spread));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(off + count),
                        _mm256_maskz_compress_epi32(static_cast<__mmask8>(present), places));
    v += __builtin_popcount(m);
    count += __builtin_popcount(present);
#else
    for (uint32_t i = 0; i < 8; ++i) {
      if (!((present >> i) & 1u)) continue;
      const uint32_t lo = (m >> (2 * i)) & 1u ? *v++ : 0u;
      const uint32_t hi = (m >> (2 * i + 1)) & 1u ? *v++ : 0u;
      off[count] = static_cast<int32_t>(16 * (8 * w + i));
      val[count++] = static_cast<int32_t>(lo | (hi << 16));
    }
#endif
  }
  return count;
}

// Q columns (entries off[q] / val[q], `len` each after padding) against tiles c..c+NT-1 of
// zt (tile stride `stride` int32s); y (n, d2) bf16 gets rows 16c.. of columns j..j+Q-1.
template <int Q, int NT>
void pair_block(const int32_t* zt, int64_t stride, const int32_t* const* off, const int32_t* const* val,
                int64_t len, uint16_t* y, int64_t n, int64_t d2, int64_t j, int64_t c) {
  __m512 acc[Q][NT];
  for (int q = 0; q < Q; ++q)
    for (int u = 0; u < NT; ++u) acc[q][u] = _mm512_setzero_ps();
  const int32_t* base = zt + c * stride;
  for (int64_t t = 0; t < len; ++t)
    for (int q = 0; q < Q; ++q) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(val[q][t]);
      const int32_t* row = base + off[q][t];
      for (int u = 0; u < NT; ++u)
        acc[q][u] = _mm512_dpbf16_ps(acc[q][u], b, (__m512bh)_mm512_loadu_si512(row + u * stride));
    }
  alignas(64) uint16_t out[NT][Q][16];  // constant indices above keep acc in registers
  for (int u = 0; u < NT; ++u)
    for (int q = 0; q < Q; ++q)
      _mm256_store_si256(reinterpret_cast<__m256i*>(out[u][q]), (__m256i)_mm512_cvtneps_pbh(acc[q][u]));
  for (int u = 0; u < NT; ++u) {
    const int64_t first = (c + u) * 16, rows = std::min<int64_t>(16, n - first);
    for (int64_t l = 0; l < rows; ++l)
      for (int q = 0; q < Q; ++q) y[(first + l) * d2 + j + q] = out[u][q][l];
  }
}

// Columns begin..end of y, PAIR_BLOCK at a time: the block's entries are decoded once and
// serve every tile. False when a column does not have exactly s bits.
bool pair_columns(const int32_t* zt, int64_t k2, int64_t tiles, const uint16_t* vals, const uint16_t* pat,
                  uint16_t* y, int64_t n, int64_t k, int64_t d2, int64_t s, int64_t words, int64_t begin,
                  int64_t end) {
  const uint32_t tail = tail_bits(k, words);
  const int64_t room = k2 + 8, stride = k2 * 16;
  std::vector<int32_t> off(PAIR_BLOCK * room), val(PAIR_BLOCK * room);
  int64_t len[PAIR_BLOCK];
  for (int64_t jb = begin; jb < end; jb += PAIR_BLOCK) {
    const int64_t je = std::min(end, jb + PAIR_BLOCK);
    for (int64_t j = jb; j < je; ++j) {
      len[j - jb] = column_pairs(pat + j * words, words, tail, s, vals + j * s, &off[(j - jb) * room],
                                 &val[(j - jb) * room]);
      if (len[j - jb] < 0) return false;
    }
    for (int64_t g = jb; g < je; g += PAIR_Q) {  // pad each group of Q columns to its longest list
      const int64_t gq = std::min<int64_t>(PAIR_Q, je - g);
      const int64_t longest = *std::max_element(len + (g - jb), len + (g - jb) + gq);
      for (int64_t q = 0; q < gq; ++q)
        for (int64_t t = len[g - jb + q]; t < longest; ++t) off[(g - jb + q) * room + t] = val[(g - jb + q) * room + t] = 0;
      for (int64_t q = 0; q < gq; ++q) len[g - jb + q] = longest;
    }
    for (int64_t c = 0; c < tiles; c += PAIR_NT)
      for (int64_t j = jb; j < je;) {
        const int32_t* o[PAIR_Q];
        const int32_t* v[PAIR_Q];
        const int64_t gq = std::min<int64_t>(PAIR_Q, je - j);
        for (int64_t q = 0; q < gq; ++q) o[q] = &off[(j - jb + q) * room], v[q] = &val[(j - jb + q) * room];
        if (gq == PAIR_Q) {
          pair_block<PAIR_Q, PAIR_NT>(zt, stride, o, v, len[j - jb], y, n, d2, j, c);
          j += PAIR_Q;
        } else {
          pair_block<1, PAIR_NT>(zt, stride, o, v, len[j - jb], y, n, d2, j, c);
          j += 1;
        }
      }
  }
  return true;
}

// y (n, d2) in bf16 from z (n, k) in bf16 and bf16 values (d2, s), pattern (d2, words).
at::Tensor bitmap_pairs(const at::Tensor& z, const at::Tensor& values, const at::Tensor& pattern) {
  const int64_t n = z.size(0), k = z.size(1), d2 = values.size(0), s = values.size(1), words = pattern.size(1);
  const int64_t k2 = (k + 1) / 2, tiles = (n + 16 * PAIR_NT - 1) / (16 * PAIR_NT) * PAIR_NT;
  auto padded = at::zeros({tiles * 16, 2 * k2}, z.options());  // rows past n and the atom past an odd k: zero
  padded.narrow(0, 0, n).narrow(1, 0, k).copy_(z);
  auto zt = padded.view(at::kInt).view({tiles, 16, k2}).transpose(1, 2).contiguous();  // (tiles, k2, 16) pairs
  auto vals = values.contiguous();
  auto out = at::empty({n, d2}, z.options());
  const auto* vp = reinterpret_cast<const uint16_t*>(vals.data_ptr<at::BFloat16>());
  const uint16_t* pp = words_of(pattern);
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int32_t* zp = zt.data_ptr<int32_t>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, d2, PAIR_BLOCK / 2, [&](int64_t b, int64_t e) {
    if (!pair_columns(zp, k2, tiles, vp, pp, op, n, k, d2, s, words, b, e)) ok = false;
  });
  TORCH_CHECK(ok.load(), "dict_bitmap: a column of the pattern does not have exactly s = ", s, " bits");
  return out;
}
#endif
"""
