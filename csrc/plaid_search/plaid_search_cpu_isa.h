// The plaid_search CPU kernels, compiled once per instruction-set level by plaid_search_cpu.cpp (each inclusion
// inside its own namespace under `#pragma GCC target`, with REATT_PS_LEVEL = 3 avx512_bf16, 2 avx512, 1 avx2, 0 scalar), so every
// path can be forced and tested on one machine (csrc/cpu_isa.h). No include guard: included once per level, on purpose.
// Semantics: reatt_kernels/reference/plaid_search.py. Costs: plaid_search_cpu.cpp.

constexpr int TILE = 32;  // document tokens decoded and scored together (two zmm of fp32 per dimension)

// ---- stage 1: centroid interaction ------------------------------------------------------------------------------------
// approx = sum_{i < nq} max_{t in doc} table[code_t, i]. One LP-float row (L2-resident: C LP 4 B = 512 KiB at C = 8192,
// LP = 16) and one 2- or 4-byte code per token; LP fixed at compile time so the row max is LP/16 zmm registers.
// An out-of-range code is clamped to row 0 and reported (`bad`): the kernel never reads past the table, and the cost
// of the check is one compare per token (no separate validation pass over the codes).
#define REATT_CI_SIMD (REATT_PS_LEVEL >= 2 ? 2 : REATT_PS_LEVEL)
#include "centroid_row_max_cpu.h"  // NOLINT: included once per ISA, on purpose
#undef REATT_CI_SIMD
template <int LP, typename Code>
static float ci_doc(const float* __restrict tab, int32_t nq, const Code* __restrict codes, int64_t t0, int64_t t1,
                    int64_t C, int* bad) {
  alignas(64) float acc[LP];
  if (ci_row_max<LP, Code>(tab, codes, t0, t1, C, acc)) *bad = 2;
  float s = 0.f;
  for (int i = 0; i < nq; ++i) s += acc[i];  // only the valid (packed-first) query tokens are summed
  return s;
}

// ---- stage 3: decode a tile of residuals, transposed: buf[d * TILE + j] = w[d, bucket(t0 + j, d)] ----------------------
// Bit layout (reatt_kernels/reference/residual_maxsim.py): dimension d in byte d * nbits / 8 at bit (d * nbits) % 8,
// LSB first. So the little-endian 32-bit word at byte 4 w holds dimensions w * 32 / nbits ... + 32 / nbits - 1.
// AVX-512: one gather fetches that word for 16 tokens; each dimension is then a shift, an AND and one vpermps from
// the dimension's 2^nbits weights held in a register (nbits <= 4), or a gather from the weight row (nbits = 8).
// About D / 16 * 4 instructions per token, against ~2,000 for a scalar decode at D = 384: the decode stops mattering
// next to the Lq * D / 16 FMAs that score the token.
template <int NBITS>
static void decode_tile(const float* __restrict w, const uint8_t* __restrict pk, int64_t P, int64_t D, int nt,
                        float* __restrict buf) {
  constexpr int K = 1 << NBITS, PER_BYTE = 8 / NBITS, MASK = K - 1;
  int64_t d_done = 0;
#if REATT_PS_LEVEL >= 2
  {
    constexpr int PER_WORD = 32 / NBITS;
    const int64_t words = P / 4;
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i mask = _mm512_set1_epi32(MASK);
    for (int h = 0; h < TILE / 16; ++h) {  // two halves of 16 tokens: one gather each per word
      const int nh = std::max(0, std::min(16, nt - 16 * h));
      const __mmask16 live = static_cast<__mmask16>((1u << nh) - 1u);
      const __m512i rows = _mm512_mullo_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(16 * h)),
                                              _mm512_set1_epi32(static_cast<int32_t>(P)));
      for (int64_t wd = 0; wd < words; ++wd) {
        const __m512i word = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live,
                                                         _mm512_add_epi32(rows, _mm512_set1_epi32(4 * wd)), pk, 1);
        for (int s = 0; s < PER_WORD; ++s) {
          const int64_t d = wd * PER_WORD + s;
          const __m512i idx = _mm512_and_si512(_mm512_srli_epi32(word, s * NBITS), mask);
          __m512 v;
          if constexpr (K <= 16) {
            // the dimension's K weights (K <= 16) as one register (masked load: lanes >= K are never indexed)
            const __m512 wk = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << K) - 1u), w + d * K);
            v = _mm512_permutexvar_ps(idx, wk);
          } else {
            v = _mm512_i32gather_ps(idx, w + d * K, 4);
          }
          _mm512_store_ps(buf + d * TILE + 16 * h, v);  // padding lanes (j >= nt) hold w[d, 0]: finite, never kept
        }
      }
    }
    d_done = words * PER_WORD;
  }
