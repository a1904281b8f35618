// Attention distillation on CUDA: the reader teacher (one pass over the cross-attention) and the KL with its gradient
// computed in the forward. Semantics: reatt_kernels/reference/distill.py. Raw pointers, strides and the caller's
// stream; no libtorch.
//
// reader_teacher: grid (B, row chunks), 8 warps per block, one warp per attention row (a (layer, head, step)). The
// warp streams its row ONCE with an online softmax whose accumulator is the row's per-document sums, kept in shared
// memory (bins[warp][n]); when the running max grows, the warp rescales its bins (rare after the first chunks). Per
// 32 tokens the warp adds exp(x - m) to its bins: one warp-sum + one shared atomic when the 32 tokens share a document
// (the FiD layout: documents are contiguous runs of ~200 tokens), per-lane shared atomics otherwise. At the row's end
// the bins / z go into the block's accumulator; the block writes its partial [n] and a second tiny kernel sums the
// partials (fixed order) and divides by the row count.
//   Bytes: B*R*S*elt read once + doc_index/mask per row (int16/uint8: 1.5x the bf16 row, but L1/L2-resident since
//   every row of query b reads the same S ids) + B*chunks*n*4 written.
//   FLOPs: ~4 per element (max, sub, exp, add) plus the sums.
// distill_kl: one block (256 threads) per row: pass 1 online log-sum-exp (and the dense teacher's row sum); pass 2
// writes grad = (T * softmax - t) * grad_scale and sums t * (log t - (x - lse)); the sparse form then rewrites its n
// teacher columns after a __syncthreads (same block: no global atomics), recomputing T * p - t there in fp32 so every
// gradient element is rounded to the student's dtype exactly once.
//   Bytes: 2 reads of the student row (the second from L2) + 1 write of the gradient (+ the teacher).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "cuda_common.cuh"
#include "distill/distill_args.h"

namespace reatt {
namespace {

constexpr int kWarps = 8;          // warps (= concurrent rows) per reader-teacher block
constexpr int kVec = 8;            // tokens per lane per chunk: a warp chunk is 256 tokens
constexpr int kKlThreads = 256;    // threads per distill_kl block
constexpr unsigned kFull = 0xffffffffu;

// REATT_SITE_PARAM / _FWD / _ONLY (emu_runtime.h; empty for nvcc): under emulation the collectives and barriers inside
// these helpers record their caller's file:line, so two different callers never look alike.
__device__ __forceinline__ float warp_max(float v REATT_SITE_PARAM) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o, 32 REATT_SITE_FWD));
  return v;
}
__device__ __forceinline__ float warp_sum(float v REATT_SITE_PARAM) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o, 32 REATT_SITE_FWD);
  return v;
}

// Block-wide reductions for distill_kl (blockDim.x == kKlThreads); `red` holds one float per warp.
__device__ __forceinline__ float block_max(float v, float* red REATT_SITE_PARAM) {
  v = warp_max(v REATT_SITE_FWD);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads(REATT_SITE_ONLY);
  if (lane == 0) red[warp] = v;
  __syncthreads(REATT_SITE_ONLY);
  v = lane < kKlThreads / 32 ? red[lane] : -INFINITY;
  return warp_max(v REATT_SITE_FWD);
}
__device__ __forceinline__ float block_sum(float v, float* red REATT_SITE_PARAM) {
  v = warp_sum(v REATT_SITE_FWD);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads(REATT_SITE_ONLY);
  if (lane == 0) red[warp] = v;
  __syncthreads(REATT_SITE_ONLY);
  v = lane < kKlThreads / 32 ? red[lane] : 0.f;
  return warp_sum(v REATT_SITE_FWD);
}

