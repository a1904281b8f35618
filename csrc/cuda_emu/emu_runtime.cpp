// The CUDA execution model on CPU threads: launches, block barriers, warp collectives, deferred cp.async, ldmatrix and
// mma.sync. Design notes in emu_runtime.h.
#ifndef REATT_CUDA_EMU
#define REATT_CUDA_EMU 1
#endif
#include "emu_runtime.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define REATT_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define REATT_EMU_ASAN 1
#endif
#endif

namespace reatt_emu {
namespace {

constexpr size_t kGuard = 64;            // guard bytes after the dynamic smem buffer (non-ASan builds)
constexpr unsigned char kPoison = 0xFF;  // NaN in fp32, fp16 and bf16

struct LaneSlot {
  uint64_t v;           // shuffle / match value, or the ldmatrix row address
  int arg;              // shuffle source lane / xor mask / delta; vote predicate
  uint32_t a[4], b[2];  // mma fragments
  float c[4];
  uint64_t out;  // results
  uint32_t r[4];
  float d[4];
};

enum CollKind { kCollShfl = 0, kCollVote = 1, kCollMatch = 2, kCollLdmatrix = 3, kCollMma = 4 };
const char* coll_name(int kind, int sub) {
  switch (kind) {
    case kCollShfl: return sub == kShflIdx ? "__shfl_sync" : sub == kShflXor ? "__shfl_xor_sync"
                         : sub == kShflUp  ? "__shfl_up_sync" : "__shfl_down_sync";
    case kCollVote: return sub == kVoteAll ? "__all_sync" : sub == kVoteAny ? "__any_sync"
                         : sub == kVoteBallot ? "__ballot_sync" : "__syncwarp";
    case kCollMatch: return "__match_any_sync";
    case kCollLdmatrix: return sub ? "ldmatrix.x4.trans" : "ldmatrix.x4";
    default: return sub == kMmaF16 ? "mma.m16n8k16.f16" : "mma.m16n8k16.bf16";
  }
}

// Waiters sleep on an atomic generation counter (a Linux futex), not on a condition variable: a woken lane needs no
// mutex, so a release costs one wake-up per lane instead of a convoy on the block's mutex, and nobody spins (the
// machine runs far more emulated threads than it has cores). The acquire load orders the waker's writes for TSan.
void wait_change(std::atomic<int>& a, int old) {
  while (a.load(std::memory_order_acquire) == old)
    syscall(SYS_futex, reinterpret_cast<int*>(&a), FUTEX_WAIT_PRIVATE, old, nullptr, nullptr, 0);
}
void publish(std::atomic<int>& a, uint64_t gen) {
  a.store(static_cast<int>(gen), std::memory_order_release);
  syscall(SYS_futex, reinterpret_cast<int*>(&a), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
}

struct Warp {
  std::atomic<int> gen_a{0};  // == (int)gen, for the waiters
  uint64_t gen = 0;       // completed collectives
  unsigned arrived = 0;   // lanes at the pending one
  unsigned mask = 0, present = 0, exited = 0;
  int kind = -1, sub = 0;
  const char* file = "";
  int line = 0;
  LaneSlot slot[2][32];  // double-buffered by gen parity: one rendezvous per collective suffices
};

struct Where {
  const char* what = "running";
  const char* file = "";
  int line = 0;
};

struct LaunchState {
  const char* name;
  const char* func;
  const char* file;
  int line;
  dim3 grid, block;
  int nthreads = 0;
  std::mutex m;
  // __syncthreads
  std::atomic<int> bar_gen_a{0};
  int live = 0, blocked = 0, bar_arrived = 0;
  uint64_t bar_gen = 0;
  int acc_or = 0, acc_and = 1, acc_count = 0;
  int res_or[2] = {0, 0}, res_and[2] = {0, 0}, res_count[2] = {0, 0};
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<Where> where;
  // the block walk
  std::atomic<int> end_gen_a{0};
  int end_arrived = 0;
  uint64_t end_gen = 0, cur_block = 0, n_blocks = 0;
  // dynamic shared memory of the current block
  size_t smem_size = 0;
  unsigned char* smem = nullptr;
  std::string fault;  // first illegal access seen (launch fails with cudaErrorIllegalAddress)
};

thread_local LaunchState* tl_state = nullptr;
thread_local int tl_tid = 0;

struct PendingCopy {
  unsigned char* dst;
  unsigned char data[16];
  int64_t group;  // -1 while uncommitted
};
thread_local std::vector<PendingCopy> tl_copies;
thread_local int64_t tl_groups = 0;

std::mutex g_launch_mutex;  // launches are serialised
std::mutex g_attr_mutex;
std::map<const void*, int> g_max_dyn_smem;

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "reatt cuda_emu: %s\n", msg.c_str());
  std::fflush(stderr);
  std::abort();
}

std::string kernel_desc(const LaunchState& S) {
  return std::string("kernel ") + S.name + " (launched by " + S.func + " at " + S.file + ":" + std::to_string(S.line) +
         "), block (" +
         std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ")";
}

// Called with S.m held, by a thread about to wait: if every live thread waits, nothing can ever wake them.
void deadlock_check(LaunchState& S) {
  if (S.live <= 0 || S.blocked < S.live) return;
  std::map<std::string, int> sites;
  for (int t = 0; t < S.nthreads; ++t) {
    const Where& w = S.where[t];
    if (std::string(w.what) == "exited") continue;
    sites[std::string(w.what) + " at " + w.file + ":" + std::to_string(w.line)] += 1;
  }
  std::string msg = "deadlock in " + kernel_desc(S) + ": every live thread waits and no barrier can complete;";
  for (auto& kv : sites) msg += "\n  " + std::to_string(kv.second) + " thread(s) wait in " + kv.first;
  die(msg);
}

// Called with S.m held: complete the block barrier when every live thread has arrived. `waiting` = how many of the
// arrived threads sleep (all of them when an exiting thread completes it, all but the caller otherwise).
void maybe_complete_barrier(LaunchState& S, int waiting) {
  if (S.bar_arrived == 0 || S.bar_arrived < S.live) return;
  const int idx = S.bar_gen & 1;
  S.res_or[idx] = S.acc_or;
  S.res_and[idx] = S.acc_and;
  S.res_count[idx] = S.acc_count;
  S.blocked -= waiting;
  S.bar_arrived = 0;
  ++S.bar_gen;
  publish(S.bar_gen_a, S.bar_gen);
}

bool in_smem(const LaunchState& S, const void* p, size_t n) {
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= S.smem && c + n <= S.smem + S.smem_size;
}
void fault(LaunchState& S, const std::string& msg) {  // with or without S.m held by the caller: S.fault is under m
  if (S.fault.empty()) S.fault = msg + " in " + kernel_desc(S);
}

void reset_block(LaunchState& S) {
  S.live = S.nthreads;
  S.blocked = 0;
  S.bar_arrived = 0;
  for (auto& w : S.warps) {
    w->arrived = 0;
    w->exited = 0;
  }
  for (auto& w : S.where) w = Where{};
  if (S.smem_size) std::memset(S.smem, kPoison, S.smem_size);
#ifndef REATT_EMU_ASAN
  std::memset(S.smem + S.smem_size, kPoison, kGuard);
#endif
}

void check_guard(LaunchState& S) {
#ifndef REATT_EMU_ASAN
  for (size_t i = 0; i < kGuard; ++i)
    if (S.smem[S.smem_size + i] != kPoison) {
      fault(S, "write past the end of the dynamic shared memory (" + std::to_string(S.smem_size) + " bytes, byte +" +
                   std::to_string(i) + ")");
      return;
    }
#else
  (void)S;
#endif
}

// The thread has returned from the kernel: it stops counting for barriers; a collective that names it can never
// complete, which is undefined behaviour on a GPU.
void thread_exit(LaunchState& S, int tid) {
  std::unique_lock<std::mutex> lk(S.m);
  Warp& W = *S.warps[tid / 32];
  const unsigned bit = 1u << (tid % 32);
  W.exited |= bit;
  S.where[tid] = Where{"exited", "", 0};
  --S.live;
  if (W.arrived != 0 && (W.mask & bit))
    die("lane " + std::to_string(tid % 32) + " of warp " + std::to_string(tid / 32) + " exited while named in the mask of " +
        coll_name(W.kind, W.sub) + " at " + W.file + ":" + std::to_string(W.line) + " in " + kernel_desc(S));
  maybe_complete_barrier(S, S.bar_arrived);
  deadlock_check(S);
}

void run_thread(LaunchState* Sp, int tid, const std::function<void()>* body) {
  LaunchState& S = *Sp;
  tl_state = Sp;
  tl_tid = tid;
  blockDim = S.block;
  gridDim = S.grid;
  const unsigned bx = S.block.x, by = S.block.y;
  threadIdx = uint3{tid % bx, (tid / bx) % by, tid / (bx * by)};
  for (;;) {
    uint64_t b;
    {
      std::lock_guard<std::mutex> lk(S.m);
      b = S.cur_block;
    }
    if (b >= S.n_blocks) break;
    blockIdx = uint3{static_cast<unsigned>(b % S.grid.x), static_cast<unsigned>((b / S.grid.x) % S.grid.y),
                     static_cast<unsigned>(b / (static_cast<uint64_t>(S.grid.x) * S.grid.y))};
    tl_copies.clear();
    tl_groups = 0;
    try {
      (*body)();
    } catch (const std::exception& e) {
      die(std::string("exception in ") + kernel_desc(S) + ": " + e.what());
    }
    tl_copies.clear();  // copies never waited for die with the block's shared memory
    thread_exit(S, tid);
    // The last thread to finish the block checks it and sets up the next one.
    std::unique_lock<std::mutex> lk(S.m);
    const uint64_t gen = S.end_gen;
    if (++S.end_arrived == S.nthreads) {
      check_guard(S);
      S.end_arrived = 0;
      ++S.end_gen;
      S.cur_block = S.fault.empty() ? S.cur_block + 1 : S.n_blocks;  // a fault ends the launch
      if (S.cur_block < S.n_blocks) reset_block(S);
      publish(S.end_gen_a, S.end_gen);
    } else {
      lk.unlock();
      wait_change(S.end_gen_a, static_cast<int>(gen));
    }
  }
  tl_state = nullptr;
}

// One warp collective: deposit this lane's inputs, rendezvous, the last lane computes every lane's outputs.
template <typename Fill, typename Compute, typename Read>
void collective(int kind, int sub, unsigned mask, const char* file, int line, Fill fill, Compute compute, Read read) {
  LaunchState* Sp = tl_state;
  if (Sp == nullptr) die(std::string(coll_name(kind, sub)) + " called outside a kernel at " + file + ":" + std::to_string(line));
  LaunchState& S = *Sp;
  const int tid = tl_tid, lane = tid % 32;
  const unsigned bit = 1u << lane;
  Warp& W = *S.warps[tid / 32];
  std::unique_lock<std::mutex> lk(S.m);
  auto site = [&](const char* f, int l) { return std::string(f) + ":" + std::to_string(l); };
  if (!(mask & bit))
    die(std::string(coll_name(kind, sub)) + " at " + site(file, line) + ": lane " + std::to_string(lane) +
        " is not in its own mask " + std::to_string(mask) + " in " + kernel_desc(S));
  if (mask & ~W.present)
    die(std::string(coll_name(kind, sub)) + " at " + site(file, line) + ": mask names lanes past the end of the block in " +
        kernel_desc(S));
  if (mask & W.exited)
    die(std::string(coll_name(kind, sub)) + " at " + site(file, line) + ": mask names lane(s) that already exited in " +
        kernel_desc(S));
  if (W.arrived == 0) {
    W.mask = mask;
    W.kind = kind;
    W.sub = sub;
    W.file = file;
    W.line = line;
  } else if (W.mask != mask || W.kind != kind || W.sub != sub || W.line != line || std::strcmp(W.file, file) != 0) {
    die("warp " + std::to_string(tid / 32) + " diverged at a collective in " + kernel_desc(S) + ": lanes " +
        std::to_string(W.arrived) + " wait in " + coll_name(W.kind, W.sub) + " (mask " + std::to_string(W.mask) +
        ") at " + site(W.file, W.line) + ", lane " + std::to_string(lane) + " arrived at " + coll_name(kind, sub) +
        " (mask " + std::to_string(mask) + ") at " + site(file, line));
  }
  const uint64_t gen = W.gen;
  LaneSlot* slots = W.slot[gen & 1];
  fill(slots[lane]);
  W.arrived |= bit;
  if (W.arrived == mask) {
    compute(slots, mask);
    W.arrived = 0;
    ++W.gen;
    S.blocked -= __builtin_popcount(mask) - 1;
    publish(W.gen_a, W.gen);
    lk.unlock();
  } else {
    ++S.blocked;
    S.where[tid] = Where{coll_name(kind, sub), file, line};  // stale once released: read only when all are blocked
    deadlock_check(S);
    lk.unlock();
    wait_change(W.gen_a, static_cast<int>(gen));
  }
  read(slots[lane]);
}

int src_lane(int kind, int lane, int arg, int width) {
  const int base = lane & ~(width - 1), in = lane & (width - 1);
  switch (kind) {
    case kShflIdx: return base + (arg & (width - 1));
    case kShflXor: {
      const int s = lane ^ arg;
      return s >= base + width ? lane : s;
    }
    case kShflUp: return in - arg >= 0 ? lane - arg : lane;
    default: return in + arg < width ? lane + arg : lane;
  }
}

float elem_to_float(uint16_t bits, int dtype) {
  return dtype == kMmaF16 ? half_bits_to_float(bits) : bf16_bits_to_float(bits);
}
uint16_t lo16(uint32_t r) { return static_cast<uint16_t>(r & 0xffffu); }
uint16_t hi16(uint32_t r) { return static_cast<uint16_t>(r >> 16); }

}  // namespace

