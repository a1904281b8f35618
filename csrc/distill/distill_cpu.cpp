// reader_teacher on the CPU: one pass over the cross-attention, no fp32 copy, no [B, L, H, T, S] temporary.
// Semantics: reatt_kernels/reference/distill.py.
//
// OpenMP over the B * R attention rows (R = layers * heads * steps). A row is streamed once, BLOCK tokens at a time:
// the block is converted to fp32 into a stack buffer (BLOCK * 4 = 1 KiB), its max taken, and an online softmax keeps
// the row's per-document sums in a thread-local bins[n] (rescaled when the running max grows: a few times per row).
// At the row's end bins / z is added to the thread's fp64 accumulator [B, n]; the accumulators are summed in thread
// order (deterministic for a fixed thread count).
//   Bytes: B * R * S * elt read once, plus doc_index / mask per row (cache-resident for S of a few 10k).
//   FLOPs: ~12 per element (max, a degree-6 polynomial exp, sum, the per-document add).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#ifdef REATT_WITH_OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "cpu_dtype.h"
#include "cpu_isa.h"
#include "distill/distill_args.h"

namespace reatt {
namespace {

constexpr int BLOCK = 256;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

struct BF16 { uint16_t v; };
struct F16 { uint16_t v; };

// ---- the per-ISA instantiations ------------------------------------------------------------------------------------
// The block loops are plain C++ with `omp simd` (the compiler vectorises them for each target): 512-bit (avx512),
// 256-bit with FMA (avx2), or the baseline 128-bit SSE2 (scalar).
#if REATT_ISA_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
namespace avx512 {
#include "distill/distill_cpu_isa.h"  // NOLINT: included once per ISA, on purpose
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "distill/distill_cpu_isa.h"  // NOLINT: included once per ISA, on purpose
}  // namespace avx2
#pragma GCC pop_options
#endif
namespace scalar {
#include "distill/distill_cpu_isa.h"  // NOLINT: included once per ISA, on purpose
}  // namespace scalar

template <typename T>
void reader_teacher_rows(int level, const T* attn, int64_t B, int64_t L, int64_t H, int64_t Tn, int64_t S, int64_t sb,
                         int64_t sl, int64_t sh, int64_t st, int64_t ss, const int32_t* doc, const uint8_t* mask,
                         int64_t n, bool is_logits, float* out) {
  switch (level) {
#if REATT_ISA_X86
    case cpu_isa::kAvx512:
      avx512::reader_teacher_rows(attn, B, L, H, Tn, S, sb, sl, sh, st, ss, doc, mask, n, is_logits, out);
      return;
    case cpu_isa::kAvx2:
      avx2::reader_teacher_rows(attn, B, L, H, Tn, S, sb, sl, sh, st, ss, doc, mask, n, is_logits, out);
      return;
#endif
    default: scalar::reader_teacher_rows(attn, B, L, H, Tn, S, sb, sl, sh, st, ss, doc, mask, n, is_logits, out);
  }
}

}  // namespace

// attn [B, L, H, T, S] (strides in elements), doc int32 [B, S] contiguous, mask uint8 [B, S] contiguous or 0,
// out fp32 [B, n_docs] contiguous.
void reader_teacher_fwd_cpu(const ReaderTeacherArgs& a) {
  const uintptr_t attn = a.attn, doc = a.doc, mask = a.mask, out = a.out;
  const int dtype = a.dtype;
  const int64_t B = a.B, L = a.L, H = a.H, Tn = a.T, S = a.S, sb = a.sb, sl = a.sl, sh = a.sh, st = a.st, ss = a.ss;
  const int64_t n_docs = a.n_docs;
  const bool is_logits = a.is_logits;
  REATT_CHECK(a.doc_dtype == kInt32,
              std::string("reader_teacher_fwd_cpu: doc must be int32, got ") + dtype_name(a.doc_dtype));
  REATT_CHECK(B >= 0 && L >= 0 && H >= 0 && Tn >= 0 && S >= 0 && n_docs >= 0, "reader_teacher_fwd_cpu: negative size");
  if (B == 0 || n_docs == 0) return;
  const int level = cpu_isa::resolve(a.isa, cpu_isa::kAvx512, "reader_teacher");
  auto* d = reinterpret_cast<const int32_t*>(doc);
  auto* mk = reinterpret_cast<const uint8_t*>(mask);
  auto* o = reinterpret_cast<float*>(out);
  switch (dtype) {
    case kFloat32:
      reader_teacher_rows(level, reinterpret_cast<const float*>(attn), B, L, H, Tn, S, sb, sl, sh, st, ss, d, mk, n_docs,
                          is_logits, o);
      break;
    case kBFloat16:
      reader_teacher_rows(level, reinterpret_cast<const BF16*>(attn), B, L, H, Tn, S, sb, sl, sh, st, ss, d, mk, n_docs,
                          is_logits, o);
      break;
    case kFloat16:
      reader_teacher_rows(level, reinterpret_cast<const F16*>(attn), B, L, H, Tn, S, sb, sl, sh, st, ss, d, mk, n_docs,
                          is_logits, o);
      break;
    default:
      throw std::invalid_argument(std::string("reatt: reader_teacher_fwd_cpu: unsupported dtype ") +
                                  dtype_name(dtype));
  }
}

namespace {
const RegisterBindings distill_cpu_bindings([](pybind11::module_& m) {
  bind_reader_teacher_args(m);
  m.def("reader_teacher_fwd_cpu", &reader_teacher_fwd_cpu, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "reader teacher p_T [B, n] from attn [B, L, H, T, S] on the CPU (a ReaderTeacherArgs)", pybind11::arg("args"));
});
}  // namespace

}  // namespace reatt
