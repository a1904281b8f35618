// residual_maxsim and centroid_interaction on the CPU: the two scoring kernels of the residual index's search.
//
// Both read a per-query centroid score table instead of the centroids themselves:
//     table[a, c, i] = q[a, i] . centroids[c]      fp32 [Bq, C, LP], LP = Lq rounded up to 16 (zero columns past Lq)
// computed by the launcher with one matmul (2 Bq Lq C D FLOPs). A token t with centroid code c_t then costs one
// LP-float row read (64 B per 16 query tokens) for its centroid part, where decompressing reads the D-float centroid
// row (1.5 KiB at D = 384) and spends Lq D multiply-adds on it.
//
// centroid_interaction (PLAID's approximate score, candidate pruning):
//     ci(a, c) = sum_i max_{t in doc cand[a, c]} table[a, code_t, i]
//   Masked query tokens have zero columns (the launcher zeroes them), so they add max(0) = 0. Per token: one table row
//   (LP floats, L2-resident: C LP 4 B = 1 MiB at C = 16384, LP = 16) and one 4-byte code. No residual is read.
//
// residual_maxsim (fused decompress + MaxSim, the rerank):
//     score(a, c) = sum_{i valid} max_t ( table[a, code_t, i] + q[a, i] . r_t ),   r_t[d] = weights[d, bucket(t, d)]
//   which equals q . (centroid + residual) up to fp32 rounding. Per token: D * nbits / 8 bytes of buckets, D weight
//   lookups (shared by every query token and every query of the batch that holds the document), Lq D multiply-adds.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#ifdef REATT_WITH_OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "residual_maxsim/residual_maxsim_args.h"