// ---- host API -------------------------------------------------------------------------------------------------------------
DeviceLimits& device_limits() {
  static DeviceLimits limits;
  return limits;
}
cudaError_t& last_error() {
  static thread_local cudaError_t err = cudaSuccess;
  return err;
}
cudaError_t set_error(cudaError_t e) {
  if (e != cudaSuccess) last_error() = e;
  return e;
}
cudaError_t func_set_attribute(const void* fn, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return set_error(cudaErrorInvalidValue);
  if (value < 0 || value > device_limits().smem_optin) return set_error(cudaErrorInvalidValue);
  std::lock_guard<std::mutex> lk(g_attr_mutex);
  g_max_dyn_smem[fn] = value;
  return cudaSuccess;
}

void launch_impl(const char* name, const char* func, const char* file, int line, const void* fn, dim3 grid,
                 dim3 block, size_t smem, const std::function<void()>& body) {
  const uint64_t nthreads = static_cast<uint64_t>(block.x) * block.y * block.z;
  const uint64_t n_blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64 || n_blocks == 0 || grid.y > 65535 || grid.z > 65535 ||
      grid.x > 2147483647u) {
    set_error(cudaErrorInvalidConfiguration);
    return;
  }
  size_t allowed = static_cast<size_t>(device_limits().smem_default);
  {
    std::lock_guard<std::mutex> lk(g_attr_mutex);
    auto it = g_max_dyn_smem.find(fn);
    if (it != g_max_dyn_smem.end()) allowed = std::max(allowed, static_cast<size_t>(it->second));
  }
  allowed = std::min(allowed, static_cast<size_t>(device_limits().smem_optin));
  if (smem > allowed) {
    set_error(cudaErrorInvalidValue);  // what the runtime reports for too much dynamic shared memory
    return;
  }
  std::lock_guard<std::mutex> launch_lock(g_launch_mutex);
  LaunchState S;
  S.name = name;
  S.func = func;
  S.file = file;
  S.line = line;
  S.grid = grid;
  S.block = block;
  S.nthreads = static_cast<int>(nthreads);
  S.n_blocks = n_blocks;
  const int nwarps = static_cast<int>((nthreads + 31) / 32);
  for (int w = 0; w < nwarps; ++w) {
    S.warps.emplace_back(new Warp());
    const int lanes = std::min<int>(32, static_cast<int>(nthreads) - 32 * w);
    S.warps.back()->present = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  }
  S.where.resize(nthreads);
  S.smem_size = smem;