// ---- reader_teacher --------------------------------------------------------------------------------------------------
template <typename T>
__global__ void reader_teacher_fwd_kernel(const T* __restrict__ attn, const int16_t* __restrict__ doc,
                                          const uint8_t* __restrict__ mask, float* __restrict__ partial, int64_t R,
                                          int64_t H, int64_t Tn, int64_t S, int n_docs, int64_t sb, int64_t sl,
                                          int64_t sh, int64_t st, int64_t ss, int64_t rows_per_block, bool is_logits) {
  REATT_DYNAMIC_SMEM(float, smem, 16);
  float* acc = smem;  // [n_docs]: sum over this block's rows of p_row[doc]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* bins = smem + static_cast<int64_t>(n_docs) * (1 + warp);  // [n_docs]: this warp's current row, times exp(-m)
  const int64_t b = blockIdx.x, chunk = blockIdx.y;
  for (int64_t k = threadIdx.x; k < static_cast<int64_t>(n_docs) * (kWarps + 1); k += blockDim.x) smem[k] = 0.f;
  __syncthreads();
  const int16_t* drow = doc + b * S;
  const uint8_t* mrow = mask ? mask + b * S : nullptr;
  const int64_t r0 = chunk * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < R ? r0 + rows_per_block : R;
  for (int64_t r = r0 + warp; r < r1; r += kWarps) {
    const int64_t l = r / (H * Tn), h = (r / Tn) % H, t = r % Tn;
    const T* row = attn + b * sb + l * sl + h * sh + t * st;
    float m = -INFINITY;  // running max (logits only; warp-uniform)
    float z = 0.f;        // this lane's share of sum exp(x - m)
    for (int64_t s0 = 0; s0 < S; s0 += 32 * kVec) {
      float x[kVec];
      int d[kVec];
      float cmax = -INFINITY;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const int64_t s = s0 + j * 32 + lane;
        d[j] = -1;
        x[j] = is_logits ? -INFINITY : 0.f;
        if (s < S) {
          const int di = drow[s];
          // di < n_docs guards the shared-memory bins even when the Python range check is skipped (torch.compile).
          if (di >= 0 && di < n_docs && (mrow == nullptr || mrow[s] != 0)) {
            d[j] = di;
            x[j] = to_f<T>(row[s * ss]);
          }
        }
        cmax = fmaxf(cmax, x[j]);
      }
      if (is_logits) {
        cmax = warp_max(cmax);
        if (cmax > m) {  // warp-uniform branch: rescale this row's bins and sums to the new max
          const float alpha = m == -INFINITY ? 0.f : expf(m - cmax);
          z *= alpha;
          __syncwarp();
          for (int k = lane; k < n_docs; k += 32) bins[k] *= alpha;
          __syncwarp();
          m = cmax;
        }
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        float e = 0.f;
        // -inf carries no mass; NaN must stay NaN (a test x > -inf would turn it into 0) so that the row is dropped.
        if (d[j] >= 0) e = is_logits ? (x[j] == -INFINITY ? 0.f : expf(x[j] - m)) : x[j];
        z += e;
        const int d0 = __shfl_sync(kFull, d[j], 0);
        if (__all_sync(kFull, d[j] == d0)) {
          const float sum = warp_sum(e);
          if (lane == 0 && d0 >= 0) atomicAdd(&bins[d0], sum);
        } else if (d[j] >= 0) {
          atomicAdd(&bins[d[j]], e);
        }
      }
      __syncwarp();
    }
    z = warp_sum(z);
    // A row with no valid token, no mass, or a NaN/+inf at a valid token (z NaN or inf) contributes 0: skip it
    // rather than scale by 0, since its bins may hold NaN and NaN * 0 = NaN.
    const bool keep = z > 0.f && z < INFINITY;  // warp-uniform
    const float inv = keep ? 1.f / z : 0.f;
    __syncwarp();
    for (int k = lane; k < n_docs; k += 32) {
      if (keep) atomicAdd(&acc[k], bins[k] * inv);
      bins[k] = 0.f;
    }
    __syncwarp();
  }
  __syncthreads();
  float* out = partial + (b * gridDim.y + chunk) * n_docs;
  for (int k = threadIdx.x; k < n_docs; k += blockDim.x) out[k] = acc[k];
}

__global__ void reader_teacher_reduce_kernel(const float* __restrict__ partial, float* __restrict__ out, int64_t B,
                                             int64_t n_chunks, int64_t n_docs, float inv_rows) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * n_docs) return;
  const int64_t b = i / n_docs, k = i % n_docs;
  float s = 0.f;
  for (int64_t c = 0; c < n_chunks; ++c) s += partial[(b * n_chunks + c) * n_docs + k];
  out[i] = s * inv_rows;
}

