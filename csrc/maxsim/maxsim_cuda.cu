// MaxSim on CUDA: forward (tensor-core mma.sync for fp16/bf16, FFMA for fp32) and backward (argmax gather for dq,
// atomic or deterministic scatter for dd, a deterministic per-distance histogram for dpos_bias).
//
// Semantics: reatt_kernels/reference/maxsim.py (THE spec). For query a, document b:
//     score(a, b) = sum_{i valid} max_{j valid} ( q[a,i] . d[b,j] + pos_bias[clamp(n_a + j - i, 0, R-1)] )
// divided by n_a for mean; an empty document scores -inf, a query with no valid token scores 0, ties go to the lowest
// j, argmax is -1 for a masked query token or an empty document.
//
// No libtorch: the bindings at the bottom take raw pointers, sizes, strides (in elements), a dtype code and the
// cudaStream_t. Every CUDA call and every launch is checked; a failure throws std::runtime_error with CUDA's message.
//
// ---- forward design (numbers for an H100: 3.0 TB/s HBM, ~700 TFLOP/s bf16 dense, 132 SMs, 228 KB smem/SM) ----------
// A CTA owns a *row block* (whole queries: QPB queries x Lq tokens, at most RB = 32*WR rows) and a contiguous range of
// document columns. Its WR x DS warps form DS *slots*: each slot streams its own documents (columns c0+s, c0+s+DS, ...)
// through shared memory in chunks of BN = 32 tokens (cp.async, double buffered), and its WR warps each hold 32 query
// rows (two m16 tiles; the A fragments stay in registers for dim 64/128) against the whole chunk. Each warp keeps a
// running (max, argmax) per row in registers, so the token-pair scores never leave registers, let alone reach HBM.
//
// The tiling is picked per shape (maxsim_fwd_cuda below):
//  * memory-bound search, few query rows (1 query x 32 tokens vs 200k docs x 128 tokens x 128, fp16): per document
//    32 KB are read and 2*32*128*128 = 1.05 MFLOP done, 32 FLOP/B: at 3.0 TB/s that is ~100 TFLOP/s, 15% of the tensor
//    cores. Reuse of a document tile is impossible (one query), so WR = 1, DS = 4: four documents in flight per CTA,
//    a 32 KB stage loading while the previous one is scored (78 KB smem), two CTAs per SM, so ~64 KB of loads in
//    flight per SM (Little: 3 TB/s x ~1 us / 132 SMs ~ 23 KB needed); every byte of d is read from HBM once.
//  * compute-bound batch (16 queries x 32 tokens = 512 rows): 2*512*128*128*200k = 3.4 TFLOP vs 6.5 GB, 525 FLOP/B,
//    far past the ridge point (~230 FLOP/B). WR = 4, DS = 1: 128 rows (4 queries) share each document tile in smem,
//    so smem->register traffic per mma is one B fragment per two m16 tiles; the 4 row blocks that read the same
//    document range are adjacent in blockIdx.x, run concurrently, and hit L2 for 3 of the 4 reads.
//  * grouped (training: query a against its own n documents): one query per row block, WR = 1/2/4 for Lq <= 32/64/more.
// Rows beyond 128 per query (Lq > 128) loop over row chunks inside the CTA, accumulating the score in place (the same
// thread owns the same output element in every chunk, so the order is fixed).
//
// ---- backward --------------------------------------------------------------------------------------------------------
//   dq[a,i]      = sum_c w[a,c] d[doc(a,c), argmax[a,c,i]]            warp per row, gather; split over c, fixed order
//   dd[b,j]     += w[a,c] q[a,i]  for every (a,i) whose argmax is j    fp32 atomics, or per-document CTAs that walk
//                                                                     the (a,i) entries in a fixed order (bitwise
//                                                                     reproducible)
//   dbias[r]    += w[a,c]         r = clamp(n_a + j - i, 0, R-1)       per-warp histograms, then a fixed-order sum
// with w[a,c] = grad[a,c] (/ n_a for mean). Bytes: dq reads Bq*C*Lq*dim*esize of d (the winners), dd reads as much of q.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cuda_emu/emu_runtime.h"  // the CUDA headers (nvcc), or the CPU emulation (REATT_CUDA_EMU, for tests)

namespace py = pybind11;

