// MaxSim backward on CUDA through the saved argmax: the dq gather, the dd scatter (fp32 atomics, or the ordered
// per-document kernel), the dbias histogram, and their launch sequence. Formulas and bytes: maxsim_cuda.cuh; the
// splits, partitions and the atomic/ordered choice are planned in maxsim_launch.cu (plan_bwd).
#include <algorithm>
#include <cstdint>

#include "maxsim/maxsim_cuda.cuh"

namespace reatt {
namespace maxsim_cuda {
namespace {


__device__ __forceinline__ int64_t bwd_doc(const BwdParams& p, int64_t a, int64_t c) {
  return p.group_size ? a * p.group_size + c : c;
}
// Element offset of document gdoc's token 0 in d (strided) and token row in the contiguous dd/dd32.
__device__ __forceinline__ int64_t bwd_base(const BwdParams& p, int64_t gdoc) {
  return p.offsets ? p.offsets[gdoc] * p.sdj : gdoc * p.sdb;
}
__device__ __forceinline__ int64_t bwd_tokrow(const BwdParams& p, int64_t gdoc) {
  return p.offsets ? p.offsets[gdoc] : gdoc * p.Ld;
}
__device__ __forceinline__ bool bwd_qvalid(const BwdParams& p, int64_t a, int64_t i) {
  return p.q_mask[a * p.sqmb + i * p.sqmi] != 0;
}
__device__ __forceinline__ float bwd_weight(const BwdParams& p, int64_t a, int64_t c) {
  const float w = p.grad[a * p.sgb + c * p.sgc];
  return p.mean ? w / static_cast<float>(max(1, p.nq[a])) : w;
}

// dq: one warp per (query row, split of the columns). Lanes own dims lane + 32*m; per column the warp reads the
// winning document row (dim * esize bytes, coalesced). Columns are summed in ascending order: reproducible.
template <typename T>
__global__ void __launch_bounds__(128) maxsim_bwd_dq_kernel(const BwdParams p) {
  REATT_EMU_LAUNCH_BOUNDS(128);
  const int lane = threadIdx.x & 31;
  const int64_t rows = p.Bq * p.Lq;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int64_t a = row / p.Lq, i = row - a * p.Lq;
  const int64_t per = (p.C + p.n_split - 1) / p.n_split;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * per, c1 = min64(p.C, c0 + per);
  const T* d = static_cast<const T*>(p.d);
  float acc[MAX_DIM / 32];
#pragma unroll
  for (int m = 0; m < MAX_DIM / 32; ++m) acc[m] = 0.f;
  // A masked row (warp-uniform) skips its C argmax reads and gathers: its dq is the zero row written below.
  const int64_t c_stop = bwd_qvalid(p, a, i) ? c1 : c0;
  for (int64_t cb = c0; cb < c_stop; cb += 32) {
    const int64_t c = cb + lane;
    int j = -1;
    float w = 0.f;
    int64_t base = 0;
    if (c < c_stop) {
      j = p.argmax[(a * p.C + c) * p.Lq + i];
      if (j >= 0) {
        w = bwd_weight(p, a, c);
        base = bwd_base(p, bwd_doc(p, a, c)) + j * p.sdj;
      }
    }
    // Lanes past c1 hold j = -1. Predicated (not branched) and unrolled, so several gathers are in flight at once:
    // the loop is latency-bound (one dependent HBM/L2 row per column otherwise). The order over c stays ascending.
#pragma unroll 4
    for (int k = 0; k < 32; ++k) {
      const int jk = __shfl_sync(0xffffffffu, j, k);
      const float wk = __shfl_sync(0xffffffffu, w, k);
      const long long bk = __shfl_sync(0xffffffffu, static_cast<long long>(base), k);
      const bool live = jk >= 0;  // uniform across the warp
#pragma unroll
      for (int m = 0; m < MAX_DIM / 32; ++m) {
        const int k2 = lane + 32 * m;
        if (live && k2 < p.D) acc[m] = fmaf(wk, to_f<T>(d[bk + k2]), acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MAX_DIM / 32; ++m) {
    const int k2 = lane + 32 * m;
    if (k2 >= p.D) continue;
    if (p.n_split == 1)
      static_cast<T*>(p.dq)[row * p.D + k2] = from_f<T>(acc[m]);
    else
      p.dq_ws[(static_cast<int64_t>(blockIdx.y) * rows + row) * p.D + k2] = acc[m];
  }
}

// dq = sum of the n_split partials, in split order.
template <typename T>
__global__ void maxsim_bwd_dq_reduce_kernel(const BwdParams p) {
  const int64_t n = p.Bq * p.Lq * p.D;
  for (int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; x < n;
       x += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int64_t sp = 0; sp < p.n_split; ++sp) s += p.dq_ws[sp * n + x];
    static_cast<T*>(p.dq)[x] = from_f<T>(s);
  }
}

// dd with fp32 atomics: one warp per (query, column) pair; per valid query row, dim atomics of w * q[a,i].
template <typename T>
__global__ void __launch_bounds__(128) maxsim_bwd_dd_atomic_kernel(const BwdParams p) {
  REATT_EMU_LAUNCH_BOUNDS(128);
  const int lane = threadIdx.x & 31;
  const int64_t pairs = p.Bq * p.C;
  const T* q = static_cast<const T*>(p.q);
  for (int64_t pc = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5); pc < pairs;
       pc += static_cast<int64_t>(gridDim.x) * 4) {
    const int64_t a = pc / p.C, c = pc - a * p.C;
    const float w = bwd_weight(p, a, c);
    const int64_t row0 = bwd_tokrow(p, bwd_doc(p, a, c));
    for (int64_t ib = 0; ib < p.Lq; ib += 32) {
      const int j = ib + lane < p.Lq && bwd_qvalid(p, a, ib + lane) ? p.argmax[pc * p.Lq + ib + lane] : -1;
      const int n = static_cast<int>(min64(32, p.Lq - ib));
      for (int k = 0; k < n; ++k) {
        const int jk = __shfl_sync(0xffffffffu, j, k);
        if (jk < 0) continue;
        const T* qr = q + a * p.sqb + (ib + k) * p.sqi;
        float* dst = p.dd32 + (row0 + jk) * p.D;
        for (int k2 = lane; k2 < p.D; k2 += 32) atomicAdd(dst + k2, w * to_f<T>(qr[k2]));
      }
    }
  }
}

// Deterministic dd: one CTA per document. For each tile of jt tokens the CTA walks the document's (a, i) entries in
// ascending order and adds w * q[a,i] to the winner's row of an fp32 smem tile [jt][D]; thread x owns dims x, x+128,
// so no two threads touch the same element and the summation order is fixed. Every token row is written (0 for a
// token that never wins), so dd needs no zero fill. Entries come in batches of DET_BATCH: their q rows are first
// copied to smem by the whole CTA (independent loads, all in flight together), so the ordered loop that follows only
// touches smem instead of waiting on one dependent global load per entry.
template <typename T>
__global__ void __launch_bounds__(128) maxsim_bwd_dd_det_kernel(const BwdParams p) {
  REATT_EMU_LAUNCH_BOUNDS(128);
  REATT_DYNAMIC_SMEM(unsigned char, smem, 16);
  long long* e_q = reinterpret_cast<long long*>(smem);          // [DET_BATCH] entry: q row offset
  int* e_j = reinterpret_cast<int*>(e_q + DET_BATCH);           // [DET_BATCH] entry: winning token (-1: not here)
  float* e_w = reinterpret_cast<float*>(e_j + DET_BATCH);       // [DET_BATCH] entry: weight
  float* qs = e_w + DET_BATCH;                                  // [DET_BATCH][D] the entries' q rows, fp32
  float* acc = qs + DET_BATCH * p.D;                            // [jt][D]
  const int64_t gdoc = blockIdx.x;
  const T* q = static_cast<const T*>(p.q);
  T* dd = static_cast<T*>(p.dd);
  const int D = static_cast<int>(p.D);
  // Which (a, c) pairs see this document: all queries (all pairs) or its owner (grouped).
  const int64_t a_lo = p.group_size ? gdoc / p.group_size : 0;
  const int64_t a_hi = p.group_size ? a_lo + 1 : p.Bq;
  const int64_t c = p.group_size ? gdoc - a_lo * p.group_size : gdoc;
  const int64_t len = p.offsets ? p.offsets[gdoc + 1] - p.offsets[gdoc] : p.Ld;
  const int64_t row0 = bwd_tokrow(p, gdoc);
  const int64_t n_entries = (a_hi - a_lo) * p.Lq;
  for (int64_t j0 = 0; j0 < len; j0 += p.jt) {
    const int64_t jn = min64(p.jt, len - j0);
    for (int64_t x = threadIdx.x; x < jn * D; x += blockDim.x) acc[x] = 0.f;
    for (int64_t eb = 0; eb < n_entries; eb += DET_BATCH) {
      __syncthreads();  // acc zeroed / the previous batch consumed
      if (threadIdx.x < DET_BATCH) {
        const int64_t e = eb + threadIdx.x;
        int j = -1;
        if (e < n_entries) {
          const int64_t a = a_lo + e / p.Lq, i = e % p.Lq;
          j = bwd_qvalid(p, a, i) ? p.argmax[(a * p.C + c) * p.Lq + i] : -1;
          if (j >= j0 && j < j0 + jn) {
            e_w[threadIdx.x] = bwd_weight(p, a, c);
            e_q[threadIdx.x] = a * p.sqb + i * p.sqi;
          } else {
            j = -1;
          }
        }
        e_j[threadIdx.x] = j;
      }
      __syncthreads();
      for (int x = threadIdx.x; x < DET_BATCH * D; x += blockDim.x) {
        const int k = x / D, k2 = x - k * D;
        if (e_j[k] >= 0) qs[x] = to_f<T>(q[e_q[k] + k2]);
      }
      __syncthreads();
      const int n = static_cast<int>(min64(DET_BATCH, n_entries - eb));
      for (int k = 0; k < n; ++k) {
        const int jk = e_j[k];
        if (jk < 0) continue;  // uniform across the CTA
        const float wk = e_w[k];
        float* arow = acc + (jk - j0) * D;
        const float* qrow = qs + k * D;
        for (int k2 = threadIdx.x; k2 < D; k2 += blockDim.x) arow[k2] = fmaf(wk, qrow[k2], arow[k2]);
      }
    }
    __syncthreads();  // with no entries at all, the zeroing above must still be visible
    for (int64_t x = threadIdx.x; x < jn * D; x += blockDim.x) dd[(row0 + j0) * D + x] = from_f<T>(acc[x]);
    __syncthreads();  // acc is reset by the next tile
  }
}

// dbias, deterministic: warp w owns a fixed slab of the Bq*C*Lq argmax entries and a private row of dbias_ws. Per 32
// entries, lanes with the same distance r are grouped (__match_any_sync), each group sums its weights in lane order,
// and the group leader adds the sum to ws[w][r] (distinct r per leader: no races).
__global__ void __launch_bounds__(128) maxsim_bwd_dbias_kernel(const BwdParams p) {
  REATT_EMU_LAUNCH_BOUNDS(128);
  const int lane = threadIdx.x & 31;
  const int64_t wid = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (wid >= p.n_part) return;  // whole warps exit together
  const int64_t E = p.Bq * p.C * p.Lq;
  const int64_t per = (E + p.n_part - 1) / p.n_part;
  const int64_t e0 = wid * per, e1 = min64(E, e0 + per);
  float* part = p.dbias_ws + wid * p.R;
  for (int64_t eb = e0; eb < e1; eb += 32) {
    const int64_t e = eb + lane;
    int r = -1;
    float w = 0.f;
    if (e < e1) {
      const int j = p.argmax[e];
      const int64_t a = e / (p.C * p.Lq), rem = e - a * p.C * p.Lq, c = rem / p.Lq, i = rem - c * p.Lq;
      if (j >= 0 && bwd_qvalid(p, a, i)) {
        r = static_cast<int>(min64(max64(p.nq[a] + j - i, 0), p.R - 1));
        w = bwd_weight(p, a, c);
      }
    }
    const unsigned grp = __match_any_sync(0xffffffffu, r);
    float s = 0.f;
    for (int k = 0; k < 32; ++k) {
      const float wk = __shfl_sync(0xffffffffu, w, k);
      if ((grp >> k) & 1u) s += wk;
    }
    if (r >= 0 && lane == __ffs(grp) - 1) part[r] += s;
    __syncwarp();  // this step's stores are visible to the next step's leaders
  }
}

__global__ void maxsim_bwd_dbias_reduce_kernel(const BwdParams p) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < p.R;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int64_t w = 0; w < p.n_part; ++w) s += p.dbias_ws[w * p.R + r];
    p.dbias[r] = s;
  }
}

template <typename T>
void launch_bwd_t(const BwdParams& p, const BwdPlan& plan, cudaStream_t stream) {
  const int64_t rows = p.Bq * p.Lq;
  {
    const dim3 grid(static_cast<unsigned>(cdiv(rows, 4)), static_cast<unsigned>(p.n_split));
    REATT_LAUNCH(maxsim_bwd_dq_kernel<T>, grid, 128, 0, stream)(p);
    REATT_LAUNCH_CHECK("maxsim_bwd_dq_kernel");
    if (p.n_split > 1) {
      const int64_t blocks = std::min<int64_t>(cdiv(rows * p.D, 256), 65535);
      REATT_LAUNCH(maxsim_bwd_dq_reduce_kernel<T>, static_cast<unsigned>(blocks), 256, 0, stream)(p);
      REATT_LAUNCH_CHECK("maxsim_bwd_dq_reduce_kernel");
    }
  }
  const int64_t n_docs = p.group_size ? p.Bq * p.group_size : p.C;
  if (plan.ordered_dd) {
    auto kernel = maxsim_bwd_dd_det_kernel<T>;
    set_dynamic_smem(kernel, plan.dd_smem, "maxsim_bwd_dd_det_kernel");
    if (n_docs > 0) {
      REATT_LAUNCH(kernel, static_cast<unsigned>(n_docs), 128, plan.dd_smem, stream)(p);
      REATT_LAUNCH_CHECK("maxsim_bwd_dd_det_kernel");
    }
  } else {
    const int64_t blocks = std::min<int64_t>(cdiv(p.Bq * p.C, 4), 65535LL * 16);
    REATT_LAUNCH(maxsim_bwd_dd_atomic_kernel<T>, static_cast<unsigned>(blocks), 128, 0, stream)(p);
    REATT_LAUNCH_CHECK("maxsim_bwd_dd_atomic_kernel");
  }
  if (p.R > 0) {
    REATT_LAUNCH(maxsim_bwd_dbias_kernel, static_cast<unsigned>(cdiv(p.n_part, 4)), 128, 0, stream)(p);
    REATT_LAUNCH_CHECK("maxsim_bwd_dbias_kernel");
    REATT_LAUNCH(maxsim_bwd_dbias_reduce_kernel, static_cast<unsigned>(std::min<int64_t>(cdiv(p.R, 256), 4096)), 256,
                 0, stream)(p);
    REATT_LAUNCH_CHECK("maxsim_bwd_dbias_reduce_kernel");
  }
}

}  // namespace

void launch_bwd(const BwdParams& p, const BwdPlan& plan, int dtype, cudaStream_t stream) {
  if (dtype == kFloat32)
    launch_bwd_t<float>(p, plan, stream);
  else if (dtype == kFloat16)
    launch_bwd_t<__half>(p, plan, stream);
  else
    launch_bwd_t<__nv_bfloat16>(p, plan, stream);
}

}  // namespace maxsim_cuda
}  // namespace reatt
