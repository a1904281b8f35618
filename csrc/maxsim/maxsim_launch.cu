// MaxSim on CUDA, host side: argument checks, the launch plans (every tiling, split and workspace size), and the entry
// points maxsim_fwd_cuda / maxsim_bwd_cuda that fill the kernel parameters and launch. The plans are pure functions of
// (MaxsimArgs, DeviceLimits): the Python launcher asks for the same plan (maxsim_plan_cuda) to size its workspaces, and
// the tests ask for it on emulated devices of every size.
#include <algorithm>
#include <cstdint>
#include <string>

#include "maxsim/maxsim_cuda.cuh"

namespace reatt {
namespace maxsim_cuda {

namespace {

void check_common(const MaxsimArgs& a, const char* fn) {
  const std::string f(fn);
  REATT_CHECK(a.dtype == kFloat32 || a.dtype == kFloat16 || a.dtype == kBFloat16,
              f + ": dtype must be float32, float16 or bfloat16, got " + dtype_name(a.dtype));
  REATT_CHECK(a.Bq >= 0 && a.Lq >= 0 && a.Nd >= 0 && a.Ld >= 0 && a.T >= 0 && a.R >= 0 && a.group_size >= 0,
              f + ": negative size");
  REATT_CHECK(a.D >= 1 && a.D <= MAX_DIM, f + ": dim must be in [1, 256], got " + std::to_string(a.D));
  REATT_CHECK(a.sq_d == 1 && a.sd_d == 1, f + ": the last dim of q and d must be contiguous");
  REATT_CHECK(!a.packed() || a.group_size == 0, f + ": the grouped layout is padded");
  REATT_CHECK(a.group_size == 0 || a.Nd == a.Bq * a.group_size, f + ": grouped layout needs Bq * n documents");
  REATT_CHECK(a.Ld < (int64_t(1) << 31), f + ": document length must fit in int32 (the argmax dtype)");
}

int64_t n_tokens(const MaxsimArgs& a) { return a.packed() ? a.T : a.Nd * a.Ld; }

}  // namespace

void check_fwd(const MaxsimArgs& a) {
  check_common(a, "maxsim_fwd_cuda");
  REATT_CHECK(a.q_mask != 0, "maxsim_fwd_cuda: q_mask (bool [Bq, Lq]) is required");
  REATT_CHECK(!a.packed() || a.d_mask == 0, "maxsim_fwd_cuda: d_mask is for the padded layout only");
  REATT_CHECK(a.pos_bias == 0 || a.R >= 1, "maxsim_fwd_cuda: pos_bias needs n_bias >= 1");
}

void check_bwd(const MaxsimArgs& a) { check_common(a, "maxsim_bwd_cuda"); }

// Forward tiling per shape (the reasoning is in maxsim_cuda.cuh): rows that can share a document tile decide WR; the
// rest of the 4 warps stream more documents at once (DS). Shared memory is capped at ~112 KB so that two CTAs fit on
// an H100 SM, and at the device's opt-in limit: first fewer document slots, then fewer row warps, then the pos_bias
// cache goes (the table is then read through L1), and a tiling that still does not fit is an error, never a failed
// launch.
FwdPlan plan_fwd(const MaxsimArgs& a, const DeviceLimits& lim) {
  FwdPlan pl{};
  const int esize = a.dtype == kFloat32 ? 4 : 2;
  const int VE = 16 / esize;
  pl.Dpad = static_cast<int>(cdiv(a.D, 16) * 16);
  pl.lds = pl.Dpad + (esize == 2 ? 8 : 4);  // +16 B per row: ldmatrix / float4 rows land on distinct banks
  const int64_t sdb = a.packed() ? 0 : a.sd_b;
  auto al = [&](int64_t x) { return x % VE == 0; };
  pl.vec = (a.D % VE == 0) && al(a.sq_b) && al(a.sq_l) && al(sdb) && al(a.sd_l) && (a.q % 16 == 0) &&
           (a.d % 16 == 0);
  pl.KT = (esize == 2 && pl.vec && (a.D == 64 || a.D == 128)) ? static_cast<int>(a.D / 16) : 0;

  const int64_t rows_needed = a.group_size ? a.Lq : a.Bq * a.Lq;
  int WR = rows_needed <= 32 ? 1 : rows_needed <= 64 ? 2 : 4;
  int DS = 4 / WR;
  pl.bias_smem = (a.pos_bias != 0 && a.R <= MAX_BIAS_SMEM) ? static_cast<int>(a.R) : 0;
  const size_t cap = static_cast<size_t>(std::min<int64_t>(112 * 1024, lim.smem_optin));
  while (fwd_smem(esize, pl.lds, WR, DS, pl.bias_smem) > cap) {
    if (DS > 1)
      DS /= 2;
    else if (WR > 1)
      WR /= 2;
    else if (pl.bias_smem > 0)
      pl.bias_smem = 0;
    else
      break;
  }
  pl.smem = fwd_smem(esize, pl.lds, WR, DS, pl.bias_smem);
  REATT_CHECK(pl.smem <= cap, "maxsim_fwd_cuda: dim " + std::to_string(a.D) + " needs " + std::to_string(pl.smem) +
                                  " bytes of shared memory per block, more than this device allows (" +
                                  std::to_string(cap) + ")");
  pl.WR = WR;
  pl.DS = DS;
  const int64_t C = a.n_cols();
  if (a.Bq == 0 || a.Lq == 0 || C == 0) return pl;  // nothing to launch: grid 0 x 0
  const int RB = WARP_M * WR;
  if (a.group_size || a.Lq > RB) {
    pl.QPB = 1;
    pl.n_rc = static_cast<int>(cdiv(a.Lq, RB));
  } else {
    pl.QPB = static_cast<int>(RB / a.Lq);
    pl.n_rc = 1;
  }
  const int64_t n_rb = cdiv(a.Bq, pl.QPB);
  REATT_CHECK(n_rb < (int64_t(1) << 31), "maxsim_fwd_cuda: too many queries");
  const int64_t target = 8LL * lim.sm_count;  // ~4 waves of 2 CTAs per SM: balances ragged documents
  int64_t ny = std::min<int64_t>(std::max<int64_t>(1, cdiv(target, n_rb)), cdiv(C, DS));
  ny = std::min<int64_t>(ny, 65535);
  pl.docs_per_cta = cdiv(C, ny);
  ny = cdiv(C, pl.docs_per_cta);
  pl.grid_x = static_cast<unsigned>(n_rb);
  pl.grid_y = static_cast<unsigned>(ny);
  return pl;
}

// Backward plan. dq: the gather is latency-bound (one winning row per column), so with few query rows the columns are
// split to reach ~8k warps (62 per SM on an H100); one split (no workspace, no second pass) when rows alone fill the
// GPU. dbias: one partition per 2048 argmax entries, at most 2048 (each is a private row of dbias_ws, summed in order).
// dd: ordered unless the caller allows atomics and a document has more than ATOMIC_MIN_ENTRIES entries. The ordered
// kernel's token tile holds 64 KB of fp32 accumulators (a whole 200-token document at dim 64, a 128-token one at dim
// 128), since every tile rescans all of the document's entries; less where the device's opt-in shared memory cannot
// hold 64 KB next to the entry batch (99 KB parts at dim > 128).
BwdPlan plan_bwd(const MaxsimArgs& a, const DeviceLimits& lim) {
  BwdPlan pl{};
  const int64_t C = a.n_cols(), rows = a.Bq * a.Lq;
  pl.n_split = std::max<int64_t>(1, std::min<int64_t>({cdiv(C, 128), 8192 / std::max<int64_t>(1, rows), 65535}));
  const int64_t E = a.Bq * C * a.Lq;
  pl.n_part = a.R > 0 ? std::max<int64_t>(1, std::min<int64_t>(cdiv(E, 2048), 2048)) : 0;
  const int64_t entries_per_doc = a.group_size ? a.Lq : a.Bq * a.Lq;
  const int64_t atomic_min = a.atomic_min_entries >= 0 ? a.atomic_min_entries : ATOMIC_MIN_ENTRIES;
  pl.ordered_dd = a.deterministic || entries_per_doc <= atomic_min;
  const int64_t acc_budget = std::min<int64_t>(64 * 1024, lim.smem_optin - static_cast<int64_t>(dd_det_smem(0, a.D)));
  REATT_CHECK(acc_budget >= 4 * a.D, "maxsim_bwd_cuda: the device's shared memory cannot hold one token row");
  pl.jt = std::max<int64_t>(1, acc_budget / (4 * a.D));
  pl.dd_smem = dd_det_smem(pl.jt, a.D);
  return pl;
}

}  // namespace maxsim_cuda

using namespace maxsim_cuda;

// Forward. Outputs: scores fp32 [Bq, C] and argmax int32 [Bq, C, Lq], both contiguous, every element written.
// 64-bit offsets throughout: d may hold more than 2^31 elements.
void maxsim_fwd_cuda(const MaxsimArgs& a) {
  check_fwd(a);
  if (a.Bq == 0 || a.Lq == 0 || a.n_cols() == 0) return;  // nothing to write
  REATT_CHECK(a.scores != 0 && a.argmax != 0, "maxsim_fwd_cuda: null output pointer");
  const FwdPlan pl = plan_fwd(a, current_device_limits());
  FwdParams p{};
  p.q = reinterpret_cast<const void*>(a.q);
  p.d = reinterpret_cast<const void*>(a.d);
  p.q_mask = reinterpret_cast<const uint8_t*>(a.q_mask);
  p.d_mask = reinterpret_cast<const uint8_t*>(a.d_mask);
  p.offsets = reinterpret_cast<const int64_t*>(a.d_offsets);
  p.pos_bias = reinterpret_cast<const float*>(a.pos_bias);
  p.scores = reinterpret_cast<float*>(a.scores);
  p.argmax = reinterpret_cast<int32_t*>(a.argmax);
  p.Bq = a.Bq;
  p.Lq = a.Lq;
  p.D = a.D;
  p.Ld = a.packed() ? 0 : a.Ld;
  p.R = a.R;
  p.group_size = a.group_size;
  p.C = a.n_cols();
  p.sqb = a.sq_b;
  p.sqi = a.sq_l;
  p.sdb = a.packed() ? 0 : a.sd_b;
  p.sdj = a.sd_l;
  p.sqmb = a.sqm_b;
  p.sqmi = a.sqm_l;
  p.sdmb = a.d_mask ? a.sdm_b : 0;
  p.sdmj = a.d_mask ? a.sdm_l : 0;
  p.mean = a.mean ? 1 : 0;
  p.docs_per_cta = pl.docs_per_cta;
  p.vec = pl.vec;
  p.WR = pl.WR;
  p.DS = pl.DS;
  p.QPB = pl.QPB;
  p.n_rc = pl.n_rc;
  p.Dpad = pl.Dpad;
  p.lds = pl.lds;
  p.bias_smem = pl.bias_smem;
  launch_fwd(p, pl, a.dtype, as_stream(a.stream));
}

// Backward through the saved argmax. grad fp32 [Bq, C] (any strides); argmax int32 [Bq, C, Lq] and nq int32 [Bq]
// contiguous. Outputs (contiguous): dq [Bq, Lq, D] in q's dtype; ordered dd (plan): dd like d in d's dtype; otherwise
// dd32 fp32 [ntok, D] zero-filled, accumulated with atomics; dbias fp32 [R]. Workspaces as the plan says: dq_ws fp32
// [n_split, Bq*Lq, D] (n_split > 1), dbias_ws fp32 [n_part, R] zero-filled (R > 0).
void maxsim_bwd_cuda(const MaxsimArgs& a) {
  check_bwd(a);
  const BwdPlan pl = plan_bwd(a, current_device_limits());
  REATT_CHECK(pl.n_split == 1 || a.dq_ws != 0, "maxsim_bwd_cuda: the plan splits dq: dq_ws is required");
  REATT_CHECK(n_tokens(a) == 0 || (pl.ordered_dd ? a.dd != 0 : a.dd32 != 0),
              "maxsim_bwd_cuda: the ordered dd needs dd, the atomic dd needs dd32 (fp32, zero-filled)");
  REATT_CHECK(a.dq != 0, "maxsim_bwd_cuda: null dq");
  REATT_CHECK(a.R == 0 || (a.dbias != 0 && a.dbias_ws != 0), "maxsim_bwd_cuda: pos_bias gradient needs dbias, dbias_ws");
  if (a.Bq == 0 || a.Lq == 0 || a.n_cols() == 0) return;
  REATT_CHECK(a.grad != 0 && a.argmax != 0 && a.nq != 0 && a.q_mask != 0,
              "maxsim_bwd_cuda: grad, argmax, q_mask and nq are required");
  BwdParams p{};
  p.grad = reinterpret_cast<const float*>(a.grad);
  p.q = reinterpret_cast<const void*>(a.q);
  p.d = reinterpret_cast<const void*>(a.d);
  p.offsets = reinterpret_cast<const int64_t*>(a.d_offsets);
  p.argmax = reinterpret_cast<const int32_t*>(a.argmax);
  p.q_mask = reinterpret_cast<const uint8_t*>(a.q_mask);
  p.nq = reinterpret_cast<const int32_t*>(a.nq);
  p.dq = reinterpret_cast<void*>(a.dq);
  p.dq_ws = reinterpret_cast<float*>(a.dq_ws);
  p.dd = reinterpret_cast<void*>(a.dd);
  p.dd32 = reinterpret_cast<float*>(a.dd32);
  p.dbias = reinterpret_cast<float*>(a.dbias);
  p.dbias_ws = reinterpret_cast<float*>(a.dbias_ws);
  p.Bq = a.Bq;
  p.Lq = a.Lq;
  p.D = a.D;
  p.C = a.n_cols();
  p.Ld = a.packed() ? 0 : a.Ld;
  p.R = a.R;
  p.group_size = a.group_size;
  p.sgb = a.sg_b;
  p.sgc = a.sg_c;
  p.sqb = a.sq_b;
  p.sqi = a.sq_l;
  p.sdb = a.packed() ? 0 : a.sd_b;
  p.sdj = a.sd_l;
  p.sqmb = a.sqm_b;
  p.sqmi = a.sqm_l;
  p.n_split = pl.n_split;
  p.n_part = pl.n_part;
  p.jt = pl.jt;
  p.mean = a.mean ? 1 : 0;
  launch_bwd(p, pl, a.dtype, as_stream(a.stream));
}

}  // namespace reatt