namespace reatt {
namespace {

// A failed runtime call (e.g. cudaFuncSetAttribute asking for more shared memory than the device allows) also leaves
// its error pending in cudaGetLastError(): clear it before throwing, or the next valid launch would report it.
#define REATT_CUDA_CHECK(expr)                                                                                  \
  do {                                                                                                          \
    cudaError_t err_ = (expr);                                                                                  \
    if (err_ != cudaSuccess) {                                                                                  \
      cudaGetLastError();                                                                                       \
      throw std::runtime_error(std::string("reatt: CUDA error in ") + #expr + ": " + cudaGetErrorString(err_)); \
    }                                                                                                           \
  } while (0)

// After every launch: a bad configuration shows up here; a fault inside the kernel shows up at the next sync.
#define REATT_LAUNCH_CHECK(name)                                                                                     \
  do {                                                                                                               \
    cudaError_t err_ = cudaGetLastError();                                                                           \
    if (err_ != cudaSuccess)                                                                                         \
      throw std::runtime_error(std::string("reatt: launching ") + (name) + " failed: " + cudaGetErrorString(err_)); \
  } while (0)

constexpr int BN = 32;        // document tokens per slot per pipeline stage (4 n8 tiles)
constexpr int WARP_M = 32;    // query rows per warp (2 m16 tiles)
constexpr int MAX_DIM = 256;  // generic path: dim up to 256 (padded to a multiple of 16 in smem)
constexpr int MAX_BIAS_SMEM = 4096;  // pos_bias floats kept in smem (16 KB); a longer table is read through L1

// ---- small device helpers ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

#ifdef REATT_CUDA_EMU
// Emulated twins of the PTX helpers below (csrc/cuda_emu/emu_runtime.cpp): same signatures, plus the caller's
// file:line so that a warp whose lanes reach a collective from different call sites is reported.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) { reatt_emu::cp_async16(dst, src); }
__device__ __forceinline__ void cp_async_commit() { reatt_emu::cp_async_commit(); }
__device__ __forceinline__ void cp_async_wait_1() { reatt_emu::cp_async_wait(1); }
__device__ __forceinline__ void cp_async_wait_0() { reatt_emu::cp_async_wait(0); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p, REATT_EMU_SITE) {
  reatt_emu::warp_ldmatrix_x4(r, p, false, REATT_EMU_SITE_ARGS);
}
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                          REATT_EMU_SITE) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "mma on f16/bf16 only");
  reatt_emu::warp_mma_16816(std::is_same<T, __half>::value ? reatt_emu::kMmaF16 : reatt_emu::kMmaBF16, c, a, b0, b1,
                            REATT_EMU_SITE_ARGS);
}
#else
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy that bypasses L1 (.cg): document tiles are streamed once per CTA.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::); }
__device__ __forceinline__ void cp_async_wait_0() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// D(16x8, fp32) += A(16x16, row) * B(16x8, col); fragment layouts as in the PTX ISA for m16n8k16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#endif  // REATT_CUDA_EMU

// (value, index) max with ties to the lowest index; -1 marks "no valid token" and never beats a real index.
__device__ __forceinline__ void merge_max(float& best, int& arg, float ob, int oa) {
  if (ob > best || (ob == best && oa >= 0 && (arg < 0 || oa < arg))) {
    best = ob;
    arg = oa;
  }
}

// ---- forward ------------------------------------------------------------------------------------------------------------
struct FwdParams {
  const void* q;            // [Bq, Lq, D], strides (sqb, sqi, 1)
  const void* d;            // padded [Nd, Ld, D] strides (sdb, sdj, 1), or packed [T, D] strides (sdj, 1)
  const uint8_t* q_mask;    // bool [Bq, Lq], strides (sqmb, sqmi); never null
  const uint8_t* d_mask;    // bool [Nd, Ld], strides (sdmb, sdmj); null = all valid (padded only)
  const int64_t* offsets;   // int64 [Nd + 1] for packed, else null
  const float* pos_bias;    // fp32 [R] contiguous, or null
  float* scores;            // fp32 [Bq, C] contiguous
  int32_t* argmax;          // int32 [Bq, C, Lq] contiguous
  int64_t Bq, Lq, D, Ld, R, group_size, C;
  int64_t sqb, sqi, sdb, sdj, sqmb, sqmi, sdmb, sdmj;
  int64_t docs_per_cta;
  int mean, vec;            // vec: every row start is 16-byte aligned, so cp.async 16 B copies are legal
  int WR, DS, QPB, n_rc, Dpad, lds;
  int bias_smem;            // pos_bias entries cached in smem (R when R <= MAX_BIAS_SMEM, else 0: read through L1)
};

// A slot's position in its document stream.
struct SlotState {
  int64_t col;   // output column (document index, or index inside the group); >= col_end when the slot is done
  int64_t base;  // element offset of the document's token 0 in d
  int64_t gdoc;  // global document index (for d_mask)
  int len, chunk, nchunks;
};

__device__ __forceinline__ void slot_set_doc(const FwdParams& p, SlotState& s, int64_t col, int64_t col_end,
                                             int64_t doc_base) {
  s.col = col;
  s.chunk = 0;
  if (col >= col_end) return;
  s.gdoc = doc_base + col;
  if (p.offsets != nullptr) {
    const int64_t o0 = p.offsets[s.gdoc], o1 = p.offsets[s.gdoc + 1];
    s.base = o0 * p.sdj;
    s.len = static_cast<int>(o1 - o0);
  } else {
    s.base = s.gdoc * p.sdb;
    s.len = static_cast<int>(p.Ld);
  }
  s.nchunks = max(1, (s.len + BN - 1) / BN);  // an empty document still takes one (fully masked) chunk
}

__device__ __forceinline__ void slot_advance(const FwdParams& p, SlotState& s, int64_t col_end, int64_t doc_base,
                                             int DS) {
  if (s.col >= col_end) return;
  if (++s.chunk >= s.nchunks) slot_set_doc(p, s, s.col + DS, col_end, doc_base);
}

// The threads of one slot (lt in [0, nt)) copy the slot's next chunk: BN tokens x D elements plus BN mask bytes.
template <typename T, int KT>
__device__ __forceinline__ void load_chunk(const FwdParams& p, const SlotState& s, T* tile, uint8_t* tmask, int lt,
                                           int nt) {
  const T* d = static_cast<const T*>(p.d);
  const int j0 = s.chunk * BN;
  const int nvalid = max(0, min(BN, s.len - j0));
  if (p.vec) {
    constexpr int VE = 16 / sizeof(T);  // elements per 16-byte copy
    const int nvec = KT > 0 ? (KT * 16) / VE : static_cast<int>(p.D) / VE;
    for (int u = lt; u < nvalid * nvec; u += nt) {
      const int tt = u / nvec, v = u - tt * nvec;
      cp_async16(tile + tt * p.lds + v * VE, d + s.base + (j0 + tt) * p.sdj + v * VE);
    }
  } else {  // unaligned rows or dim not a multiple of 16 bytes: element copies (correct, slower)
    const int D = static_cast<int>(p.D);
    for (int u = lt; u < nvalid * D; u += nt) {
      const int tt = u / D, k = u - tt * D;
      tile[tt * p.lds + k] = d[s.base + (j0 + tt) * p.sdj + k];
    }
  }
  // Tokens past the end keep stale data in smem; their mask byte is 0 and the score is replaced (not added) by -inf.
  for (int tt = lt; tt < BN; tt += nt) {
    bool ok = tt < nvalid;
    if (ok && p.d_mask != nullptr) ok = p.d_mask[s.gdoc * p.sdmb + (j0 + tt) * p.sdmj] != 0;
    tmask[tt] = ok ? 1 : 0;
  }
}