namespace reatt {
namespace {

constexpr int TILE = 16;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// ---- centroid interaction -------------------------------------------------------------------------------------------
// One (query, candidate) pair per iteration; the running max over the document's tokens is LP floats in registers.
template <int LP>
__attribute__((target_clones("avx512f", "avx2", "default")))
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
    int32_t bad_code = 0;
    float acc[LP];
    {
      const int32_t code = codes[t0];
      const bool ok = code >= 0 && code < C;
      bad_code |= !ok;
      const float* r = tab + static_cast<int64_t>(ok ? code : 0) * LP;
      for (int i = 0; i < LP; ++i) acc[i] = r[i];
    }
    for (int64_t t = t0 + 1; t < t1; ++t) {
      const int32_t code = codes[t];
      const bool ok = code >= 0 && code < C;
      bad_code |= !ok;
      const float* r = tab + static_cast<int64_t>(ok ? code : 0) * LP;
      for (int i = 0; i < LP; ++i) acc[i] = std::max(acc[i], r[i]);
    }
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
__attribute__((target_clones("avx512f", "avx2", "default")))
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

// order: int64 [Bq * Nc] flat pair indices sorted by document; group_off: int64 [n_groups + 1] bounds of each
// document's run in order. table: fp32 [Bq, C, LP].
void residual_maxsim_fwd_cpu(const ResidualMaxsimArgs& a) {
  const uintptr_t q = a.q, q_mask = a.q_mask, table = a.table, weights = a.weights, codes = a.codes;
  const uintptr_t packed = a.packed, offsets = a.offsets, cand = a.cand, order = a.order, group_off = a.group_off;
  const uintptr_t out = a.out;
  const int64_t n_groups = a.n_groups, Bq = a.Bq, Lq = a.Lq, D = a.D, C = a.C, LP = a.LP, Nd = a.Nd, Nc = a.Nc;
  const int nbits = a.nbits, nthreads = a.nthreads;
  REATT_CHECK(table != 0, "residual_maxsim: the cpu kernel needs the centroid score table (args.table)");
  REATT_CHECK(Bq >= 0 && Lq >= 0 && D > 0 && Nd >= 0 && Nc >= 0 && C > 0, "residual_maxsim: bad sizes");
  REATT_CHECK(LP >= Lq, "residual_maxsim: the centroid score table must have at least Lq columns");
  REATT_CHECK((D * nbits) % 8 == 0, "residual_maxsim: D * nbits must be a multiple of 8");
  auto* qp = reinterpret_cast<const float*>(q);
  auto* mp = reinterpret_cast<const bool*>(q_mask);
  auto* tp = reinterpret_cast<const float*>(table);
  auto* wp = reinterpret_cast<const float*>(weights);
  auto* cd = reinterpret_cast<const int32_t*>(codes);
  auto* pk = reinterpret_cast<const uint8_t*>(packed);
  auto* of = reinterpret_cast<const int64_t*>(offsets);
  auto* ca = reinterpret_cast<const int64_t*>(cand);
  auto* op = reinterpret_cast<float*>(out);
  auto* od = reinterpret_cast<const int64_t*>(order);
  auto* go = reinterpret_cast<const int64_t*>(group_off);
  const int nt = std::max(1, nthreads);
  switch (nbits) {
    case 1: residual_maxsim_impl<1>(qp, mp, tp, wp, cd, pk, of, ca, od, go, n_groups, op, Lq, D, C, LP, Nd, Nc, nt); break;
    case 2: residual_maxsim_impl<2>(qp, mp, tp, wp, cd, pk, of, ca, od, go, n_groups, op, Lq, D, C, LP, Nd, Nc, nt); break;
    case 4: residual_maxsim_impl<4>(qp, mp, tp, wp, cd, pk, of, ca, od, go, n_groups, op, Lq, D, C, LP, Nd, Nc, nt); break;
    case 8: residual_maxsim_impl<8>(qp, mp, tp, wp, cd, pk, of, ca, od, go, n_groups, op, Lq, D, C, LP, Nd, Nc, nt); break;
    default: REATT_CHECK(false, "residual_maxsim: nbits must be 1, 2, 4 or 8");
  }
}

// cand: int64 [Bq, Nc] (-1 = padding), or 0 for "every document" (Nc = Nd). table: fp32 [Bq, C, LP], LP in
// {16, 32, 48, 64} and >= Lq; q_mask: bool [Bq, Lq].
void centroid_interaction_fwd_cpu(uintptr_t table, uintptr_t q_mask, uintptr_t codes, uintptr_t offsets, uintptr_t cand,
                                  uintptr_t out, int64_t Bq, int64_t Lq, int64_t C, int64_t LP, int64_t Nd, int64_t Nc,
                                  int nthreads) {
  REATT_CHECK(Bq >= 0 && C > 0 && Nd >= 0 && Nc >= 0 && Lq >= 0, "centroid_interaction: bad sizes");
  REATT_CHECK(LP >= Lq, "centroid_interaction: the table must have at least Lq columns");
  auto* mp = reinterpret_cast<const bool*>(q_mask);
  REATT_CHECK(cand != 0 || Nc == Nd, "centroid_interaction: without cand, Nc must equal the number of documents");
  auto* tp = reinterpret_cast<const float*>(table);
  auto* cp = reinterpret_cast<const int32_t*>(codes);
  auto* of = reinterpret_cast<const int64_t*>(offsets);
  auto* ca = reinterpret_cast<const int64_t*>(cand);
  auto* op = reinterpret_cast<float*>(out);
  const int nt = std::max(1, nthreads);
  std::atomic<int> bad{0};
  switch (LP) {
    case 16: ci_impl<16>(tp, mp, cp, of, ca, op, Bq, Lq, C, Nd, Nc, nt, &bad); break;
    case 32: ci_impl<32>(tp, mp, cp, of, ca, op, Bq, Lq, C, Nd, Nc, nt, &bad); break;
    case 48: ci_impl<48>(tp, mp, cp, of, ca, op, Bq, Lq, C, Nd, Nc, nt, &bad); break;
    case 64: ci_impl<64>(tp, mp, cp, of, ca, op, Bq, Lq, C, Nd, Nc, nt, &bad); break;
    default: REATT_CHECK(false, "centroid_interaction: LP (table columns) must be 16, 32, 48 or 64");
  }
  REATT_CHECK(bad.load() != 1, "centroid_interaction: a candidate document id is >= the number of documents");
  REATT_CHECK(bad.load() != 2, "centroid_interaction: a token's centroid code is out of range");
}

RegisterBindings reg_residual([](pybind11::module_& m) {
  bind_residual_maxsim_args(m);
  m.def("residual_maxsim_fwd_cpu", &residual_maxsim_fwd_cpu,
        "Fused decompress + MaxSim over candidates on the CPU from a centroid score table (a ResidualMaxsimArgs with "
        "table fp32 [Bq, C, LP], LP and nthreads set)",
        pybind11::call_guard<pybind11::gil_scoped_release>(), pybind11::arg("args"));
  m.def("centroid_interaction_fwd_cpu", &centroid_interaction_fwd_cpu,
        "PLAID centroid interaction: sum over query tokens of the max over a document's tokens of table[code, i]",
        pybind11::call_guard<pybind11::gil_scoped_release>());
});

}  // namespace
}  // namespace reatt
