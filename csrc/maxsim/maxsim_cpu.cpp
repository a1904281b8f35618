// MaxSim on the CPU: forward (scores + argmax) and backward (dq gather, dd scatter, dbias), all three layouts
// (padded + d_mask, packed + offsets, grouped), fp32 / fp16 / bf16 inputs with fp32 accumulation, any strides.
// Semantics: reatt_kernels/reference/maxsim.py (THE spec).
//
// Structure: the kernels live in maxsim_cpu_isa.h and are compiled four times here, each inside a namespace under
// `#pragma GCC target`: avx512bf16 (AVX-512 + VDPBF16PS for bf16 inputs), avx512, avx2 (+FMA, F16C) and scalar
// (portable C++ the compiler vectorises for the baseline ISA). maxsim_*_cpu pick the best one the running CPU
// supports (__builtin_cpu_supports), so the binary runs on any x86-64 without -march=native. Other architectures (and
// compilers other than GCC) get the scalar path only.
//
// Parallelism (OpenMP, thread count passed in from torch.get_num_threads()):
// - forward: over (document, query chunk) items; each (query, document) pair is computed by one thread with a fixed
//   operation order, so scores and argmax are bitwise independent of the thread count.
// - backward: dq over (query, token) rows (each row sums its documents in order); dd over documents (each document's
//   rows are owned by one thread, summed over (query, token) in order); dbias in fixed blocks of documents whose
//   partial sums are added in block order. So the backward is deterministic for every thread count, and the
//   `deterministic` flag of the op is a no-op on this backend.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// The SIMD paths need GCC (per-namespace `#pragma GCC target` regions); other compilers build the portable path only.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define REATT_X86 1
#include <immintrin.h>
#else
#define REATT_X86 0
#endif

#ifdef REATT_WITH_OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "cpu_dtype.h"
#include "cpu_isa.h"
#include "maxsim/maxsim_args.h"
#include "maxsim/maxsim_cpu.h"

namespace py = pybind11;

// Document tokens per segment: the forward's per-thread scratch is O(segment), not O(longest document). The binding's
// `seg` argument overrides it (the tests use tiny segments to cover the multi-segment path on small inputs).
#ifndef REATT_MAXSIM_SEG
#define REATT_MAXSIM_SEG 1024
#endif

namespace reatt {
namespace maxsim_cpu {

// ---- the per-ISA instantiations -----------------------------------------------------------------------------------------
#if REATT_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c")
namespace avx512bf16 {
#define REATT_BF16DP 1
constexpr int W = 16;
constexpr int NJ_MAX = 12;  // 2 x 12 zmm accumulators + 2 query vectors of the 32 registers
#define REATT_NJ_LIST 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
#include "maxsim/maxsim_cpu_avx512.h"  // NOLINT: included once per AVX-512 variant, on purpose
#include "maxsim/maxsim_cpu_isa.h"  // NOLINT: included once per ISA, on purpose
#undef REATT_BF16DP
#undef REATT_NJ_LIST
}  // namespace avx512bf16
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
namespace avx512 {
#define REATT_BF16DP 0
constexpr int W = 16;
constexpr int NJ_MAX = 12;
#define REATT_NJ_LIST 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
#include "maxsim/maxsim_cpu_avx512.h"  // NOLINT: included once per AVX-512 variant, on purpose
#include "maxsim/maxsim_cpu_isa.h"  // NOLINT: included once per ISA, on purpose
#undef REATT_BF16DP
#undef REATT_NJ_LIST
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define REATT_BF16DP 0
constexpr int W = 8;
constexpr int NJ_MAX = 6;  // 2 x 6 ymm accumulators + 2 query vectors + 1 broadcast of the 16 registers
#define REATT_NJ_LIST 1, 2, 3, 4, 5, 6
using Vf = __m256;
using Vi = __m256i;
static inline Vf v_zero() { return _mm256_setzero_ps(); }
static inline Vf v_load(const float* p) { return _mm256_loadu_ps(p); }
static inline Vf v_set1(float x) { return _mm256_set1_ps(x); }
static inline Vf v_fma(Vf a, Vf b, Vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline Vf v_add(Vf a, Vf b) { return _mm256_add_ps(a, b); }
static inline void v_store(float* p, Vf v) { _mm256_storeu_ps(p, v); }
static inline Vi vi_load(const int32_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline void vi_store(int32_t* p, Vi v) { _mm256_storeu_si256((__m256i*)p, v); }
static inline void v_update(Vf s, Vf& m, Vi& id, int32_t j) {
  const __m256 gt = _mm256_cmp_ps(s, m, _CMP_GT_OQ);
  m = _mm256_blendv_ps(m, s, gt);
  id = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(id), _mm256_castsi256_ps(_mm256_set1_epi32(j)), gt));
}
static inline Vf v_gather(const float* base, Vi idx) { return _mm256_i32gather_ps(base, idx, 4); }
static inline void cvt_f16_row(const uint16_t* s, int64_t n, float* d) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) _mm256_storeu_ps(d + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + k))));
  for (; k < n; ++k) d[k] = half_to_float(s[k]);
}
#include "maxsim/maxsim_cpu_isa.h"  // NOLINT: included once per ISA, on purpose
#undef REATT_BF16DP
#undef REATT_NJ_LIST
}  // namespace avx2
#pragma GCC pop_options
#endif  // REATT_X86