// Scores of this warp's 32 rows against 16 tokens (n8 tiles 2*np, 2*np+1) of the slot's chunk, in the m16n8k16
// accumulator layout: acc[mt][nt][e] is row mt*16 + g + 8*(e/2), column nt*8 + 2*t + (e%2) (g = lane/4, t = lane%4).
template <typename T, int KT>
__device__ __forceinline__ void score_tile(const FwdParams& p, const T* sQw, const T* tile, int np, int lane,
                                           const uint32_t (&areg)[2][KT > 0 ? KT : 1][4], float (&acc)[2][2][4]) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
  const int lds = p.lds;
  if constexpr (std::is_same<T, float>::value) {
    // FFMA: per 4-wide k step, 4 + 4 float4 smem loads feed 64 FMAs.
    const int g = lane >> 2, t = lane & 3;
    for (int k = 0; k < p.Dpad; k += 4) {
      float4 qa[2][2], db[2][2];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          qa[mt][h] = *reinterpret_cast<const float4*>(sQw + (mt * 16 + h * 8 + g) * lds + k);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          db[nt][e] = *reinterpret_cast<const float4*>(tile + (np * 16 + nt * 8 + 2 * t + e) * lds + k);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& c = acc[mt][nt][2 * h + e];
              c = fmaf(qa[mt][h].x, db[nt][e].x, c);
              c = fmaf(qa[mt][h].y, db[nt][e].y, c);
              c = fmaf(qa[mt][h].z, db[nt][e].z, c);
              c = fmaf(qa[mt][h].w, db[nt][e].w, c);
            }
    }
  } else {
    // Tensor cores: per k16 step one ldmatrix.x4 gives the B fragments of both n8 tiles (rows = tokens: the "col"
    // operand is d itself), reused by the two m16 tiles: 4 mma (16 KFLOP) per 512 B of smem read.
    const T* brow = tile + (np * 16 + (lane & 7) + 8 * (lane >> 4)) * lds + 8 * ((lane >> 3) & 1);
    const int kt_n = KT > 0 ? KT : p.Dpad / 16;
#pragma unroll(KT > 0 ? KT : 1)
    for (int kt = 0; kt < kt_n; ++kt) {
      uint32_t b[4];
      ldmatrix_x4(b, brow + kt * 16);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        uint32_t a[4];
        if constexpr (KT > 0) {
#pragma unroll
          for (int x = 0; x < 4; ++x) a[x] = areg[mt][kt][x];
        } else {
          ldmatrix_x4(a, sQw + (mt * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * lds + kt * 16 + 8 * (lane >> 4));
        }
        mma_16816<T>(acc[mt][0], a, b[0], b[1]);
        mma_16816<T>(acc[mt][1], a, b[2], b[3]);
      }
    }
  }
}

