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
#include <numeric>
#include <random>
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
constexpr unsigned char kPoison = 0x7B;  // 0x7B7B7B7B: fp32/bf16 ~1.3e36, fp16 61280, int32 2071690107 (see the header)

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

constexpr uint64_t kNoBlock = ~uint64_t(0);

struct StaticSmem {
  const void* key;
  unsigned char* p;
  size_t bytes;
};

struct LaunchState;

// One resident block: its own threads, barrier, warps and shared memory. It runs the grid's blocks that the launch's
// queue hands it, one after another.
struct Block {
  LaunchState* L = nullptr;
  int slot = 0;
  std::mutex m;
  // __syncthreads
  std::atomic<int> bar_gen_a{0};
  int live = 0, blocked = 0, bar_arrived = 0;
  uint64_t bar_gen = 0;
  int bar_kind = 0;  // the pending barrier's kind and site (set by its first arrival)
  const char* bar_file = "";
  int bar_line = 0;
  int acc_or = 0, acc_and = 1, acc_count = 0;
  int res_or[2] = {0, 0}, res_and[2] = {0, 0}, res_count[2] = {0, 0};
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<Where> where;
  // the block walk
  std::atomic<int> end_gen_a{0};
  int end_arrived = 0;
  uint64_t end_gen = 0, cur = kNoBlock;  // linear index of the grid block being run
  // shared memory of the current block
  size_t smem_size = 0;
  unsigned char* smem = nullptr;
  std::vector<StaticSmem> statics;
};

struct LaunchState {
  const char* name;
  const char* func;
  const char* file;
  int line;
  dim3 grid, block;
  int nthreads = 0;
  uint64_t n_blocks = 0;
  uint64_t seed = 0, launch_no = 0;
  // the block queue: position k of the order runs grid block (perm_a * k + perm_b) % n_blocks
  std::mutex qm;
  uint64_t next = 0, perm_a = 1, perm_b = 0;
  std::mutex fm;
  std::string fault;  // first failure seen; the launch fails with fault_code
  cudaError_t fault_code = cudaSuccess;
  std::vector<std::unique_ptr<Block>> blocks;
};

thread_local Block* tl_block = nullptr;
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

// ---- configuration: seed, resident blocks, mma order ----------------------------------------------------------------
uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
uint64_t env_u64(const char* name, uint64_t dflt) {
  const char* v = std::getenv(name);
  return (v && *v) ? std::strtoull(v, nullptr, 0) : dflt;
}
struct Config {
  std::atomic<uint64_t> seed{0};
  std::atomic<uint64_t> launches{0};  // launches since the seed was set
  std::atomic<int> resident{3};
  std::atomic<bool> serial{false};
  std::atomic<int> mma_order{0};  // 0 k order, 1 pairwise, 2 reverse k
  Config() {
    seed = env_u64("REATT_EMU_SEED", std::random_device{}() ^ (uint64_t(std::random_device{}()) << 32));
    resident = static_cast<int>(std::max<uint64_t>(1, env_u64("REATT_EMU_RESIDENT", 3)));
    serial = env_u64("REATT_EMU_SERIAL", 0) != 0;
    const char* o = std::getenv("REATT_EMU_MMA_ORDER");
    const std::string order = o ? o : "seq";
    if (order == "seq" || order.empty()) mma_order = 0;
    else if (order == "pairwise") mma_order = 1;
    else if (order == "reverse") mma_order = 2;
    else {
      std::fprintf(stderr, "reatt cuda_emu: REATT_EMU_MMA_ORDER must be seq, pairwise or reverse, not %s\n", o);
      std::abort();
    }
  }
};
Config& config() {
  static Config c;
  return c;
}
thread_local uint64_t tl_launch_seed = 0, tl_launch_no = 0;  // of the launch this thread belongs to (for messages)

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "reatt cuda_emu: %s\n  (replay: REATT_EMU_SEED=%llu, launch %llu after the seed was set%s)\n",
               msg.c_str(), static_cast<unsigned long long>(config().seed.load()),
               static_cast<unsigned long long>(tl_launch_no), config().serial ? ", REATT_EMU_SERIAL=1" : "");
  std::fflush(stderr);
  std::abort();
}

std::string block_desc(const LaunchState& S) {
  return std::string("kernel ") + S.name + " (launched by " + S.func + " at " + S.file + ":" + std::to_string(S.line) +
         ")";
}
std::string kernel_desc(const LaunchState& S) {
  return block_desc(S) + ", block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
         std::to_string(blockIdx.z) + ")";
}