#ifdef REATT_EMU_ASAN
  const size_t alloc = smem;  // exact: ASan reports any byte past it
#else
  const size_t alloc = smem + kGuard;
#endif
  void* buf = nullptr;
  if (posix_memalign(&buf, 128, std::max<size_t>(alloc, 1)) != 0) die("out of memory for shared memory");
  S.smem = static_cast<unsigned char*>(buf);
  reset_block(S);
  std::vector<std::thread> threads;
  threads.reserve(nthreads);
  for (int t = 0; t < S.nthreads; ++t) threads.emplace_back(run_thread, &S, t, &body);
  for (auto& t : threads) t.join();
  std::free(S.smem);
  if (!S.fault.empty()) {
    std::fprintf(stderr, "reatt cuda_emu: %s\n", S.fault.c_str());
    set_error(cudaErrorIllegalAddress);
  }
}

// ---- barriers and collectives ---------------------------------------------------------------------------------------
void* dynamic_smem() {
  if (tl_state == nullptr) die("dynamic shared memory used outside a kernel");
  return tl_state->smem;
}

int block_barrier(int kind, int pred, const char* file, int line) {
  LaunchState* Sp = tl_state;
  if (Sp == nullptr) die(std::string("__syncthreads called outside a kernel at ") + file + ":" + std::to_string(line));
  LaunchState& S = *Sp;
  std::unique_lock<std::mutex> lk(S.m);
  const uint64_t gen = S.bar_gen;
  if (S.bar_arrived == 0) {
    S.acc_or = 0;
    S.acc_and = 1;
    S.acc_count = 0;
  }
  S.acc_or |= pred;
  S.acc_and &= pred;
  S.acc_count += pred;
  ++S.bar_arrived;
  if (S.bar_arrived == S.live) {
    maybe_complete_barrier(S, S.bar_arrived - 1);
    lk.unlock();
  } else {
    ++S.blocked;
    S.where[tl_tid] = Where{"__syncthreads", file, line};
    deadlock_check(S);
    lk.unlock();
    wait_change(S.bar_gen_a, static_cast<int>(gen));
  }
  const int idx = gen & 1;
  return kind == 1 ? S.res_or[idx] : kind == 2 ? S.res_and[idx] : kind == 3 ? S.res_count[idx] : 0;
}

