// plaid_search on the CPU: a residual index's whole search for a batch of queries in one call and one parallel region.
// Semantics (THE spec): reatt_kernels/reference/plaid_search.py. Launcher: reatt_kernels/cpu/plaid_search.py.
//
//   (1) centroid interaction  approx(a, b) = sum_{i < nq_a} max_{t in b} table[a, code_t, i]   over every candidate
//   (2) selection             each query's ncand best (score, then lower row), excluded / empty documents never
//   (3) rerank                score(a, b) = sum_{i < nq_a} max_{t in b} (table[a, code_t, i] + q_ai . r_t),
//                             r_t[d] = weights[d, bucket(t, d)]: the residual decoded 32 tokens at a time into a
//                             transposed fp32 tile, each chosen document decoded once for all the queries that chose it;
//                             q . r in fp32 FMAs (avx512, avx2, scalar) or bf16 pairs (avx512_bf16: vdpbf16ps)
//   (4) top-k                 each query's k best by rerank score, -inf / -1 where fewer qualify
//
// Why one call: the staged pipeline (centroid_interaction, topk, residual_maxsim, topk as separate torch ops) paid
// per-op dispatch, a per-call validation pass over every code (min / max: as much traffic as stage 1 itself) and a
// Python grouping of the pairs; here the checks ride along in the loops (one compare per token) and nothing leaves the
// parallel region. Costs per query, at T tokens, nq valid query tokens, M reranked documents of L tokens:
//   (1) T code reads (2 or 4 B) + T table rows of LP floats (L2-resident); T * LP max operations
//   (3) M L D nbits / 8 bytes of buckets; M L (D / 16) * 4 decode instructions; M L nq D multiply-adds
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif

#ifdef REATT_WITH_OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "cpu_dtype.h"
#include "cpu_isa.h"
#include "plaid_search/plaid_search_args.h"

namespace reatt {
namespace {

#if REATT_ISA_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c")
namespace avx512bf16 {
#define REATT_PS_LEVEL 3
#include "plaid_search/plaid_search_cpu_isa.h"  // NOLINT: included once per ISA, on purpose
#undef REATT_PS_LEVEL
}  // namespace avx512bf16
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
namespace avx512 {
#define REATT_PS_LEVEL 2
#include "plaid_search/plaid_search_cpu_isa.h"  // NOLINT: included once per ISA, on purpose
#undef REATT_PS_LEVEL
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define REATT_PS_LEVEL 1
#include "plaid_search/plaid_search_cpu_isa.h"  // NOLINT: included once per ISA, on purpose
#undef REATT_PS_LEVEL
}  // namespace avx2
#pragma GCC pop_options
#endif
namespace scalar {
#define REATT_PS_LEVEL 0
#include "plaid_search/plaid_search_cpu_isa.h"  // NOLINT: included once per ISA, on purpose
#undef REATT_PS_LEVEL
}  // namespace scalar

template <int NBITS, typename Code>
void run(int level, const PlaidSearchArgs& a) {
  switch (level) {
#if REATT_ISA_X86
    case cpu_isa::kAvx512Bf16: avx512bf16::plaid_search_impl<NBITS, Code>(a); return;
    case cpu_isa::kAvx512: avx512::plaid_search_impl<NBITS, Code>(a); return;
    case cpu_isa::kAvx2: avx2::plaid_search_impl<NBITS, Code>(a); return;
#endif
    default: scalar::plaid_search_impl<NBITS, Code>(a); return;
  }
}

template <typename Code>
void run_nbits(int level, const PlaidSearchArgs& a) {
  switch (a.nbits) {
    case 1: run<1, Code>(level, a); return;
    case 2: run<2, Code>(level, a); return;
    case 4: run<4, Code>(level, a); return;
    case 8: run<8, Code>(level, a); return;
    default: REATT_CHECK(false, "plaid_search: nbits must be 1, 2, 4 or 8, got " + std::to_string(a.nbits));
  }
}

void plaid_search_cpu(const PlaidSearchArgs& a) {
  REATT_CHECK(a.Bq >= 0 && a.D > 0 && a.C > 0 && a.Nd >= 0 && a.T >= 0 && a.Nc >= 0, "plaid_search: bad sizes");
  REATT_CHECK(a.LP == 16 || a.LP == 32 || a.LP == 48 || a.LP == 64,
              "plaid_search: LP (table columns) must be 16, 32, 48 or 64, got " + std::to_string(a.LP));
  REATT_CHECK(a.k >= 1, "plaid_search: k must be >= 1");
  REATT_CHECK(a.ncand >= 1, "plaid_search: ncand must be >= 1");
  REATT_CHECK((a.D * a.nbits) % 8 == 0, "plaid_search: D * nbits must be a multiple of 8");
  REATT_CHECK(a.code_dtype == kInt32 || a.code_dtype == kUInt16, "plaid_search: codes must be int32 or uint16");
  REATT_CHECK(a.code_dtype == kInt32 || a.C <= 65536, "plaid_search: uint16 codes need C <= 65536");
  REATT_CHECK(a.nthreads >= 1, "plaid_search: nthreads must be >= 1");
  if (a.Bq == 0) return;
  REATT_CHECK(a.table && a.q && a.n_valid && a.weights && a.offsets && a.out_scores && a.out_docs &&
                  (a.T == 0 || (a.codes && a.packed)),
              "plaid_search: a required pointer is null");
  // "auto" runs the fp32 rerank (avx512 at most): the bf16 rerank (vdpbf16ps) measured only about 5 % faster on a
  // Zen 5 (the decode, not the multiply-adds, holds the rerank back at 9-32 query tokens) and rounds the residual
  // half of every score to bf16, so it runs only when asked for (REATT_CPU_ISA=avx512_bf16).
  const bool automatic = a.isa.empty() || a.isa == "auto";
  const int level = cpu_isa::resolve(a.isa, automatic ? cpu_isa::kAvx512 : cpu_isa::kAvx512Bf16, "plaid_search");
  if (a.code_dtype == kInt32)
    run_nbits<int32_t>(level, a);
  else
    run_nbits<uint16_t>(level, a);
}

const RegisterBindings plaid_search_bindings([](pybind11::module_& m) {
  bind_plaid_search_args(m);
  m.def("plaid_search_cpu", &plaid_search_cpu,
        "A residual index's search in one call: centroid interaction, selection, decompressed rerank, top-k (a "
        "PlaidSearchArgs; writes out_scores fp32 [Bq, k] and out_docs int64 [Bq, k])",
        pybind11::call_guard<pybind11::gil_scoped_release>(), pybind11::arg("args"));
});

}  // namespace
}  // namespace reatt