// Portable fallback: GCC/Clang vector extensions (4 lanes: one SSE / NEON register), so the same tile compiles to the
// baseline SIMD of any architecture; the compare-and-select is done with bit masks (portable across both compilers).
namespace scalar {
#define REATT_BF16DP 0
constexpr int W = 4;
constexpr int NJ_MAX = 4;  // 2 x 4 accumulators + 2 query vectors + 1 broadcast: fits the 16 SSE registers
#define REATT_NJ_LIST 1, 2, 3, 4
typedef float Vf __attribute__((vector_size(16)));
typedef int32_t Vi __attribute__((vector_size(16)));
static inline Vf v_zero() { return Vf{0.f, 0.f, 0.f, 0.f}; }
static inline Vf v_load(const float* p) {
  Vf r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
static inline Vf v_set1(float x) { return Vf{x, x, x, x}; }
static inline Vf v_fma(Vf a, Vf b, Vf c) { return c + a * b; }
static inline Vf v_add(Vf a, Vf b) { return a + b; }
static inline void v_store(float* p, Vf v) { std::memcpy(p, &v, sizeof(v)); }
static inline Vi vi_load(const int32_t* p) {
  Vi r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
static inline void vi_store(int32_t* p, Vi v) { std::memcpy(p, &v, sizeof(v)); }
static inline void v_update(Vf s, Vf& m, Vi& id, int32_t j) {
  const Vi gt = s > m;  // all ones where s > m (false for NaN)
  const Vi jv = Vi{j, j, j, j};
  m = (Vf)(((Vi)s & gt) | ((Vi)m & ~gt));
  id = (jv & gt) | (id & ~gt);
}
static inline Vf v_gather(const float* base, Vi idx) {
  return Vf{base[idx[0]], base[idx[1]], base[idx[2]], base[idx[3]]};
}
static inline void cvt_f16_row(const uint16_t* s, int64_t n, float* d) {
  for (int64_t k = 0; k < n; ++k) d[k] = half_to_float(s[k]);
}
#include "maxsim/maxsim_cpu_isa.h"  // NOLINT: included once per ISA, on purpose
#undef REATT_BF16DP
#undef REATT_NJ_LIST
}  // namespace scalar

// A float buffer whose data starts on a 64-byte line, so the kernels' zmm loads and stores of packed queries and
// document tiles never straddle two lines (std::vector only promises 16 bytes).
struct LineBuf {
  std::vector<float> v;
  float* p;
  explicit LineBuf(size_t n) : v(n + 16) {
    const uintptr_t u = reinterpret_cast<uintptr_t>(v.data());
    p = v.data() + ((64 - u % 64) % 64) / sizeof(float);
  }
  float* data() { return p; }
};

// ---- run-time ISA choice -------------------------------------------------------------------------------------------------
struct IsaOps {
  const char* name;
  int W;
  void (*pack)(const FwdArgs&, int64_t);
  void (*doc)(const FwdArgs&, int64_t, int64_t, int64_t, float*);
  int64_t (*dq_rows)(const BwdArgs&, const float*, const int64_t*, int64_t, int64_t, float*, float*);
  int64_t (*dd_docs)(const BwdArgs&, const float*, const int32_t*, const int64_t*, const int64_t*, const float*,
                     int64_t, int64_t, float*, float*);
};

#define REATT_OPS(ns) \
  IsaOps { #ns, ns::W, &ns::fwd_pack_query, &ns::fwd_doc, &ns::bwd_dq_rows, &ns::bwd_dd_docs }

// `isa`: "auto" (the best path this CPU runs) or a level name no better than that (csrc/cpu_isa.h; the tests use it to
// run every path on one machine).
static IsaOps pick(const std::string& isa) {
  switch (cpu_isa::resolve(isa, cpu_isa::kAvx512Bf16, "maxsim")) {
#if REATT_X86
    case cpu_isa::kAvx512Bf16: return REATT_OPS(avx512bf16);
    case cpu_isa::kAvx512: return REATT_OPS(avx512);
    case cpu_isa::kAvx2: return REATT_OPS(avx2);
#endif
    default: return REATT_OPS(scalar);
  }
}

static int threads_for(int n_threads) {
  REATT_CHECK(n_threads >= 1, "n_threads must be >= 1, got " + std::to_string(n_threads));
#ifdef REATT_WITH_OPENMP
  return n_threads;
#else
  return 1;
#endif
}

static void check_dtype(int dtype) {
  REATT_CHECK(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16,
              std::string("q/d dtype must be float32, float16 or bfloat16, got ") + dtype_name(dtype));
}

// Longest document of a packed layout, validating the offsets on the way (they index memory).
static int64_t packed_lmax(const int64_t* off, int64_t Nd) {
  REATT_CHECK(off[0] == 0, "d_offsets must start at 0");
  int64_t lmax = 0;
  for (int64_t b = 0; b < Nd; ++b) {
    const int64_t len = off[b + 1] - off[b];
    REATT_CHECK(len >= 0, "d_offsets must be non-decreasing");
    lmax = len > lmax ? len : lmax;
  }
  return lmax;
}

// ---- forward --------------------------------------------------------------------------------------------------------------
// A [n0, n1] tensor the kernels index as row-major contiguous (the masks, grad): its strides must say so.
static bool contiguous_2d(int64_t s0, int64_t s1, int64_t n0, int64_t n1) {
  return (n0 <= 1 || s0 == n1) && (n1 <= 1 || s1 == 1);
}

void maxsim_fwd_cpu(const MaxsimArgs& a) {
  const uintptr_t q = a.q, q_mask = a.q_mask, d = a.d, d_mask = a.d_mask, d_offsets = a.d_offsets;
  const uintptr_t pos_bias = a.pos_bias, scores = a.scores, argmax = a.argmax;
  const int dtype = a.dtype;
  const int64_t Bq = a.Bq, Lq = a.Lq, D = a.D, sq_b = a.sq_b, sq_l = a.sq_l, sq_d = a.sq_d;
  const int64_t Nd = a.Nd, Ld = a.packed() ? 0 : a.Ld, sd_b = a.packed() ? 0 : a.sd_b, sd_l = a.sd_l, sd_d = a.sd_d;
  const int64_t R = a.R, group_size = a.group_size, seg = a.seg;
  const bool mean = a.mean;
  REATT_CHECK(contiguous_2d(a.sqm_b, a.sqm_l, Bq, Lq), "q_mask must be contiguous [Bq, Lq]");
  REATT_CHECK(d_mask == 0 || contiguous_2d(a.sdm_b, a.sdm_l, Nd, Ld), "d_mask must be contiguous [Nd, Ld]");
  check_dtype(dtype);
  REATT_CHECK(Bq >= 0 && Lq >= 0 && Nd >= 0 && Ld >= 0, "q / d sizes must be >= 0");
  REATT_CHECK(D >= 1, "q must have dim >= 1");
  REATT_CHECK(group_size >= 0, "group_size must be >= 0");
  REATT_CHECK(group_size == 0 || Nd == Bq * group_size, "grouped layout needs Nd == Bq * group_size documents");
  REATT_CHECK(group_size == 0 || d_offsets == 0, "grouped layout takes padded documents (no d_offsets)");
  REATT_CHECK(d_offsets == 0 || d_mask == 0, "d_mask is for the padded layout only (packed has d_offsets)");
  REATT_CHECK(pos_bias == 0 || R >= 1, "pos_bias must have R >= 1 entries");
  const int nt = threads_for(a.n_threads);
  const IsaOps ops = pick(a.isa);

  FwdArgs A{};
  A.q = reinterpret_cast<const void*>(q);
  A.Bq = Bq, A.Lq = Lq, A.D = D, A.sq_b = sq_b, A.sq_l = sq_l, A.sq_d = sq_d;
  A.q_mask = reinterpret_cast<const uint8_t*>(q_mask);
  A.d = reinterpret_cast<const void*>(d);
  A.Nd = Nd, A.Ld = Ld, A.sd_b = sd_b, A.sd_l = sd_l, A.sd_d = sd_d;
  A.d_mask = reinterpret_cast<const uint8_t*>(d_mask);
  A.offsets = reinterpret_cast<const int64_t*>(d_offsets);
  A.dtype = dtype;
  A.bias = reinterpret_cast<const float*>(pos_bias);
  A.R = pos_bias ? R : 0;
  A.group_size = group_size;
  A.mean = mean;
  A.scores = reinterpret_cast<float*>(scores);
  A.argmax = reinterpret_cast<int32_t*>(argmax);
  A.C = group_size ? group_size : Nd;
  if (Bq == 0 || A.C == 0 || Lq == 0) {
    // Nothing to scan: write the defined results (0 scores for empty queries, -1 argmax) if anything is there.
    for (int64_t t = 0; t < Bq * A.C; ++t) A.scores[t] = 0.f;
    return;
  }
  REATT_CHECK(q != 0 && q_mask != 0 && scores != 0 && argmax != 0, "q, q_mask, scores and argmax must be non-null");
  if (A.offsets != nullptr) {
    A.Lmax = packed_lmax(A.offsets, Nd);
    REATT_CHECK(A.Lmax == 0 || d != 0, "d_tokens must be non-null when documents have tokens");
  } else {
    A.Lmax = Ld;
    REATT_CHECK(Ld == 0 || d != 0, "d must be non-null when documents have tokens");
  }
  REATT_CHECK(A.Lmax < (int64_t(1) << 31), "documents must have < 2^31 tokens (argmax is int32)");
  A.Lmax = A.Lmax < 1 ? 1 : A.Lmax;
  REATT_CHECK(seg >= 0, "seg must be >= 0 (0: the default segment length)");
  A.Lseg = std::min<int64_t>(A.Lmax, seg > 0 ? seg : REATT_MAXSIM_SEG);
  A.Lqp = (Lq + ops.W - 1) / ops.W * ops.W;
  const bool has_bf16 = std::string(ops.name) == "avx512bf16";
  A.bf16dp = has_bf16 && dtype == kBFloat16;
  A.filt = has_bf16 && dtype != kBFloat16;
  A.Dp = (A.bf16dp || A.filt) ? (D + 1) / 2 * 2 : D;
  A.Dq = (D + 31) / 32 * 32;
  if (a.d_screen != 0) {
    REATT_CHECK(A.offsets != nullptr && a.d_norm != 0, "a prepared corpus (d_screen) needs the packed layout and d_norm");
    REATT_CHECK(a.screen_ld == A.Dq, "d_screen rows must be dim rounded up to 32 (" + std::to_string(A.Dq) +
                                         ") elements apart, got " + std::to_string(a.screen_ld));
    if (A.filt) {  // only the fp32 filter reads a screen; every other path reads d as it is
      A.d16 = reinterpret_cast<const uint16_t*>(a.d_screen);
      A.dnorm = reinterpret_cast<const float*>(a.d_norm);
    }
  }
  A.qpack_stride = (A.bf16dp || A.filt) ? (A.Dp / 2) * A.Lqp : D * A.Lqp;
  LineBuf qpack(static_cast<size_t>(Bq * A.qpack_stride));  // fp32 or uint32 words: both 4 bytes
  std::vector<int32_t> n_valid(static_cast<size_t>(Bq));
  std::vector<int32_t> qidx(static_cast<size_t>(Bq * A.Lqp));
  LineBuf q32(A.filt ? static_cast<size_t>(Bq * Lq * D) : 0);
  LineBuf qnorm(A.filt ? static_cast<size_t>(Bq * A.Lqp) : 0);
  LineBuf qT32(A.filt ? static_cast<size_t>(Bq * D * A.Lqp) : 0);
  A.q32 = q32.data();
  A.qnorm = qnorm.data();
  A.qT32 = qT32.data();
  {
    // |s~ - s^| <= (2u + u^2) |q||d| for bf16 rounding (u = 2^-8), plus the fp32 accumulation error of the bf16 pass
    // (two roundings per pair: D terms) and of the exact rescoring s^ (D FMAs + a 16-lane sum), each <= n 2^-24 |q||d|;
    // 1% on top for the rounded norms.
    const double u = std::ldexp(1.0, -8), gamma = static_cast<double>(2 * D + 32) * std::ldexp(1.0, -24);
    A.filt_c = static_cast<float>((2 * u + u * u + gamma) * 1.01);
  }
  // Packed lanes index the table with their original token i (< Lq + Lqp for padding lanes: fwd_pack_query), against
  // j in [0, Lmax): m = i - j + Lmax - 1 in [0, Lq + Lqp + Lmax - 2).
  A.bias_stride = A.bias ? A.Lq + A.Lqp + A.Lmax - 1 : 0;
  LineBuf bias_tab(static_cast<size_t>(Bq * A.bias_stride));
  A.qpack = qpack.data();
  A.n_valid = n_valid.data();
  A.qidx = qidx.data();
  A.bias_tab = bias_tab.data();

#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t a = 0; a < Bq; ++a) ops.pack(A, a);

  // Work items: (document, chunk of queries). All pairs with few documents split the queries so every thread gets
  // work; grouped documents have their one query.
  int64_t n_ach = 1, qch = Bq;
  if (!group_size && Nd < 4 * nt) {
    n_ach = (4 * nt + Nd - 1) / Nd;
    n_ach = n_ach > Bq ? Bq : n_ach;
    qch = (Bq + n_ach - 1) / n_ach;
    n_ach = (Bq + qch - 1) / qch;
  }
  const int64_t n_items = Nd * n_ach;
  // Per-thread scratch: running (max, argmax), pass-1 (max, argmax), a saved (max, argmax) and pass 1's runner-up
  // [Lqp] each, then one segment of document tiles (fp32 rows, bf16 pairs, and the filter's s~ [Lseg][Lqp]).
  const size_t scratch_floats =
      A.filt ? static_cast<size_t>(7 * A.Lqp + (A.Lseg * D + 15) / 16 * 16 + A.Lseg * A.Dq / 2 + A.Lseg * A.Lqp + 64)
             : static_cast<size_t>(2 * A.Lqp + A.Lseg * A.Dp + 16);
#pragma omp parallel num_threads(nt)
  {
    LineBuf scratch(scratch_floats);
#pragma omp for schedule(dynamic, 8)
    for (int64_t it = 0; it < n_items; ++it) {
      const int64_t b = it / n_ach, ac = it % n_ach;
      int64_t a0, a1;
      if (group_size) {
        a0 = b / group_size;
        a1 = a0 + 1;
      } else {
        a0 = ac * qch;
        a1 = a0 + qch < Bq ? a0 + qch : Bq;
      }
      ops.doc(A, b, a0, a1, scratch.data());
    }
  }
}

// ---- backward -------------------------------------------------------------------------------------------------------------
void maxsim_bwd_cpu(const MaxsimArgs& a) {
  const uintptr_t grad = a.grad, q = a.q, q_mask = a.q_mask, d = a.d, d_offsets = a.d_offsets, argmax = a.argmax;
  const uintptr_t dq = a.dq, dd = a.dd, dbias = a.dbias;
  const int dtype = a.dtype;
  const int64_t Bq = a.Bq, Lq = a.Lq, D = a.D, sq_b = a.sq_b, sq_l = a.sq_l, sq_d = a.sq_d;
  const int64_t Nd = a.Nd, Ld = a.packed() ? 0 : a.Ld, sd_b = a.packed() ? 0 : a.sd_b, sd_l = a.sd_l, sd_d = a.sd_d;
  const int64_t R = a.R, group_size = a.group_size, seg = a.seg;
  const bool mean = a.mean;
  REATT_CHECK(contiguous_2d(a.sqm_b, a.sqm_l, Bq, Lq), "q_mask must be contiguous [Bq, Lq]");
  REATT_CHECK(contiguous_2d(a.sg_b, a.sg_c, Bq, a.n_cols()), "grad must be contiguous [Bq, C]");
  check_dtype(dtype);
  REATT_CHECK(Bq >= 0 && Lq >= 0 && Nd >= 0 && Ld >= 0 && R >= 0, "sizes must be >= 0");
  REATT_CHECK(D >= 1, "q must have dim >= 1");
  REATT_CHECK(group_size >= 0, "group_size must be >= 0");
  REATT_CHECK(group_size == 0 || Nd == Bq * group_size, "grouped layout needs Nd == Bq * group_size documents");
  const int nt = threads_for(a.n_threads);
  const IsaOps ops = pick(a.isa);

  BwdArgs B{};
  B.grad = reinterpret_cast<const float*>(grad);
  B.q = reinterpret_cast<const void*>(q);
  B.Bq = Bq, B.Lq = Lq, B.D = D, B.sq_b = sq_b, B.sq_l = sq_l, B.sq_d = sq_d;
  B.q_mask = reinterpret_cast<const uint8_t*>(q_mask);
  B.d = reinterpret_cast<const void*>(d);
  B.Nd = Nd, B.Ld = Ld, B.sd_b = sd_b, B.sd_l = sd_l, B.sd_d = sd_d;
  B.offsets = reinterpret_cast<const int64_t*>(d_offsets);
  B.dtype = dtype;
  B.argmax = reinterpret_cast<const int32_t*>(argmax);
  B.R = R;
  B.group_size = group_size;
  B.mean = mean;
  B.dq = reinterpret_cast<void*>(dq);
  B.dd = reinterpret_cast<void*>(dd);
  B.dbias = reinterpret_cast<float*>(dbias);
  B.C = group_size ? group_size : Nd;
  if (B.offsets != nullptr) {
    packed_lmax(B.offsets, Nd);
    B.n_tokens = B.offsets[Nd];
  } else {
    B.n_tokens = Nd * Ld;
  }
  const size_t esz = dtype == kFloat32 ? 4 : 2;
  if (B.n_tokens > 0) REATT_CHECK(dd != 0, "dd must be non-null");
  if (Bq * Lq > 0) REATT_CHECK(dq != 0, "dq must be non-null");
  if (R > 0) REATT_CHECK(dbias != 0, "dbias must be non-null when n_bias > 0");
  for (int64_t r = 0; r < R; ++r) B.dbias[r] = 0.f;
  if (Bq == 0 || Lq == 0 || B.C == 0) {
    if (B.n_tokens > 0) std::memset(B.dd, 0, static_cast<size_t>(B.n_tokens * D) * esz);
    if (Bq * Lq > 0) std::memset(B.dq, 0, static_cast<size_t>(Bq * Lq * D) * esz);
    return;
  }
  REATT_CHECK(grad != 0 && q != 0 && q_mask != 0 && argmax != 0, "grad, q, q_mask and argmax must be non-null");

  // The valid (query, token) rows, packed as in the forward: vrows[p] = a * Lq + i for the p-th valid row (queries in
  // order, tokens in order), query a's rows at [vstart[a], vstart[a + 1]). Only these rows are visited (dq gathers,
  // dd / dbias scatters) and converted (q32 [n_rows][D]: row p); a masked row's dq is zero and its argmax entries are
  // never read, so a query with n valid tokens of Lq costs n / Lq of the backward's per-row work.
  std::vector<int32_t> n_valid(static_cast<size_t>(Bq));
  std::vector<int64_t> vstart(static_cast<size_t>(Bq + 1), 0);
  for (int64_t a = 0; a < Bq; ++a) {
    int32_t n = 0;
    for (int64_t i = 0; i < Lq; ++i) n += B.q_mask[a * Lq + i] ? 1 : 0;
    n_valid[a] = n;
    vstart[a + 1] = vstart[a] + n;
  }
  const int64_t n_rows = vstart[Bq];
  std::vector<int64_t> vrows(static_cast<size_t>(n_rows));
  // Per-(query, column) weights g / n_a (mean) and the valid query rows in fp32, contiguous.
  std::vector<float> w(static_cast<size_t>(Bq * B.C));
  std::vector<float> q32(static_cast<size_t>(n_rows * D));
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t a = 0; a < Bq; ++a) {
    const int32_t n = n_valid[a];
    const float div = static_cast<float>(n < 1 ? 1 : n);
    for (int64_t c = 0; c < B.C; ++c) w[a * B.C + c] = mean ? B.grad[a * B.C + c] / div : B.grad[a * B.C + c];
    int64_t p = vstart[a];
    for (int64_t i = 0; i < Lq; ++i) {
      if (!B.q_mask[a * Lq + i]) {
        std::memset(static_cast<char*>(B.dq) + (a * Lq + i) * D * static_cast<int64_t>(esz), 0, D * esz);
        continue;
      }
      vrows[p] = a * Lq + i;
      const char* row = static_cast<const char*>(B.q) + (a * sq_b + i * sq_l) * static_cast<int64_t>(esz);
      float* dst = q32.data() + p * D;
      for (int64_t k = 0; k < D; ++k) {
        const int64_t off = k * sq_d;
        dst[k] = dtype == kFloat32 ? reinterpret_cast<const float*>(row)[off]
                 : dtype == kFloat16 ? half_to_float(reinterpret_cast<const uint16_t*>(row)[off])
                                     : bf16_to_float(reinterpret_cast<const uint16_t*>(row)[off]);
      }
      ++p;
    }
  }

  // Documents are handled in fixed blocks (independent of the thread count); each block owns one dbias partial.
  constexpr int64_t kDocBlock = 64;
  const int64_t n_blocks = (Nd + kDocBlock - 1) / kDocBlock;
  std::vector<float> parts(static_cast<size_t>(n_blocks * R));
  int64_t Lmax = 1;
  if (B.offsets != nullptr) {
    for (int64_t b = 0; b < Nd; ++b) Lmax = std::max<int64_t>(Lmax, B.offsets[b + 1] - B.offsets[b]);
  } else {
    Lmax = std::max<int64_t>(Lmax, Ld);
  }
  REATT_CHECK(seg >= 0, "seg must be >= 0 (0: the default segment length)");
  B.Lseg = std::min<int64_t>(Lmax, seg > 0 ? seg : REATT_MAXSIM_SEG);
  int64_t bad = 0;
  // dq work items: chunks of the packed valid rows, at most kDqRows each (their accumulators, kDqRows * D fp32, stay
  // in L2), at least one per thread.
  constexpr int64_t kDqRows = 256;
  const int64_t n_dq =
      std::max<int64_t>({1, std::min<int64_t>(nt, n_rows), (n_rows + kDqRows - 1) / kDqRows});  // 1: all masked
  const int64_t dq_chunk = (n_rows + n_dq - 1) / n_dq;
#pragma omp parallel num_threads(nt) reduction(+ : bad)
  {
    std::vector<float> acc(static_cast<size_t>(dq_chunk * D)), tmp(static_cast<size_t>(D));
    std::vector<float> tile(static_cast<size_t>(B.Lseg * D));
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t it = 0; it < n_dq; ++it) {
      const int64_t r0 = it * dq_chunk, r1 = std::min(n_rows, r0 + dq_chunk);
      if (r0 < r1) bad += ops.dq_rows(B, w.data(), vrows.data(), r0, r1, acc.data(), tmp.data());
    }
    // dd and dbias: blocks of documents.
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t b0 = blk * kDocBlock, b1 = std::min(Nd, b0 + kDocBlock);
      bad += ops.dd_docs(B, w.data(), n_valid.data(), vstart.data(), vrows.data(), q32.data(), b0, b1,
                         parts.data() + blk * R, tile.data());
    }
  }
  REATT_CHECK(bad == 0, "argmax holds a token index outside its document (" + std::to_string(bad) + " entries)");
  for (int64_t blk = 0; blk < n_blocks; ++blk)
    for (int64_t r = 0; r < R; ++r) B.dbias[r] += parts[blk * R + r];
}