// Called with B.m held, by a thread about to wait: if every live thread waits, nothing can ever wake them.
void deadlock_check(Block& B) {
  if (B.live <= 0 || B.blocked < B.live) return;
  std::map<std::string, int> sites;
  for (int t = 0; t < B.L->nthreads; ++t) {
    const Where& w = B.where[t];
    if (std::string(w.what) == "exited") continue;
    sites[std::string(w.what) + " at " + w.file + ":" + std::to_string(w.line)] += 1;
  }
  std::string msg = "deadlock in " + kernel_desc(*B.L) + ": every live thread waits and no barrier can complete;";
  for (auto& kv : sites) msg += "\n  " + std::to_string(kv.second) + " thread(s) wait in " + kv.first;
  die(msg);
}

// Called with B.m held: complete the block barrier when every live thread has arrived. `waiting` = how many of the
// arrived threads sleep (all of them when an exiting thread completes it, all but the caller otherwise).
void maybe_complete_barrier(Block& B, int waiting) {
  if (B.bar_arrived == 0 || B.bar_arrived < B.live) return;
  const int idx = B.bar_gen & 1;
  B.res_or[idx] = B.acc_or;
  B.res_and[idx] = B.acc_and;
  B.res_count[idx] = B.acc_count;
  B.blocked -= waiting;
  B.bar_arrived = 0;
  ++B.bar_gen;
  publish(B.bar_gen_a, B.bar_gen);
}

bool in_smem(const Block& B, const void* p, size_t n) {
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= B.smem && c + n <= B.smem + B.smem_size;
}
void fault(LaunchState& S, const std::string& msg, cudaError_t code = cudaErrorIllegalAddress) {
  std::lock_guard<std::mutex> lk(S.fm);
  if (S.fault.empty()) {
    S.fault = msg + " in " + kernel_desc(S);
    S.fault_code = code;
  }
}
bool faulted(LaunchState& S) {
  std::lock_guard<std::mutex> lk(S.fm);
  return !S.fault.empty();
}

// The next grid block for a resident block, or kNoBlock when the grid is done or the launch failed.
uint64_t next_block(LaunchState& S) {
  if (faulted(S)) return kNoBlock;
  std::lock_guard<std::mutex> lk(S.qm);
  if (S.next >= S.n_blocks) return kNoBlock;
  const uint64_t k = S.next++;
  return static_cast<uint64_t>((static_cast<unsigned __int128>(S.perm_a) * k + S.perm_b) % S.n_blocks);
}

void poison_block_smem(Block& B) {
  if (B.smem_size) std::memset(B.smem, kPoison, B.smem_size);
#ifndef REATT_EMU_ASAN
  std::memset(B.smem + B.smem_size, kPoison, kGuard);
#endif
  for (auto& s : B.statics) std::memset(s.p, kPoison, s.bytes);
}

void reset_block(Block& B) {
  B.live = B.L->nthreads;
  B.blocked = 0;
  B.bar_arrived = 0;
  for (auto& w : B.warps) {
    w->arrived = 0;
    w->exited = 0;
  }
  for (auto& w : B.where) w = Where{};
  poison_block_smem(B);
}

void check_guard(Block& B) {
#ifndef REATT_EMU_ASAN
  for (size_t i = 0; i < kGuard; ++i)
    if (B.smem[B.smem_size + i] != kPoison) {
      fault(*B.L, "write past the end of the dynamic shared memory (" + std::to_string(B.smem_size) + " bytes, byte +" +
                      std::to_string(i) + ")");
      return;
    }
#else
  (void)B;
#endif
}

// The thread has returned from the kernel: it stops counting for barriers; a collective that names it can never
// complete, which is undefined behaviour on a GPU.
void thread_exit(Block& B, int tid) {
  std::unique_lock<std::mutex> lk(B.m);
  Warp& W = *B.warps[tid / 32];
  const unsigned bit = 1u << (tid % 32);
  W.exited |= bit;
  B.where[tid] = Where{"exited", "", 0};
  --B.live;
  if (W.arrived != 0 && (W.mask & bit))
    die("lane " + std::to_string(tid % 32) + " of warp " + std::to_string(tid / 32) + " exited while named in the mask of " +
        coll_name(W.kind, W.sub) + " at " + W.file + ":" + std::to_string(W.line) + " in " + kernel_desc(*B.L));
  maybe_complete_barrier(B, B.bar_arrived);
  deadlock_check(B);
}