#endif
  for (int j = 0; j < TILE; ++j) {
    if (j >= nt) {
      for (int64_t d = d_done; d < D; ++d) buf[d * TILE + j] = 0.f;
      continue;
    }
    const uint8_t* row = pk + j * P;
    for (int64_t d = d_done; d < D; ++d) {
      const int byte = row[d / PER_BYTE];
      buf[d * TILE + j] = w[d * K + ((byte >> ((d % PER_BYTE) * NBITS)) & MASK)];
    }
  }
}

#if REATT_PS_LEVEL >= 2
// The AVX-512 micro-kernel: 6 query rows x 32 tokens per pass, 12 zmm accumulators; per dimension 2 tile loads and
// 6 broadcasts feed 12 FMAs (the loads, not the FMAs, would bind a 4-row x 16-token block: 5 loads per 4 FMAs).
// Lanes past nt (the tile's tail) are -inf before the max; a NaN pair score is skipped, as std::max(m, NaN) keeps m.
static void tile_maxdots(const float* __restrict q, int32_t nq, const float* __restrict buf, int64_t D, int nt,
                         const float* __restrict tab, int64_t LP, const int32_t* __restrict tcodes,
                         float* __restrict best) {
  constexpr int R = 6;
  const __m512i lp = _mm512_set1_epi32(static_cast<int32_t>(LP));
  const __m512i off0 = _mm512_mullo_epi32(_mm512_loadu_si512(tcodes), lp);
  const __m512i off1 = _mm512_mullo_epi32(_mm512_loadu_si512(tcodes + 16), lp);
  const __mmask16 m0 = static_cast<__mmask16>(nt >= 16 ? 0xFFFFu : (1u << nt) - 1u);
  const __mmask16 m1 = static_cast<__mmask16>(nt >= 32 ? 0xFFFFu : nt <= 16 ? 0u : (1u << (nt - 16)) - 1u);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i0 = 0; i0 < nq; i0 += R) {
    const int ni = static_cast<int>(std::min<int64_t>(R, nq - i0));
    const float* qr[R];
    for (int r = 0; r < R; ++r) qr[r] = q + std::min<int64_t>(i0 + r, nq - 1) * D;  // spare rows repeat a valid one
    __m512 acc0[R], acc1[R];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m512 t0 = _mm512_load_ps(buf + d * TILE), t1 = _mm512_load_ps(buf + d * TILE + 16);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m512 b = _mm512_set1_ps(qr[r][d]);
        acc0[r] = _mm512_fmadd_ps(b, t0, acc0[r]);
        acc1[r] = _mm512_fmadd_ps(b, t1, acc1[r]);
      }
    }
    for (int r = 0; r < ni; ++r) {
      const __m512i col = _mm512_set1_epi32(static_cast<int32_t>(i0 + r));
      const __m512 c0 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m0, _mm512_add_epi32(off0, col), tab, 4);
      const __m512 c1 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m1, _mm512_add_epi32(off1, col), tab, 4);
      __m512 s0 = _mm512_add_ps(acc0[r], c0), s1 = _mm512_add_ps(acc1[r], c1);
      s0 = _mm512_mask_mov_ps(ninf, m0 & _mm512_cmp_ps_mask(s0, s0, _CMP_ORD_Q), s0);
      s1 = _mm512_mask_mov_ps(ninf, m1 & _mm512_cmp_ps_mask(s1, s1, _CMP_ORD_Q), s1);
      best[i0 + r] = std::max(best[i0 + r], _mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
    }
  }
}
#else
// best[i] = max(best[i], max_j table[code_j, i] + q_i . buf[:, j]) for the nq valid query tokens, 4 at a time: each
// 32-float row of the transposed residual tile is loaded once for 4 FMAs (the compiler vectorises the j loop).
static void tile_maxdots(const float* __restrict q, int32_t nq, const float* __restrict buf, int64_t D, int nt,
                         const float* __restrict tab, int64_t LP, const int32_t* __restrict tcodes,
                         float* __restrict best) {
  for (int64_t i0 = 0; i0 < nq; i0 += 4) {
    const int ni = static_cast<int>(std::min<int64_t>(4, nq - i0));
    float acc[4][TILE] = {};
    const float* q0 = q + i0 * D;
    const float* q1 = q + std::min<int64_t>(i0 + 1, nq - 1) * D;  // spare rows repeat a valid one
    const float* q2 = q + std::min<int64_t>(i0 + 2, nq - 1) * D;
    const float* q3 = q + std::min<int64_t>(i0 + 3, nq - 1) * D;
    for (int64_t d = 0; d < D; ++d) {
      const float* row = buf + d * TILE;
      const float a0 = q0[d], a1 = q1[d], a2 = q2[d], a3 = q3[d];
      for (int j = 0; j < TILE; ++j) {
        acc[0][j] += a0 * row[j];
        acc[1][j] += a1 * row[j];
        acc[2][j] += a2 * row[j];
        acc[3][j] += a3 * row[j];
      }
    }
    for (int kq = 0; kq < ni; ++kq) {
      float m = best[i0 + kq];
      // std::max(m, NaN) keeps m: a NaN pair score is skipped (the documented semantics)
      for (int j = 0; j < nt; ++j) m = std::max(m, acc[kq][j] + tab[static_cast<int64_t>(tcodes[j]) * LP + i0 + kq]);
      best[i0 + kq] = m;
    }
  }
}
#endif

