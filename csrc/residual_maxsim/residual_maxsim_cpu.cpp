// residual_maxsim on the CPU: fused decompress + MaxSim over each query's candidate documents.
//
// score(a, c) = sum_{i valid} max_{t in doc cand[a, c]} q[a, i] . (centroids[codes[t]] + weights[d, bucket(t, d)])
//
// One OpenMP task per (query, candidate) pair. A document is decoded TILE tokens at a time into a transposed
// [D][TILE] fp32 buffer (D * TILE * 4 = 8 KiB at D = 128: L1-resident) and never as a whole candidate set, so memory
// traffic is the compressed bytes only: 4 + D * nbits / 8 bytes per token (36 B at 2 bits, D = 128) plus a centroid
// row (shared across tokens, cache-resident for hot centroids). FLOPs: 2 * Lq * D per (query, token) pair.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"
#include "residual_maxsim/residual_maxsim_args.h"

namespace reatt {
namespace {

constexpr int TILE = 16;

// best[i] = max(best[i], max_j q_i . buf[:, j]) for 4 query tokens at once: each 16-float row of the transposed tile is
// loaded once for 4 FMAs, and the j loop maps onto one 512-bit (or two 256-bit) register with no horizontal reduction.
__attribute__((target_clones("avx512f", "avx2", "default")))
void tile_maxdots(const float* __restrict q, const bool* __restrict qm, int64_t Lq, const float* __restrict buf,
                  int64_t D, int nt, float* __restrict best) {
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
      for (int j = 0; j < nt; ++j) m = std::max(m, acc[k][j]);
      best[i0 + k] = m;
    }
  }
}

// Decode one token into row[D] (contiguous, so the weight lookup vectorises as a gather): unpack the buckets first,
// then v[d] = centroid[d] + weights[d * 2^NBITS + bucket[d]].
template <int NBITS>
__attribute__((target_clones("avx512f", "avx2", "default")))
void decode_row(const float* __restrict cent, const float* __restrict w, const uint8_t* __restrict pk, int64_t D,
                int32_t* __restrict idx, float* __restrict row) {
  constexpr int K = 1 << NBITS;
  constexpr int PER = 8 / NBITS;
  constexpr int MASK = K - 1;
  const int64_t P = D / PER;
  for (int64_t p = 0; p < P; ++p) {
    const int byte = pk[p];
    for (int s = 0; s < PER; ++s) idx[p * PER + s] = static_cast<int32_t>((p * PER + s) * K + ((byte >> (s * NBITS)) & MASK));
  }
  for (int64_t d = 0; d < D; ++d) row[d] = cent[d] + w[idx[d]];
}

// Pairs (query, candidate) are grouped by document (the launcher sorts them), so each document is decoded once per
// call however many queries share it; its tiles are then scored against every query of the group.
template <int NBITS>
void residual_maxsim_impl(const float* q, const bool* q_mask, const float* centroids, const float* weights,
                          const int32_t* codes, const uint8_t* packed, const int64_t* offsets, const int64_t* cand,
                          const int64_t* order, const int64_t* group_off, int64_t n_groups, float* out, int64_t Lq,
                          int64_t D, int64_t C, int64_t Nd, int64_t Nc) {
  const int64_t P = D * NBITS / 8;
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  std::atomic<int> bad{0};
#pragma omp parallel
  {
    std::vector<float> buf(static_cast<size_t>(D) * TILE);
    std::vector<float> row(static_cast<size_t>(D));
    std::vector<int32_t> idx(static_cast<size_t>(D));
    std::vector<float> best;
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
          if (j < nt) {
            const int32_t code = codes[t0 + j];
            if (code < 0 || code >= C) { bad.store(2); std::fill(row.begin(), row.end(), 0.f); }
            else decode_row<NBITS>(centroids + static_cast<int64_t>(code) * D, weights, packed + (t0 + j) * P, D,
                                   idx.data(), row.data());
          } else {
            std::fill(row.begin(), row.end(), 0.f);
          }
          for (int64_t d = 0; d < D; ++d) buf[d * TILE + j] = row[d];
        }
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t a = order[p] / Nc;
          tile_maxdots(q + a * Lq * D, q_mask + a * Lq, Lq, buf.data(), D, nt, best.data() + (p - p0) * Lq);
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
// document's run in order.
void residual_maxsim_fwd_cpu(const ResidualMaxsimArgs& a) {
  const uintptr_t q = a.q, q_mask = a.q_mask, centroids = a.centroids, weights = a.weights, codes = a.codes;
  const uintptr_t packed = a.packed, offsets = a.offsets, cand = a.cand, order = a.order, group_off = a.group_off;
  const uintptr_t out = a.out;
  const int64_t n_groups = a.n_groups, Bq = a.Bq, Lq = a.Lq, D = a.D, C = a.C, Nd = a.Nd, Nc = a.Nc;
  const int nbits = a.nbits;
  REATT_CHECK(Bq >= 0 && Lq >= 0 && D > 0 && Nd >= 0 && Nc >= 0, "residual_maxsim: bad sizes");
  REATT_CHECK((D * nbits) % 8 == 0, "residual_maxsim: D * nbits must be a multiple of 8");
  auto* qp = reinterpret_cast<const float*>(q);
  auto* mp = reinterpret_cast<const bool*>(q_mask);
  auto* cp = reinterpret_cast<const float*>(centroids);
  auto* wp = reinterpret_cast<const float*>(weights);
  auto* cd = reinterpret_cast<const int32_t*>(codes);
  auto* pk = reinterpret_cast<const uint8_t*>(packed);
  auto* of = reinterpret_cast<const int64_t*>(offsets);
  auto* ca = reinterpret_cast<const int64_t*>(cand);
  auto* op = reinterpret_cast<float*>(out);
  auto* od = reinterpret_cast<const int64_t*>(order);
  auto* go = reinterpret_cast<const int64_t*>(group_off);
  switch (nbits) {
    case 1: residual_maxsim_impl<1>(qp, mp, cp, wp, cd, pk, of, ca, od, go, n_groups, op, Lq, D, C, Nd, Nc); break;
    case 2: residual_maxsim_impl<2>(qp, mp, cp, wp, cd, pk, of, ca, od, go, n_groups, op, Lq, D, C, Nd, Nc); break;
    case 4: residual_maxsim_impl<4>(qp, mp, cp, wp, cd, pk, of, ca, od, go, n_groups, op, Lq, D, C, Nd, Nc); break;
    case 8: residual_maxsim_impl<8>(qp, mp, cp, wp, cd, pk, of, ca, od, go, n_groups, op, Lq, D, C, Nd, Nc); break;
    default: REATT_CHECK(false, "residual_maxsim: nbits must be 1, 2, 4 or 8");
  }
}

RegisterBindings reg_residual([](pybind11::module_& m) {
  bind_residual_maxsim_args(m);
  m.def("residual_maxsim_fwd_cpu", &residual_maxsim_fwd_cpu,
        "Fused decompress + MaxSim over candidates on the CPU (a ResidualMaxsimArgs)",
        pybind11::call_guard<pybind11::gil_scoped_release>(), pybind11::arg("args"));
});

}  // namespace
}  // namespace reatt