void set_block_idx(const LaunchState& S, uint64_t b) {
  blockIdx = uint3{static_cast<unsigned>(b % S.grid.x), static_cast<unsigned>((b / S.grid.x) % S.grid.y),
                   static_cast<unsigned>(b / (static_cast<uint64_t>(S.grid.x) * S.grid.y))};
}

void run_thread(Block* Bp, int tid, const std::function<void()>* body) {
  Block& B = *Bp;
  LaunchState& S = *B.L;
  tl_block = Bp;
  tl_tid = tid;
  tl_launch_seed = S.seed;
  tl_launch_no = S.launch_no;
  blockDim = S.block;
  gridDim = S.grid;
  const unsigned bx = S.block.x, by = S.block.y;
  threadIdx = uint3{tid % bx, (tid / bx) % by, tid / (bx * by)};
  for (;;) {
    uint64_t b;
    {
      std::lock_guard<std::mutex> lk(B.m);
      b = B.cur;
    }
    if (b == kNoBlock) break;
    set_block_idx(S, b);
    tl_copies.clear();
    tl_groups = 0;
    // Seeded jitter: the first lane of some warps yields before starting the block, so resident blocks (and the warps
    // of a block) interleave differently from seed to seed. (One lane per warp: a yield is costly on a loaded machine,
    // and the warp's other lanes wait for it at its first collective anyway.)
    if (!config().serial && tid % 32 == 0) {
      const uint64_t h = splitmix(S.seed ^ (b * 0x100000001b3ull) ^ (static_cast<uint64_t>(tid) << 40));
      for (uint64_t k = 0; k < (h & 3); ++k) std::this_thread::yield();
    }
    try {
      (*body)();
    } catch (const std::exception& e) {
      die(std::string("exception in ") + kernel_desc(S) + ": " + e.what());
    }
    tl_copies.clear();  // copies never waited for die with the block's shared memory
    thread_exit(B, tid);
    // The last thread to finish the block checks it and takes the next one from the launch's queue.
    std::unique_lock<std::mutex> lk(B.m);
    const uint64_t gen = B.end_gen;
    if (++B.end_arrived == S.nthreads) {
      check_guard(B);
      B.end_arrived = 0;
      ++B.end_gen;
      B.cur = next_block(S);
      if (B.cur != kNoBlock) reset_block(B);
      publish(B.end_gen_a, B.end_gen);
    } else {
      lk.unlock();
      wait_change(B.end_gen_a, static_cast<int>(gen));
    }
  }
  tl_block = nullptr;
}

