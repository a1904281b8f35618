// NO include guard: this file is included once per instruction set by maxsim_cpu.cpp (see below).
// MaxSim CPU kernels for ONE instruction set. maxsim_cpu.cpp includes this file once per ISA, inside a namespace
// (avx512 / avx2 / scalar) and under a `#pragma GCC target(...)`, after defining the vector primitives:
//   constexpr int W;  Vf / Vi (W floats / int32s);  v_zero, v_load, v_set1, v_fma, v_add, v_store, vi_load,
//   vi_store, v_update(s, m, idx, j) (where s > m: m = s, idx = j: strict, so ties keep the lowest j),
//   v_gather(base, idx) (lanes base[idx[l]]), cvt_f16_row(src, n, dst); and REATT_BF16DP (1 where the AVX512_BF16
//   pair kernel exists).
// So one kernel source compiles to every ISA and the driver picks one at run time; no -march=native.
//
// The micro-kernel vectorises over QUERY tokens: an accumulator holds s[i0 .. i0+W, j] for one document token j,
// so the max over j is an elementwise max across accumulators (no horizontal reductions), and the document element
// d[j, k] is a scalar broadcast straight from memory (an embedded-broadcast FMA operand on AVX-512). A register tile
// is NI vectors of query tokens x NJ document tokens: per k it loads NI query vectors (from q^T, L1-resident) and NJ
// broadcasts, and issues NI * NJ FMAs. With NI = 2, NJ = 12 on AVX-512 (24 zmm accumulators) a 32-token query is
// one tile row, so every document token is read from memory exactly once per query block: the kernel streams the
// corpus at 4 bytes per 2 * 32 FLOPs (fp32) and stays FMA-bound. The next document is prefetched from inside the
// tiles (two lines per k step), so its DRAM reads overlap the current document's FMAs.
// The query tokens are the VALID ones only, packed in order into the first lanes (fwd_pack_query): a query with n of
// its Lq tokens valid costs ceil(n / W) vectors, whatever the positions of its masked tokens.
//
// Paths (measured on the 2-core AMD EPYC dev VM, Zen 4, 1 thread, 1 query x 4000 docs x 128 x 128, thread CPU time):
// - fp32, plain FMA tile (isa avx512; avx2 the same on Zen 4): ~93-103 GFLOP/s per core (about the fp32 FMA peak);
// - fp32, portable vector-extension tile (isa scalar, SSE2 here): ~31 GFLOP/s per core;
// - bf16, VDPBF16PS tile (avx512_bf16):                   ~190 GFLOP/s per core (about the bf16 dot-product peak);
// - fp32 / fp16 through the bf16 filter + exact fp32 rescoring (avx512_bf16, see fwd_doc_filtered): ~125-130
//   GFLOP/s per core at fixed length, ~115 ragged (48-128 tokens), with results equal to an fp32 scan.

using namespace ::reatt::maxsim_cpu;

#ifndef REATT_PRAGMA_UNROLL
#define REATT_PRAGMA_UNROLL _Pragma("GCC unroll 32")
#endif

// ---- forward micro-kernels ---------------------------------------------------------------------------------------------
// s[p, j] = sum_k qT[k, p] * d[j, k] for the packed query lanes p in [p0, p0 + NI * W) (qT already offset to p0) and
// j in [j0, j0 + NJ), then fold into the running (max, argmax) of each lane. Lane p holds the query's valid token
// i = qidx[p] (fwd_pack_query), so the bias of (p, j) is bias_tab[i - j + Lmax - 1]:
// - gidx == nullptr: the tile's original indices are consecutive (every tile of a prefix mask), and `bias` points at
//   bias_tab + (Lmax - 1) + qidx[p0] - j0, so the bias of (p0 + ni * W + lane, j0 + nj) is bias[ni * W - nj + lane];
// - gidx == qidx + p0 (a tile that straddles a hole of the mask): `bias` points at bias_tab + (Lmax - 1) - j0 and the
//   bias of that pair is gathered from bias[gidx[ni * W + lane] - nj] (NI * NJ gathers of W lanes per tile, against
//   NI * NJ * D FMAs).
// jmask (nullable) is d_mask + j0.
// FLOPs: 2 * NI * W * NJ * D. Bytes: NJ * D * 4 from the document rows (the q^T tile is L1-resident).
template <int NI, int NJ, bool HAS_BIAS>
static inline void maxsim_fwd_tile_f32(const float* __restrict qT, int64_t ldq, const float* __restrict drow,
                                       int64_t ldd, int64_t D, const float* __restrict bias,
                                       const int32_t* __restrict gidx, const uint8_t* __restrict jmask, int32_t j0,
                                       float* __restrict mx, int32_t* __restrict idx, const char* pf, int64_t npf) {
  Vf acc[NI][NJ];
  REATT_PRAGMA_UNROLL
  for (int ni = 0; ni < NI; ++ni) {
    REATT_PRAGMA_UNROLL
    for (int nj = 0; nj < NJ; ++nj) acc[ni][nj] = v_zero();
  }
  const float* dr[NJ];
  REATT_PRAGMA_UNROLL
  for (int nj = 0; nj < NJ; ++nj) dr[nj] = drow + nj * ldd;
  for (int64_t k = 0; k < D; ++k) {
    // Up to two lines of the next document per step, so its DRAM reads overlap this tile's FMAs.
    if (2 * k < npf) __builtin_prefetch(pf + 2 * k * 64, 0, 2);
    if (2 * k + 1 < npf) __builtin_prefetch(pf + (2 * k + 1) * 64, 0, 2);
    Vf qv[NI];
    REATT_PRAGMA_UNROLL
    for (int ni = 0; ni < NI; ++ni) qv[ni] = v_load(qT + k * ldq + ni * W);
    REATT_PRAGMA_UNROLL
    for (int nj = 0; nj < NJ; ++nj) {
      const Vf b = v_set1(dr[nj][k]);
      REATT_PRAGMA_UNROLL
      for (int ni = 0; ni < NI; ++ni) acc[ni][nj] = v_fma(qv[ni], b, acc[ni][nj]);
    }
  }
  REATT_PRAGMA_UNROLL
  for (int ni = 0; ni < NI; ++ni) {
    Vf m = v_load(mx + ni * W);
    Vi id = vi_load(idx + ni * W);
    const bool gather = HAS_BIAS && gidx != nullptr;
    const Vi gi = gather ? vi_load(gidx + ni * W) : Vi{};
    REATT_PRAGMA_UNROLL
    for (int nj = 0; nj < NJ; ++nj) {
      if (jmask != nullptr && !jmask[nj]) continue;  // a masked document token never wins
      Vf s = acc[ni][nj];
      if (HAS_BIAS) s = v_add(s, gather ? v_gather(bias - nj, gi) : v_load(bias + ni * W - nj));
      v_update(s, m, id, j0 + nj);
    }
    v_store(mx + ni * W, m);
    vi_store(idx + ni * W, id);
  }
}