// KT > 0: dim == 16*KT and the warp's A fragments live in registers (fp16/bf16, dim 64 or 128); KT == 0: any dim
// (padded to Dpad in smem), A read from smem at every k step (and the FFMA path for fp32).
template <typename T, int KT>
__global__ void __launch_bounds__(128) maxsim_fwd_kernel(const FwdParams p) {
  REATT_EMU_LAUNCH_BOUNDS(128);
  REATT_DYNAMIC_SMEM(unsigned char, smem, 16);
  const int WR = p.WR, DS = p.DS, RB = WARP_M * WR, lds = p.lds;
  T* sQ = reinterpret_cast<T*>(smem);                 // [RB][lds]
  T* sD = sQ + RB * lds;                              // [2][DS*BN][lds]
  uint8_t* sM = reinterpret_cast<uint8_t*>(sD + 2 * DS * BN * lds);  // [2][DS*BN]
  float* sRow = reinterpret_cast<float*>(sM + ((2 * DS * BN + 15) / 16) * 16);  // [DS][RB] row maxima
  int* sNa = reinterpret_cast<int*>(sRow + DS * RB);  // [QPB] valid query tokens
  float* sBias = reinterpret_cast<float*>(sNa + RB);   // [bias_smem] pos_bias: one LDS per score element

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int slot = warp / WR, wr = warp - slot * WR;
  const int slot_threads = WARP_M * WR, lt = tid - slot * slot_threads;
  const int64_t Lq = p.Lq, C = p.C;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * p.QPB;
  const int64_t a1 = min64(p.Bq, a0 + p.QPB);
  const int64_t col_begin = static_cast<int64_t>(blockIdx.y) * p.docs_per_cta;
  const int64_t col_end = min64(C, col_begin + p.docs_per_cta);
  const int64_t doc_base = p.group_size ? a0 * p.group_size : 0;  // grouped: query a0 owns docs a0*n .. a0*n+n-1
  const T* q = static_cast<const T*>(p.q);

  for (int x = tid; x < a1 - a0; x += blockDim.x) {
    int n = 0;
    for (int64_t i = 0; i < Lq; ++i) n += p.q_mask[(a0 + x) * p.sqmb + i * p.sqmi] != 0;
    sNa[x] = n;
  }
  for (int x = tid; x < p.bias_smem; x += blockDim.x) sBias[x] = p.pos_bias[x];
  // The k padding [D, Dpad) of the two stage buffers is never written by the loads: zero it once.
  if (p.Dpad != p.D) {
    const int pad = p.Dpad - static_cast<int>(p.D);
    for (int u = tid; u < 2 * DS * BN * pad; u += blockDim.x) {
      const int row = u / pad, k = static_cast<int>(p.D) + u % pad;
      sD[row * lds + k] = from_f<T>(0.f);
    }
  }

  for (int rc = 0; rc < p.n_rc; ++rc) {
    const int64_t F0 = a0 * Lq + static_cast<int64_t>(rc) * RB;  // first flattened (a*Lq + i) row of this chunk
    const int rows_blk = static_cast<int>(min64(RB, a1 * Lq - F0));
    __syncthreads();  // the previous row chunk is done with sQ, sRow and the stage buffers
    // Query rows -> sQ (zero rows past the block and the k padding, so the mma sees zeros there).
    for (int u = tid; u < RB * p.Dpad; u += blockDim.x) {
      const int r = u / p.Dpad, k = u - r * p.Dpad;
      float v = 0.f;
      if (r < rows_blk && k < p.D) {
        const int64_t F = F0 + r, a = F / Lq, i = F - a * Lq;
        v = to_f<T>(q[a * p.sqb + i * p.sqi + k]);
      }
      sQ[r * lds + k] = from_f<T>(v);
    }
    __syncthreads();

    // This thread's rows (mt, h): r = wr*32 + mt*16 + h*8 + g; validity and the bias offset n_a - i.
    bool rvalid[2][2];
    int bbase[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wr * WARP_M + mt * 16 + h * 8 + g;
        rvalid[mt][h] = false;
        bbase[mt][h] = 0;
        if (r < rows_blk) {
          const int64_t F = F0 + r, a = F / Lq, i = F - a * Lq;
          rvalid[mt][h] = p.q_mask[a * p.sqmb + i * p.sqmi] != 0;
          bbase[mt][h] = sNa[a - a0] - static_cast<int>(i);
        }
      }
    const T* sQw = sQ + wr * WARP_M * lds;
    uint32_t areg[2][KT > 0 ? KT : 1][4];
    if constexpr (KT > 0) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int kt = 0; kt < KT; ++kt)
          ldmatrix_x4(areg[mt][kt],
                      sQw + (mt * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * lds + kt * 16 + 8 * (lane >> 4));
    }

    // Stream this slot's documents: load chunk n+1 while computing chunk n.
    SlotState ld, cp;
    slot_set_doc(p, ld, col_begin + slot, col_end, doc_base);
    cp = ld;
    // Stage buffer `b` of this slot: tokens at sD + ((b*DS + slot)*BN)*lds, mask bytes at sM + (b*DS + slot)*BN.
    auto tile_of = [&](int b) { return sD + static_cast<int64_t>((b * DS + slot) * BN) * lds; };
    auto mask_of = [&](int b) { return sM + (b * DS + slot) * BN; };
    if (ld.col < col_end) load_chunk<T, KT>(p, ld, tile_of(0), mask_of(0), lt, slot_threads);
    cp_async_commit();
    slot_advance(p, ld, col_end, doc_base, DS);
    bool cp_active = cp.col < col_end;
    float best[2][2];
    int arg[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        best[mt][h] = -INFINITY;
        arg[mt][h] = -1;
      }
    int buf = 0;
    bool any = __syncthreads_or(cp_active);
    while (any) {
      if (ld.col < col_end) load_chunk<T, KT>(p, ld, tile_of(buf ^ 1), mask_of(buf ^ 1), lt, slot_threads);
      cp_async_commit();
      slot_advance(p, ld, col_end, doc_base, DS);
      cp_async_wait_1();  // this thread's copies of chunk `buf` have landed ...
      __syncthreads();    // ... and everyone else's
      const bool doc_end = cp_active && cp.chunk == cp.nchunks - 1;
      if (cp_active) {
        const T* tile = tile_of(buf);
        const uint8_t* tmask = mask_of(buf);
        const int j0 = cp.chunk * BN;
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          float acc[2][2][4];
          score_tile<T, KT>(p, sQw, tile, np, lane, areg, acc);
          // Fold 16 columns into the running max: columns ascend within a thread, so a strict > keeps the lowest j.
#pragma unroll
          for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int c = np * 16 + nt * 8 + 2 * t + e;
              const bool cvalid = tmask[c] != 0;
              const int j = j0 + c;
#pragma unroll
              for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                  float v = acc[mt][nt][2 * h + e];
                  if (p.pos_bias != nullptr) {
                    const int r = min(max(bbase[mt][h] + j, 0), static_cast<int>(p.R) - 1);
                    v += p.bias_smem ? sBias[r] : __ldg(p.pos_bias + r);
                  }
                  v = cvalid ? v : -INFINITY;  // a select, so stale smem (even NaN) can never leak in
                  if (v > best[mt][h]) {
                    best[mt][h] = v;
                    arg[mt][h] = j;
                  }
                }
            }
        }
        if (doc_end) {
          // The 4 lanes of a quad hold the same rows, different columns: combine, then lane t == 0 writes.
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
#pragma unroll
              for (int off = 1; off <= 2; off <<= 1) {
                const float ob = __shfl_xor_sync(0xffffffffu, best[mt][h], off);
                const int oa = __shfl_xor_sync(0xffffffffu, arg[mt][h], off);
                merge_max(best[mt][h], arg[mt][h], ob, oa);
              }
              const int r = wr * WARP_M + mt * 16 + h * 8 + g;
              if (t == 0 && r < rows_blk) {
                const int64_t F = F0 + r, a = F / Lq, i = F - a * Lq;
                p.argmax[(a * C + cp.col) * Lq + i] = rvalid[mt][h] ? arg[mt][h] : -1;
                sRow[slot * RB + r] = rvalid[mt][h] ? best[mt][h] : 0.f;
              }
              best[mt][h] = -INFINITY;
              arg[mt][h] = -1;
            }
        }
      }
      __syncthreads();  // sRow is complete; buffer `buf` may be refilled by the next iteration
      if (doc_end && lt < a1 - a0 && (p.n_rc == 1 || lt == 0)) {
        // Sum the row maxima of query a = a0 + lt in row order (fixed order: reproducible).
        const int64_t a = a0 + lt;
        const int rb = static_cast<int>(max64(0, lt * Lq - static_cast<int64_t>(rc) * RB));
        const int re = static_cast<int>(min64(rows_blk, (lt + 1) * Lq - static_cast<int64_t>(rc) * RB));
        float s = 0.f;
        for (int r = rb; r < re; ++r) s += sRow[slot * RB + r];
        float* out = p.scores + a * C + cp.col;
        if (rc > 0) s = *out + s;
        if (rc == p.n_rc - 1 && p.mean) s = s / static_cast<float>(max(1, sNa[lt]));
        *out = s;
      }
      slot_advance(p, cp, col_end, doc_base, DS);
      cp_active = cp.col < col_end;
      buf ^= 1;
      any = __syncthreads_or(cp_active);
    }
    cp_async_wait_0();
  }
}