#if REATT_PS_LEVEL == 3
// ---- the avx512_bf16 rerank: vdpbf16ps, two dimensions per lane ------------------------------------------------------
// The decoded fp32 tile is rounded to bf16 and interleaved so that each 32-bit lane holds one token's pair of
// dimensions (2p, 2p + 1); each query row is rounded the same way once per call. One vdpbf16ps then does two
// multiply-adds per lane (fp32 accumulation): half the instructions of the fp32 micro-kernel.
// Rounding: both operands are rounded to nearest bf16 (relative error <= 2^-9 each), products and sums stay fp32, so
// |score - fp32 score| <= ~2^-8 sum_i max_t sum_d |q_id| |r_td| (plus fp32 rounding); the centroid half of every
// score comes from the fp32 table, untouched. tests/kernels/test_plaid_search.py checks this bound against the float64
// oracle; REATT_CPU_ISA=avx512 runs the fp32 rerank (fp32-level scores) on the same CPU.
static inline __m512i bf16_pairs(__m512 even, __m512 odd) {
  const __m512i e = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(even)));
  const __m512i o = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(odd)));
  return _mm512_or_si512(e, _mm512_slli_epi32(o, 16));
}

// pb[p * TILE + j] = bf16 pair (buf[2p][j], buf[2p + 1][j]) (a missing dimension 2p + 1 of an odd D is 0).
static void pack_pairs(const float* __restrict buf, int64_t D, uint32_t* __restrict pb) {
  const int64_t Dh = (D + 1) / 2;
  for (int64_t p = 0; p < Dh; ++p)
    for (int h = 0; h < TILE / 16; ++h) {
      const __m512 even = _mm512_load_ps(buf + 2 * p * TILE + 16 * h);
      const __m512 odd = 2 * p + 1 < D ? _mm512_load_ps(buf + (2 * p + 1) * TILE + 16 * h) : _mm512_setzero_ps();
      _mm512_store_si512(pb + p * TILE + 16 * h, bf16_pairs(even, odd));
    }
}

