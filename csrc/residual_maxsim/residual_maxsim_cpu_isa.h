// The residual_maxsim and centroid_interaction CPU kernels, compiled once per instruction-set level by
// residual_maxsim_cpu.cpp (each inclusion inside its own namespace under `#pragma GCC target`), so that every path can
// be forced and tested on one machine (csrc/cpu_isa.h). No include guard: included once per level, on purpose.
// Semantics and byte counts: residual_maxsim_cpu.cpp.

constexpr int TILE = 16;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// ---- centroid interaction -------------------------------------------------------------------------------------------
#include "centroid_row_max_cpu.h"  // NOLINT: included once per ISA, on purpose (REATT_CI_SIMD set by the includer)
// One (query, candidate) pair per iteration; the running max over the document's tokens is LP floats in registers.
template <int LP>
void ci_impl(const float* __restrict table, const bool* __restrict q_mask, const int32_t* __restrict codes,
             const int64_t* __restrict offsets, const int64_t* __restrict cand, float* __restrict out, int64_t Bq,
             int64_t Lq, int64_t C, int64_t Nd, int64_t Nc, int nthreads, std::atomic<int>* bad) {
  const int64_t total = Bq * Nc;
#pragma omp parallel for schedule(dynamic, 64) num_threads(nthreads)
  for (int64_t p = 0; p < total; ++p) {
    const int64_t a = p / Nc;
    const int64_t b = cand ? cand[p] : p % Nc;  // no cand: every document, in order
    if (b < 0) { out[p] = NEG_INF; continue; }
    if (b >= Nd) { bad->store(1); out[p] = std::numeric_limits<float>::quiet_NaN(); continue; }
    const bool* qm = q_mask + a * Lq;
    bool any = false;
    for (int64_t i = 0; i < Lq; ++i) any |= qm[i];
    if (!any) { out[p] = 0.f; continue; }  // a query with no valid token sums nothing
    const int64_t t0 = offsets[b], t1 = offsets[b + 1];
    if (t1 <= t0) { out[p] = NEG_INF; continue; }  // an empty document
    const float* tab = table + a * C * LP;
    // The launcher validated every code (ops/centroid_interaction.py); an out-of-range one is clamped to row 0 and
    // reported, never read past the table. The hot loop is branch-free: one row load and LP maxes per token.
    alignas(64) float acc[LP];
    const int bad_code = ci_row_max<LP, int32_t>(tab, codes, t0, t1, C, acc);
    if (bad_code) bad->store(2);
    // only valid query tokens are summed: masked columns (and the padding past Lq) may hold anything
    float s = 0.f;
    for (int64_t i = 0; i < Lq; ++i)
      if (qm[i]) s += acc[i];
    out[p] = s;
  }
}

// ---- residual_maxsim ------------------------------------------------------------------------------------------------
// best[i] = max(best[i], max_j table[code_j, i] + q_i . buf[:, j]) for 4 query tokens at once: each 16-float row of the
// transposed residual tile is loaded once for 4 FMAs, and the j loop maps onto one 512-bit (or two 256-bit) register.
void tile_maxdots(const float* __restrict q, const bool* __restrict qm, int64_t Lq, const float* __restrict buf,
                  int64_t D, int nt, const float* __restrict tab, int64_t LP, const int32_t* __restrict tcodes,
                  float* __restrict best) {
  for (int64_t i0 = 0; i0 < Lq; i0 += 4) {
    const int ni = static_cast<int>(std::min<int64_t>(4, Lq - i0));
    float acc[4][TILE] = {};
    const float* q0 = q + i0 * D;
    const float* q1 = q + std::min<int64_t>(i0 + 1, Lq - 1) * D;
    const float* q2 = q + std::min<int64_t>(i0 + 2, Lq - 1) * D;
    const float* q3 = q + std::min<int64_t>(i0 + 3, Lq - 1) * D;
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
    for (int k = 0; k < ni; ++k) {
      if (!qm[i0 + k]) continue;
      float m = best[i0 + k];
      // std::max(m, NaN) keeps m: a NaN pair score is skipped (the documented semantics)
      for (int j = 0; j < nt; ++j) m = std::max(m, acc[k][j] + tab[static_cast<int64_t>(tcodes[j]) * LP + i0 + k]);
      best[i0 + k] = m;
    }
  }
}