uint64_t warp_shfl(int kind, unsigned mask, uint64_t v, int arg, int width, const char* file, int line) {
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    die(std::string("shuffle width must be a power of two <= 32 at ") + file + ":" + std::to_string(line));
  uint64_t out = 0;
  collective(
      kCollShfl, kind, mask, file, line,
      [&](LaneSlot& s) {
        s.v = v;
        s.arg = arg;
      },
      [&](LaneSlot* slots, unsigned m) {
        for (int l = 0; l < 32; ++l) {
          if (!((m >> l) & 1u)) continue;
          const int src = src_lane(kind, l, slots[l].arg, width);
          if (!((m >> src) & 1u))
            die(std::string("shuffle at ") + file + ":" + std::to_string(line) + ": lane " + std::to_string(l) +
                " reads lane " + std::to_string(src) + ", which is not in the mask");
          slots[l].out = slots[src].v;
        }
      },
      [&](const LaneSlot& s) { out = s.out; });
  return out;
}

unsigned warp_vote(int kind, unsigned mask, int pred, const char* file, int line) {
  unsigned out = 0;
  collective(
      kCollVote, kind, mask, file, line, [&](LaneSlot& s) { s.arg = pred; },
      [&](LaneSlot* slots, unsigned m) {
        unsigned ballot = 0;
        for (int l = 0; l < 32; ++l)
          if (((m >> l) & 1u) && slots[l].arg) ballot |= 1u << l;
        const unsigned res = kind == kVoteAll ? (ballot == m) : kind == kVoteAny ? (ballot != 0) : ballot;
        for (int l = 0; l < 32; ++l) slots[l].out = res;
      },
      [&](const LaneSlot& s) { out = static_cast<unsigned>(s.out); });
  return out;
}