// tile_maxdots with bf16 pairs: qb [rows][Dh] (query rows as bf16 pairs), pb [Dh][TILE].
static void tile_maxdots_bf16(const uint32_t* __restrict qb, int32_t nq, const uint32_t* __restrict pb, int64_t Dh,
                              int nt, const float* __restrict tab, int64_t LP, const int32_t* __restrict tcodes,
                              float* __restrict best) {
  constexpr int R = 6;
  const __m512i lp = _mm512_set1_epi32(static_cast<int32_t>(LP));
  const __m512i off0 = _mm512_mullo_epi32(_mm512_loadu_si512(tcodes), lp);
  const __m512i off1 = _mm512_mullo_epi32(_mm512_loadu_si512(tcodes + 16), lp);
  const __mmask16 m0 = static_cast<__mmask16>(nt >= 16 ? 0xFFFFu : (1u << nt) - 1u);
  const __mmask16 m1 = static_cast<__mmask16>(nt >= 32 ? 0xFFFFu : nt <= 16 ? 0u : (1u << (nt - 16)) - 1u);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i0 = 0; i0 < nq; i0 += R) {
    const int ni = static_cast<int>(std::min<int64_t>(R, nq - i0));
    const uint32_t* qr[R];
    for (int r = 0; r < R; ++r) qr[r] = qb + std::min<int64_t>(i0 + r, nq - 1) * Dh;
    __m512 acc0[R], acc1[R];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < Dh; ++p) {
      const __m512bh t0 = reinterpret_cast<__m512bh>(_mm512_load_si512(pb + p * TILE));
      const __m512bh t1 = reinterpret_cast<__m512bh>(_mm512_load_si512(pb + p * TILE + 16));
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m512bh b = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int32_t>(qr[r][p])));
        acc0[r] = _mm512_dpbf16_ps(acc0[r], t0, b);
        acc1[r] = _mm512_dpbf16_ps(acc1[r], t1, b);
      }
    }
    for (int r = 0; r < ni; ++r) {
      const __m512i col = _mm512_set1_epi32(static_cast<int32_t>(i0 + r));
      const __m512 c0 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m0, _mm512_add_epi32(off0, col), tab, 4);
      const __m512 c1 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m1, _mm512_add_epi32(off1, col), tab, 4);
      __m512 s0 = _mm512_add_ps(acc0[r], c0), s1 = _mm512_add_ps(acc1[r], c1);
      s0 = _mm512_mask_mov_ps(ninf, m0 & _mm512_cmp_ps_mask(s0, s0, _CMP_ORD_Q), s0);
      s1 = _mm512_mask_mov_ps(ninf, m1 & _mm512_cmp_ps_mask(s1, s1, _CMP_ORD_Q), s1);
      best[i0 + r] = std::max(best[i0 + r], _mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
    }
  }
}
#endif