// ---- a corpus prepared once (rk.prepare_corpus) -----------------------------------------------------------------------
// The fp32 filter's per-call preparation of each document (filt_prepare: rows to bf16 pairs and the bound of its row
// norms), done once: d_screen [T][Dq] bf16 rows (round to nearest even, zero past D) and d_norm [Nd] >= max_j |d_j|
// per document, the norm summed in double and rounded up by 2^-20 (an upper bound, which is all the filter's proof
// needs). A row holding a NaN fails the compare and does not lower the bound; an inf row makes it inf (every token a
// candidate), as in rows_to_bf16. Bytes: T * D * esize read, T * Dq * 2 + Nd * 4 written, once.
void maxsim_prepare_cpu(const MaxsimArgs& a) {
  check_dtype(a.dtype);
  REATT_CHECK(a.packed(), "maxsim_prepare_cpu: the packed layout (d_offsets) is required");
  REATT_CHECK(a.D >= 1 && a.Nd >= 0 && a.T >= 0, "maxsim_prepare_cpu: bad sizes");
  const int64_t D = a.D, Dq = (a.D + 31) / 32 * 32, Nd = a.Nd;
  REATT_CHECK(a.screen_ld == Dq, "maxsim_prepare_cpu: screen_ld must be dim rounded up to 32");
  const int64_t* off = reinterpret_cast<const int64_t*>(a.d_offsets);
  packed_lmax(off, Nd);
  REATT_CHECK(off[Nd] == a.T, "maxsim_prepare_cpu: d_offsets must end at T");
  REATT_CHECK(a.T == 0 || (a.d != 0 && a.d_screen != 0), "maxsim_prepare_cpu: null d or d_screen");
  REATT_CHECK(Nd == 0 || a.d_norm != 0, "maxsim_prepare_cpu: null d_norm");
  uint16_t* screen = reinterpret_cast<uint16_t*>(a.d_screen);
  float* norm = reinterpret_cast<float*>(a.d_norm);
  const int esz = a.dtype == kFloat32 ? 4 : 2;
  const int nt = threads_for(a.n_threads);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 64)
  for (int64_t b = 0; b < Nd; ++b) {
    double mx2 = 0.0;
    for (int64_t t = off[b]; t < off[b + 1]; ++t) {
      const char* row = reinterpret_cast<const char*>(a.d) + t * a.sd_l * esz;
      uint16_t* dst = screen + t * Dq;
      double s2 = 0.0;
      for (int64_t k = 0; k < D; ++k) {
        const int64_t o = k * a.sd_d * esz;
        uint16_t h;
        float v;
        switch (a.dtype) {
          case kFloat32: std::memcpy(&v, row + o, 4); break;
          case kFloat16: std::memcpy(&h, row + o, 2); v = half_to_float(h); break;
          default: std::memcpy(&h, row + o, 2); v = bf16_to_float(h); break;
        }
        dst[k] = float_to_bf16(v);
        s2 += static_cast<double>(v) * v;
      }
      for (int64_t k = D; k < Dq; ++k) dst[k] = 0;
      if (s2 > mx2) mx2 = s2;
    }
    norm[b] = static_cast<float>(std::sqrt(mx2) * (1.0 + std::ldexp(1.0, -20)));
  }
}

