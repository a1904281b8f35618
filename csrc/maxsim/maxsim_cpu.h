// MaxSim CPU backend: the argument blocks shared by the per-ISA kernels (maxsim_cpu_isa.h) and the driver
// (maxsim_cpu.cpp). Plain structs of raw pointers, sizes and strides (in elements); no libtorch.
#pragma once
#include <cstdint>

namespace reatt {
namespace maxsim_cpu {

// Forward problem, canonical layout of reatt_kernels/reference/maxsim.py.
struct FwdArgs {
  // q [Bq, Lq, D] in dtype; q_mask bool [Bq, Lq] contiguous (1 = real token).
  const void* q;
  int64_t Bq, Lq, D;
  int64_t sq_b, sq_l, sq_d;
  const uint8_t* q_mask;
  // d: padded [Nd, Ld, D] (sd_b, sd_l, sd_d) with optional d_mask bool [Nd, Ld] contiguous, or packed [T, D]
  // (sd_l, sd_d; sd_b unused) with offsets int64 [Nd + 1].
  const void* d;
  int64_t Nd, Ld;
  int64_t sd_b, sd_l, sd_d;
  const uint8_t* d_mask;
  const int64_t* offsets;
  int dtype;  // DType code shared by q and d
  // pos_bias fp32 [R] contiguous, or nullptr.
  const float* bias;
  int64_t R;
  int64_t group_size;  // 0: all pairs; n: grouped (doc b -> query b / n, column b % n)
  bool mean;
  float* scores;       // [Bq, C] contiguous
  int32_t* argmax;     // [Bq, C, Lq] contiguous

  // Derived by the driver before the kernels run.
  int64_t C;      // output columns
  int64_t Lmax;   // longest document (>= 1 so the bias table is never empty)
  int64_t Lseg;   // document tokens per segment: bounds the per-thread scratch whatever the document length
  int64_t Lqp;    // Lq rounded up to the ISA's vector width
  int64_t Dp;     // D rounded up to even (bf16 pairs); == D otherwise
  bool bf16dp;    // use the AVX512_BF16 dot-product path (bf16 inputs only)
  bool filt;      // fp32 / fp16 inputs: bf16 filter pass + exact fp32 rescoring (AVX512_BF16 CPUs)
  int64_t Dq;     // filter: bf16 document row stride (D rounded up to 32)
  float filt_c;   // filter: |s - s~| bound per unit |q_i| * max_j |d_j|, both ends (see fwd_doc_filtered)
  // Query lanes are PACKED (fwd_pack_query): lane p < n_valid[a] holds query a's p-th valid token, qidx[a][p].
  float* q32;     // filter: packed query rows in fp32 [Bq][Lq][D] (row p: lane p)
  float* qnorm;   // filter: |q_p| [Bq][Lqp] (rounded up; 0 for padding lanes)
  float* qT32;    // filter: fp32 q^T [Bq][D][Lqp] for the plain tile, the fallback of a segment with too many
                  // candidates (near-ties everywhere)
  void* qpack;    // per query: fp32 q^T [D][Lqp], or bf16 pairs [Dp/2][Lqp] (uint32 each)
  int64_t qpack_stride;  // elements (float or uint32) per query
  int32_t* n_valid;      // [Bq] valid query tokens
  int32_t* qidx;         // [Bq][Lqp] original token index of each packed lane (past n_valid: last + 1, + 2, ...)
  // A prepared corpus (rk.prepare_corpus; packed layout): bf16 screen rows [T][Dq] and per-document bounds of
  // max_j |d_j| [Nd], used by the fp32 filter instead of converting every document on every call; or nullptr.
  const uint16_t* d16;
  const float* dnorm;
  float* bias_tab;       // per query [bias_stride]: bias_tab[i - j + Lmax - 1] = pos_bias[clamp(n_a + j - i)]
                         // (i: the original token index; < Lq + Lqp for padding lanes)
  int64_t bias_stride;
};

// Backward problem: grads through the saved argmax.
struct BwdArgs {
  const float* grad;  // [Bq, C] contiguous fp32
  const void* q;
  int64_t Bq, Lq, D;
  int64_t sq_b, sq_l, sq_d;
  const uint8_t* q_mask;
  const void* d;
  int64_t Nd, Ld;
  int64_t sd_b, sd_l, sd_d;
  const int64_t* offsets;
  int dtype;
  const int32_t* argmax;  // [Bq, C, Lq] contiguous
  int64_t R;              // n_bias (0: no dbias)
  int64_t group_size;
  bool mean;
  void* dq;               // [Bq, Lq, D] contiguous, dtype
  void* dd;               // d.shape contiguous, dtype
  float* dbias;           // [R]
  int64_t C;
  int64_t n_tokens;       // rows of dd: Nd * Ld (padded) or T (packed)
  int64_t Lseg;           // dd rows staged per segment (bounds the per-thread scratch)
};

}  // namespace maxsim_cpu
}  // namespace reatt