// The decompressed MaxSim of one document against the queries that selected it (`who`: query indices), from the
// table (centroid part) and the residual buckets: out[w] = sum_{i < nq} max_t (table[code_t, i] + q_i . r_t).
template <int NBITS, typename Code>
static void rerank_doc(const PlaidSearchArgs& A, const float* table, const float* q, const uint32_t* qb,
                       const int32_t* nv, const float* weights, const Code* codes, const uint8_t* packed,
                       const int64_t* off, int64_t b, const int64_t* who, int64_t n_who, float* out, float* buf,
                       uint32_t* pbuf, float* best, int* bad) {
  const int64_t P = A.D * NBITS / 8, LP = A.LP, D = A.D, C = A.C;
  int32_t tcodes[TILE];
  for (int64_t w = 0; w < n_who; ++w)
    for (int64_t i = 0; i < LP; ++i) best[w * LP + i] = -std::numeric_limits<float>::infinity();
  const int64_t t_end = off[b + 1];
  for (int64_t t0 = off[b]; t0 < t_end; t0 += TILE) {
    const int nt = static_cast<int>(std::min<int64_t>(TILE, t_end - t0));
    for (int j = 0; j < TILE; ++j) {
      const int32_t code = j < nt ? static_cast<int32_t>(codes[t0 + j]) : 0;
      const bool ok = code >= 0 && code < C;
      if (!ok) *bad = 2;
      tcodes[j] = ok ? code : 0;
    }
    decode_tile<NBITS>(weights, packed + t0 * P, P, D, nt, buf);
#if REATT_PS_LEVEL == 3
    const int64_t Dh = (D + 1) / 2;
    pack_pairs(buf, D, pbuf);
    for (int64_t w = 0; w < n_who; ++w) {
      const int64_t a = who[w];
      tile_maxdots_bf16(qb + a * LP * Dh, nv[a], pbuf, Dh, nt, table + a * C * LP, LP, tcodes, best + w * LP);
    }
#else
    (void)qb;
    (void)pbuf;
    for (int64_t w = 0; w < n_who; ++w) {
      const int64_t a = who[w];
      tile_maxdots(q + a * LP * D, nv[a], buf, D, nt, table + a * C * LP, LP, tcodes, best + w * LP);
    }
#endif
  }
  for (int64_t w = 0; w < n_who; ++w) {
    const int64_t a = who[w];
    float s = 0.f;
    for (int64_t i = 0; i < nv[a]; ++i) s += best[w * LP + i];  // an empty document keeps -inf: it scores -inf
    out[w] = s;                                                 // a query with no valid token sums nothing: 0
  }
}

// (score, row) order of every selection: higher score first, then the lower document row. NaN ranks as -inf.
static inline bool ranks_before(float sa, int64_t da, float sb, int64_t db) {
  sa = sa == sa ? sa : -std::numeric_limits<float>::infinity();
  sb = sb == sb ? sb : -std::numeric_limits<float>::infinity();
  return sa > sb || (sa == sb && da < db);
}

