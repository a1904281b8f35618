// MaxSim forward on CUDA: the kernel (design and byte/FLOP counts: maxsim_cuda.cuh) and its dtype/tiling dispatch.
// The tiling itself is planned in maxsim_launch.cu (plan_fwd).
#include <cstdint>
#include <type_traits>

#include "maxsim/maxsim_cuda.cuh"

namespace reatt {
namespace maxsim_cuda {
namespace {

// ---- PTX helpers: one #ifdef per helper set, the emulated twins first --------------------------------------------------
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
// nmt (1 or 2, warp-uniform): m16 tiles holding a valid row; the second one's mma is skipped past the last valid row.
template <typename T, int KT>
__device__ __forceinline__ void score_tile(const FwdParams& p, const T* sQw, const T* tile, int np, int lane, int nmt,
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
              if (mt >= nmt) continue;
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
        if (mt >= nmt) continue;
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
  int* sStart = sNa + RB;                              // [QPB + 1] first packed row of each query (block-relative)
  int* sRowX = sStart + RB + 1;                        // [RB] packed row of this chunk -> query (a - a0)
  int* sRowI = sRowX + RB;                             // [RB] packed row of this chunk -> original token index
  float* sBias = reinterpret_cast<float*>(sRowI + RB);  // [bias_smem] pos_bias: one LDS per score element

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

  const int nqb = static_cast<int>(a1 - a0);
  for (int x = tid; x < nqb; x += blockDim.x) {
    int n = 0;
    for (int64_t i = 0; i < Lq; ++i) n += p.q_mask[(a0 + x) * p.sqmb + i * p.sqmi] != 0;
    sNa[x] = n;
  }
  __syncthreads();
  if (tid == 0) {  // QPB <= 128 queries: a serial prefix sum, once per CTA
    int s = 0;
    for (int x = 0; x < nqb; ++x) {
      sStart[x] = s;
      s += sNa[x];
    }
    sStart[nqb] = s;
  }
  __syncthreads();
  const int n_rows = sStart[nqb];  // valid (query, token) rows of the block
  if (n_rows == 0) {
    // No valid token in any query of the block: every score is a sum over no terms (0), every argmax -1. No document
    // is read.
    for (int64_t u = tid; u < (col_end - col_begin) * nqb; u += blockDim.x) {
      const int64_t c = col_begin + u / nqb, a = a0 + u % nqb;
      p.scores[a * C + c] = 0.f;
      for (int64_t i = 0; i < Lq; ++i) p.argmax[(a * C + c) * Lq + i] = -1;
    }
    return;
  }
  const int n_rc = (n_rows + RB - 1) / RB;  // row chunks holding valid rows (<= p.n_rc)
  for (int x = tid; x < p.bias_smem; x += blockDim.x) sBias[x] = p.pos_bias[x];
  // The k padding [D, Dpad) of the two stage buffers is never written by the loads: zero it once.
  if (p.Dpad != p.D) {
    const int pad = p.Dpad - static_cast<int>(p.D);
    for (int u = tid; u < 2 * DS * BN * pad; u += blockDim.x) {
      const int row = u / pad, k = static_cast<int>(p.D) + u % pad;
      sD[row * lds + k] = from_f<T>(0.f);
    }
  }

  for (int rc = 0; rc < n_rc; ++rc) {
    const int R0 = rc * RB;  // first packed row of this chunk
    const int rows_blk = min(RB, n_rows - R0);
    __syncthreads();  // the previous row chunk is done with sQ, sRow, sRowX / sRowI and the stage buffers
    // Packed rows [R0, R0 + rows_blk) -> (query, original token): thread x walks query x's mask in token order, its
    // k-th valid token being packed row sStart[x] + k. O(Lq) per query, once per chunk.
    for (int x = tid; x < nqb; x += blockDim.x) {
      int k = sStart[x];
      for (int64_t i = 0; i < Lq && k < R0 + rows_blk; ++i) {
        if (p.q_mask[(a0 + x) * p.sqmb + i * p.sqmi] == 0) continue;
        if (k >= R0) {
          sRowX[k - R0] = x;
          sRowI[k - R0] = static_cast<int>(i);
        }
        ++k;
      }
    }
    __syncthreads();
    // Query rows -> sQ (zero rows past the valid ones and the k padding, so the mma sees zeros there).
    for (int u = tid; u < RB * p.Dpad; u += blockDim.x) {
      const int r = u / p.Dpad, k = u - r * p.Dpad;
      float v = 0.f;
      if (r < rows_blk && k < p.D) {
        const int64_t a = a0 + sRowX[r], i = sRowI[r];
        v = to_f<T>(q[a * p.sqb + i * p.sqi + k]);
      }
      sQ[r * lds + k] = from_f<T>(v);
    }
    __syncthreads();

    // This thread's rows (mt, h): r = wr*32 + mt*16 + h*8 + g; validity (every packed row below rows_blk is a valid
    // token) and the bias offset n_a - i with the token's ORIGINAL index i.
    bool rvalid[2][2];
    int bbase[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wr * WARP_M + mt * 16 + h * 8 + g;
        rvalid[mt][h] = r < rows_blk;
        bbase[mt][h] = rvalid[mt][h] ? sNa[sRowX[r]] - sRowI[r] : 0;
      }
    // m16 tiles of this warp that hold a valid row (warp-uniform): 0 -> the warp only loads and synchronises.
    const int nmt = min(2, max(0, (rows_blk - wr * WARP_M + 15) / 16));
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
      if (cp_active && nmt > 0) {
        const T* tile = tile_of(buf);
        const uint8_t* tmask = mask_of(buf);
        const int j0 = cp.chunk * BN;
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          float acc[2][2][4];
          score_tile<T, KT>(p, sQw, tile, np, lane, nmt, areg, acc);
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
              if (t == 0 && rvalid[mt][h]) {
                const int64_t a = a0 + sRowX[r], i = sRowI[r];
                p.argmax[(a * C + cp.col) * Lq + i] = arg[mt][h];
                sRow[slot * RB + r] = best[mt][h];
              }
              best[mt][h] = -INFINITY;
              arg[mt][h] = -1;
            }
        }
      }
      __syncthreads();  // sRow is complete; buffer `buf` may be refilled by the next iteration
      if (doc_end && lt < nqb && (n_rc == 1 || lt == 0)) {
        // Sum the row maxima of query a = a0 + lt (its packed rows, in token order: a fixed order, reproducible; the
        // masked rows the unpacked kernel added as 0 change nothing).
        const int64_t a = a0 + lt;
        const int rb = max(0, sStart[lt] - R0);
        const int re = min(rows_blk, sStart[lt + 1] - R0);
        float s = 0.f;
        for (int r = rb; r < re; ++r) s += sRow[slot * RB + r];
        float* out = p.scores + a * C + cp.col;
        if (rc > 0) s = *out + s;
        if (rc == n_rc - 1 && p.mean) s = s / static_cast<float>(max(1, sNa[lt]));
        *out = s;
      }
      if (doc_end && rc == 0) {
        // The masked tokens of the block's queries: argmax -1 (never computed, so never written above).
        for (int64_t u = lt; u < nqb * Lq; u += slot_threads) {
          const int64_t a = a0 + u / Lq, i = u % Lq;
          if (p.q_mask[a * p.sqmb + i * p.sqmi] == 0) p.argmax[(a * C + cp.col) * Lq + i] = -1;
        }
      }
      slot_advance(p, cp, col_end, doc_base, DS);
      cp_active = cp.col < col_end;
      buf ^= 1;
      any = __syncthreads_or(cp_active);
    }
    cp_async_wait_0();
  }
}