// ---- distill_kl ------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void distill_kl_fwd_kernel(const T* __restrict__ student, int64_t ssb, int64_t ssm, int64_t M,
                                      const float* __restrict__ teacher, const float* __restrict__ tprobs,
                                      const int64_t* __restrict__ tcols, int64_t n, float* __restrict__ loss,
                                      T* __restrict__ grad, float grad_scale, bool normalize, bool sparse) {
  REATT_SHARED_ARRAY(float, red, 32);
  const int64_t b = blockIdx.x;
  const T* row = student + b * ssb;
  // pass 1: online log-sum-exp per thread, then across the block
  float m = -INFINITY, z = 0.f, ts = 0.f;
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
    const float x = to_f<T>(row[j * ssm]);
    if (x > m) {
      z = m == -INFINITY ? 0.f : z * expf(m - x);
      m = x;
    }
    if (x != -INFINITY) z += expf(x - m);  // -inf adds 0; NaN must reach z (a NaN logit makes the loss NaN)
    if (!sparse) ts += teacher[b * M + j];
  }
  const float mx = block_max(m, red);
  z = (m == -INFINITY) ? z : z * expf(m - mx);  // m = -inf: z is 0, or NaN from a NaN logit (kept)
  z = block_sum(z, red);
  if (sparse) {
    ts = 0.f;
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) ts += tprobs[b * n + k];
  }
  ts = block_sum(ts, red);
  const float lse = mx == -INFINITY ? -INFINITY : mx + logf(z);
  const float inv_t = normalize ? 1.f / (ts > 0.f ? ts : 1.f) : 1.f;
  // T_b: the teacher row's mass after normalisation (a row with no mass stays at 0: gradient 0, loss 0).
  const float t_mass = normalize ? (ts > 0.f ? 1.f : 0.f) : ts;
  // pass 2: gradient and (dense) loss terms
  float lacc = 0.f;
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
    const float x = to_f<T>(row[j * ssm]);
    const float p = (lse > -INFINITY && x > -INFINITY) ? expf(x - lse) : 0.f;
    float g = t_mass * p;
    if (!sparse) {
      const float tv = teacher[b * M + j] * inv_t;
      if (tv > 0.f) lacc += tv * (logf(tv) - (x - lse));
      g -= tv;
    }
    if (grad != nullptr) grad[b * M + j] = from_f<T>(g * grad_scale);
  }
  if (sparse) {
    __syncthreads();  // the gradient row is complete before the teacher columns patch it
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
      const float tv = tprobs[b * n + k] * inv_t;
      const int64_t c = tcols[b * n + k];
      const float x = to_f<T>(row[c * ssm]);
      if (tv > 0.f) lacc += tv * (logf(tv) - (x - lse));
      // Recompute this column's T * p - t in fp32 and round once (reading back the rounded T * p and rounding the
      // difference again would cost a rounding of the larger T * p: many ulps of a small difference).
      const float p = (lse > -INFINITY && x > -INFINITY) ? expf(x - lse) : 0.f;
      if (grad != nullptr) grad[b * M + c] = from_f<T>((t_mass * p - tv) * grad_scale);
    }
  }
  lacc = block_sum(lacc, red);
  if (threadIdx.x == 0) loss[b] = lacc;
}

// Grid of the reader teacher: row chunks per query so that ~4 blocks per SM run (the rows of one query are few next to
// a GPU: 12 layers x 12 heads x 1 step = 144), each chunk at least one row per warp. One partial [n_docs] per chunk.
struct ReaderTeacherPlan {
  int64_t n_chunks, rows_per_block;
};

ReaderTeacherPlan reader_teacher_plan(const ReaderTeacherArgs& a, const DeviceLimits& lim) {
  const int64_t R = a.L * a.H * a.T;
  const int64_t target = 4LL * lim.sm_count;
  int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>({cdiv(R, kWarps), cdiv(target, std::max<int64_t>(1, a.B)),
                                                             65535}));
  const int64_t rows_per_block = std::max<int64_t>(1, cdiv(R, n_chunks));
  n_chunks = std::max<int64_t>(1, cdiv(R, rows_per_block));
  return ReaderTeacherPlan{n_chunks, rows_per_block};
}

