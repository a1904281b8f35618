// MaxSim on CUDA: forward (tensor-core mma.sync for fp16/bf16, FFMA for fp32) and backward (argmax gather for dq,
// atomic or deterministic scatter for dd, a deterministic per-distance histogram for dpos_bias).
//
// Semantics: reatt_kernels/reference/maxsim.py (THE spec). For query a, document b:
//     score(a, b) = sum_{i valid} max_{j valid} ( q[a,i] . d[b,j] + pos_bias[clamp(n_a + j - i, 0, R-1)] )
// divided by n_a for mean; an empty document scores -inf, a query with no valid token scores 0, ties go to the lowest
// j, argmax is -1 for a masked query token or an empty document.
//
// Files: this header (constants, kernel parameters, launch plans), maxsim_fwd.cu (forward kernel), maxsim_bwd.cu
// (backward kernels), maxsim_launch.cu (validation, the plans, the host entry points), maxsim_cuda_bindings.cu (pybind).
// No libtorch: the bindings take a MaxsimArgs (maxsim_args.h: raw pointers, sizes, strides in elements, a dtype code and
// the cudaStream_t). Every CUDA call and every launch is checked; a failure throws std::runtime_error with CUDA's message.
//
// ---- forward design (numbers for an H100: 3.0 TB/s HBM, ~700 TFLOP/s bf16 dense, 132 SMs, 228 KB smem/SM) ----------
// A CTA owns a *row block* (whole queries: QPB queries x Lq tokens, at most RB = 32*WR rows) and a contiguous range of
// document columns. Its WR x DS warps form DS *slots*: each slot streams its own documents (columns c0+s, c0+s+DS, ...)
// through shared memory in chunks of BN = 32 tokens (cp.async, double buffered), and its WR warps each hold 32 query
// rows (two m16 tiles; the A fragments stay in registers for dim 64/128) against the whole chunk. Each warp keeps a
// running (max, argmax) per row in registers, so the token-pair scores never leave registers, let alone reach HBM.
//
// The tiling is picked per shape (plan_fwd in maxsim_launch.cu):
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
// Masked query tokens cost nothing: a CTA packs the VALID (query, token) rows of its queries, in order, into the first
// rows of its row block (sRowX / sRowI keep each packed row's query and original token, for the bias distance
// n_a + j - i and for where argmax goes), so only ceil(valid rows / 32) warps compute (a warp, or the second m16 tile
// of a warp, past the last valid row skips its mma and folds), only ceil(valid rows / RB) row chunks are streamed
// (a 200-token query with 100 valid tokens: one chunk, not two), and a CTA whose queries have no valid token writes
// its 0 scores and -1 argmax without reading a document. Masked rows get argmax -1 from a plain store loop. The grid
// and the tiling still come from the padded shape (the plan never reads the mask, so it needs no device sync).
//
// ---- backward --------------------------------------------------------------------------------------------------------
//   dq[a,i]      = sum_c w[a,c] d[doc(a,c), argmax[a,c,i]]            warp per row, gather; split over c, fixed order
//   dd[b,j]     += w[a,c] q[a,i]  for every (a,i) whose argmax is j    fp32 atomics, or per-document CTAs that walk
//                                                                     the (a,i) entries in a fixed order (bitwise
//                                                                     reproducible)
//   dbias[r]    += w[a,c]         r = clamp(n_a + j - i, 0, R-1)       per-warp histograms, then a fixed-order sum
// with w[a,c] = grad[a,c] (/ n_a for mean). Bytes: dq reads Bq*C*Lq*dim*esize of d (the winners), dd reads as much of q.
// Masked query rows: the dq warp of a masked row writes its zero row and exits before reading any of its C argmax
// entries; the dd and dbias kernels treat a masked row's entries as -1 (no winner) whatever the argmax holds.
#pragma once
#include <cstddef>
#include <cstdint>

#include "cuda_common.cuh"
#include "maxsim/maxsim_args.h"