// Residuals of up to TILE tokens into the transposed tile buf[d * TILE + j] (zeros past nt).
template <int NBITS>
void decode_tile(const float* __restrict w, const uint8_t* __restrict pk, int64_t P, int64_t D, int nt,
                 float* __restrict buf) {
  constexpr int K = 1 << NBITS, PER = 8 / NBITS, MASK = K - 1;
  for (int j = 0; j < TILE; ++j) {
    if (j >= nt) {
      for (int64_t d = 0; d < D; ++d) buf[d * TILE + j] = 0.f;
      continue;
    }
    const uint8_t* row = pk + j * P;
    for (int64_t p = 0; p < P; ++p) {
      const int byte = row[p];
      for (int s = 0; s < PER; ++s) {
        const int64_t d = p * PER + s;
        buf[d * TILE + j] = w[d * K + ((byte >> (s * NBITS)) & MASK)];
      }
    }
  }
}

// Pairs (query, candidate) are grouped by document (the launcher sorts them), so each document is decoded once per
// call however many queries share it; its tiles are then scored against every query of the group.
template <int NBITS>
void residual_maxsim_impl(const float* q, const bool* q_mask, const float* table, const float* weights,
                          const int32_t* codes, const uint8_t* packed, const int64_t* offsets, const int64_t* cand,
                          const int64_t* order, const int64_t* group_off, int64_t n_groups, float* out, int64_t Lq,
                          int64_t D, int64_t C, int64_t LP, int64_t Nd, int64_t Nc, int nthreads) {
  const int64_t P = D * NBITS / 8;
  std::atomic<int> bad{0};
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> buf(static_cast<size_t>(D) * TILE);
    std::vector<float> best;
    int32_t tcodes[TILE];
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < n_groups; ++g) {
      const int64_t p0 = group_off[g], p1 = group_off[g + 1];
      const int64_t b = cand[order[p0]];
      if (b < 0) {
        for (int64_t p = p0; p < p1; ++p) out[order[p]] = NEG_INF;
        continue;
      }
      if (b >= Nd) {
        bad.store(1);
        for (int64_t p = p0; p < p1; ++p) out[order[p]] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      best.assign(static_cast<size_t>((p1 - p0) * Lq), NEG_INF);
      const int64_t t_end = offsets[b + 1];
      for (int64_t t0 = offsets[b]; t0 < t_end; t0 += TILE) {
        const int nt = static_cast<int>(std::min<int64_t>(TILE, t_end - t0));
        for (int j = 0; j < TILE; ++j) {
          const int32_t code = j < nt ? codes[t0 + j] : 0;
          if (code < 0 || code >= C) bad.store(2);
          tcodes[j] = (code < 0 || code >= C) ? 0 : code;
        }
        decode_tile<NBITS>(weights, packed + t0 * P, P, D, nt, buf.data());
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t a = order[p] / Nc;
          tile_maxdots(q + a * Lq * D, q_mask + a * Lq, Lq, buf.data(), D, nt, table + a * C * LP, LP, tcodes,
                       best.data() + (p - p0) * Lq);
        }
      }
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t a = order[p] / Nc;
        const bool* qm = q_mask + a * Lq;
        float s = 0.f;
        for (int64_t i = 0; i < Lq; ++i)
          if (qm[i]) s += best[(p - p0) * Lq + i];  // an empty document leaves -inf: it scores -inf
        out[order[p]] = s;  // a query with no valid token sums nothing: 0
      }
    }
  }
  REATT_CHECK(bad.load() != 1, "residual_maxsim: a candidate document id is >= the number of documents");
  REATT_CHECK(bad.load() != 2, "residual_maxsim: a token's centroid code is out of range");
}