void check_reader_teacher(const ReaderTeacherArgs& a) {
  REATT_CHECK(a.n_docs >= 1 && a.n_docs <= 1024, "reader_teacher_fwd_cuda: n_docs must be in [1, 1024]");
  REATT_CHECK(a.B >= 1 && a.L >= 0 && a.H >= 0 && a.T >= 0 && a.S >= 0, "reader_teacher_fwd_cuda: bad sizes");
  REATT_CHECK(a.doc_dtype == kInt16,
              std::string("reader_teacher_fwd_cuda: doc must be int16, got ") + dtype_name(a.doc_dtype));
}

}  // namespace

// attn [B, L, H, T, S] (strides in elements), doc int16 [B, S] contiguous (n_docs <= 1024), mask uint8 [B, S]
// contiguous or 0, partial fp32 [B, n_chunks, n_docs] (n_chunks: reader_teacher_plan_cuda), out fp32 [B, n_docs].
void reader_teacher_fwd_cuda(const ReaderTeacherArgs& a) {
  check_reader_teacher(a);
  const uintptr_t attn = a.attn, doc = a.doc, mask = a.mask, partial = a.partial, out = a.out;
  const int dtype = a.dtype;
  const int64_t B = a.B, H = a.H, Tn = a.T, S = a.S, sb = a.sb, sl = a.sl, sh = a.sh, st = a.st, ss = a.ss;
  const int64_t n_docs = a.n_docs;
  const bool is_logits = a.is_logits;
  const ReaderTeacherPlan plan = reader_teacher_plan(a, current_device_limits());
  const int64_t n_chunks = plan.n_chunks, rows_per_block = plan.rows_per_block;
  REATT_CHECK(n_chunks <= 65535, "reader_teacher_fwd_cuda: bad grid");
  REATT_CHECK(rows_per_block * n_chunks >= a.L * H * Tn, "reader_teacher_fwd_cuda: chunks do not cover the rows");
  REATT_CHECK(partial != 0 && out != 0, "reader_teacher_fwd_cuda: partial and out are required");
  auto s = as_stream(a.stream);
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(n_chunks));
  const size_t smem = static_cast<size_t>(kWarps + 1) * n_docs * sizeof(float);
  const int64_t R = a.L * H * Tn;
  auto* d = reinterpret_cast<const int16_t*>(doc);
  auto* mk = reinterpret_cast<const uint8_t*>(mask);
  auto* pp = reinterpret_cast<float*>(partial);
  const int nd = static_cast<int>(n_docs);
  switch (dtype) {
    case kFloat32:
      REATT_LAUNCH(reader_teacher_fwd_kernel<float>, grid, kWarps * 32, smem, s)(
          reinterpret_cast<const float*>(attn), d, mk, pp, R, H, Tn, S, nd, sb, sl, sh, st, ss, rows_per_block,
          is_logits);
      break;
    case kFloat16:
      REATT_LAUNCH(reader_teacher_fwd_kernel<__half>, grid, kWarps * 32, smem, s)(
          reinterpret_cast<const __half*>(attn), d, mk, pp, R, H, Tn, S, nd, sb, sl, sh, st, ss, rows_per_block,
          is_logits);
      break;
    case kBFloat16:
      REATT_LAUNCH(reader_teacher_fwd_kernel<__nv_bfloat16>, grid, kWarps * 32, smem, s)(
          reinterpret_cast<const __nv_bfloat16*>(attn), d, mk, pp, R, H, Tn, S, nd, sb, sl, sh, st, ss,
          rows_per_block, is_logits);
      break;
    default:
      throw std::invalid_argument(std::string("reatt: reader_teacher_fwd_cuda: unsupported dtype ") +
                                  dtype_name(dtype));
  }
  REATT_LAUNCH_CHECK("reader_teacher_fwd_kernel");
  const int64_t total = B * n_docs;
  REATT_LAUNCH(reader_teacher_reduce_kernel, static_cast<unsigned>((total + 255) / 256), 256, 0, s)(
      pp, reinterpret_cast<float*>(out), B, n_chunks, n_docs, 1.f / static_cast<float>(R));
  REATT_LAUNCH_CHECK("reader_teacher_reduce_kernel");
}