#if REATT_BF16DP
// Same tile on bf16 pairs with VDPBF16PS: qP[kk, i] holds (q[i, 2kk], q[i, 2kk+1]) in one 32-bit word and the
// document pair (d[j, 2kk], d[j, 2kk+1]) is a 32-bit broadcast, so one instruction does 2 * W multiply-adds with
// exact bf16 x bf16 products accumulated in fp32. Twice the FLOPs per instruction of the fp32 tile, half the bytes.
// STORE = false: fold into (max, argmax) as the fp32 tile does (bf16 inputs: the result is exact).
// STORE = true: the fp32 filter's first pass: store s~ (+ bias) to sbuf[nj * lds + ni * W + lane] and fold only the
// max (no argmax), for the exact rescoring pass (see fwd_doc_filtered).
template <int NI, int NJ, bool HAS_BIAS, bool STORE>
static inline void maxsim_fwd_tile_bf16(const uint32_t* __restrict qP, int64_t ldq, const uint16_t* __restrict drow,
                                        int64_t ldd, int64_t Dh, const float* __restrict bias,
                                        const int32_t* __restrict gidx, const uint8_t* __restrict jmask, int32_t j0,
                                        float* __restrict mx, int32_t* __restrict idx, float* __restrict sbuf,
                                        int64_t lds, float* __restrict m2, const char* pf, int64_t npf) {
  __m512 acc[NI][NJ];
  REATT_PRAGMA_UNROLL
  for (int ni = 0; ni < NI; ++ni) {
    REATT_PRAGMA_UNROLL
    for (int nj = 0; nj < NJ; ++nj) acc[ni][nj] = _mm512_setzero_ps();
  }
  const uint16_t* dr[NJ];
  REATT_PRAGMA_UNROLL
  for (int nj = 0; nj < NJ; ++nj) dr[nj] = drow + nj * ldd;
  for (int64_t kk = 0; kk < Dh; ++kk) {
    if (2 * kk < npf) __builtin_prefetch(pf + 2 * kk * 64, 0, 2);
    if (2 * kk + 1 < npf) __builtin_prefetch(pf + (2 * kk + 1) * 64, 0, 2);
    __m512i qv[NI];
    REATT_PRAGMA_UNROLL
    for (int ni = 0; ni < NI; ++ni) qv[ni] = _mm512_loadu_si512(qP + kk * ldq + ni * 16);
    REATT_PRAGMA_UNROLL
    for (int nj = 0; nj < NJ; ++nj) {
      uint32_t pair;
      std::memcpy(&pair, dr[nj] + 2 * kk, 4);
      const __m512i b = _mm512_set1_epi32(static_cast<int>(pair));
      REATT_PRAGMA_UNROLL
      for (int ni = 0; ni < NI; ++ni) acc[ni][nj] = _mm512_dpbf16_ps(acc[ni][nj], (__m512bh)qv[ni], (__m512bh)b);
    }
  }
  REATT_PRAGMA_UNROLL
  for (int ni = 0; ni < NI; ++ni) {
    Vf m = v_load(mx + ni * W);
    Vi id = vi_load(idx + ni * W);
    Vf sec = STORE ? v_load(m2 + ni * W) : v_zero();
    __mmask16 nan = 0;
    const bool gather = HAS_BIAS && gidx != nullptr;
    const Vi gi = gather ? vi_load(gidx + ni * W) : Vi{};
    REATT_PRAGMA_UNROLL
    for (int nj = 0; nj < NJ; ++nj) {
      Vf s = acc[ni][nj];
      if (HAS_BIAS) s = v_add(s, gather ? v_gather(bias - nj, gi) : v_load(bias + ni * W - nj));
      if (STORE) v_store(sbuf + nj * lds + ni * W, s);
      if (jmask != nullptr && !jmask[nj]) continue;
      if (STORE) {
        // The runner-up M2~ over every valid j but the winner (ties included): if s > m the old m becomes it, else s
        // may. Pass 2 scans S only in lanes where M2~ can reach the threshold. A NaN s~ must be rescored, so it
        // makes M2~ +inf (below); min/max alone would drop it.
        // (Masked forms with a full mask: the same instructions, without GCC 12's false maybe-uninitialized
        // warning on the plain intrinsics' undefined source.)
        sec = _mm512_mask_max_ps(sec, 0xffff, sec, _mm512_mask_min_ps(s, 0xffff, s, m));
        nan |= _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q);
      }
      v_update(s, m, id, j0 + nj);  // STORE: (M~, j~) of the filter; a NaN s~ never wins here (pass 2 rescores it)
    }
    v_store(mx + ni * W, m);
    vi_store(idx + ni * W, id);
    if (STORE) v_store(m2 + ni * W, _mm512_mask_mov_ps(sec, nan, _mm512_set1_ps(INFINITY)));
  }
}
#endif

// One j-block (nj <= NJ_MAX document tokens; REATT_NJ_LIST = 1..NJ_MAX) against one query tile. The runtime nj picks
// a compile-time tile (only the last block of a document is short).
template <int NI, int NJ, bool HAS_BIAS>
static inline void tile_f32(const float* qT, int64_t ldq, const void* drow, int64_t ldd, int64_t D, const float* bias,
                            const int32_t* gidx, const uint8_t* jmask, int32_t j0, float* mx, int32_t* idx,
                            const char* pf, int64_t npf) {
  maxsim_fwd_tile_f32<NI, NJ, HAS_BIAS>(qT, ldq, static_cast<const float*>(drow), ldd, D, bias, gidx, jmask, j0, mx,
                                        idx, pf, npf);
}

template <int NI, bool HAS_BIAS, int... NJS>
static inline void jblock_f32_dispatch(int nj, const float* qT, int64_t ldq, const void* drow, int64_t ldd, int64_t D,
                                       const float* bias, const int32_t* gidx, const uint8_t* jmask, int32_t j0,
                                       float* mx, int32_t* idx, const char* pf, int64_t npf) {
  // Fold over the candidate tile widths; exactly one matches.
  ((nj == NJS ? (tile_f32<NI, NJS, HAS_BIAS>(qT, ldq, drow, ldd, D, bias, gidx, jmask, j0, mx, idx, pf, npf), 0) : 0),
   ...);
}

// The bias operands of the query tile at packed lanes [p0, p0 + nl) against the j-block at j0 (see
// maxsim_fwd_tile_f32): one contiguous run of the table when the lanes' original indices are consecutive (qidx is
// strictly increasing, so that is the case iff its span is nl - 1), else a per-lane gather.
struct TileBias {
  const float* p;
  const int32_t* g;
};
static inline TileBias tile_bias(const float* btab, const int32_t* qidx, int64_t p0, int64_t nl, int64_t j0) {
  if (btab == nullptr) return {nullptr, nullptr};
  if (qidx[p0 + nl - 1] - qidx[p0] == nl - 1) return {btab + qidx[p0] - j0, nullptr};
  return {btab - j0, qidx + p0};
}

// One j-block of fp32 rows against the query tiles of packed lanes [0, Lqa) (Lqa: the valid-token count rounded up
// to W; the lanes of masked tokens do not exist, so a query with n valid tokens costs ceil(n / W) vectors, whatever
// its padded length): tiles of 2 vectors, then a 1-vector tail. qp: q^T [D][Lqp]; btab: the query's bias table at
// offset Lmax - 1, or nullptr; qidx: the lanes' original token indices.
static inline void jblock_f32_all(int nj, const float* qp, int64_t Lqp, int64_t Lqa, const void* dr, int64_t ld_rows,
                                  int64_t D, const float* btab, const int32_t* qidx, const uint8_t* jm, int32_t j0,
                                  float* mx, int32_t* idx, const char* pf, int64_t npf) {
  for (int64_t i0 = 0; i0 < Lqa; i0 += 2 * W) {
    const float* q0 = qp + i0;
    const char* pp = i0 == 0 ? pf : nullptr;
    const int64_t pn = i0 == 0 ? npf : 0;
    if (i0 + 2 * W <= Lqa) {
      const TileBias tb = tile_bias(btab, qidx, i0, 2 * W, j0);
      if (tb.p) jblock_f32_dispatch<2, true, REATT_NJ_LIST>(nj, q0, Lqp, dr, ld_rows, D, tb.p, tb.g, jm, j0, mx + i0, idx + i0, pp, pn);
      else jblock_f32_dispatch<2, false, REATT_NJ_LIST>(nj, q0, Lqp, dr, ld_rows, D, nullptr, nullptr, jm, j0, mx + i0, idx + i0, pp, pn);
    } else {
      const TileBias tb = tile_bias(btab, qidx, i0, W, j0);
      if (tb.p) jblock_f32_dispatch<1, true, REATT_NJ_LIST>(nj, q0, Lqp, dr, ld_rows, D, tb.p, tb.g, jm, j0, mx + i0, idx + i0, pp, pn);
      else jblock_f32_dispatch<1, false, REATT_NJ_LIST>(nj, q0, Lqp, dr, ld_rows, D, nullptr, nullptr, jm, j0, mx + i0, idx + i0, pp, pn);
    }
  }
}