template <typename T, int KT>
void launch_fwd_t(const FwdParams& p, const FwdPlan& plan, cudaStream_t stream) {
  auto kernel = maxsim_fwd_kernel<T, KT>;
  set_dynamic_smem(kernel, plan.smem, "maxsim_fwd_kernel");
  REATT_LAUNCH(kernel, dim3(plan.grid_x, plan.grid_y), 32 * p.WR * p.DS, plan.smem, stream)(p);
  REATT_LAUNCH_CHECK("maxsim_fwd_kernel");
}

}  // namespace

void launch_fwd(const FwdParams& p, const FwdPlan& plan, int dtype, cudaStream_t stream) {
  const int KT = plan.KT;
  if (dtype == kFloat32) {
    launch_fwd_t<float, 0>(p, plan, stream);
  } else if (dtype == kFloat16) {
    if (KT == 4) launch_fwd_t<__half, 4>(p, plan, stream);
    else if (KT == 8) launch_fwd_t<__half, 8>(p, plan, stream);
    else launch_fwd_t<__half, 0>(p, plan, stream);
  } else {
    if (KT == 4) launch_fwd_t<__nv_bfloat16, 4>(p, plan, stream);
    else if (KT == 8) launch_fwd_t<__nv_bfloat16, 8>(p, plan, stream);
    else launch_fwd_t<__nv_bfloat16, 0>(p, plan, stream);
  }
}

}  // namespace maxsim_cuda
}  // namespace reatt