// student [B, M] (strides in elements); teacher fp32 [B, M] contiguous (dense form); tprobs fp32 [B, n] and tcols
// int64 [B, n] contiguous (sparse form); loss fp32 [B]; grad [B, M] contiguous in the student's dtype, or 0. An empty
// teacher (M = 0 dense, n = 0 sparse) may come as null pointers: every row's loss is then 0 (nothing is read).
void distill_kl_fwd_cuda(const DistillKlArgs& a) {
  const uintptr_t student = a.student, teacher = a.teacher, tprobs = a.tprobs, tcols = a.tcols, loss = a.loss;
  const uintptr_t grad = a.grad;
  const int dtype = a.dtype;
  const int64_t B = a.B, M = a.M, ssb = a.ss_b, ssm = a.ss_m, n = a.n;
  const bool sparse = a.sparse, normalize = a.normalize;
  const double grad_scale = a.grad_scale;
  REATT_CHECK(B >= 1 && B <= 2147483647, "distill_kl_fwd_cuda: B must be in [1, 2^31)");
  REATT_CHECK(M >= 0 && n >= 0, "distill_kl_fwd_cuda: negative size");
  REATT_CHECK(loss != 0, "distill_kl_fwd_cuda: null loss");
  REATT_CHECK(sparse ? (n == 0 || (tprobs != 0 && tcols != 0)) : (M == 0 || teacher != 0),
              "distill_kl_fwd_cuda: a non-empty teacher needs its pointers (dense: teacher; sparse: tprobs, tcols)");
  REATT_CHECK(M == 0 || student != 0, "distill_kl_fwd_cuda: null student");
  auto s = as_stream(a.stream);
  auto* t = reinterpret_cast<const float*>(teacher);
  auto* tp = reinterpret_cast<const float*>(tprobs);
  auto* tc = reinterpret_cast<const int64_t*>(tcols);
  auto* lo = reinterpret_cast<float*>(loss);
  const float gs = static_cast<float>(grad_scale);
  const unsigned grid = static_cast<unsigned>(B);
  switch (dtype) {
    case kFloat32:
      REATT_LAUNCH(distill_kl_fwd_kernel<float>, grid, kKlThreads, 0, s)(
          reinterpret_cast<const float*>(student), ssb, ssm, M, t, tp, tc, n, lo, reinterpret_cast<float*>(grad), gs,
          normalize, sparse);
      break;
    case kFloat16:
      REATT_LAUNCH(distill_kl_fwd_kernel<__half>, grid, kKlThreads, 0, s)(
          reinterpret_cast<const __half*>(student), ssb, ssm, M, t, tp, tc, n, lo, reinterpret_cast<__half*>(grad), gs,
          normalize, sparse);
      break;
    case kBFloat16:
      REATT_LAUNCH(distill_kl_fwd_kernel<__nv_bfloat16>, grid, kKlThreads, 0, s)(
          reinterpret_cast<const __nv_bfloat16*>(student), ssb, ssm, M, t, tp, tc, n, lo,
          reinterpret_cast<__nv_bfloat16*>(grad), gs, normalize, sparse);
      break;
    default:
      throw std::invalid_argument(std::string("reatt: distill_kl_fwd_cuda: unsupported dtype ") + dtype_name(dtype));
  }
  REATT_LAUNCH_CHECK("distill_kl_fwd_kernel");
}

namespace {
pybind11::dict reader_teacher_plan_cuda(const ReaderTeacherArgs& a) {
  check_reader_teacher(a);
  const ReaderTeacherPlan plan = reader_teacher_plan(a, current_device_limits());
  pybind11::dict out;
  out["n_chunks"] = plan.n_chunks;
  out["rows_per_block"] = plan.rows_per_block;
  return out;
}

const RegisterBindings distill_cuda_bindings([](pybind11::module_& m) {
  bind_reader_teacher_args(m);
  bind_distill_kl_args(m);
  m.def("reader_teacher_fwd_cuda", &reader_teacher_fwd_cuda,
        "reader teacher p_T [B, n] from attn [B, L, H, T, S] (a ReaderTeacherArgs)", pybind11::arg("args"));
  m.def("reader_teacher_plan_cuda", &reader_teacher_plan_cuda,
        "The reader teacher's grid on the current device: {n_chunks, rows_per_block} (partial is [B, n_chunks, n])",
        pybind11::arg("args"));
  m.def("distill_kl_fwd_cuda", &distill_kl_fwd_cuda,
        "row-wise KL(teacher || softmax(student)) and its gradient (a DistillKlArgs)", pybind11::arg("args"));
});
}  // namespace

}  // namespace reatt
