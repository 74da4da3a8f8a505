"""C++ source of the many-row bf16 kernel of the sparse path (spliced into
ell_native_source.SOURCE; ell_native.py builds it). docs/inference.md describes it.

y (n, d2) = z (n, k) S for a bf16 model and more than a few rows, as a GEMM whose B operand
is decoded from the stored form of S instead of read from a materialised S^T, with bf16 dot
products (`vdpbf16ps`: each float32 lane adds a0 b0 + a1 b1 of two bf16 pairs, products
exact, one float32 sum per output rounded once to bf16):
- a panel of PANEL_WIDTH (48) columns of S is decoded from the bits into dense rows (the
  dense path's S^T rows, zero where no bit is set; dense_rows) and transposed into atom
  pairs: panel[m][j] is the 32-bit pair (S[2m, j], S[2m + 1, j]), so one 64-byte load is 16
  columns' values of atoms 2m and 2m + 1. The panel (48 ceil(k / 2) words, 44 KiB at k = 460)
  stays in the core's caches while every row of z runs against it;
- z needs no new layout: row r's atoms 2m and 2m + 1 are adjacent bf16s, one 32-bit word,
  broadcast to every lane;
- PANEL_ROWS (8) rows x 3 vectors of 16 columns accumulate in 24 registers: per atom pair,
  3 loads of the panel and 8 broadcasts of z serve 24 dot products (then 4, 2, 1 rows for
  the rest). Outputs are whole 16-column stores into y's rows.
This does the dense path's multiply-adds (no zero is skipped: at half density unstructured
sparsity cannot be register-tiled), but S^T is never written to memory and read back, which
at 16-128 rows was a quarter to a third of the dense path's time in the model."""