#if REATT_BF16DP
template <int NI, int NJ, bool HAS_BIAS, bool STORE>
static inline void tile_bf16(const uint32_t* qP, int64_t ldq, const void* drow, int64_t ldd, int64_t Dh,
                             const float* bias, const int32_t* gidx, const uint8_t* jmask, int32_t j0, float* mx,
                             int32_t* idx, float* sbuf, int64_t lds, float* m2, const char* pf, int64_t npf) {
  maxsim_fwd_tile_bf16<NI, NJ, HAS_BIAS, STORE>(qP, ldq, static_cast<const uint16_t*>(drow), ldd, Dh, bias, gidx,
                                                jmask, j0, mx, idx, sbuf, lds, m2, pf, npf);
}
template <int NI, bool HAS_BIAS, bool STORE, int... NJS>
static inline void jblock_bf16_dispatch(int nj, const uint32_t* qP, int64_t ldq, const void* drow, int64_t ldd,
                                        int64_t Dh, const float* bias, const int32_t* gidx, const uint8_t* jmask,
                                        int32_t j0, float* mx, int32_t* idx, float* sbuf, int64_t lds, float* m2,
                                        const char* pf, int64_t npf) {
  ((nj == NJS ? (tile_bf16<NI, NJS, HAS_BIAS, STORE>(qP, ldq, drow, ldd, Dh, bias, gidx, jmask, j0, mx, idx, sbuf, lds,
                                                     m2, pf, npf),
                 0)
              : 0),
   ...);
}

// The query tiles of packed lanes [0, Lqa) x one j-block of bf16 pairs (both passes share it; see jblock_f32_all).
template <bool STORE>
static inline void jblock_bf16_all(const FwdArgs& A, int64_t Lqa, int nj, const uint32_t* qp, const void* dr,
                                   int64_t ld_rows, const float* btab, const int32_t* qidx, const uint8_t* jm,
                                   int32_t j0, float* mx, int32_t* idx, float* S, int64_t sj0, float* m2,
                                   const char* pf, int64_t npf) {
  const int64_t Lqp = A.Lqp, Dh = A.Dp / 2;
  for (int64_t i0 = 0; i0 < Lqa; i0 += 2 * W) {
    const uint32_t* q0 = qp + i0;
    float* sb = S != nullptr ? S + sj0 * Lqp + i0 : nullptr;  // sj0: j0 inside the current segment
    float* s2 = m2 != nullptr ? m2 + i0 : nullptr;
    const int64_t np = i0 == 0 ? npf : 0;
    if (i0 + 2 * W <= Lqa) {
      const TileBias tb = tile_bias(btab, qidx, i0, 2 * W, j0);
      if (tb.p) jblock_bf16_dispatch<2, true, STORE, REATT_NJ_LIST>(nj, q0, Lqp, dr, ld_rows, Dh, tb.p, tb.g, jm, j0, mx + i0, idx + i0, sb, Lqp, s2, pf, np);
      else jblock_bf16_dispatch<2, false, STORE, REATT_NJ_LIST>(nj, q0, Lqp, dr, ld_rows, Dh, nullptr, nullptr, jm, j0, mx + i0, idx + i0, sb, Lqp, s2, pf, np);
    } else {
      const TileBias tb = tile_bias(btab, qidx, i0, W, j0);
      if (tb.p) jblock_bf16_dispatch<1, true, STORE, REATT_NJ_LIST>(nj, q0, Lqp, dr, ld_rows, Dh, tb.p, tb.g, jm, j0, mx + i0, idx + i0, sb, Lqp, s2, pf, np);
      else jblock_bf16_dispatch<1, false, STORE, REATT_NJ_LIST>(nj, q0, Lqp, dr, ld_rows, Dh, nullptr, nullptr, jm, j0, mx + i0, idx + i0, sb, Lqp, s2, pf, np);
    }
  }
}
#endif

// ---- forward: packing ----------------------------------------------------------------------------------------------------
static inline float load_elem(const void* base, int dtype, int64_t off) {
  switch (dtype) {
    case kFloat32: return static_cast<const float*>(base)[off];
    case kFloat16: return half_to_float(static_cast<const uint16_t*>(base)[off]);
    default: return bf16_to_float(static_cast<const uint16_t*>(base)[off]);
  }
}

// One row of D elements (stride sk) as fp32 into dst.
static inline void row_to_f32(const void* src, int dtype, int64_t sk, int64_t D, float* __restrict dst) {
  if (sk == 1) {
    if (dtype == kFloat32) {
      std::memcpy(dst, src, sizeof(float) * D);
    } else if (dtype == kBFloat16) {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t k = 0; k < D; ++k) {
        const uint32_t u = static_cast<uint32_t>(s[k]) << 16;
        std::memcpy(dst + k, &u, 4);
      }
    } else {
      cvt_f16_row(static_cast<const uint16_t*>(src), D, dst);
    }
    return;
  }
  for (int64_t k = 0; k < D; ++k) dst[k] = load_elem(src, dtype, k * sk);
}

static inline const char* elem_ptr(const void* base, int dtype, int64_t off) {
  return static_cast<const char*>(base) + off * (dtype == kFloat32 ? 4 : 2);
}

// The byte span of document b's rows (its first row to the end of its last), for prefetching; empty when b is out
// of range. Capped: a strided layout may spread a document over much more memory than its bytes.
struct Span {
  const char* p;
  int64_t bytes;
};
static inline Span doc_span(const FwdArgs& A, int64_t b) {
  if (b >= A.Nd) return {nullptr, 0};
  int64_t row0, len;
  if (A.offsets != nullptr) {
    row0 = A.offsets[b] * A.sd_l;
    len = A.offsets[b + 1] - A.offsets[b];
  } else {
    row0 = b * A.sd_b;
    len = A.Ld;
  }
  if (len <= 0) return {nullptr, 0};
  const int64_t esz = A.dtype == kFloat32 ? 4 : 2;
  int64_t bytes = ((len - 1) * A.sd_l + (A.D - 1) * A.sd_d + 1) * esz;
  bytes = bytes > (int64_t(1) << 18) ? (int64_t(1) << 18) : bytes;
  return {elem_ptr(A.d, A.dtype, row0), bytes};
}

// Slice `part` of `parts` of a span, as whole cache lines: the tiles of the current document's j-block `part`
// prefetch it (two lines per k step), so the next document streams in from DRAM while this one computes instead of
// stalling the conversion at its start. Lines beyond what the steps can carry are prefetched at once.
struct PfSlice {
  const char* p;
  int64_t n;
};
static inline PfSlice prefetch_slice(const Span& s, int64_t part, int64_t parts, int64_t steps) {
  if (s.p == nullptr || parts <= 0) return {nullptr, 0};
  const int64_t lines = (s.bytes + 63) / 64;
  const int64_t l0 = lines * part / parts, l1 = lines * (part + 1) / parts;
  for (int64_t l = l0 + 2 * steps; l < l1; ++l) __builtin_prefetch(s.p + l * 64, 0, 2);
  return {s.p + l0 * 64, l1 - l0 < 2 * steps ? l1 - l0 : 2 * steps};
}