std::string maxsim_cpu_isa() { return cpu_isa::kNames[cpu_isa::best()]; }

}  // namespace maxsim_cpu

// Thin bindings: one MaxsimArgs each (maxsim_args.h: raw pointers, sizes and strides in elements, dtype codes).
static RegisterBindings maxsim_cpu_bindings([](py::module_& m) {
  bind_maxsim_args(m);
  m.def("maxsim_fwd_cpu", &maxsim_cpu::maxsim_fwd_cpu, py::call_guard<py::gil_scoped_release>(),
        "MaxSim forward on the CPU: writes scores fp32 [Bq, C] and argmax int32 [Bq, C, Lq]", py::arg("args"));
  m.def("maxsim_bwd_cpu", &maxsim_cpu::maxsim_bwd_cpu, py::call_guard<py::gil_scoped_release>(),
        "MaxSim backward on the CPU: writes dq, dd (input dtype, contiguous) and dbias fp32 [R]; deterministic",
        py::arg("args"));
  m.def("maxsim_cpu_isa", &maxsim_cpu::maxsim_cpu_isa, "The best MaxSim CPU kernel ISA this machine supports");
  m.def("maxsim_prepare_cpu", &maxsim_cpu::maxsim_prepare_cpu, py::call_guard<py::gil_scoped_release>(),
        "A corpus prepared once for the CPU forward: writes d_screen bf16 [T, screen_ld] and d_norm fp32 [Nd]",
        py::arg("args"));
});

}  // namespace reatt