PANELS_SOURCE = r"""
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define COSPADI_BF16_PANELS 1
constexpr int PANEL_VECTORS = 3;                    // 16-column vectors per panel
constexpr int64_t PANEL_WIDTH = 16 * PANEL_VECTORS;  // columns per panel
constexpr int PANEL_ROWS = 8;                        // rows of z per run of the inner loop

// 16 x 16 int32 transpose: out[i * ldo + c] = in[c * ldi + i].
inline void transpose16(const int32_t* in, int64_t ldi, int32_t* out, int64_t ldo) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(in + i * ldi);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8)
    for (int e = 0; e < 4; ++e) {
      t[i + e] = _mm512_shuffle_i32x4(r[i + e], r[i + 4 + e], 0x88);
      t[i + 4 + e] = _mm512_shuffle_i32x4(r[i + e], r[i + 4 + e], 0xDD);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + i * ldo, r[i]);
}

// panel[m * PANEL_WIDTH + c] = rows[c * k2 + m]: PANEL_WIDTH dense rows of k2 pairs into atom-pair order.
inline void pack_panel(const int32_t* rows, int64_t k2, int32_t* panel) {
  const int64_t whole = k2 / 16 * 16;
  for (int64_t c = 0; c < PANEL_WIDTH; c += 16)
    for (int64_t m = 0; m < whole; m += 16) transpose16(rows + c * k2 + m, k2, panel + m * PANEL_WIDTH + c, PANEL_WIDTH);
  for (int64_t c = 0; c < PANEL_WIDTH; ++c)
    for (int64_t m = whole; m < k2; ++m) panel[m * PANEL_WIDTH + c] = rows[c * k2 + m];
}

// Atoms 2m and 2m + 1 of a row of z as one 32-bit word (the second zero past an odd k).
inline int32_t z_pair(const uint16_t* row, int64_t m, int64_t k) {
  if (2 * m + 1 < k) {
    int32_t pair;
    std::memcpy(&pair, row + 2 * m, sizeof pair);
    return pair;
  }
  return row[2 * m];
}

// y rows r0..r0+R-1 (row stride d2), columns j..j+width-1, from z rows (row stride k) and
// one panel (k2 steps of PANEL_WIDTH pairs); the panel's columns past `width` are not stored.
template <int R>
void panel_rows(const uint16_t* z, int64_t k, const int32_t* panel, int64_t k2, uint16_t* y, int64_t d2,
                int64_t width) {
  __m512 acc[R][PANEL_VECTORS];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < PANEL_VECTORS; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t m = 0; m < k2; ++m) {
    __m512bh b[PANEL_VECTORS];
    for (int c = 0; c < PANEL_VECTORS; ++c)
      b[c] = (__m512bh)_mm512_loadu_si512(panel + m * PANEL_WIDTH + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(z_pair(z + r * k, m, k));
      for (int c = 0; c < PANEL_VECTORS; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < PANEL_VECTORS && 16 * c < width; ++c) {
      const __m256i v = (__m256i)_mm512_cvtneps_pbh(acc[r][c]);
      const int64_t left = std::min<int64_t>(16, width - 16 * c);
      _mm256_mask_storeu_epi16(y + r * d2 + 16 * c, static_cast<__mmask16>((1u << left) - 1u), v);
    }
}

// Panels begin..end (columns PANEL_WIDTH p ..) of y (n, d2) from z (n, k); false when a
// column does not have exactly s bits.
bool panel_columns(const uint16_t* z, int64_t n, int64_t k, const c10::BFloat16* vals, const uint16_t* pat,
                   uint16_t* y, int64_t d2, int64_t s, int64_t words, int64_t begin, int64_t end) {
  const int64_t k2 = (k + 1) / 2;
  // zeroed once: dense_rows rewrites atoms 0..k-1 of each panel's columns, so the atom past an odd k stays
  // zero; the rows past d2 in the last panel keep earlier columns' values, whose sums are never stored
  std::vector<int32_t> rows(PANEL_WIDTH * k2, 0), panel(PANEL_WIDTH * k2);
  for (int64_t p = begin; p < end; ++p) {
    const int64_t j = p * PANEL_WIDTH, width = std::min<int64_t>(PANEL_WIDTH, d2 - j);
    if (!dense_rows(vals, pat, reinterpret_cast<c10::BFloat16*>(rows.data()), k, d2, s, words, j, j + width, 2 * k2))
      return false;
    pack_panel(rows.data(), k2, panel.data());
    const int32_t* pan = panel.data();
    int64_t r = 0;
    for (; r + PANEL_ROWS <= n; r += PANEL_ROWS) panel_rows<PANEL_ROWS>(z + r * k, k, pan, k2, y + r * d2 + j, d2, width);
    if (r + 4 <= n) panel_rows<4>(z + r * k, k, pan, k2, y + r * d2 + j, d2, width), r += 4;
    if (r + 2 <= n) panel_rows<2>(z + r * k, k, pan, k2, y + r * d2 + j, d2, width), r += 2;
    if (r < n) panel_rows<1>(z + r * k, k, pan, k2, y + r * d2 + j, d2, width);
  }
  return true;
}

// y (n, d2) in bf16 from z (n, k) in bf16 and bf16 values (d2, s), pattern (d2, words).
at::Tensor bitmap_panels(const at::Tensor& z, const at::Tensor& values, const at::Tensor& pattern) {
  const int64_t n = z.size(0), k = z.size(1), d2 = values.size(0), s = values.size(1), words = pattern.size(1);
  auto zc = z.contiguous();
  auto vals = values.contiguous();
  auto out = at::empty({n, d2}, z.options());
  const auto* zp = reinterpret_cast<const uint16_t*>(zc.data_ptr<at::BFloat16>());
  const auto* vp = vals.data_ptr<at::BFloat16>();
  const uint16_t* pp = words_of(pattern);
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  std::atomic<bool> ok{true};
  at::parallel_for(0, (d2 + PANEL_WIDTH - 1) / PANEL_WIDTH, 1, [&](int64_t b, int64_t e) {
    if (!panel_columns(zp, n, k, vp, pp, op, d2, s, words, b, e)) ok = false;
  });
  TORCH_CHECK(ok.load(), "dict_bitmap: a column of the pattern does not have exactly s = ", s, " bits");
  return out;
}
#endif
"""
