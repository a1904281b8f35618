// residual_maxsim on CUDA: fused decompress + MaxSim over each query's candidate documents.
//
// One block (4 warps) per (candidate c, query a). The query sits in shared memory; the document is decoded 32 tokens
// at a time into a shared [32][D + 1] tile (the +1 pad keeps lane j's row reads on distinct banks), then warp w takes
// query tokens i = w, w + 4, ...: lane j computes q_i . v_j, a shuffle max over the 32 lanes updates best[i].
// Decompressed vectors never reach global memory.
//
// Global bytes per document token: 4 (code) + D * nbits / 8 (buckets) + D * 4 (centroid row: L2-resident for hot
// centroids) ; FLOPs: 2 * Lq * D per (query, token).
#include <cstdint>
#include <limits>

#include "cuda_common.cuh"
#include "residual_maxsim/residual_maxsim_args.h"

namespace reatt {
namespace {

constexpr int TILE_T = 32;
constexpr int THREADS = 128;

template <int NBITS>
__global__ void residual_maxsim_fwd_kernel(const float* __restrict__ q, const bool* __restrict__ q_mask,
                                           const float* __restrict__ centroids, const float* __restrict__ weights,
                                           const int32_t* __restrict__ codes, const uint8_t* __restrict__ packed,
                                           const int64_t* __restrict__ offsets, const int64_t* __restrict__ cand,
                                           float* __restrict__ out, int Lq, int D, int64_t Nd, int64_t Nc) {
  constexpr int K = 1 << NBITS;
  constexpr int MASK = K - 1;
  REATT_DYNAMIC_SMEM(float, smem, 16);
  float* qs = smem;                          // [Lq][D]
  float* vs = qs + Lq * D;                   // [TILE_T][D + 1]
  float* best = vs + TILE_T * (D + 1);       // [Lq]
  const int64_t c = blockIdx.x;
  const int64_t a = blockIdx.y;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const float NEG_INF = -INFINITY;
  const int64_t b = cand[a * Nc + c];
  if (b < 0 || b >= Nd) {  // padding (and, defensively, an out-of-range id) scores -inf
    if (tid == 0) out[a * Nc + c] = NEG_INF;
    return;
  }
  const int64_t P = static_cast<int64_t>(D) * NBITS / 8;
  const bool* qm = q_mask + a * Lq;
  for (int e = tid; e < Lq * D; e += THREADS) qs[e] = q[a * Lq * D + e];
  for (int i = tid; i < Lq; i += THREADS) best[i] = NEG_INF;
  __syncthreads();
  const int64_t t_begin = offsets[b], t_end = offsets[b + 1];
  for (int64_t t0 = t_begin; t0 < t_end; t0 += TILE_T) {
    const int nt = static_cast<int>(min(static_cast<int64_t>(TILE_T), t_end - t0));
    for (int e = tid; e < nt * D; e += THREADS) {
      const int j = e / D, d = e - j * D;
      const int64_t t = t0 + j;
      const int code = codes[t];
      const int byte = packed[t * P + ((d * NBITS) >> 3)];
      const int bucket = (byte >> ((d * NBITS) & 7)) & MASK;
      vs[j * (D + 1) + d] = centroids[static_cast<int64_t>(code) * D + d] + weights[d * K + bucket];
    }
    __syncthreads();
    for (int i = warp; i < Lq; i += THREADS / 32) {
      if (!qm[i]) continue;  // uniform per warp
      float acc = 0.f;
      if (lane < nt) {
        const float* qi = qs + i * D;
        const float* vj = vs + lane * (D + 1);
        for (int d = 0; d < D; ++d) acc = fmaf(qi[d], vj[d], acc);
      } else {
        acc = NEG_INF;
      }
      for (int o = 16; o > 0; o >>= 1) acc = fmaxf(acc, __shfl_xor_sync(0xffffffffu, acc, o));
      if (lane == 0) best[i] = fmaxf(best[i], acc);
    }
    __syncthreads();
  }
  if (tid == 0) {
    float s = 0.f;  // a query with no valid token sums nothing: 0; an empty document leaves -inf
    for (int i = 0; i < Lq; ++i)
      if (qm[i]) s += best[i];
    out[a * Nc + c] = s;
  }
}

// Dynamic shared memory of the kernel: query tile [Lq][D] + token tile [TILE_T][D + 1] + row maxima [Lq], fp32.
size_t residual_smem(int64_t Lq, int64_t D) {
  return sizeof(float) * (static_cast<size_t>(Lq) * D + static_cast<size_t>(TILE_T) * (D + 1) + Lq);
}

// The current device's opt-in per-block shared-memory limit (227 KB on an H100, 163 KB on an A100, 99 KB on sm_86/89).
int smem_optin_limit() { return static_cast<int>(current_device_limits().smem_optin); }

template <int NBITS>
void launch(const float* q, const bool* qm, const float* cent, const float* w, const int32_t* codes, const uint8_t* pk,
            const int64_t* off, const int64_t* cand, float* out, int64_t Bq, int Lq, int D, int64_t Nd, int64_t Nc,
            cudaStream_t stream) {
  const size_t smem = residual_smem(Lq, D);
  const int limit = smem_optin_limit();
  REATT_CHECK(smem <= static_cast<size_t>(limit),
              "residual_maxsim: a query of " + std::to_string(Lq) + " x " + std::to_string(D) + " needs " +
                  std::to_string(smem) + " bytes of shared memory; this device allows " + std::to_string(limit));
  auto kernel = residual_maxsim_fwd_kernel<NBITS>;
  set_dynamic_smem(kernel, smem, "residual_maxsim");
  REATT_CHECK(Bq <= 65535, "residual_maxsim: at most 65535 queries per call (grid y)");
  dim3 grid(static_cast<unsigned>(Nc), static_cast<unsigned>(Bq));
  REATT_LAUNCH(kernel, grid, THREADS, smem, stream)(q, qm, cent, w, codes, pk, off, cand, out, Lq, D, Nd, Nc);
  REATT_LAUNCH_CHECK("residual_maxsim_fwd_kernel");
}

void residual_maxsim_fwd_cuda(const ResidualMaxsimArgs& a) {
  const uintptr_t q = a.q, q_mask = a.q_mask, centroids = a.centroids, weights = a.weights, codes = a.codes;
  const uintptr_t packed = a.packed, offsets = a.offsets, cand = a.cand, out = a.out, stream = a.stream;
  const int64_t Bq = a.Bq, Lq = a.Lq, D = a.D, Nd = a.Nd, Nc = a.Nc;
  const int nbits = a.nbits;
  REATT_CHECK(Bq >= 0 && Lq >= 0 && D > 0 && Nd >= 0 && Nc >= 0, "residual_maxsim: bad sizes");
  REATT_CHECK((D * nbits) % 8 == 0, "residual_maxsim: D * nbits must be a multiple of 8");
  if (Bq == 0 || Nc == 0) return;
  auto* qp = reinterpret_cast<const float*>(q);
  auto* mp = reinterpret_cast<const bool*>(q_mask);
  auto* cp = reinterpret_cast<const float*>(centroids);
  auto* wp = reinterpret_cast<const float*>(weights);
  auto* cd = reinterpret_cast<const int32_t*>(codes);
  auto* pk = reinterpret_cast<const uint8_t*>(packed);
  auto* of = reinterpret_cast<const int64_t*>(offsets);
  auto* ca = reinterpret_cast<const int64_t*>(cand);
  auto* op = reinterpret_cast<float*>(out);
  auto st = as_stream(stream);
  const int lq = static_cast<int>(Lq), d = static_cast<int>(D);
  switch (nbits) {
    case 1: launch<1>(qp, mp, cp, wp, cd, pk, of, ca, op, Bq, lq, d, Nd, Nc, st); break;
    case 2: launch<2>(qp, mp, cp, wp, cd, pk, of, ca, op, Bq, lq, d, Nd, Nc, st); break;
    case 4: launch<4>(qp, mp, cp, wp, cd, pk, of, ca, op, Bq, lq, d, Nd, Nc, st); break;
    case 8: launch<8>(qp, mp, cp, wp, cd, pk, of, ca, op, Bq, lq, d, Nd, Nc, st); break;
    default: REATT_CHECK(false, "residual_maxsim: nbits must be 1, 2, 4 or 8");
  }
}

// (bytes the kernel needs for a query of Lq x D, the current device's opt-in limit): the backend's support check.
pybind11::tuple residual_maxsim_smem_cuda(int64_t Lq, int64_t D) {
  REATT_CHECK(Lq >= 0 && D > 0, "residual_maxsim_smem_cuda: bad sizes");
  return pybind11::make_tuple(residual_smem(Lq, D), smem_optin_limit());
}

RegisterBindings reg_residual_cuda([](pybind11::module_& m) {
  bind_residual_maxsim_args(m);
  m.def("residual_maxsim_smem_cuda", &residual_maxsim_smem_cuda,
        "(shared-memory bytes needed for a Lq x D query, the current device's opt-in per-block limit)");
  m.def("residual_maxsim_fwd_cuda", &residual_maxsim_fwd_cuda,
        "Fused decompress + MaxSim over candidates on CUDA (a ResidualMaxsimArgs)", pybind11::arg("args"));
});

}  // namespace
}  // namespace reatt
