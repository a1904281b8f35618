// AVX-512 vector helpers shared by the avx512bf16 and avx512 namespaces of maxsim_cpu.cpp. Included inside each
// namespace's `#pragma GCC target` region (the same text compiled twice under two target sets), so no include guard.
using Vf = __m512;
using Vi = __m512i;
static inline Vf v_zero() { return _mm512_setzero_ps(); }
static inline Vf v_load(const float* p) { return _mm512_loadu_ps(p); }
static inline Vf v_set1(float x) { return _mm512_set1_ps(x); }
static inline Vf v_fma(Vf a, Vf b, Vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline Vf v_add(Vf a, Vf b) { return _mm512_add_ps(a, b); }
static inline void v_store(float* p, Vf v) { _mm512_storeu_ps(p, v); }
static inline Vi vi_load(const int32_t* p) { return _mm512_loadu_si512(p); }
static inline void vi_store(int32_t* p, Vi v) { _mm512_storeu_si512(p, v); }
static inline void v_update(Vf s, Vf& m, Vi& id, int32_t j) {
  const __mmask16 gt = _mm512_cmp_ps_mask(s, m, _CMP_GT_OQ);
  m = _mm512_mask_mov_ps(m, gt, s);
  id = _mm512_mask_set1_epi32(id, gt, j);
}
// Lanes base[idx[l]] (the bias of a query tile that straddles a hole of the mask: see maxsim_fwd_tile_f32).
static inline Vf v_gather(const float* base, Vi idx) { return _mm512_i32gather_ps(idx, base, 4); }
static inline void cvt_f16_row(const uint16_t* s, int64_t n, float* d) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) _mm512_storeu_ps(d + k, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + k))));
  for (; k < n; ++k) d[k] = half_to_float(s[k]);
}