// ---- backward -----------------------------------------------------------------------------------------------------------
struct BwdParams {
  const float* grad;        // [Bq, C], strides (sgb, sgc)
  const void* q;            // [Bq, Lq, D], strides (sqb, sqi, 1)
  const void* d;            // padded [Nd, Ld, D] (sdb, sdj, 1) or packed [T, D] (sdj, 1)
  const int64_t* offsets;   // packed only
  const int32_t* argmax;    // [Bq, C, Lq] contiguous
  const int32_t* nq;        // [Bq] valid query tokens
  void* dq;                 // [Bq, Lq, D] contiguous, q's dtype
  float* dq_ws;             // [n_split, Bq*Lq, D] fp32 when n_split > 1
  void* dd;                 // deterministic: d's shape, contiguous, d's dtype
  float* dd32;              // atomic: fp32 [ntok, D] zero-filled
  float* dbias;             // [R]
  float* dbias_ws;          // [n_part, R] zero-filled
  int64_t Bq, Lq, D, C, Ld, R, group_size;
  int64_t sgb, sgc, sqb, sqi, sdb, sdj;
  int64_t n_split, n_part, jt;
  int mean;
};

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
  for (int64_t cb = c0; cb < c1; cb += 32) {
    const int64_t c = cb + lane;
    int j = -1;
    float w = 0.f;
    int64_t base = 0;
    if (c < c1) {
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
      const int j = ib + lane < p.Lq ? p.argmax[pc * p.Lq + ib + lane] : -1;
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
constexpr int DET_BATCH = 64;

size_t dd_det_smem(int64_t jt, int64_t D) {
  return static_cast<size_t>(DET_BATCH) * (8 + 4 + 4) + static_cast<size_t>(DET_BATCH + jt) * D * 4;
}

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
          j = p.argmax[(a * p.C + c) * p.Lq + i];
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
      if (j >= 0) {
        const int64_t a = e / (p.C * p.Lq), rem = e - a * p.C * p.Lq, c = rem / p.Lq, i = rem - c * p.Lq;
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

// ---- host ------------------------------------------------------------------------------------------------------------
int sm_count() {
  int dev = 0, n = 0;
  REATT_CUDA_CHECK(cudaGetDevice(&dev));
  REATT_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

// Dynamic shared memory one block may opt into on the current device (227 KB on an H100, 163 KB on an A100, 99 KB
// on sm_86/sm_89): every tiling below is planned within it, so no launch asks for more than the device has.
int64_t smem_optin() {
  int dev = 0, n = 0;
  REATT_CUDA_CHECK(cudaGetDevice(&dev));
  REATT_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return n;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Shared memory of the forward kernel for a tiling.
size_t fwd_smem(int esize, int lds, int WR, int DS, int bias_floats) {
  const size_t rows = static_cast<size_t>(WARP_M) * WR;
  size_t bytes = static_cast<size_t>(esize) * lds * (rows + 2 * BN * DS);
  bytes += ((2 * BN * DS + 15) / 16) * 16;  // masks
  bytes += 4 * DS * rows;                   // row maxima
  bytes += 4 * rows;                        // n_a per query (QPB <= rows)
  bytes += 4 * static_cast<size_t>(bias_floats);
  return bytes;
}

template <typename T, int KT>
void launch_fwd(const FwdParams& p, dim3 grid, size_t smem, cudaStream_t stream) {
  auto kernel = maxsim_fwd_kernel<T, KT>;
  REATT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  REATT_LAUNCH(kernel, grid, 32 * p.WR * p.DS, smem, stream)(p);
  REATT_LAUNCH_CHECK("maxsim_fwd_kernel");
}

// Forward. q_sizes [Bq, Lq, D]; d_sizes padded [Nd, Ld, D] or packed [T, D]; strides in elements (last dim must be
// 1). Outputs: scores fp32 [Bq, C] and argmax int32 [Bq, C, Lq], both contiguous, every element written.
void maxsim_fwd_cuda(uintptr_t q, uintptr_t d, uintptr_t q_mask, uintptr_t d_mask, uintptr_t d_offsets,
                     uintptr_t pos_bias, uintptr_t scores, uintptr_t argmax, int dtype, std::vector<int64_t> q_sizes,
                     std::vector<int64_t> q_strides, std::vector<int64_t> d_sizes, std::vector<int64_t> d_strides,
                     std::vector<int64_t> q_mask_strides, std::vector<int64_t> d_mask_strides, int64_t n_docs,
                     int64_t n_bias, int64_t group_size, bool mean, uintptr_t stream_handle) {
  REATT_CHECK(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16,
              std::string("maxsim_fwd_cuda: dtype must be float32, float16 or bfloat16, got ") + dtype_name(dtype));
  REATT_CHECK(q_sizes.size() == 3 && q_strides.size() == 3, "maxsim_fwd_cuda: q must be 3-D [Bq, Lq, D]");
  const bool packed = d_offsets != 0;
  REATT_CHECK(d_sizes.size() == (packed ? 2u : 3u) && d_strides.size() == d_sizes.size(),
              "maxsim_fwd_cuda: d must be [Nd, Ld, D] (padded) or [T, D] (packed with d_offsets)");
  REATT_CHECK(q_mask != 0 && q_mask_strides.size() == 2, "maxsim_fwd_cuda: q_mask (bool [Bq, Lq]) is required");
  REATT_CHECK(!packed || d_mask == 0, "maxsim_fwd_cuda: d_mask is for the padded layout only");
  REATT_CHECK(d_mask == 0 || d_mask_strides.size() == 2, "maxsim_fwd_cuda: d_mask strides must be [Nd, Ld] strides");
  REATT_CHECK(!packed || group_size == 0, "maxsim_fwd_cuda: the grouped layout is padded");
  FwdParams p{};
  p.Bq = q_sizes[0];
  p.Lq = q_sizes[1];
  p.D = q_sizes[2];
  REATT_CHECK(p.D >= 1 && p.D <= MAX_DIM, "maxsim_fwd_cuda: dim must be in [1, 256], got " + std::to_string(p.D));
  REATT_CHECK(d_sizes.back() == p.D, "maxsim_fwd_cuda: q and d must have the same dim");
  REATT_CHECK(q_strides[2] == 1 && d_strides.back() == 1, "maxsim_fwd_cuda: the last dim of q and d must be contiguous");
  REATT_CHECK(n_docs >= 0 && n_bias >= 0 && group_size >= 0, "maxsim_fwd_cuda: negative size");
  REATT_CHECK(pos_bias == 0 || n_bias >= 1, "maxsim_fwd_cuda: pos_bias needs n_bias >= 1");
  if (packed) {
    p.Ld = 0;
    p.sdb = 0;
    p.sdj = d_strides[0];
  } else {
    REATT_CHECK(d_sizes[0] == n_docs, "maxsim_fwd_cuda: n_docs must equal d.shape[0]");
    p.Ld = d_sizes[1];
    p.sdb = d_strides[0];
    p.sdj = d_strides[1];
  }
  REATT_CHECK(group_size == 0 || n_docs == p.Bq * group_size, "maxsim_fwd_cuda: grouped layout needs Bq * n documents");
  p.group_size = group_size;
  p.C = group_size ? group_size : n_docs;
  if (p.Bq == 0 || p.Lq == 0 || p.C == 0) return;  // nothing to write
  REATT_CHECK(p.Ld < (int64_t(1) << 31), "maxsim_fwd_cuda: document length must fit in int32 (the argmax dtype)");
  p.q = reinterpret_cast<const void*>(q);
  p.d = reinterpret_cast<const void*>(d);
  p.q_mask = reinterpret_cast<const uint8_t*>(q_mask);
  p.d_mask = reinterpret_cast<const uint8_t*>(d_mask);
  p.offsets = reinterpret_cast<const int64_t*>(d_offsets);
  p.pos_bias = reinterpret_cast<const float*>(pos_bias);
  p.scores = reinterpret_cast<float*>(scores);
  p.argmax = reinterpret_cast<int32_t*>(argmax);
  REATT_CHECK(p.scores != nullptr && p.argmax != nullptr, "maxsim_fwd_cuda: null output pointer");
  p.R = n_bias;
  p.mean = mean ? 1 : 0;
  p.sqb = q_strides[0];
  p.sqi = q_strides[1];
  p.sqmb = q_mask_strides[0];
  p.sqmi = q_mask_strides[1];
  p.sdmb = d_mask ? d_mask_strides[0] : 0;
  p.sdmj = d_mask ? d_mask_strides[1] : 0;

  const int esize = dtype == kFloat32 ? 4 : 2;
  const int VE = 16 / esize;
  p.Dpad = static_cast<int>(cdiv(p.D, 16) * 16);
  p.lds = p.Dpad + (esize == 2 ? 8 : 4);  // +16 B per row: ldmatrix / float4 rows land on distinct banks
  auto al = [&](int64_t x) { return x % VE == 0; };
  p.vec = (p.D % VE == 0) && al(p.sqb) && al(p.sqi) && al(p.sdb) && al(p.sdj) && (q % 16 == 0) && (d % 16 == 0);
  const int KT = (esize == 2 && p.vec && (p.D == 64 || p.D == 128)) ? static_cast<int>(p.D / 16) : 0;

  // Tiling per shape (see the header): rows that can share a document tile decide WR; the rest of the 4 warps stream
  // more documents at once (DS). Shared memory is capped at ~112 KB so that two CTAs fit on an H100 SM, and at the
  // device's opt-in limit: first fewer document slots, then fewer row warps, then the pos_bias cache goes (the table
  // is then read through L1), and a tiling that still does not fit is an error, never a failed launch.
  const int64_t rows_needed = group_size ? p.Lq : p.Bq * p.Lq;
  int WR = rows_needed <= 32 ? 1 : rows_needed <= 64 ? 2 : 4;
  int DS = 4 / WR;
  p.bias_smem = (pos_bias != 0 && n_bias <= MAX_BIAS_SMEM) ? static_cast<int>(n_bias) : 0;
  const size_t cap = static_cast<size_t>(std::min<int64_t>(112 * 1024, smem_optin()));
  while (fwd_smem(esize, p.lds, WR, DS, p.bias_smem) > cap) {
    if (DS > 1)
      DS /= 2;
    else if (WR > 1)
      WR /= 2;
    else if (p.bias_smem > 0)
      p.bias_smem = 0;
    else
      break;
  }
  REATT_CHECK(fwd_smem(esize, p.lds, WR, DS, p.bias_smem) <= cap,
              "maxsim_fwd_cuda: dim " + std::to_string(p.D) + " needs " +
                  std::to_string(fwd_smem(esize, p.lds, WR, DS, p.bias_smem)) +
                  " bytes of shared memory per block, more than this device allows (" + std::to_string(cap) + ")");
  p.WR = WR;
  p.DS = DS;
  const int RB = WARP_M * WR;
  if (group_size || p.Lq > RB) {
    p.QPB = 1;
    p.n_rc = static_cast<int>(cdiv(p.Lq, RB));
  } else {
    p.QPB = static_cast<int>(RB / p.Lq);
    p.n_rc = 1;
  }
  const int64_t n_rb = cdiv(p.Bq, p.QPB);
  REATT_CHECK(n_rb < (int64_t(1) << 31), "maxsim_fwd_cuda: too many queries");
  const int64_t target = 8LL * sm_count();  // ~4 waves of 2 CTAs per SM: balances ragged documents
  int64_t ny = std::min<int64_t>(std::max<int64_t>(1, cdiv(target, n_rb)), cdiv(p.C, DS));
  ny = std::min<int64_t>(ny, 65535);
  p.docs_per_cta = cdiv(p.C, ny);
  ny = cdiv(p.C, p.docs_per_cta);
  const dim3 grid(static_cast<unsigned>(n_rb), static_cast<unsigned>(ny));
  const size_t smem = fwd_smem(esize, p.lds, WR, DS, p.bias_smem);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (dtype == kFloat32) {
    launch_fwd<float, 0>(p, grid, smem, stream);
  } else if (dtype == kFloat16) {
    if (KT == 4) launch_fwd<__half, 4>(p, grid, smem, stream);
    else if (KT == 8) launch_fwd<__half, 8>(p, grid, smem, stream);
    else launch_fwd<__half, 0>(p, grid, smem, stream);
  } else {
    if (KT == 4) launch_fwd<__nv_bfloat16, 4>(p, grid, smem, stream);
    else if (KT == 8) launch_fwd<__nv_bfloat16, 8>(p, grid, smem, stream);
    else launch_fwd<__nv_bfloat16, 0>(p, grid, smem, stream);
  }
}

template <typename T>
void launch_bwd(const BwdParams& p, bool deterministic, cudaStream_t stream) {
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
  if (deterministic) {
    const size_t smem = dd_det_smem(p.jt, p.D);
    auto kernel = maxsim_bwd_dd_det_kernel<T>;
    REATT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    if (n_docs > 0) {
      REATT_LAUNCH(kernel, static_cast<unsigned>(n_docs), 128, smem, stream)(p);
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

// Backward through the saved argmax. grad fp32 [Bq, C] (any strides); argmax int32 [Bq, C, Lq] and nq int32 [Bq]
// contiguous. Outputs (contiguous): dq [Bq, Lq, D] in q's dtype; deterministic: dd like d in d's dtype; otherwise
// dd32 fp32 [ntok, D] zero-filled, accumulated with atomics; dbias fp32 [R]. Workspaces: dq_ws fp32
// [n_split, Bq*Lq, D] (n_split > 1), dbias_ws fp32 [n_part, R] zero-filled (R > 0).
void maxsim_bwd_cuda(uintptr_t grad, std::vector<int64_t> grad_strides, uintptr_t q, uintptr_t d, uintptr_t d_offsets,
                     uintptr_t argmax, uintptr_t nq, uintptr_t dq, uintptr_t dq_ws, uintptr_t dd, uintptr_t dd32,
                     uintptr_t dbias, uintptr_t dbias_ws, int dtype, std::vector<int64_t> q_sizes,
                     std::vector<int64_t> q_strides, std::vector<int64_t> d_sizes, std::vector<int64_t> d_strides,
                     int64_t n_cols, int64_t n_bias, int64_t group_size, bool mean, bool deterministic,
                     int64_t n_split, int64_t n_part, uintptr_t stream_handle) {
  REATT_CHECK(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16,
              std::string("maxsim_bwd_cuda: dtype must be float32, float16 or bfloat16, got ") + dtype_name(dtype));
  REATT_CHECK(q_sizes.size() == 3 && q_strides.size() == 3, "maxsim_bwd_cuda: q must be 3-D [Bq, Lq, D]");
  const bool packed = d_offsets != 0;
  REATT_CHECK(d_sizes.size() == (packed ? 2u : 3u) && d_strides.size() == d_sizes.size(),
              "maxsim_bwd_cuda: d must be [Nd, Ld, D] (padded) or [T, D] (packed with d_offsets)");
  REATT_CHECK(grad_strides.size() == 2, "maxsim_bwd_cuda: grad must be 2-D [Bq, C]");
  BwdParams p{};
  p.Bq = q_sizes[0];
  p.Lq = q_sizes[1];
  p.D = q_sizes[2];
  REATT_CHECK(p.D >= 1 && p.D <= MAX_DIM, "maxsim_bwd_cuda: dim must be in [1, 256], got " + std::to_string(p.D));
  REATT_CHECK(d_sizes.back() == p.D && q_strides[2] == 1 && d_strides.back() == 1,
              "maxsim_bwd_cuda: q and d must share dim, with a contiguous last dim");
  REATT_CHECK(n_split >= 1 && n_split <= 65535, "maxsim_bwd_cuda: n_split must be in [1, 65535]");
  REATT_CHECK(n_bias == 0 || n_part >= 1, "maxsim_bwd_cuda: n_part must be >= 1 with a pos_bias");
  p.C = n_cols;
  p.group_size = group_size;
  p.R = n_bias;
  p.mean = mean ? 1 : 0;
  p.n_split = n_split;
  p.n_part = n_part;
  p.sgb = grad_strides[0];
  p.sgc = grad_strides[1];
  p.sqb = q_strides[0];
  p.sqi = q_strides[1];
  if (packed) {
    p.Ld = 0;
    p.sdb = 0;
    p.sdj = d_strides[0];
  } else {
    p.Ld = d_sizes[1];
    p.sdb = d_strides[0];
    p.sdj = d_strides[1];
    REATT_CHECK(group_size == 0 ? d_sizes[0] == n_cols : d_sizes[0] == p.Bq * group_size,
                "maxsim_bwd_cuda: d.shape[0] does not match the number of columns / groups");
  }
  p.grad = reinterpret_cast<const float*>(grad);
  p.q = reinterpret_cast<const void*>(q);
  p.d = reinterpret_cast<const void*>(d);
  p.offsets = reinterpret_cast<const int64_t*>(d_offsets);
  p.argmax = reinterpret_cast<const int32_t*>(argmax);
  p.nq = reinterpret_cast<const int32_t*>(nq);
  p.dq = reinterpret_cast<void*>(dq);
  p.dq_ws = reinterpret_cast<float*>(dq_ws);
  p.dd = reinterpret_cast<void*>(dd);
  p.dd32 = reinterpret_cast<float*>(dd32);
  p.dbias = reinterpret_cast<float*>(dbias);
  p.dbias_ws = reinterpret_cast<float*>(dbias_ws);
  REATT_CHECK(n_split == 1 || dq_ws != 0, "maxsim_bwd_cuda: n_split > 1 needs dq_ws");
  const int64_t ntok = packed ? d_sizes[0] : d_sizes[0] * d_sizes[1];
  REATT_CHECK(ntok == 0 || (deterministic ? dd != 0 : dd32 != 0),
              "maxsim_bwd_cuda: deterministic mode needs dd, atomic mode needs dd32 (fp32, zero-filled)");
  REATT_CHECK(dq != 0, "maxsim_bwd_cuda: null dq");
  REATT_CHECK(n_bias == 0 || (dbias != 0 && dbias_ws != 0), "maxsim_bwd_cuda: pos_bias gradient needs dbias, dbias_ws");
  // Token tile of the deterministic dd kernel: 64 KB of fp32 accumulators (a whole 200-token document at dim 64,
  // a 128-token one at dim 128), since every tile rescans all of the document's entries; less where the device's
  // opt-in shared memory cannot hold 64 KB next to the entry batch (99 KB parts at dim > 128).
  const int64_t acc_budget = std::min<int64_t>(64 * 1024, smem_optin() - static_cast<int64_t>(dd_det_smem(0, p.D)));
  REATT_CHECK(acc_budget >= 4 * p.D, "maxsim_bwd_cuda: the device's shared memory cannot hold one token row");
  p.jt = std::max<int64_t>(1, acc_budget / (4 * p.D));
  if (p.Bq == 0 || p.Lq == 0 || p.C == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (dtype == kFloat32)
    launch_bwd<float>(p, deterministic, stream);
  else if (dtype == kFloat16)
    launch_bwd<__half>(p, deterministic, stream);
  else
    launch_bwd<__nv_bfloat16>(p, deterministic, stream);
}

const RegisterBindings kRegister([](py::module_& m) {
  m.def("maxsim_fwd_cuda", &maxsim_fwd_cuda, py::call_guard<py::gil_scoped_release>(),
        "MaxSim forward on CUDA (raw pointers; see csrc/maxsim/maxsim_cuda.cu)", py::arg("q"), py::arg("d"),
        py::arg("q_mask"), py::arg("d_mask"), py::arg("d_offsets"), py::arg("pos_bias"), py::arg("scores"),
        py::arg("argmax"), py::arg("dtype"), py::arg("q_sizes"), py::arg("q_strides"), py::arg("d_sizes"),
        py::arg("d_strides"), py::arg("q_mask_strides"), py::arg("d_mask_strides"), py::arg("n_docs"),
        py::arg("n_bias"), py::arg("group_size"), py::arg("mean"), py::arg("stream"));
  m.def("maxsim_bwd_cuda", &maxsim_bwd_cuda, py::call_guard<py::gil_scoped_release>(),
        "MaxSim backward on CUDA through the saved argmax (raw pointers)", py::arg("grad"), py::arg("grad_strides"),
        py::arg("q"), py::arg("d"), py::arg("d_offsets"), py::arg("argmax"), py::arg("nq"), py::arg("dq"),
        py::arg("dq_ws"), py::arg("dd"), py::arg("dd32"), py::arg("dbias"), py::arg("dbias_ws"), py::arg("dtype"),
        py::arg("q_sizes"), py::arg("q_strides"), py::arg("d_sizes"), py::arg("d_strides"), py::arg("n_cols"),
        py::arg("n_bias"), py::arg("group_size"), py::arg("mean"), py::arg("deterministic"), py::arg("n_split"),
        py::arg("n_part"), py::arg("stream"));
});

}  // namespace
}  // namespace reatt