// One warp collective: deposit this lane's inputs, rendezvous, the last lane computes every lane's outputs.
template <typename Fill, typename Compute, typename Read>
void collective(int kind, int sub, unsigned mask, const char* file, int line, Fill fill, Compute compute, Read read) {
  Block* Bp = tl_block;
  if (Bp == nullptr) die(std::string(coll_name(kind, sub)) + " called outside a kernel at " + file + ":" + std::to_string(line));
  Block& B = *Bp;
  LaunchState& S = *B.L;
  const int tid = tl_tid, lane = tid % 32;
  const unsigned bit = 1u << lane;
  Warp& W = *B.warps[tid / 32];
  std::unique_lock<std::mutex> lk(B.m);
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
    B.blocked -= __builtin_popcount(mask) - 1;
    publish(W.gen_a, W.gen);
    lk.unlock();
  } else {
    ++B.blocked;
    B.where[tid] = Where{coll_name(kind, sub), file, line};  // stale once released: read only when all are blocked
    deadlock_check(B);
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

// ---- emulator settings (reatt_kernels._C_emu.emu_config / set_emu_config) ----------------------------------------------
uint64_t emu_seed() { return config().seed; }
uint64_t emu_launches() { return config().launches; }
void set_emu_seed(uint64_t seed) {
  config().seed = seed;
  config().launches = 0;
}
int emu_resident() { return config().resident; }
void set_emu_resident(int n) { config().resident = std::max(1, n); }
bool emu_serial() { return config().serial; }
void set_emu_serial(bool on) { config().serial = on; }
int emu_mma_order() { return config().mma_order; }
void set_emu_mma_order(int order) { config().mma_order = order; }

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
  // The device limits (every architecture since sm_30): 1024 threads per block, block 1024 x 1024 x 64, grid
  // (2^31 - 1) x 65535 x 65535, no zero dimension.
  if (nthreads == 0 || nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 || n_blocks == 0 ||
      grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    std::fprintf(stderr, "reatt cuda_emu: launch of %s at %s:%d: block (%u,%u,%u) / grid (%u,%u,%u) outside the device "
                 "limits\n", name, file, line, block.x, block.y, block.z, grid.x, grid.y, grid.z);
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
  Config& cfg = config();
  LaunchState S;
  S.name = name;
  S.func = func;
  S.file = file;
  S.line = line;
  S.grid = grid;
  S.block = block;
  S.nthreads = static_cast<int>(nthreads);
  S.n_blocks = n_blocks;
  S.launch_no = cfg.launches++;
  S.seed = splitmix(cfg.seed.load() ^ splitmix(S.launch_no));
  tl_launch_no = S.launch_no;
  const bool serial = cfg.serial;
  if (!serial && n_blocks > 1) {  // a random order: k -> (a k + b) mod n with gcd(a, n) = 1 is a permutation
    uint64_t r = S.seed;
    do {
      r = splitmix(r);
      S.perm_a = 1 + r % (n_blocks - 1 ? n_blocks - 1 : 1);
    } while (std::gcd(S.perm_a, n_blocks) != 1);
    S.perm_b = splitmix(r) % n_blocks;
  }
  const int resident = static_cast<int>(std::min<uint64_t>(serial ? 1 : cfg.resident.load(), n_blocks));
  const int nwarps = static_cast<int>((nthreads + 31) / 32);
#ifdef REATT_EMU_ASAN
  const size_t alloc = smem;  // exact: ASan reports any byte past it
#else
  const size_t alloc = smem + kGuard;
#endif
  for (int k = 0; k < resident; ++k) {
    S.blocks.emplace_back(new Block());
    Block& B = *S.blocks.back();
    B.L = &S;
    B.slot = k;
    for (int w = 0; w < nwarps; ++w) {
      B.warps.emplace_back(new Warp());
      const int lanes = std::min<int>(32, static_cast<int>(nthreads) - 32 * w);
      B.warps.back()->present = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    }
    B.where.resize(nthreads);
    B.smem_size = smem;
    void* buf = nullptr;
    if (posix_memalign(&buf, 128, std::max<size_t>(alloc, 1)) != 0) die("out of memory for shared memory");
    B.smem = static_cast<unsigned char*>(buf);
    B.cur = next_block(S);
    reset_block(B);
  }
  std::vector<std::thread> threads;
  threads.reserve(nthreads * resident);
  for (int k = 0; k < resident; ++k)
    for (int t = 0; t < S.nthreads; ++t) threads.emplace_back(run_thread, S.blocks[k].get(), t, &body);
  for (auto& t : threads) t.join();
  for (auto& Bp : S.blocks) {
    std::free(Bp->smem);
    for (auto& st : Bp->statics) std::free(st.p);
  }
  if (!S.fault.empty()) {
    std::fprintf(stderr, "reatt cuda_emu: %s (REATT_EMU_SEED=%llu, launch %llu)\n", S.fault.c_str(),
                 static_cast<unsigned long long>(cfg.seed.load()), static_cast<unsigned long long>(S.launch_no));
    set_error(S.fault_code);
  }
}

// ---- barriers and collectives ---------------------------------------------------------------------------------------
void* dynamic_smem() {
  if (tl_block == nullptr) die("dynamic shared memory used outside a kernel");
  return tl_block->smem;
}

void* static_smem(const void* key, size_t bytes, size_t align) {
  if (tl_block == nullptr) die("static shared memory used outside a kernel");
  Block& B = *tl_block;
  std::lock_guard<std::mutex> lk(B.m);
  for (auto& s : B.statics)
    if (s.key == key) return s.p;
  // First use in this resident block: allocated exactly (ASan sees an overrun), poisoned like the dynamic buffer;
  // reset_block poisons it again before every later block.
  void* p = nullptr;
  if (posix_memalign(&p, std::max<size_t>(align, 16), std::max<size_t>(bytes, 1)) != 0)
    die("out of memory for static shared memory");
  std::memset(p, kPoison, bytes);
  B.statics.push_back(StaticSmem{key, static_cast<unsigned char*>(p), bytes});
  return p;
}

bool launch_bounds_exceeded(int max_threads, const char* file, int line) {
  if (tl_block == nullptr) die("REATT_EMU_LAUNCH_BOUNDS used outside a kernel");
  LaunchState& S = *tl_block->L;
  if (S.nthreads <= max_threads) return false;
  fault(S, "launch with " + std::to_string(S.nthreads) + " threads per block, above the kernel's __launch_bounds__(" +
               std::to_string(max_threads) + ") at " + file + ":" + std::to_string(line) +
               " (a GPU refuses the launch: too many resources requested)",
        cudaErrorLaunchOutOfResources);
  return true;
}

namespace {
const char* barrier_name(int kind) {
  return kind == 0 ? "__syncthreads" : kind == 1 ? "__syncthreads_or" : kind == 2 ? "__syncthreads_and"
                                                                                   : "__syncthreads_count";
}
}  // namespace

int block_barrier(int kind, int pred, const char* file, int line) {
  Block* Bp = tl_block;
  if (Bp == nullptr) die(std::string("__syncthreads called outside a kernel at ") + file + ":" + std::to_string(line));
  Block& B = *Bp;
  std::unique_lock<std::mutex> lk(B.m);
  const uint64_t gen = B.bar_gen;
  if (B.bar_arrived == 0) {
    B.acc_or = 0;
    B.acc_and = 1;
    B.acc_count = 0;
    B.bar_kind = kind;
    B.bar_file = file;
    B.bar_line = line;
  } else if (B.bar_kind != kind || B.bar_line != line || std::strcmp(B.bar_file, file) != 0) {
    // Undefined behaviour on a GPU (it may hang, or silently pair the two barriers): all threads of a block must
    // reach the same __syncthreads, of the same kind.
    die("divergent barrier in " + kernel_desc(*B.L) + ": " + std::to_string(B.bar_arrived) + " thread(s) wait in " +
        barrier_name(B.bar_kind) + " at " + B.bar_file + ":" + std::to_string(B.bar_line) + ", thread " +
        std::to_string(tl_tid) + " arrived at " + barrier_name(kind) + " at " + file + ":" + std::to_string(line));
  }
  B.acc_or |= pred;
  B.acc_and &= pred;
  B.acc_count += pred;
  ++B.bar_arrived;
  if (B.bar_arrived == B.live) {
    maybe_complete_barrier(B, B.bar_arrived - 1);
    lk.unlock();
  } else {
    ++B.blocked;
    B.where[tl_tid] = Where{barrier_name(kind), file, line};
    deadlock_check(B);
    lk.unlock();
    wait_change(B.bar_gen_a, static_cast<int>(gen));
  }
  const int idx = gen & 1;
  return kind == 1 ? B.res_or[idx] : kind == 2 ? B.res_and[idx] : kind == 3 ? B.res_count[idx] : 0;
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
  if (tl_block == nullptr) die(std::string("ldmatrix called outside a kernel at ") + file + ":" + std::to_string(line));
  Block& B = *tl_block;
  LaunchState& S = *B.L;
  collective(
      kCollLdmatrix, trans ? 1 : 0, 0xffffffffu, file, line,
      [&](LaneSlot& s) { s.v = reinterpret_cast<uint64_t>(p); },
      [&](LaneSlot* slots, unsigned) {
        for (int l = 0; l < 32; ++l) {
          const auto* row = reinterpret_cast<const unsigned char*>(slots[l].v);
          if ((slots[l].v & 15u) != 0 || !in_smem(B, row, 16)) {
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
// Products of two halves are exact in fp32; the sum over k runs in fp32, starting from C, in k order (default),
// pairwise, or in reverse k order (REATT_EMU_MMA_ORDER / set_numerics): the hardware's order is unspecified.
void warp_mma_16816(int dtype, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const char* file,
                    int line) {
  const int order = config().mma_order;
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
            float prod[16];  // exact in fp32 (products of two halves)
            for (int k = 0; k < 16; ++k) prod[k] = A[row][k] * B[k][col];
            float acc = C[row][col];
            if (order == 0) {
              for (int k = 0; k < 16; ++k) acc += prod[k];
            } else if (order == 2) {
              for (int k = 15; k >= 0; --k) acc += prod[k];
            } else {  // pairwise: a balanced tree over k, then C
              for (int w = 1; w < 16; w *= 2)
                for (int k = 0; k < 16; k += 2 * w) prod[k] += prod[k + w];
              acc += prod[0];
            }
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
  if (tl_block == nullptr) die("cp.async called outside a kernel");
  Block& B = *tl_block;
  auto* d = static_cast<unsigned char*>(dst);
  if ((reinterpret_cast<uintptr_t>(dst) & 15u) != 0 || (reinterpret_cast<uintptr_t>(src) & 15u) != 0 ||
      !in_smem(B, d, 16)) {
    fault(*B.L, "cp.async: destination outside the dynamic shared memory or an address not 16-byte aligned");
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
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
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