namespace reatt {
namespace maxsim_cuda {

constexpr int BN = 32;        // document tokens per slot per pipeline stage (4 n8 tiles)
constexpr int WARP_M = 32;    // query rows per warp (2 m16 tiles)
constexpr int MAX_DIM = 256;  // generic path: dim up to 256 (padded to a multiple of 16 in smem)
constexpr int MAX_BIAS_SMEM = 4096;  // pos_bias floats kept in smem (16 KB); a longer table is read through L1
constexpr int DET_BATCH = 64;        // (query, token) entries staged per step of the ordered dd kernel
// dd without ``deterministic``: fp32 atomics need a zeroed fp32 copy of d (4 bytes per element: +328 MB on the
// 64 x 6400 training shape, which alone would use most of its +0.5 GiB budget) plus a cast pass; the ordered kernel
// writes dd directly and walks every (query, token) entry of a document once per 64 KB token tile. Up to this many
// entries per document (all-pairs training: 64 x 32 = 2048; grouped: Lq) the ordered kernel is predicted to cost about
// what the atomics do (~1 ms each on that shape, H100, unmeasured), so atomics are used only above it.
constexpr int64_t ATOMIC_MIN_ENTRIES = 4096;

// ---- kernel parameters (passed by value to every kernel) -----------------------------------------------------------
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


struct BwdParams {
  const float* grad;        // [Bq, C], strides (sgb, sgc)
  const void* q;            // [Bq, Lq, D], strides (sqb, sqi, 1)
  const void* d;            // padded [Nd, Ld, D] (sdb, sdj, 1) or packed [T, D] (sdj, 1)
  const int64_t* offsets;   // packed only
  const int32_t* argmax;    // [Bq, C, Lq] contiguous
  const uint8_t* q_mask;    // bool [Bq, Lq], strides (sqmb, sqmi): a masked row's argmax entries are never read
  const int32_t* nq;        // [Bq] valid query tokens
  void* dq;                 // [Bq, Lq, D] contiguous, q's dtype
  float* dq_ws;             // [n_split, Bq*Lq, D] fp32 when n_split > 1
  void* dd;                 // deterministic: d's shape, contiguous, d's dtype
  float* dd32;              // atomic: fp32 [ntok, D] zero-filled
  float* dbias;             // [R]
  float* dbias_ws;          // [n_part, R] zero-filled
  int64_t Bq, Lq, D, C, Ld, R, group_size;
  int64_t sgb, sgc, sqb, sqi, sdb, sdj, sqmb, sqmi;
  int64_t n_split, n_part, jt;
  int mean;
};

// ---- launch plans ----------------------------------------------------------------------------------------------------
// Every tiling, split and workspace size is decided here, in C++, from the arguments and the device's limits; the
// launchers in reatt_kernels/cuda/maxsim.py allocate what the plan asks for (maxsim_plan_cuda gives it to them and to
// the tests), and the entry points recompute the same plan, so the two can never disagree.
struct FwdPlan {
  int WR, DS;          // warps per row block (32 rows each) x document slots; 32 * WR * DS threads
  int QPB, n_rc;       // queries per row block; row chunks per query (Lq > 32 * WR)
  int KT;              // > 0: dim == 16 * KT with the A fragments in registers (fp16/bf16, dim 64/128)
  int vec;             // 16-byte cp.async copies are legal (aligned rows, dim a multiple of 16 bytes)
  int Dpad, lds;       // dim padded to 16; smem row stride in elements
  int bias_smem;       // pos_bias entries cached in smem (0: read through L1)
  int64_t docs_per_cta;
  unsigned grid_x, grid_y;
  size_t smem;         // dynamic shared memory per block, bytes
};

struct BwdPlan {
  int64_t n_split;     // column splits of the dq gather (> 1: fp32 workspace dq_ws [n_split, Bq*Lq, D] + a reduction)
  int64_t n_part;      // dbias partitions (rows of dbias_ws [n_part, R]); 0 without pos_bias
  bool ordered_dd;     // dd by the per-document kernel in a fixed order (else fp32 atomics into dd32)
  int64_t jt;          // token tile of the ordered dd kernel
  size_t dd_smem;      // its dynamic shared memory, bytes
};

// Shared memory of the forward kernel for a tiling (the carve-up is at the top of maxsim_fwd_kernel).
inline size_t fwd_smem(int esize, int lds, int WR, int DS, int bias_floats) {
  const size_t rows = static_cast<size_t>(WARP_M) * WR;
  size_t bytes = static_cast<size_t>(esize) * lds * (rows + 2 * BN * DS);
  bytes += ((2 * BN * DS + 15) / 16) * 16;  // masks
  bytes += 4 * DS * rows;                   // row maxima
  bytes += 4 * (4 * rows + 1);              // n_a and first packed row per query (QPB <= rows); query, token per row
  bytes += 4 * static_cast<size_t>(bias_floats);
  return bytes;
}

// Shared memory of the ordered dd kernel: the entry batch (q row offset, token, weight; fp32 q rows) + a [jt][D] tile.
inline size_t dd_det_smem(int64_t jt, int64_t D) {
  return static_cast<size_t>(DET_BATCH) * (8 + 4 + 4) + static_cast<size_t>(DET_BATCH + jt) * D * 4;
}

// Argument checks (a bad argument throws std::invalid_argument naming it) and the plans, in maxsim_launch.cu.
void check_fwd(const MaxsimArgs& a);
void check_bwd(const MaxsimArgs& a);
FwdPlan plan_fwd(const MaxsimArgs& a, const DeviceLimits& lim);  // maxsim_launch.cu
BwdPlan plan_bwd(const MaxsimArgs& a, const DeviceLimits& lim);  // maxsim_launch.cu
void launch_fwd(const FwdParams& p, const FwdPlan& plan, int dtype, cudaStream_t stream);  // maxsim_fwd.cu
void launch_bwd(const BwdParams& p, const BwdPlan& plan, int dtype, cudaStream_t stream);  // maxsim_bwd.cu

}  // namespace maxsim_cuda

// The host entry points (maxsim_launch.cu), bound by maxsim_cuda_bindings.cu.
void maxsim_fwd_cuda(const MaxsimArgs& a);
void maxsim_bwd_cuda(const MaxsimArgs& a);

}  // namespace reatt