// Pack query a's VALID tokens, in order, into lanes 0 .. n - 1 (n = its valid-token count): q^T [D][Lqp] fp32, or
// bf16 pairs [Dp/2][Lqp] (bf16 inputs, and the fp32 filter, which also keeps the packed rows in fp32 and their norms);
// qidx[p], the original token index of lane p; and the query's bias table. Why: the kernels score whole vectors of
// lanes, so a masked token packed in place would cost as much as a valid one; packed, a query with n valid tokens of
// Lq costs ceil(n / W) vectors per document token (a 32-token query with 16 valid tokens: half), wherever the holes
// are. The lanes keep their original index for what depends on it: the bias distance n + j - i, and where argmax
// goes (fwd_epilogue). Lanes p >= n (padding) are zero; their qidx continues the last valid index by +1, so a tail
// tile of a prefix mask stays one contiguous bias run, and every bias address stays inside the table (i < Lq + Lqp).
static void fwd_pack_query(const FwdArgs& A, int64_t a) {
  const uint8_t* qm = A.q_mask + a * A.Lq;
  int32_t* qidx = A.qidx + a * A.Lqp;
  int32_t n = 0;
  for (int64_t i = 0; i < A.Lq; ++i)
    if (qm[i]) qidx[n++] = static_cast<int32_t>(i);
  A.n_valid[a] = n;
  for (int64_t p = n; p < A.Lqp; ++p) qidx[p] = (n > 0 ? qidx[n - 1] : -1) + 1 + static_cast<int32_t>(p - n);
  std::vector<float> row(A.D);
  if (A.bf16dp || A.filt) {
    uint32_t* P = static_cast<uint32_t*>(A.qpack) + a * A.qpack_stride;
    const int64_t Dh = A.Dp / 2;
    for (int64_t kk = 0; kk < Dh; ++kk)
      for (int64_t p = 0; p < A.Lqp; ++p) P[kk * A.Lqp + p] = 0;
    for (int64_t p = 0; p < A.Lqp; ++p) {
      if (A.filt) {
        A.qnorm[a * A.Lqp + p] = 0.f;
        for (int64_t k = 0; k < A.D; ++k) A.qT32[(a * A.D + k) * A.Lqp + p] = 0.f;  // padding lanes: never read
      }
      if (p >= n) continue;
      const int64_t i = qidx[p];
      if (A.bf16dp) {
        const uint16_t* src = static_cast<const uint16_t*>(A.q) + a * A.sq_b + i * A.sq_l;
        for (int64_t k = 0; k < A.D; ++k) {
          const uint32_t v = src[k * A.sq_d];
          P[(k / 2) * A.Lqp + p] |= (k & 1) ? (v << 16) : v;
        }
      } else {
        float* q32 = A.q32 + (a * A.Lq + p) * A.D;  // packed rows too: lane p's row
        row_to_f32(elem_ptr(A.q, A.dtype, a * A.sq_b + i * A.sq_l), A.dtype, A.sq_d, A.D, q32);
        double ss = 0.0;
        for (int64_t k = 0; k < A.D; ++k) {
          const uint32_t v = float_to_bf16(q32[k]);
          P[(k / 2) * A.Lqp + p] |= (k & 1) ? (v << 16) : v;
          ss += static_cast<double>(q32[k]) * q32[k];
        }
        A.qnorm[a * A.Lqp + p] = static_cast<float>(std::sqrt(ss) * (1.0 + 1e-6));
        float* T = A.qT32 + a * A.D * A.Lqp;
        for (int64_t k = 0; k < A.D; ++k) T[k * A.Lqp + p] = q32[k];
      }
    }
  } else {
    float* P = static_cast<float*>(A.qpack) + a * A.qpack_stride;
    for (int64_t p = 0; p < A.Lqp; ++p) {
      if (p < n) {
        row_to_f32(elem_ptr(A.q, A.dtype, a * A.sq_b + qidx[p] * A.sq_l), A.dtype, A.sq_d, A.D, row.data());
        for (int64_t k = 0; k < A.D; ++k) P[k * A.Lqp + p] = row[k];
      } else {
        for (int64_t k = 0; k < A.D; ++k) P[k * A.Lqp + p] = 0.f;  // padding lanes: computed (tail only), never read
      }
    }
  }
  if (A.bias != nullptr) {
    float* T = A.bias_tab + a * A.bias_stride;
    // T[m] with m = i - j + Lmax - 1  <=>  r = n_a + j - i = n_a + Lmax - 1 - m (i: the ORIGINAL token index).
    for (int64_t m = 0; m < A.bias_stride; ++m) {
      int64_t r = n + A.Lmax - 1 - m;
      r = r < 0 ? 0 : (r > A.R - 1 ? A.R - 1 : r);
      T[m] = A.bias[r];
    }
  }
}

// Epilogue of one (query, document) pair: sum the maxima of the packed lanes (in double, in lane order = token order:
// deterministic), -inf for an empty document, 0 for an empty query; argmax of lane p goes to its original token
// qidx[p], and -1 to every masked token and to a token with no winner.
static inline void fwd_epilogue(const FwdArgs& A, int64_t a, int64_t b, const float* mx, const int32_t* idx) {
  const int32_t* qidx = A.qidx + a * A.Lqp;
  const int64_t col = A.group_size ? b - a * A.group_size : b;
  int32_t* am = A.argmax + (a * A.C + col) * A.Lq;
  const int32_t n = A.n_valid[a];
  for (int64_t i = 0; i < A.Lq; ++i) am[i] = -1;
  bool empty = true;
  double acc = 0.0;
  for (int64_t p = 0; p < n; ++p) {
    if (idx[p] >= 0) {
      empty = false;
      acc += mx[p];
      am[qidx[p]] = idx[p];
    }
  }
  float score;
  if (n == 0) score = 0.f;            // a sum over no query tokens
  else if (empty) score = -INFINITY;  // no valid document token
  else score = A.mean ? static_cast<float>(acc / n) : static_cast<float>(acc);
  A.scores[a * A.C + col] = score;
}

#if REATT_BF16DP
// ---- forward, fp32 / fp16 inputs through a bf16 filter (exact result) -----------------------------------------------------
// Why: VDPBF16PS does twice the multiply-adds per instruction of an fp32 FMA, and the fp32 FMA peak of the CPU is what
// bounds the plain kernel. Pass 1 scores every (i, j) in bf16 (s~), keeping s~ in S and the bf16 winner (M~_i, j~_i).
// The bf16 rounding moves a dot product by at most |s - s~| <= (2u + u^2) |q_i| |d_j| (u = 2^-8, Cauchy-Schwarz),
// plus fp32 accumulation error on both sides: eps_i = filt_c * |q_i| * max_j |d_j| (+ rounding slack). Pass 2 scores
// j~_i exactly, folds it into the running best B_i (earlier segments of a long document hold lower j), and rescores
// exactly, in fp32, only the j with s~ >= B_i - eps_i: every j that can reach B_i. So the result (the max of the fp32
// dot products, at the lowest maximising j; NaN never wins) is that of a full fp32 scan. For unit vectors
// in d = 128 eps is ~0.008-0.013 while maxima stand ~0.1 above the bulk: about 1.5 exact dot products per
// (i, document) in all. Adversarial inputs (near-ties everywhere) only make pass 2 slower, never wrong, and past a
// budget of 4 * Lq + 64 rescorings a segment is redone with the plain fp32 tile (about 1.8x the normal cost at worst).

static inline __mmask16 tail_mask16(int64_t rem) {
  return rem >= 16 ? static_cast<__mmask16>(0xffff) : (rem <= 0 ? 0 : static_cast<__mmask16>((1u << rem) - 1u));
}