unsigned warp_match_any(unsigned mask, uint64_t v, const char* file, int line) {
  unsigned out = 0;
  collective(
      kCollMatch, 0, mask, file, line, [&](LaneSlot& s) { s.v = v; },
      [&](LaneSlot* slots, unsigned m) {
        for (int l = 0; l < 32; ++l) {
          if (!((m >> l) & 1u)) continue;
          unsigned same = 0;
          for (int k = 0; k < 32; ++k)
            if (((m >> k) & 1u) && slots[k].v == slots[l].v) same |= 1u << k;
          slots[l].out = same;
        }
      },
      [&](const LaneSlot& s) { out = static_cast<unsigned>(s.out); });
  return out;
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lanes 8i..8i+7 give the row addresses of matrix i; lane l gets
// from every matrix the two b16 at row l/4, columns 2(l%4), 2(l%4)+1 (.trans: rows 2(l%4), 2(l%4)+1 of column l/4).
void warp_ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans, const char* file, int line) {
  LaunchState& S = *tl_state;
  collective(
      kCollLdmatrix, trans ? 1 : 0, 0xffffffffu, file, line,
      [&](LaneSlot& s) { s.v = reinterpret_cast<uint64_t>(p); },
      [&](LaneSlot* slots, unsigned) {
        for (int l = 0; l < 32; ++l) {
          const auto* row = reinterpret_cast<const unsigned char*>(slots[l].v);
          if ((slots[l].v & 15u) != 0 || !in_smem(S, row, 16)) {
            fault(S, "ldmatrix at " + std::string(file) + ":" + std::to_string(line) + ": lane " + std::to_string(l) +
                         "'s row address is not a 16-byte aligned row inside the dynamic shared memory");
            for (int k = 0; k < 32; ++k)
              for (int m = 0; m < 4; ++m) slots[k].r[m] = 0xffffffffu;
            return;
          }
        }
        for (int l = 0; l < 32; ++l)
          for (int m = 0; m < 4; ++m) {
            uint16_t e0, e1;
            if (!trans) {
              const auto* row = reinterpret_cast<const uint16_t*>(slots[8 * m + l / 4].v);
              e0 = row[2 * (l % 4)];
              e1 = row[2 * (l % 4) + 1];
            } else {
              e0 = reinterpret_cast<const uint16_t*>(slots[8 * m + 2 * (l % 4)].v)[l / 4];
              e1 = reinterpret_cast<const uint16_t*>(slots[8 * m + 2 * (l % 4) + 1].v)[l / 4];
            }
            slots[l].r[m] = static_cast<uint32_t>(e0) | (static_cast<uint32_t>(e1) << 16);
          }
      },
      [&](const LaneSlot& s) {
        for (int m = 0; m < 4; ++m) r[m] = s.r[m];
      });
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, g = lane/4, t = lane%4 (PTX ISA fragment tables):
//   A (16x16): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..2t+1], a2 = A[g][2t+8..2t+9], a3 = A[g+8][2t+8..2t+9]
//   B (16x8):  b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]          (low 16 bits = the lower row/column index)
//   C, D:      c0,c1 = C[g][2t], C[g][2t+1]; c2,c3 = C[g+8][2t], C[g+8][2t+1]
// Products of two halves are exact in fp32; the sum over k runs in fp32, in k order, starting from C.
void warp_mma_16816(int dtype, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const char* file,
                    int line) {
  collective(
      kCollMma, dtype, 0xffffffffu, file, line,
      [&](LaneSlot& s) {
        for (int x = 0; x < 4; ++x) s.a[x] = a[x];
        s.b[0] = b0;
        s.b[1] = b1;
        for (int x = 0; x < 4; ++x) s.c[x] = c[x];
      },
      [&](LaneSlot* slots, unsigned) {
        float A[16][16], B[16][8], C[16][8];
        for (int l = 0; l < 32; ++l) {
          const int g = l / 4, t = l % 4;
          const LaneSlot& s = slots[l];
          for (int x = 0; x < 4; ++x) {
            const int row = g + 8 * (x & 1), col = 2 * t + 8 * (x >> 1);
            A[row][col] = elem_to_float(lo16(s.a[x]), dtype);
            A[row][col + 1] = elem_to_float(hi16(s.a[x]), dtype);
          }
          for (int x = 0; x < 2; ++x) {
            B[2 * t + 8 * x][g] = elem_to_float(lo16(s.b[x]), dtype);
            B[2 * t + 8 * x + 1][g] = elem_to_float(hi16(s.b[x]), dtype);
          }
          for (int x = 0; x < 4; ++x) C[g + 8 * (x >> 1)][2 * t + (x & 1)] = s.c[x];
        }
        for (int l = 0; l < 32; ++l) {
          const int g = l / 4, t = l % 4;
          for (int x = 0; x < 4; ++x) {
            const int row = g + 8 * (x >> 1), col = 2 * t + (x & 1);
            float acc = C[row][col];
            for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
            slots[l].d[x] = acc;
          }
        }
      },
      [&](const LaneSlot& s) {
        for (int x = 0; x < 4; ++x) c[x] = s.d[x];
      });
}

// cp.async.cg.shared.global 16 B: read the source now, poison the destination, land the data at the matching wait.
void cp_async16(void* dst, const void* src) {
  LaunchState& S = *tl_state;
  auto* d = static_cast<unsigned char*>(dst);
  if ((reinterpret_cast<uintptr_t>(dst) & 15u) != 0 || (reinterpret_cast<uintptr_t>(src) & 15u) != 0 ||
      !in_smem(S, d, 16)) {
    std::lock_guard<std::mutex> lk(S.m);
    fault(S, "cp.async: destination outside the dynamic shared memory or an address not 16-byte aligned");
    return;
  }
  PendingCopy c;
  c.dst = d;
  std::memcpy(c.data, src, 16);
  c.group = -1;
  tl_copies.push_back(c);
  std::memset(d, kPoison, 16);
}
void cp_async_commit() {
  const int64_t g = ++tl_groups;
  for (auto& c : tl_copies)
    if (c.group < 0) c.group = g;
}
// cp.async.wait_group n: every committed group but the n most recent is complete.
void cp_async_wait(int n) {
  const int64_t upto = tl_groups - n;
  size_t keep = 0;
  for (size_t i = 0; i < tl_copies.size(); ++i) {
    PendingCopy& c = tl_copies[i];
    if (c.group >= 0 && c.group <= upto)
      std::memcpy(c.dst, c.data, 16);
    else
      tl_copies[keep++] = c;
  }
  tl_copies.resize(keep);
}

}  // namespace reatt_emu

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
  }
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return reatt_emu::set_error(cudaErrorInvalidValue);
  const auto& d = reatt_emu::device_limits();
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sm_count; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_optin; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = d.smem_default; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = d.smem_optin + 1024; return cudaSuccess;
    default: return reatt_emu::set_error(cudaErrorInvalidValue);
  }
}
