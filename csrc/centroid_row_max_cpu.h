// The row max of the centroid interaction, shared by plaid_search and centroid_interaction: for the tokens t0..t1-1
// of one document (t1 > t0), acc[i] = max_t tab[code_t * LP + i] for i < LP. Returns 1 if a code was outside [0, C) (it
// read row 0 instead: never past the table). No include guard: included once per instruction-set level, inside that
// level's namespace, with REATT_CI_SIMD = 2 (AVX-512), 1 (AVX2) or 0 (scalar) defined by the includer.
//
// SIMD levels: the row max in LP / W vector registers, written with intrinsics because GCC does not vectorise the
// plain loop of the scalar level (measured: it compiled to 16 scalar loads and vmaxss per token at LP = 16, about 20x
// slower on real text). Two accumulator sets take the even and the odd tokens, so one token's max never waits on the
// previous one's (the vmaxps latency, not the L2 row load, would bind a single chain); they are merged once per
// document. Per token: one code load, LP / W row loads and as many maxes. std::max(acc, r) keeps acc when either is
// NaN; ci_max(r, acc) (max_ps) returns its second operand then too.
#if REATT_CI_SIMD >= 1
#if REATT_CI_SIMD >= 2
using CiVec = __m512;
constexpr int CI_W = 16;
static inline CiVec ci_load(const float* p) { return _mm512_loadu_ps(p); }
static inline CiVec ci_max(CiVec r, CiVec acc) { return _mm512_max_ps(r, acc); }
static inline void ci_store(float* p, CiVec v) { _mm512_storeu_ps(p, v); }
#else
using CiVec = __m256;
constexpr int CI_W = 8;
static inline CiVec ci_load(const float* p) { return _mm256_loadu_ps(p); }
static inline CiVec ci_max(CiVec r, CiVec acc) { return _mm256_max_ps(r, acc); }
static inline void ci_store(float* p, CiVec v) { _mm256_storeu_ps(p, v); }
#endif
template <int LP, typename Code>
static int ci_row_max(const float* __restrict tab, const Code* __restrict codes, int64_t t0, int64_t t1, int64_t C,
                      float* __restrict acc) {
  constexpr int W = CI_W;
  constexpr int NV = LP / W;
  int32_t bad_code = 0;
  auto row = [&](int64_t t) {
    const int32_t code = static_cast<int32_t>(codes[t]);
    const bool ok = code >= 0 && code < C;
    bad_code |= !ok;
    return tab + static_cast<int64_t>(ok ? code : 0) * LP;
  };
  CiVec a[NV], b[NV];
  {
    const float* r = row(t0);
    for (int v = 0; v < NV; ++v) a[v] = b[v] = ci_load(r + v * W);  // max is idempotent: both sets start at token t0
  }
  int64_t t = t0 + 1;
  for (; t + 1 < t1; t += 2) {
    const float* ra = row(t);
    const float* rb = row(t + 1);
    for (int v = 0; v < NV; ++v) {
      a[v] = ci_max(ci_load(ra + v * W), a[v]);
      b[v] = ci_max(ci_load(rb + v * W), b[v]);
    }
  }
  if (t < t1) {
    const float* ra = row(t);
    for (int v = 0; v < NV; ++v) a[v] = ci_max(ci_load(ra + v * W), a[v]);
  }
  for (int v = 0; v < NV; ++v) ci_store(acc + v * W, ci_max(b[v], a[v]));
  return bad_code;
}
#else
template <int LP, typename Code>
static int ci_row_max(const float* __restrict tab, const Code* __restrict codes, int64_t t0, int64_t t1, int64_t C,
                      float* __restrict acc) {
  int32_t bad_code = 0;
  {
    const int32_t code = static_cast<int32_t>(codes[t0]);
    const bool ok = code >= 0 && code < C;
    bad_code |= !ok;
    const float* r = tab + static_cast<int64_t>(ok ? code : 0) * LP;
    for (int i = 0; i < LP; ++i) acc[i] = r[i];
  }
  for (int64_t t = t0 + 1; t < t1; ++t) {
    const int32_t code = static_cast<int32_t>(codes[t]);
    const bool ok = code >= 0 && code < C;
    bad_code |= !ok;
    const float* r = tab + static_cast<int64_t>(ok ? code : 0) * LP;
    for (int i = 0; i < LP; ++i) acc[i] = std::max(acc[i], r[i]);
  }
  return bad_code;
}
#endif
