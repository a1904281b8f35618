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
#include <string>
#include <vector>

#ifdef REATT_WITH_OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "cpu_isa.h"
#if REATT_ISA_X86
#include <immintrin.h>  // the centroid row max (centroid_row_max_cpu.h) is written with intrinsics
#endif
#include "residual_maxsim/residual_maxsim_args.h"

namespace reatt {
namespace {

// ---- the per-ISA instantiations ------------------------------------------------------------------------------------
// The loops are plain C++ (the compiler vectorises them for each target), except the centroid row max, written with
// intrinsics in centroid_row_max_cpu.h because GCC left it scalar; what differs is the vector width the compiler may
// use: 512-bit (avx512), 256-bit with FMA (avx2), or the baseline 128-bit SSE2 (scalar).
#if REATT_ISA_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#define REATT_CI_SIMD 2
namespace avx512 {
#include "residual_maxsim/residual_maxsim_cpu_isa.h"  // NOLINT: included once per ISA, on purpose
}  // namespace avx512
#undef REATT_CI_SIMD
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define REATT_CI_SIMD 1
namespace avx2 {
#include "residual_maxsim/residual_maxsim_cpu_isa.h"  // NOLINT: included once per ISA, on purpose
}  // namespace avx2
#undef REATT_CI_SIMD
#pragma GCC pop_options
#endif
#define REATT_CI_SIMD 0
namespace scalar {
#include "residual_maxsim/residual_maxsim_cpu_isa.h"  // NOLINT: included once per ISA, on purpose
}  // namespace scalar
#undef REATT_CI_SIMD

// One function of each level's namespace, chosen by the resolved level (REATT_CPU_ISA through args.isa).
#if REATT_ISA_X86
#define REATT_BY_LEVEL(level, fn, ...)                          \
  do {                                                          \
    switch (level) {                                            \
      case cpu_isa::kAvx512: avx512::fn(__VA_ARGS__); break;    \
      case cpu_isa::kAvx2: avx2::fn(__VA_ARGS__); break;        \
      default: scalar::fn(__VA_ARGS__); break;                  \
    }                                                           \
  } while (0)
#else
#define REATT_BY_LEVEL(level, fn, ...) scalar::fn(__VA_ARGS__)
#endif

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
  const int level = cpu_isa::resolve(a.isa, cpu_isa::kAvx512, "residual_maxsim");
  switch (nbits) {
    case 1: REATT_BY_LEVEL(level, residual_maxsim_impl<1>, qp, mp, tp, wp, cd, pk, of, ca, od, go, n_groups, op, Lq, D, C,
                            LP, Nd, Nc, nt); break;
    case 2: REATT_BY_LEVEL(level, residual_maxsim_impl<2>, qp, mp, tp, wp, cd, pk, of, ca, od, go, n_groups, op, Lq, D, C,
                            LP, Nd, Nc, nt); break;
    case 4: REATT_BY_LEVEL(level, residual_maxsim_impl<4>, qp, mp, tp, wp, cd, pk, of, ca, od, go, n_groups, op, Lq, D, C,
                            LP, Nd, Nc, nt); break;
    case 8: REATT_BY_LEVEL(level, residual_maxsim_impl<8>, qp, mp, tp, wp, cd, pk, of, ca, od, go, n_groups, op, Lq, D, C,
                            LP, Nd, Nc, nt); break;
    default: REATT_CHECK(false, "residual_maxsim: nbits must be 1, 2, 4 or 8");
  }
}

// cand: int64 [Bq, Nc] (-1 = padding), or 0 for "every document" (Nc = Nd). table: fp32 [Bq, C, LP], LP in
// {16, 32, 48, 64} and >= Lq; q_mask: bool [Bq, Lq].
void centroid_interaction_fwd_cpu(uintptr_t table, uintptr_t q_mask, uintptr_t codes, uintptr_t offsets, uintptr_t cand,
                                  uintptr_t out, int64_t Bq, int64_t Lq, int64_t C, int64_t LP, int64_t Nd, int64_t Nc,
                                  int nthreads, const std::string& isa) {
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
  const int level = cpu_isa::resolve(isa, cpu_isa::kAvx512, "centroid_interaction");
  switch (LP) {
    case 16: REATT_BY_LEVEL(level, ci_impl<16>, tp, mp, cp, of, ca, op, Bq, Lq, C, Nd, Nc, nt, &bad); break;
    case 32: REATT_BY_LEVEL(level, ci_impl<32>, tp, mp, cp, of, ca, op, Bq, Lq, C, Nd, Nc, nt, &bad); break;
    case 48: REATT_BY_LEVEL(level, ci_impl<48>, tp, mp, cp, of, ca, op, Bq, Lq, C, Nd, Nc, nt, &bad); break;
    case 64: REATT_BY_LEVEL(level, ci_impl<64>, tp, mp, cp, of, ca, op, Bq, Lq, C, Nd, Nc, nt, &bad); break;
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
        pybind11::call_guard<pybind11::gil_scoped_release>(), pybind11::arg("table"), pybind11::arg("q_mask"),
        pybind11::arg("codes"), pybind11::arg("offsets"), pybind11::arg("cand"), pybind11::arg("out"),
        pybind11::arg("Bq"), pybind11::arg("Lq"), pybind11::arg("C"), pybind11::arg("LP"), pybind11::arg("Nd"),
        pybind11::arg("Nc"), pybind11::arg("nthreads"), pybind11::arg("isa") = "auto");
});

}  // namespace
}  // namespace reatt