// fp32 rows -> bf16 pairs (rows of Dq elements, zero beyond D), returning an upper bound of max_j |d_j| over valid j.
// Each row's squared norm is reduced exactly (one horizontal sum per row). An earlier bound summed per-lane maxima
// (no reductions) but was ~1.6x loose for unit vectors in d = 128, and eps scales with it: the tight bound cuts
// the candidates to rescore (1.45 -> 1.26 per query token and document on the clustered corpus) and the lanes pass 2
// must scan, worth far more than 8 shuffles per row (amortised over every query of the batch).
// Bytes: len * D * 4 read (the document's one trip from memory), len * Dq * 2 written (L2-resident).
static float rows_to_bf16(const float* r32, int64_t ld32, int64_t len, int64_t D, int64_t Dq, uint16_t* t16,
                          const uint8_t* jmask) {
  float rowmax = 0.f;
  const bool full = D % 32 == 0;
  for (int64_t j = 0; j < len; ++j) {
    const float* src = r32 + j * ld32;
    uint16_t* dst = t16 + j * Dq;
    __m512 sq0 = _mm512_setzero_ps(), sq1 = _mm512_setzero_ps();
    if (full) {
      for (int64_t k = 0; k < D; k += 32) {
        const __m512 lo = _mm512_loadu_ps(src + k), hi = _mm512_loadu_ps(src + k + 16);
        sq0 = _mm512_fmadd_ps(lo, lo, sq0);
        sq1 = _mm512_fmadd_ps(hi, hi, sq1);
        _mm512_storeu_si512(dst + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    } else {
      for (int64_t k = 0; k < Dq; k += 32) {
        const __m512 lo = _mm512_maskz_loadu_ps(tail_mask16(D - k), src + k);
        const __m512 hi = _mm512_maskz_loadu_ps(tail_mask16(D - k - 16), src + k + 16);
        sq0 = _mm512_fmadd_ps(lo, lo, sq0);
        sq1 = _mm512_fmadd_ps(hi, hi, sq1);
        _mm512_storeu_si512(dst + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    }
    // A row with a NaN (whose dot products are NaN and never win) fails the compare and is skipped instead of
    // erasing the maximum so far. An inf row makes the bound inf: every j a candidate.
    if (jmask == nullptr || jmask[j]) {
      const float n2 = _mm512_reduce_add_ps(_mm512_add_ps(sq0, sq1));
      rowmax = n2 > rowmax ? n2 : rowmax;
    }
  }
  // The fp32 sum of D squares is low by at most (D + 16) 2^-24 relative: the factor covers it (and the sqrt).
  return std::sqrt(rowmax) * (1.f + static_cast<float>(D + 48) * 0x1p-24f);
}

static inline float dot_f32(const float* x, const float* y, int64_t D) {
  // Two accumulators: a candidate's dot is latency-bound, not throughput-bound.
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= D; k += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(y + k), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(y + k + 16), acc1);
  }
  for (; k < D; k += 16) {
    const __mmask16 m = tail_mask16(D - k);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + k), _mm512_maskz_loadu_ps(m, y + k), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// One segment [s0, s0 + n) of a document, ready for the filter: fp32 rows (in place or converted), bf16 pairs, and
// the bound on its row norms.
struct FiltSeg {
  int64_t s0, n;
  const float* r32;      // row j of the segment at r32 + (j - s0) * ld32; nullptr: only in d's dtype, at row_s0
  int64_t ld32;
  float nmax;
  const uint16_t* t16;   // bf16 pairs of the segment's rows, Dq elements apart
  int64_t row_s0;        // element offset of row s0 in d (rows sd_l apart): where r32 == nullptr converts from
  bool prefetch_rows;    // the rows are not in cache (a prepared corpus): prefetch the rows pass 2 rescores
};

static FiltSeg filt_prepare(const FwdArgs& A, int64_t row0, int64_t s0, int64_t n, const uint8_t* jmask, float* t32,
                            uint16_t* t16) {
  FiltSeg g{s0, n, nullptr, 0, 0.f, t16, row0 + s0 * A.sd_l, false};
  if (A.dtype == kFloat32 && A.sd_d == 1) {
    g.r32 = static_cast<const float*>(A.d) + row0 + s0 * A.sd_l;
    g.ld32 = A.sd_l;
  } else {
    for (int64_t j = 0; j < n; ++j)
      row_to_f32(elem_ptr(A.d, A.dtype, row0 + (s0 + j) * A.sd_l), A.dtype, A.sd_d, A.D, t32 + j * A.D);
    g.r32 = t32;
    g.ld32 = A.D;
  }
  // Bytes: the segment is read once in fp32 (n * D * 4) and written once in bf16 (n * Dq * 2, L2-resident).
  g.nmax = rows_to_bf16(g.r32, g.ld32, n, A.D, A.Dq, t16, jmask != nullptr ? jmask + s0 : nullptr);
  return g;
}

// The same segment of a PREPARED corpus (rk.prepare_corpus: packed, screen rows and per-document norm bounds computed
// once): nothing is converted or read here. fp32 rows with unit stride are rescored in place; other rows (fp16: the
// exact index's storage) are converted one candidate row at a time (filt_segment), 2 * D bytes each, instead of the
// whole segment on every call. The document's bound holds for each of its segments.
static FiltSeg filt_prepared(const FwdArgs& A, int64_t b, int64_t row0, int64_t s0, int64_t n) {
  FiltSeg g{s0, n, nullptr, 0, A.dnorm[b], A.d16 + (A.offsets[b] + s0) * A.Dq, row0 + s0 * A.sd_l, true};
  if (A.dtype == kFloat32 && A.sd_d == 1) {
    g.r32 = static_cast<const float*>(A.d) + g.row_s0;
    g.ld32 = A.sd_l;
  }
  return g;
}

// Query a against one prepared segment, folding into the exact running (mx, idx) of its tokens (earlier segments
// hold lower j). mt / jt: pass 1's per-segment (M~, j~).
// t32: the per-thread fp32 row buffer [Lseg][D] (one candidate row, or the whole segment for the fallback, when the
// segment has no fp32 rows of its own: g.r32 == nullptr).
static void filt_segment(const FwdArgs& A, int64_t a, const FiltSeg& g, float* S, const uint8_t* jmask, float* mx,
                         int32_t* idx, float* mt, int32_t* jt, float* m2, float* pm, int32_t* pi, const Span* next,
                         int64_t nblk_doc, float* t32) {
  // Locals, not loads through A / g: the stores to mx / idx below could alias them as far as the compiler knows.
  const int64_t Lqp = A.Lqp, D = A.D, s0 = g.s0, n = g.n, Dq = A.Dq;
  const float* r32 = g.r32;
  int64_t ld32 = g.ld32;
  const uint16_t* const t16 = g.t16;
  const float nmax = g.nmax;
  // Row r of the segment in fp32: in place, or converted into t32 (valid until the next call).
  auto row32 = [&](int64_t r) -> const float* {
    if (r32 != nullptr) return r32 + r * ld32;
    row_to_f32(elem_ptr(A.d, A.dtype, g.row_s0 + r * A.sd_l), A.dtype, A.sd_d, D, t32);
    return t32;
  };
  constexpr int NJ = NJ_MAX;
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < Lqp; ++i) {
    mt[i] = -INFINITY;
    m2[i] = -INFINITY;
    jt[i] = -1;
  }
  const uint32_t* qp = static_cast<const uint32_t*>(A.qpack) + a * A.qpack_stride;
  const float* btab = A.bias != nullptr ? A.bias_tab + a * A.bias_stride + (A.Lmax - 1) : nullptr;
  // Packed lanes (fwd_pack_query): lane i < nv holds the valid token qi[i]; only the first Lqa lanes are scored.
  const int32_t* qi = A.qidx + a * Lqp;
  const int64_t nv = A.n_valid[a], Lqa = (nv + W - 1) / W * W;
  // Pass 1: s~ (+ bias) for every (i, j) into S [n][Lqp], and (M~_i, j~_i). FLOPs 2 * Lqa * n * Dp at the bf16 rate.
  for (int64_t r0 = 0; r0 < n; r0 += NJ) {
    const int nj = static_cast<int>(n - r0 < NJ ? n - r0 : NJ);
    const int64_t j0 = s0 + r0;
    const PfSlice pf = next != nullptr ? prefetch_slice(*next, j0 / NJ, nblk_doc, A.Dp / 2) : PfSlice{nullptr, 0};
    jblock_bf16_all<true>(A, Lqa, nj, qp, t16 + r0 * Dq, Dq, btab, qi, jmask != nullptr ? jmask + j0 : nullptr,
                          static_cast<int32_t>(j0), mt, jt, S, r0, m2, pf.p, pf.n);
  }
  // Pass 2, per query token i: E = the exact fp32 score of pass 1's winner j~, folded into the running best B_i; the
  // exact winner j* has s~_j* >= s_j* - eps >= B_i - eps, so only j with s~_j >= B_i - eps are rescored (exactly, in
  // fp32), in ascending j, keeping the larger value and, on equal values, the lower j. NaN never wins (as in a scan).
  // Near-ties everywhere (e.g. repeated tokens) can make most j candidates: past a budget of rescorings the segment
  // falls back to the plain fp32 tile (from the saved running best), so the worst case costs about one extra pass.
  const float* qn = A.qnorm + a * Lqp;
  const float* q32 = A.q32 + a * A.Lq * D;
  std::memcpy(pm, mx, sizeof(float) * Lqp);
  std::memcpy(pi, idx, sizeof(int32_t) * Lqp);
  if (g.prefetch_rows) {
    // A prepared corpus streams only the screen rows, so the rows pass 2 rescores are not in cache. Every live lane
    // rescores its pass-1 winner: request all those rows now (up to nv rows, D * esize bytes each) so their DRAM
    // latencies overlap, instead of one miss after another in the loop below.
    const int64_t esz = A.dtype == kFloat32 ? 4 : 2, bytes = ((D - 1) * A.sd_d + 1) * esz;
    for (int64_t i = 0; i < nv; ++i) {
      if (jt[i] < 0) continue;
      const char* row = elem_ptr(A.d, A.dtype, g.row_s0 + (jt[i] - s0) * A.sd_l);
      for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(row + o, 0, 3);
    }
  }
  int64_t budget = 4 * nv + 64;
  for (int64_t i0 = 0; i0 < Lqa && budget >= 0; i0 += W) {
    const __mmask16 live = tail_mask16(nv - i0);  // the packed lanes of valid tokens
    for (__mmask16 c = live; c; c &= static_cast<__mmask16>(c - 1)) {
      const int64_t i = i0 + __builtin_ctz(c);
      const int32_t j = jt[i];
      if (j < 0) continue;  // no valid j, or every s~ NaN: B stays, and if it is -inf every valid j is rescored
      float e = dot_f32(q32 + i * D, row32(j - s0), D);
      if (btab != nullptr) e += btab[qi[i] - j];
      if (e > mx[i] || (e == mx[i] && j < idx[i])) {
        mx[i] = e;
        idx[i] = j;
      }
    }
    const __m512 Bv = _mm512_loadu_ps(mx + i0);
    const __m512 mtv = _mm512_loadu_ps(mt + i0);
    // eps: the bf16 bound, plus the roundings of the bias additions (2^-21 (|B| + |M~|)), plus flushed subnormals.
    const __m512 eps = _mm512_fmadd_ps(
        _mm512_loadu_ps(qn + i0), _mm512_set1_ps(A.filt_c * nmax),
        _mm512_fmadd_ps(_mm512_add_ps(_mm512_abs_ps(Bv), _mm512_abs_ps(mtv)), _mm512_set1_ps(0x1p-21f),
                        _mm512_set1_ps(static_cast<float>(D) * 0x1p-125f * (nmax + 1.f))));
    __m512 thr = _mm512_sub_ps(Bv, eps);
    thr = _mm512_mask_mov_ps(thr, _mm512_cmp_ps_mask(thr, thr, _CMP_UNORD_Q), ninf);  // NaN: keep every j
    // Only lanes whose runner-up M2~ reaches the threshold can hold a candidate besides j~ (every other valid j has
    // s~ <= M2~, and a NaN s~ made M2~ +inf): the others skip the scan. On the clustered corpus about 3 lanes in 4.
    const __mmask16 need = _mm512_mask_cmp_ps_mask(live, _mm512_loadu_ps(m2 + i0), thr, _CMP_NLT_UQ);
    if (!need) continue;
    // Rescore the candidates of row r (lanes c), in ascending j, keeping the larger value and, on ties, the lower j.
    auto rescore = [&](int64_t r, __mmask16 c) {
      const int64_t j = s0 + r;
      if (jmask != nullptr && !jmask[j]) return;
      while (c) {
        const int64_t i = i0 + __builtin_ctz(c);
        c &= static_cast<__mmask16>(c - 1);
        if (jt[i] == j) continue;  // pass 1's winner: already folded in
        if (--budget < 0) return;
        float e = dot_f32(q32 + i * D, row32(r), D);
        if (btab != nullptr) e += btab[qi[i] - j];
        if (e > mx[i] || (e == mx[i] && j < idx[i])) {
          mx[i] = e;
          idx[i] = static_cast<int32_t>(j);
        }
      }
    };
    // Not-less-than, unordered true: a NaN s~ (bf16 overflow of a finite fp32 value) is rescored too. Four rows per
    // branch: hits are rare (a few per 128 rows), so one well-predicted branch per four rows replaces a
    // mispredicted one per hit row; the row-at-a-time loop cost ~4 cycles a row.
    int64_t r = 0;
    for (; r + 4 <= n && budget >= 0; r += 4) {
      const float* sr = S + r * Lqp + i0;
      const __mmask16 c0 = _mm512_mask_cmp_ps_mask(need, _mm512_loadu_ps(sr), thr, _CMP_NLT_UQ);
      const __mmask16 c1 = _mm512_mask_cmp_ps_mask(need, _mm512_loadu_ps(sr + Lqp), thr, _CMP_NLT_UQ);
      const __mmask16 c2 = _mm512_mask_cmp_ps_mask(need, _mm512_loadu_ps(sr + 2 * Lqp), thr, _CMP_NLT_UQ);
      const __mmask16 c3 = _mm512_mask_cmp_ps_mask(need, _mm512_loadu_ps(sr + 3 * Lqp), thr, _CMP_NLT_UQ);
      if (!(c0 | c1 | c2 | c3)) continue;
      if (c0) rescore(r, c0);
      if (c1 && budget >= 0) rescore(r + 1, c1);
      if (c2 && budget >= 0) rescore(r + 2, c2);
      if (c3 && budget >= 0) rescore(r + 3, c3);
    }
    for (; r < n && budget >= 0; ++r) {
      const __mmask16 c = _mm512_mask_cmp_ps_mask(need, _mm512_loadu_ps(S + r * Lqp + i0), thr, _CMP_NLT_UQ);
      if (c) rescore(r, c);
    }
  }
  if (budget >= 0) return;
  // Fallback: the plain fp32 tile over the segment, from the running best before it (ascending j, strict >).
  std::memcpy(mx, pm, sizeof(float) * Lqp);
  std::memcpy(idx, pi, sizeof(int32_t) * Lqp);
  if (r32 == nullptr) {  // a prepared segment without fp32 rows: convert it now (the rare worst case only)
    for (int64_t r = 0; r < n; ++r)
      row_to_f32(elem_ptr(A.d, A.dtype, g.row_s0 + r * A.sd_l), A.dtype, A.sd_d, D, t32 + r * D);
    r32 = t32;
    ld32 = D;
  }
  const float* qT = A.qT32 + a * D * Lqp;
  for (int64_t r0 = 0; r0 < n; r0 += NJ) {
    const int nj = static_cast<int>(n - r0 < NJ ? n - r0 : NJ);
    const int32_t j0 = static_cast<int32_t>(s0 + r0);
    const float* dr = r32 + r0 * ld32;
    const uint8_t* jm = jmask != nullptr ? jmask + j0 : nullptr;
    jblock_f32_all(nj, qT, Lqp, Lqa, dr, ld32, D, btab, qi, jm, j0, mx, idx, nullptr, 0);
  }
}
static void fwd_doc_filtered(const FwdArgs& A, int64_t b, int64_t a0, int64_t a1, int64_t len, int64_t row0,
                             const uint8_t* jmask, float* scratch) {
  const int64_t Lqp = A.Lqp, Lseg = A.Lseg;
  float* mx = scratch;
  int32_t* idx = reinterpret_cast<int32_t*>(scratch + Lqp);
  float* mt = scratch + 2 * Lqp;
  int32_t* jt = reinterpret_cast<int32_t*>(scratch + 3 * Lqp);
  float* pm = scratch + 4 * Lqp;
  int32_t* pi = reinterpret_cast<int32_t*>(scratch + 5 * Lqp);
  float* m2 = scratch + 6 * Lqp;
  float* t32 = scratch + 7 * Lqp;
  const int64_t t32n = (Lseg * A.D + 15) / 16 * 16;  // whole lines: t16 and S start 64-byte aligned
  uint16_t* t16 = reinterpret_cast<uint16_t*>(t32 + t32n);
  float* S = t32 + t32n + Lseg * A.Dq / 2;
  const bool prepared = A.d16 != nullptr;
  // The next document's bytes to prefetch: its screen rows when the corpus is prepared (the rows pass 1 streams).
  Span next = doc_span(A, b + 1);
  if (prepared) {
    next = b + 1 < A.Nd ? Span{reinterpret_cast<const char*>(A.d16 + A.offsets[b + 1] * A.Dq),
                               std::min<int64_t>((A.offsets[b + 2] - A.offsets[b + 1]) * A.Dq * 2, int64_t(1) << 18)}
                        : Span{nullptr, 0};
    if (next.bytes <= 0) next = Span{nullptr, 0};
  }
  const int64_t nblk = (len + NJ_MAX - 1) / NJ_MAX;
  const bool one = len <= Lseg;
  // A document that fits one segment is prepared once for all its queries; a longer one is prepared segment by
  // segment for each query (scratch stays bounded by Lseg whatever the document length). A prepared corpus costs
  // nothing here.
  FiltSeg g1{};
  if (one) g1 = prepared ? filt_prepared(A, b, row0, 0, len) : filt_prepare(A, row0, 0, len, jmask, t32, t16);
  for (int64_t a = a0; a < a1; ++a) {
    for (int64_t i = 0; i < Lqp; ++i) {
      mx[i] = -INFINITY;
      idx[i] = -1;
    }
    for (int64_t s0 = 0; s0 < len && A.n_valid[a] > 0; s0 += Lseg) {  // an all-masked query scans nothing
      const int64_t n = std::min(Lseg, len - s0);
      const FiltSeg g = one        ? g1
                        : prepared ? filt_prepared(A, b, row0, s0, n)
                                   : filt_prepare(A, row0, s0, n, jmask, t32, t16);
      filt_segment(A, a, g, S, jmask, mx, idx, mt, jt, m2, pm, pi, a == a0 ? &next : nullptr, nblk, t32);
    }
    fwd_epilogue(A, a, b, mx, idx);
  }
}
#endif

// ---- forward: one document against queries [a0, a1) ----------------------------------------------------------------------
// scratch: per-thread buffer (see the driver for its size): running max / argmax [Lqp] each, then tiles.
static void fwd_doc(const FwdArgs& A, int64_t b, int64_t a0, int64_t a1, float* scratch) {
  int64_t len, row0;
  const uint8_t* jmask = nullptr;
  if (A.offsets != nullptr) {
    row0 = A.offsets[b];
    len = A.offsets[b + 1] - row0;
    row0 *= A.sd_l;
  } else {
    len = A.Ld;
    row0 = b * A.sd_b;
    if (A.d_mask != nullptr) {
      jmask = A.d_mask + b * A.Ld;
      // Trailing masked tokens never win: scan only up to the last valid one. Right-padded batches (T5's) are ragged,
      // so this skips their padding (a quarter of the work in the training benchmark's 100-200 of 200 tokens).
      while (len > 0 && !jmask[len - 1]) --len;
    }
  }
#if REATT_BF16DP
  if (A.filt) {
    fwd_doc_filtered(A, b, a0, a1, len, row0, jmask, scratch);
    return;
  }
#endif
  float* mx = scratch;
  int32_t* idx = reinterpret_cast<int32_t*>(scratch + A.Lqp);
  float* tile = scratch + 2 * A.Lqp;
  constexpr int NJ = NJ_MAX;
  const int64_t Lqp = A.Lqp, Lseg = A.Lseg;
  const size_t esz = A.bf16dp ? 2 : 4;
  const bool direct = A.bf16dp ? (A.sd_d == 1 && A.D == A.Dp) : (A.dtype == kFloat32 && A.sd_d == 1);
  // Rows [s0, s0 + n) of the document in the kernel's element type, contiguous in k, as (pointer to row s0, stride):
  // read in place when the input already is, else converted into the tile. Converted documents that fit one segment
  // are converted once for all queries of [a0, a1); longer ones segment by segment (scratch stays bounded).
  auto rows_at = [&](int64_t s0, int64_t n, int64_t& ld) -> const char* {
    if (direct) {
      ld = A.sd_l;
      return elem_ptr(A.d, A.dtype, row0 + s0 * A.sd_l);
    }
    if (A.bf16dp) {
      uint16_t* t = reinterpret_cast<uint16_t*>(tile);
      for (int64_t j = 0; j < n; ++j) {
        const uint16_t* src = static_cast<const uint16_t*>(A.d) + row0 + (s0 + j) * A.sd_l;
        for (int64_t k = 0; k < A.D; ++k) t[j * A.Dp + k] = src[k * A.sd_d];
        for (int64_t k = A.D; k < A.Dp; ++k) t[j * A.Dp + k] = 0;
      }
      ld = A.Dp;
    } else {
      for (int64_t j = 0; j < n; ++j)
        row_to_f32(elem_ptr(A.d, A.dtype, row0 + (s0 + j) * A.sd_l), A.dtype, A.sd_d, A.D, tile + j * A.D);
      ld = A.D;
    }
    return reinterpret_cast<const char*>(tile);
  };
  const bool one = direct || len <= Lseg;
  const int64_t seg = one ? (len > 0 ? len : 1) : Lseg;
  int64_t ld1 = 0;
  const char* rows1 = one ? rows_at(0, len, ld1) : nullptr;
  const Span next = doc_span(A, b + 1);
  const int64_t nblk = (len + NJ - 1) / NJ;
  for (int64_t a = a0; a < a1; ++a) {
    for (int64_t i = 0; i < Lqp; ++i) {
      mx[i] = -INFINITY;
      idx[i] = -1;
    }
    const float* btab = A.bias != nullptr ? A.bias_tab + a * A.bias_stride + (A.Lmax - 1) : nullptr;
    // Only the packed lanes of valid tokens are scored: ceil(n_a / W) vectors (none for an all-masked query).
    const int32_t* qi = A.qidx + a * Lqp;
    const int64_t Lqa = (A.n_valid[a] + W - 1) / W * W;
    for (int64_t s0 = 0; s0 < len && Lqa > 0; s0 += seg) {
      const int64_t n = std::min(seg, len - s0);
      int64_t ld_rows = ld1;
      const char* rows = one ? rows1 : rows_at(s0, n, ld_rows);
      // j-blocks outer, query vectors inner: the NJ document rows (NJ * D * esz bytes) stay in L1 across the query
      // tiles, and q^T (D * Lqp * 4 bytes) stays in L1/L2 across the j-blocks. The running (max, argmax) carry over
      // from block to block and segment to segment in ascending j.
      for (int64_t r0 = 0; r0 < n; r0 += NJ) {
        const int nj = static_cast<int>(n - r0 < NJ ? n - r0 : NJ);
        const int64_t j0 = s0 + r0;
        const PfSlice pf =
            a == a0 ? prefetch_slice(next, j0 / NJ, nblk, A.bf16dp ? A.Dp / 2 : A.D) : PfSlice{nullptr, 0};
        const void* dr = rows + r0 * ld_rows * esz;
        const uint8_t* jm = jmask != nullptr ? jmask + j0 : nullptr;
#if REATT_BF16DP
        if (A.bf16dp) {
          jblock_bf16_all<false>(A, Lqa, nj, static_cast<const uint32_t*>(A.qpack) + a * A.qpack_stride, dr, ld_rows,
                                 btab, qi, jm, static_cast<int32_t>(j0), mx, idx, nullptr, 0, nullptr, pf.p, pf.n);
          continue;
        }
#endif
        jblock_f32_all(nj, static_cast<const float*>(A.qpack) + a * A.qpack_stride, Lqp, Lqa, dr, ld_rows, A.D, btab,
                       qi, jm, static_cast<int32_t>(j0), mx, idx, pf.p, pf.n);
      }
    }
    fwd_epilogue(A, a, b, mx, idx);
  }
}

// One fp32 row stored as dtype (contiguous). Defined here, per ISA, so the bf16 loop (float_to_bf16 is branch-free)
// vectorises at this ISA's width: a scalar baseline-ISA store was a tenth of the training benchmark's backward.
static inline void store_row(const float* __restrict src, int64_t D, int dtype, char* __restrict out) {
  if (dtype == kFloat32) {
    std::memcpy(out, src, sizeof(float) * D);
    return;
  }
  uint16_t* o = reinterpret_cast<uint16_t*>(out);
  if (dtype == kBFloat16) {
    for (int64_t k = 0; k < D; ++k) o[k] = float_to_bf16(src[k]);
  } else {
    for (int64_t k = 0; k < D; ++k) o[k] = float_to_half(src[k]);
  }
}

// ---- backward ----------------------------------------------------------------------------------------------------------
// dq of the packed valid rows [r0, r1) (row p is (a, i) with vrows[p] = a * Lq + i; masked rows are zeroed by the
// driver and never visited): dq[a, i] = sum_c w[a, c] * d[doc(a, c), argmax[a, c, i]], each row summed in c order
// (deterministic, and the same for every thread count and chunking). acc: [(r1 - r0) * D] fp32; tmp: [D].
// Columns outer, rows inner: with all pairs every query reads the same document c at the same time, so document c's
// rows are pulled into cache once per chunk and reused by every (a, i) of it, and argmax[a, c, i0:i1] is one
// contiguous run. (Rows outer gathered one row per (row, c) from the whole document set: a cache miss each, 80 % of
// dq's time in the training benchmark.) The rows of column c + kAhead are prefetched while column c is summed.
// Bytes: one D-row gather per (c, row) with a valid argmax (mostly cache hits), plus the argmax block; FLOPs: 2 * D
// each.
static int64_t bwd_dq_rows(const BwdArgs& B, const float* w, const int64_t* vrows, int64_t r0, int64_t r1, float* acc,
                           float* tmp) {
  int64_t bad = 0;
  const int64_t D = B.D, n = r1 - r0;
  for (int64_t t = 0; t < n * D; ++t) acc[t] = 0.f;
  const bool direct = B.dtype == kFloat32 && B.sd_d == 1;
  const int64_t esz = B.dtype == kFloat32 ? 4 : 2;
  // Document (a, c): rows j < len at elements base + j * sd_l.
  auto doc_rows = [&](int64_t a, int64_t c, int64_t& len, int64_t& base) {
    const int64_t doc = B.group_size ? a * B.group_size + c : c;
    if (B.offsets != nullptr) {
      len = B.offsets[doc + 1] - B.offsets[doc];
      base = B.offsets[doc] * B.sd_l;
    } else {
      len = B.Ld;
      base = doc * B.sd_b;
    }
  };
  constexpr int64_t kAhead = 2;
  const int64_t row_bytes = (D - 1) * B.sd_d * esz + esz;
  auto prefetch_col = [&](int64_t c) {
    int64_t a_cur = -1, len = 0, base = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t a = vrows[r] / B.Lq, i = vrows[r] % B.Lq;
      if (a != a_cur) {
        doc_rows(a, c, len, base);
        a_cur = a;
      }
      const int32_t j = B.argmax[(a * B.C + c) * B.Lq + i];
      if (j < 0 || j >= len) continue;
      const char* p = elem_ptr(B.d, B.dtype, base + j * B.sd_l);
      for (int64_t off = 0; off < row_bytes && off < 512; off += 64) __builtin_prefetch(p + off, 0, 3);
    }
  };
  for (int64_t c = 0; c < kAhead && c < B.C; ++c) prefetch_col(c);
  for (int64_t c = 0; c < B.C; ++c) {
    if (c + kAhead < B.C) prefetch_col(c + kAhead);
    int64_t a_cur = -1, len = 0, base = 0;
    const int32_t* am = nullptr;
    float wv = 0.f;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t a = vrows[r] / B.Lq, i = vrows[r] % B.Lq;
      if (a != a_cur) {
        doc_rows(a, c, len, base);
        am = B.argmax + (a * B.C + c) * B.Lq;
        wv = w[a * B.C + c];
        a_cur = a;
      }
      const int32_t j = am[i];
      if (j < 0) continue;
      if (j >= len) {
        ++bad;
        continue;
      }
      const int64_t row = base + j * B.sd_l;
      const float* src;
      if (direct) {
        src = static_cast<const float*>(B.d) + row;
      } else {
        row_to_f32(elem_ptr(B.d, B.dtype, row), B.dtype, B.sd_d, D, tmp);
        src = tmp;
      }
      float* dst = acc + (r - r0) * D;
      int64_t k = 0;
      for (; k + W <= D; k += W) v_store(dst + k, v_fma(v_set1(wv), v_load(src + k), v_load(dst + k)));
      for (; k < D; ++k) dst[k] = std::fma(wv, src[k], dst[k]);
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    char* out = static_cast<char*>(B.dq) + vrows[r] * D * esz;
    store_row(acc + (r - r0) * D, D, B.dtype, out);
  }
  return bad;
}

// dd rows of documents [b0, b1) and their dbias contributions (into `part`, one fixed block's partial sum).
// Each document's rows are owned by one caller, accumulated over the valid (a, i) in order: deterministic. Only the
// packed valid rows of each query are visited (query a's: vrows[vstart[a] .. vstart[a + 1]), fp32 rows q32[p]).
static int64_t bwd_dd_docs(const BwdArgs& B, const float* w, const int32_t* n_valid, const int64_t* vstart,
                           const int64_t* vrows, const float* q32, int64_t b0, int64_t b1, float* part, float* tile) {
  int64_t bad = 0;
  const size_t esz = B.dtype == kFloat32 ? 4 : 2;
  for (int64_t b = b0; b < b1; ++b) {
    int64_t len, row0;
    if (B.offsets != nullptr) {
      row0 = B.offsets[b];
      len = B.offsets[b + 1] - row0;
    } else {
      row0 = b * B.Ld;
      len = B.Ld;
    }
    int64_t a0 = 0, a1 = B.Bq;
    if (B.group_size) {
      a0 = b / B.group_size;
      a1 = a0 + 1;
    }
    // Rows [s0, s0 + n) at a time (fp32 staging of at most Lseg rows, whatever the document length); each (a, i)
    // lands in exactly one segment. Bytes per document: 4 argmax bytes per valid query row per segment, len * D * esz
    // written.
    const int64_t seg = len <= B.Lseg ? (len > 0 ? len : 1) : B.Lseg;
    for (int64_t s0 = 0; s0 < len || (s0 == 0 && len == 0); s0 += seg) {
      const int64_t n = std::min(seg, len - s0);
      for (int64_t t = 0; t < n * B.D; ++t) tile[t] = 0.f;
      for (int64_t a = a0; a < a1; ++a) {
        const int64_t c = B.group_size ? b - a * B.group_size : b;
        const float wv = w[a * B.C + c];
        const int32_t* am = B.argmax + (a * B.C + c) * B.Lq;
        for (int64_t p = vstart[a]; p < vstart[a + 1]; ++p) {
          const int64_t i = vrows[p] - a * B.Lq;  // the original token index (the bias distance needs it)
          const int32_t j = am[i];
          if (j < 0) continue;
          if (j >= len) {
            bad += s0 == 0 ? 1 : 0;
            continue;
          }
          if (j < s0 || j >= s0 + n) continue;
          const float* qi = q32 + p * B.D;
          float* dst = tile + (j - s0) * B.D;
          for (int64_t k = 0; k < B.D; ++k) dst[k] += wv * qi[k];
          if (B.R > 0) {
            int64_t r = n_valid[a] + j - i;
            r = r < 0 ? 0 : (r > B.R - 1 ? B.R - 1 : r);
            part[r] += wv;
          }
        }
      }
      char* out = static_cast<char*>(B.dd) + (row0 + s0) * B.D * esz;
      for (int64_t j = 0; j < n; ++j) store_row(tile + j * B.D, B.D, B.dtype, out + j * B.D * esz);
    }
  }
  return bad;
}