// The whole search, one parallel region: (1) centroid interaction of every (query, candidate), (2) each query's
// ncand best, (3) the rerank of those, each document decoded once for all queries that chose it, (4) each query's k
// best. `stage_s` (optional) receives the seconds of 1, 2 and 3 + 4.
template <int NBITS, typename Code>
static void plaid_search_impl(const PlaidSearchArgs& A) {
  using Clock = std::chrono::steady_clock;
  const auto* table = reinterpret_cast<const float*>(A.table);
  const auto* q = reinterpret_cast<const float*>(A.q);
  const auto* nv = reinterpret_cast<const int32_t*>(A.n_valid);
  const auto* weights = reinterpret_cast<const float*>(A.weights);
  const auto* codes = reinterpret_cast<const Code*>(A.codes);
  const auto* packed = reinterpret_cast<const uint8_t*>(A.packed);
  const auto* off = reinterpret_cast<const int64_t*>(A.offsets);
  const auto* live = reinterpret_cast<const uint8_t*>(A.live);
  const auto* allow = reinterpret_cast<const uint8_t*>(A.allow);
  const auto* cand = reinterpret_cast<const int64_t*>(A.cand);
  auto* out_s = reinterpret_cast<float*>(A.out_scores);
  auto* out_d = reinterpret_cast<int64_t*>(A.out_docs);
  auto* stage_s = reinterpret_cast<double*>(A.stage_s);
  const int64_t Bq = A.Bq, Nd = A.Nd, C = A.C, T = A.T, k = A.k;
  const int64_t Ncol = cand ? A.Nc : Nd;  // candidate columns per query
  const int64_t M = std::max<int64_t>(1, std::min(A.ncand, Ncol));
  const float NEG = -std::numeric_limits<float>::infinity();
  std::vector<float> approx(static_cast<size_t>(Bq * Ncol));
  std::vector<int64_t> sel(static_cast<size_t>(Bq * M), -1);   // chosen document rows, -1 padded
  std::vector<float> rer(static_cast<size_t>(Bq * M), NEG);    // their rerank scores
  std::vector<int64_t> pair_doc, pair_idx, group_off;          // (query, slot) pairs grouped by document
  int bad = 0;
  // avx512_bf16: every query row as bf16 pairs once per call ([Bq][LP][ceil(D / 2)], round to nearest even)
  std::vector<uint32_t> qb;
#if REATT_PS_LEVEL == 3
  {
    const int64_t Dh = (A.D + 1) / 2;
    qb.assign(static_cast<size_t>(Bq * A.LP * Dh), 0u);
    for (int64_t r = 0; r < Bq * A.LP; ++r)
      for (int64_t p = 0; p < Dh; ++p) {
        const uint32_t lo = float_to_bf16(q[r * A.D + 2 * p]);
        const uint32_t hi = 2 * p + 1 < A.D ? float_to_bf16(q[r * A.D + 2 * p + 1]) : 0u;
        qb[r * Dh + p] = lo | (hi << 16);
      }
  }
#endif
  Clock::time_point t_a = Clock::now(), t_b = t_a, t_c = t_a;
#pragma omp parallel num_threads(A.nthreads) reduction(max : bad)
  {
    // (1) centroid interaction. Work items are (query, 64 candidates): the table (one query's, L2-resident) and the
    // codes stream; excluded and empty documents cost one offset read.
    const int64_t chunks = (Ncol + 63) / 64;
#pragma omp for schedule(dynamic, 4)
    for (int64_t it = 0; it < Bq * chunks; ++it) {
      const int64_t a = it / chunks, c0 = (it % chunks) * 64, c1 = std::min(Ncol, c0 + 64);
      const float* tab = table + a * C * A.LP;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = cand ? cand[a * Ncol + c] : c;
        float s = NEG;
        if (b >= Nd) {
          bad = 1;
        } else if (b >= 0 && (!live || live[b]) && (!allow || allow[a * Nd + b])) {
          const int64_t t0 = off[b], t1 = off[b + 1];
          if (t0 < 0 || t1 < t0 || t1 > T) {
            bad = 3;
          } else if (nv[a] == 0) {
            s = 0.f;  // a sum over no query tokens
          } else if (t1 > t0) {
            switch (A.LP) {  // the row width is a compile-time constant of the inner loop
              case 16: s = ci_doc<16, Code>(tab, nv[a], codes, t0, t1, C, &bad); break;
              case 32: s = ci_doc<32, Code>(tab, nv[a], codes, t0, t1, C, &bad); break;
              case 48: s = ci_doc<48, Code>(tab, nv[a], codes, t0, t1, C, &bad); break;
              default: s = ci_doc<64, Code>(tab, nv[a], codes, t0, t1, C, &bad); break;
            }
          }  // an empty document: -inf, never selected
        }
        approx[a * Ncol + c] = s;
      }
    }
#pragma omp master
    t_b = Clock::now();
    // (2) each query's M best columns: a partial selection (nth_element, O(Ncol)), then sorted, so the rerank visits
    // documents in a fixed order whatever the thread count.
#pragma omp for schedule(static)
    for (int64_t a = 0; a < Bq; ++a) {
      std::vector<int64_t> cols;
      cols.reserve(static_cast<size_t>(Ncol));
      const float* ap = approx.data() + a * Ncol;
      for (int64_t c = 0; c < Ncol; ++c)
        if (ap[c] > NEG) cols.push_back(c);  // -inf (excluded, empty, padding) is never a candidate; NaN is not > -inf
      auto doc_of = [&](int64_t c) { return cand ? cand[a * Ncol + c] : c; };
      if (cand) {
        // a document listed twice is one candidate (both columns hold the same score): keep its first column
        std::stable_sort(cols.begin(), cols.end(), [&](int64_t x, int64_t y) { return doc_of(x) < doc_of(y); });
        cols.erase(std::unique(cols.begin(), cols.end(), [&](int64_t x, int64_t y) { return doc_of(x) == doc_of(y); }),
                   cols.end());
      }
      auto before = [&](int64_t x, int64_t y) { return ranks_before(ap[x], doc_of(x), ap[y], doc_of(y)); };
      const int64_t m = std::min<int64_t>(M, static_cast<int64_t>(cols.size()));
      if (m < static_cast<int64_t>(cols.size())) std::nth_element(cols.begin(), cols.begin() + m, cols.end(), before);
      std::sort(cols.begin(), cols.begin() + m, before);
      for (int64_t r = 0; r < m; ++r) sel[a * M + r] = doc_of(cols[r]);
    }
    // group the (query, slot) pairs by document, so each document is decoded once per call
#pragma omp single
    {
      t_c = Clock::now();
      std::vector<int64_t> idx;
      for (int64_t p = 0; p < Bq * M; ++p)
        if (sel[p] >= 0) idx.push_back(p);
      std::stable_sort(idx.begin(), idx.end(), [&](int64_t x, int64_t y) { return sel[x] < sel[y]; });
      pair_idx = idx;
      group_off.push_back(0);
      for (size_t u = 1; u <= idx.size(); ++u)
        if (u == idx.size() || sel[idx[u]] != sel[idx[u - 1]]) group_off.push_back(static_cast<int64_t>(u));
    }
    // (3) rerank: decompressed MaxSim of the chosen documents, one document per work item
    {
      std::vector<float> buf(static_cast<size_t>(A.D) * TILE + 16), best;
      std::vector<uint32_t> pairs(static_cast<size_t>((A.D + 1) / 2) * TILE + 16);
      std::vector<int64_t> who;
      std::vector<float> res;
      const int64_t n_groups = static_cast<int64_t>(group_off.size()) - 1;
#pragma omp for schedule(dynamic, 1)
      for (int64_t g = 0; g < n_groups; ++g) {
        const int64_t p0 = group_off[g], p1 = group_off[g + 1];
        who.resize(static_cast<size_t>(p1 - p0));
        res.resize(static_cast<size_t>(p1 - p0));
        best.resize(static_cast<size_t>((p1 - p0) * A.LP));
        for (int64_t p = p0; p < p1; ++p) who[p - p0] = pair_idx[p] / M;
        // 64-byte aligned tile: the decoder's zmm stores
        float* tile = buf.data() + ((64 - reinterpret_cast<uintptr_t>(buf.data()) % 64) % 64) / sizeof(float);
        uint32_t* ptile = pairs.data() + ((64 - reinterpret_cast<uintptr_t>(pairs.data()) % 64) % 64) / 4;
        rerank_doc<NBITS, Code>(A, table, q, qb.data(), nv, weights, codes, packed, off, sel[pair_idx[p0]],
                                who.data(), p1 - p0, res.data(), tile, ptile, best.data(), &bad);
        for (int64_t p = p0; p < p1; ++p) rer[pair_idx[p]] = res[p - p0];
      }
    }
    // (4) each query's k best reranked documents
#pragma omp for schedule(static)
    for (int64_t a = 0; a < Bq; ++a) {
      std::vector<int64_t> slot;
      for (int64_t u = 0; u < M; ++u)
        if (sel[a * M + u] >= 0 && rer[a * M + u] > NEG) slot.push_back(u);
      const float* rs = rer.data() + a * M;
      const int64_t* ds = sel.data() + a * M;
      auto before = [&](int64_t x, int64_t y) { return ranks_before(rs[x], ds[x], rs[y], ds[y]); };
      const int64_t m = std::min<int64_t>(k, static_cast<int64_t>(slot.size()));
      std::partial_sort(slot.begin(), slot.begin() + m, slot.end(), before);
      for (int64_t r = 0; r < k; ++r) {
        out_s[a * k + r] = r < m ? rs[slot[r]] : NEG;
        out_d[a * k + r] = r < m ? ds[slot[r]] : -1;
      }
    }
  }
  if (stage_s != nullptr) {
    const auto t_d = Clock::now();
    stage_s[0] = std::chrono::duration<double>(t_b - t_a).count();
    stage_s[1] = std::chrono::duration<double>(t_c - t_b).count();
    stage_s[2] = std::chrono::duration<double>(t_d - t_c).count();
  }
  REATT_CHECK(bad != 1, "plaid_search: a candidate document id is >= the number of documents");
  REATT_CHECK(bad != 2, "plaid_search: a token's centroid code is out of range [0, C)");
  REATT_CHECK(bad != 3, "plaid_search: d_offsets are not non-decreasing within [0, T]");
}
