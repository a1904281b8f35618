// CPU roofline probes: this machine's peak dot-product rate and its streaming read bandwidth, measured in the caller's
// process (reatt_kernels/bench/util.py::roofline), so a benchmark's "% of roofline" compares a kernel with the
// hardware as it runs now, not with a datasheet or with a library's matmul.
//
// - cpu_peak_flops("bf16dp"): VDPBF16PS zmm (AVX512_BF16), 64 FLOP per instruction (16 fp32 lanes x 2 bf16 products x
//   multiply + add). This is the instruction the C++ MaxSim screens with, so it is its compute ceiling.
// - cpu_peak_flops("fma32"): VFMADD zmm (AVX-512, 32 FLOP), else ymm (AVX2 + FMA, 16 FLOP), else a portable loop.
//   Each thread runs a register-resident loop of independent accumulators, enough to cover the instruction's latency
//   at two issues per cycle (24 zmm: 2 ports x up to 6 cycles on Zen 4/5 and Ice Lake..Sapphire Rapids; 12 ymm).
// - cpu_read_bandwidth: a streaming read of a buffer much larger than the last-level cache, loads summed into 8
//   accumulators per thread, split across threads in contiguous chunks.
// Every probe times with std::chrono::steady_clock and keeps the best of several rounds: other processes on a shared
// machine only ever slow a round down, so the fastest round is the closest to the hardware limit.
//
// Measured on an AMD EPYC Zen 5 VM (2 cores): bf16dp ~420 GFLOP/s per core, fma32 ~210 GFLOP/s per core.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

// The SIMD probes need GCC's target attributes on x86-64 (as csrc/maxsim/maxsim_cpu.cpp); elsewhere only the portable
// loops build.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define REATT_ROOF_X86 1
#include <immintrin.h>
#else
#define REATT_ROOF_X86 0
#endif

#ifdef __linux__
#include <sys/mman.h>
#endif

#ifdef REATT_WITH_OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "cpu_isa.h"

namespace py = pybind11;

namespace reatt {
namespace roofline_cpu {

using Clock = std::chrono::steady_clock;

static double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// ---- the compute kernels: `iters` iterations of N_ACC independent instructions, all operands in registers ------------
// Why the accumulators start at distinct values: the same instruction applied to equal inputs would let the compiler
// merge the chains into one (common-subexpression elimination), leaving a single latency-bound chain.
// Why the empty asm on `a`: the compiler must treat it as changed every iteration, so it can neither hoist nor fold the
// loop into a closed form. The sum of the accumulators is returned and reported, so no chain is dead code.
// Why these operand values: bf16 1/64 products and the FMA fixed point b / (1 - a) ~ 1000 keep every accumulator
// normal (no subnormal slow path) and finite for any run length.

#if REATT_ROOF_X86
constexpr int kAccZmm = 24;
constexpr int kAccYmm = 12;

__attribute__((target("avx512f,avx512bf16"))) static float bf16dp_avx512(int64_t iters) {
  __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.0f / 64), _mm512_set1_ps(1.0f / 64));
  const __m512bh b = a;
  __m512 acc[kAccZmm];
#pragma GCC unroll 24
  for (int k = 0; k < kAccZmm; ++k) acc[k] = _mm512_set1_ps(static_cast<float>(k));
  for (int64_t i = 0; i < iters; ++i) {
    asm volatile("" : "+v"(a));
#pragma GCC unroll 24
    for (int k = 0; k < kAccZmm; ++k) acc[k] = _mm512_dpbf16_ps(acc[k], a, b);
  }
#pragma GCC unroll 24
  for (int k = 1; k < kAccZmm; ++k) acc[0] = _mm512_add_ps(acc[0], acc[k]);
  return _mm512_reduce_add_ps(acc[0]);
}

__attribute__((target("avx512f,fma"))) static float fma32_avx512(int64_t iters) {
  __m512 a = _mm512_set1_ps(0.999999f);
  const __m512 b = _mm512_set1_ps(1e-3f);
  __m512 acc[kAccZmm];
#pragma GCC unroll 24
  for (int k = 0; k < kAccZmm; ++k) acc[k] = _mm512_set1_ps(static_cast<float>(k));
  for (int64_t i = 0; i < iters; ++i) {
    asm volatile("" : "+v"(a));
#pragma GCC unroll 24
    for (int k = 0; k < kAccZmm; ++k) acc[k] = _mm512_fmadd_ps(acc[k], a, b);
  }
#pragma GCC unroll 24
  for (int k = 1; k < kAccZmm; ++k) acc[0] = _mm512_add_ps(acc[0], acc[k]);
  return _mm512_reduce_add_ps(acc[0]);
}

__attribute__((target("avx2,fma"))) static float fma32_avx2(int64_t iters) {
  __m256 a = _mm256_set1_ps(0.999999f);
  const __m256 b = _mm256_set1_ps(1e-3f);
  __m256 acc[kAccYmm];  // 12 + a + b = 14 of the 16 ymm registers
#pragma GCC unroll 12
  for (int k = 0; k < kAccYmm; ++k) acc[k] = _mm256_set1_ps(static_cast<float>(k));
  for (int64_t i = 0; i < iters; ++i) {
    asm volatile("" : "+x"(a));
#pragma GCC unroll 12
    for (int k = 0; k < kAccYmm; ++k) acc[k] = _mm256_fmadd_ps(acc[k], a, b);
  }
#pragma GCC unroll 12
  for (int k = 1; k < kAccYmm; ++k) acc[0] = _mm256_add_ps(acc[0], acc[k]);
  float lanes[8];
  _mm256_storeu_ps(lanes, acc[0]);
  float s = 0.f;
  for (float v : lanes) s += v;
  return s;
}
#endif  // REATT_ROOF_X86

// Portable: 32 fp32 lanes of acc * a + b, which the compiler vectorises for the baseline ISA (SSE2 on x86-64: a
// multiply and an add, no FMA). 2 FLOP per lane per iteration.
constexpr int kPortableLanes = 32;
static float fma32_portable(int64_t iters) {
  float a = 0.999999f;
  const float b = 1e-3f;
  float acc[kPortableLanes];
  for (int k = 0; k < kPortableLanes; ++k) acc[k] = static_cast<float>(k);
  for (int64_t i = 0; i < iters; ++i) {
#if defined(__GNUC__)
    asm volatile("" : "+m"(a));
#endif
    for (int k = 0; k < kPortableLanes; ++k) acc[k] = acc[k] * a + b;
  }
  float s = 0.f;
  for (int k = 0; k < kPortableLanes; ++k) s += acc[k];
  return s;
}

// ---- CPU features ------------------------------------------------------------------------------------------------------
// csrc/cpu_isa.h answers for every CPU kernel (REATT_CPU_ISA_CAP included), so a probe never measures an instruction set
// the kernels it judges would not run.
static bool has_avx512_bf16() { return cpu_isa::best() >= cpu_isa::kAvx512Bf16; }

// ---- argument checks ---------------------------------------------------------------------------------------------------
static int checked_threads(int n_threads) {
  REATT_CHECK(n_threads >= 1, "n_threads must be >= 1, got " + std::to_string(n_threads));
#ifdef REATT_WITH_OPENMP
  return n_threads;
#else
  return 1;  // built without OpenMP: one thread, and the result's "threads" says so
#endif
}

static void check_seconds(double seconds) {
  REATT_CHECK(std::isfinite(seconds) && seconds > 0,
              "seconds must be a finite number > 0, got " + std::to_string(seconds));
}

static int thread_id() {
#ifdef REATT_WITH_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

static int team_size() {
#ifdef REATT_WITH_OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// Rounds: at least kMinRounds, then until `seconds` of timed work; at most kMaxRounds.
constexpr int kMinRounds = 3;
constexpr int kMaxRounds = 100000;

struct Timed {
  double best_s = std::numeric_limits<double>::infinity();
  int rounds = 0;
  int threads = 1;
  double checksum = 0;
};

// Runs `body(tid, nt) -> float` on nt threads in one parallel region, round after round; each round is timed by the
// master between two barriers (the start is stamped before the barrier that releases the workers, so a round never
// looks shorter than the slowest thread's work).
template <class Body>
static Timed time_rounds(int nt, double seconds, Body body) {
  Timed out;
  std::vector<double> sink(static_cast<size_t>(nt), 0.0);
  double total_s = 0;
  bool stop = false;
  Clock::time_point t0;
#ifdef REATT_WITH_OPENMP
#pragma omp parallel num_threads(nt)
#endif
  {
    const int tid = thread_id();
    const int n = team_size();
    for (;;) {
#ifdef REATT_WITH_OPENMP
#pragma omp barrier
#pragma omp master
#endif
      t0 = Clock::now();
#ifdef REATT_WITH_OPENMP
#pragma omp barrier
#endif
      sink[tid] += body(tid, n);
#ifdef REATT_WITH_OPENMP
#pragma omp barrier
#pragma omp master
#endif
      {
        const double t = seconds_since(t0);
        out.best_s = std::min(out.best_s, t);
        total_s += t;
        out.rounds += 1;
        out.threads = n;
        stop = (out.rounds >= kMinRounds && total_s >= seconds) || out.rounds >= kMaxRounds;
      }
#ifdef REATT_WITH_OPENMP
#pragma omp barrier
#endif
      if (stop) break;
    }
  }
  for (double s : sink) out.checksum += s;
  return out;
}

// ---- cpu_peak_flops ----------------------------------------------------------------------------------------------------
struct PeakResult {
  double gflops;
  std::string isa, method;
  int threads;
  double checksum;
};

// `isa`: "auto" (the best path this CPU runs) or a level name (csrc/cpu_isa.h); the tests force every path.
static PeakResult peak_flops(const std::string& kind, int n_threads, double seconds, const std::string& isa_req) {
  REATT_CHECK(kind == "bf16dp" || kind == "fma32", "kind must be 'bf16dp' or 'fma32', got '" + kind + "'");
  const int nt = checked_threads(n_threads);
  check_seconds(seconds);
  float (*kernel)(int64_t) = &fma32_portable;
  double flop_per_iter = 2.0 * kPortableLanes;
  std::string isa = "scalar", what = "32 fp32 lanes of a * x + b (compiler-vectorised, baseline ISA, no FMA)";
  if (kind == "bf16dp") {
    REATT_CHECK(has_avx512_bf16(), "kind='bf16dp' needs VDPBF16PS, but this CPU lacks avx512_bf16 (use kind='fma32')");
    REATT_CHECK(isa_req.empty() || isa_req == "auto" || isa_req == "avx512_bf16",
                "kind='bf16dp' runs only isa 'avx512_bf16' (or 'auto'), got '" + isa_req + "'");
#if REATT_ROOF_X86
    kernel = &bf16dp_avx512;
    flop_per_iter = 64.0 * kAccZmm;
    isa = "avx512_bf16";
    what = "24 independent vdpbf16ps zmm per iteration (64 FLOP each)";
#endif
  } else {
    const int level = cpu_isa::resolve(isa_req, cpu_isa::kAvx512, "cpu_peak_flops");
#if REATT_ROOF_X86
    if (level == cpu_isa::kAvx512) {
      kernel = &fma32_avx512;
      flop_per_iter = 32.0 * kAccZmm;
      isa = "avx512";
      what = "24 independent vfmadd231ps zmm per iteration (32 FLOP each)";
    } else if (level == cpu_isa::kAvx2) {
      kernel = &fma32_avx2;
      flop_per_iter = 16.0 * kAccYmm;
      isa = "avx2";
      what = "12 independent vfmadd231ps ymm per iteration (16 FLOP each)";
    }
#else
    (void)level;
#endif
  }
  // Iterations per round: doubled until one thread's round lasts a hundredth of the budget, between 0.2 ms (the
  // barriers and the clock stay under 1%) and 5 ms (short rounds, many of them: on a shared machine the best one is
  // likely to have had every core to itself). The doubling also warms the core up (clock ramp, AVX-512 power state).
  const double target_s = std::min(5e-3, std::max(2e-4, seconds / 100));
  int64_t iters = 1 << 10;
  double warm_sum = 0;
  for (;;) {
    const auto t0 = Clock::now();
    warm_sum += kernel(iters);
    if (seconds_since(t0) >= target_s || iters >= (int64_t{1} << 40)) break;
    iters *= 2;
  }
  const Timed t = time_rounds(nt, seconds, [&](int, int) { return kernel(iters); });
  PeakResult r;
  r.threads = t.threads;
  r.gflops = flop_per_iter * static_cast<double>(iters) * t.threads / t.best_s / 1e9;
  r.isa = isa;
  r.method = what + ", " + std::to_string(t.threads) + " thread(s), best of " + std::to_string(t.rounds) +
             " rounds of " + std::to_string(iters) + " iterations (steady_clock)";
  r.checksum = t.checksum + warm_sum;
  return r;
}

// ---- cpu_read_bandwidth ------------------------------------------------------------------------------------------------
// Unit of work: a 512-byte block (8 cache lines, 128 floats), read as 8 zmm / 16 ymm loads into 8 accumulators, so
// the adds never limit the loads (at most one 64-byte line per add, two adds per cycle).
constexpr int64_t kBlock = 512;
constexpr int64_t kBlockFloats = kBlock / 4;

#if REATT_ROOF_X86
__attribute__((target("avx512f"))) static float read_avx512(const float* p, int64_t b0, int64_t b1) {
  __m512 acc[8];
  for (int k = 0; k < 8; ++k) acc[k] = _mm512_setzero_ps();
  for (int64_t blk = b0; blk < b1; ++blk) {
    const float* x = p + blk * kBlockFloats;
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) acc[k] = _mm512_add_ps(acc[k], _mm512_load_ps(x + 16 * k));
  }
  for (int k = 1; k < 8; ++k) acc[0] = _mm512_add_ps(acc[0], acc[k]);
  return _mm512_reduce_add_ps(acc[0]);
}

__attribute__((target("avx2"))) static float read_avx2(const float* p, int64_t b0, int64_t b1) {
  __m256 acc[8];
  for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
  for (int64_t blk = b0; blk < b1; ++blk) {
    const float* x = p + blk * kBlockFloats;
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k)
      acc[k] = _mm256_add_ps(acc[k], _mm256_add_ps(_mm256_load_ps(x + 16 * k), _mm256_load_ps(x + 16 * k + 8)));
  }
  for (int k = 1; k < 8; ++k) acc[0] = _mm256_add_ps(acc[0], acc[k]);
  float lanes[8];
  _mm256_storeu_ps(lanes, acc[0]);
  float s = 0.f;
  for (float v : lanes) s += v;
  return s;
}
#endif

static float read_portable(const float* p, int64_t b0, int64_t b1) {
  float acc[16] = {0};
  for (int64_t blk = b0; blk < b1; ++blk) {
    const float* x = p + blk * kBlockFloats;
    for (int64_t i = 0; i < kBlockFloats; i += 16)
      for (int k = 0; k < 16; ++k) acc[k] += x[i + k];
  }
  float s = 0.f;
  for (float v : acc) s += v;
  return s;
}

struct AlignedBuffer {
  void* p = nullptr;
  ~AlignedBuffer() { std::free(p); }
};

struct BandwidthResult {
  double gbps;
  int64_t bytes;
  int threads;
  std::string method;
  double checksum;
};

static BandwidthResult read_bandwidth(int64_t n_bytes, int n_threads, double seconds, const std::string& isa_req) {
  REATT_CHECK(n_bytes >= (int64_t{1} << 20),
              "n_bytes must be >= 1 MiB (1048576), got " + std::to_string(n_bytes));
  const int nt = checked_threads(n_threads);
  check_seconds(seconds);
  // Whole 4 KiB pages: every thread's chunk is whole blocks, and "bytes" reports what one pass reads.
  const int64_t bytes = n_bytes / 4096 * 4096;
  const int64_t n_blocks = bytes / kBlock;
  AlignedBuffer buf;
  // 2 MiB alignment and MADV_HUGEPAGE (a hint; the kernel may refuse): fewer TLB misses, as a large torch tensor gets.
  REATT_CHECK(posix_memalign(&buf.p, size_t{1} << 21, static_cast<size_t>(bytes)) == 0 && buf.p != nullptr,
              "could not allocate n_bytes=" + std::to_string(n_bytes) + " for the read-bandwidth buffer");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(buf.p, static_cast<size_t>(bytes), MADV_HUGEPAGE);
#endif
  float* data = static_cast<float*>(buf.p);

  const char* isa = "scalar";
  float (*reader)(const float*, int64_t, int64_t) = &read_portable;
  const int level = cpu_isa::resolve(isa_req, cpu_isa::kAvx512, "cpu_read_bandwidth");
#if REATT_ROOF_X86
  if (level == cpu_isa::kAvx512) {
    reader = &read_avx512;
    isa = "avx512";
  } else if (level == cpu_isa::kAvx2) {
    reader = &read_avx2;
    isa = "avx2";
  }
#else
  (void)level;
#endif
  // Each thread's contiguous chunk of blocks (the chunks of an OpenMP static schedule), the same in the first touch and
  // in every pass: the page faults happen here, outside the timing, and on a NUMA machine each thread reads pages it
  // placed on its own node.
  auto chunk = [n_blocks](int tid, int n, int64_t* b0, int64_t* b1) {
    *b0 = n_blocks * tid / n;
    *b1 = n_blocks * (tid + 1) / n;
  };
#ifdef REATT_WITH_OPENMP
#pragma omp parallel num_threads(nt)
#endif
  {
    int64_t b0, b1;
    chunk(thread_id(), team_size(), &b0, &b1);
    // Small non-zero values: the sums stay finite and normal; a zero page could be shared copy-on-write by the OS.
    for (int64_t i = b0 * kBlockFloats; i < b1 * kBlockFloats; ++i) data[i] = 1.0f / 1024;
  }
  float warm = 0;  // one untimed pass
#ifdef REATT_WITH_OPENMP
#pragma omp parallel num_threads(nt) reduction(+ : warm)
#endif
  {
    int64_t b0, b1;
    chunk(thread_id(), team_size(), &b0, &b1);
    warm += reader(data, b0, b1);
  }
  const Timed t = time_rounds(nt, seconds, [&](int tid, int n) {
    int64_t b0, b1;
    chunk(tid, n, &b0, &b1);
    return reader(data, b0, b1);
  });
  BandwidthResult r;
  r.bytes = bytes;
  r.threads = t.threads;
  r.gbps = static_cast<double>(bytes) / t.best_s / 1e9;
  r.method = std::string("streaming read of ") + std::to_string(bytes >> 20) + " MiB (" + isa +
             " loads summed into 8 accumulators per thread, contiguous chunk per thread), " +
             std::to_string(t.threads) + " thread(s), bytes read / fastest of " + std::to_string(t.rounds) +
             " passes (steady_clock; buffer touched before timing)";
  r.checksum = t.checksum + warm;
  return r;
}

}  // namespace roofline_cpu

static RegisterBindings roofline_cpu_bindings([](py::module_& m) {
  m.def(
      "cpu_peak_flops",
      [](const std::string& kind, int n_threads, double seconds, const std::string& isa) {
        roofline_cpu::PeakResult r;
        {
          py::gil_scoped_release nogil;
          r = roofline_cpu::peak_flops(kind, n_threads, seconds, isa);
        }
        py::dict d;
        d["GFLOPs"] = r.gflops;
        d["isa"] = r.isa;
        d["threads"] = r.threads;
        d["method"] = r.method;
        d["checksum"] = r.checksum;  // the accumulators' sum: consumed, so no loop is dead code
        return d;
      },
      "Peak dot-product rate of this CPU: kind 'bf16dp' (vdpbf16ps zmm, needs avx512_bf16) or 'fma32' (fp32 FMA: "
      "avx512, else avx2, else scalar), on n_threads threads for about `seconds`; best round. `isa` forces a path "
      "(csrc/cpu_isa.h). Returns {GFLOPs, isa, threads, method, checksum}",
      py::arg("kind"), py::arg("n_threads"), py::arg("seconds"), py::arg("isa") = "auto");
  m.def(
      "cpu_read_bandwidth",
      [](int64_t n_bytes, int n_threads, double seconds, const std::string& isa) {
        roofline_cpu::BandwidthResult r;
        {
          py::gil_scoped_release nogil;
          r = roofline_cpu::read_bandwidth(n_bytes, n_threads, seconds, isa);
        }
        py::dict d;
        d["GBps"] = r.gbps;
        d["bytes"] = r.bytes;
        d["threads"] = r.threads;
        d["method"] = r.method;
        d["checksum"] = r.checksum;
        return d;
      },
      "Streaming read bandwidth: a buffer of n_bytes (>= 1 MiB, rounded down to 4 KiB pages) touched first, then read "
      "by n_threads threads for about `seconds`; fastest pass. `isa` forces a path (csrc/cpu_isa.h). Returns {GBps, "
      "bytes, threads, method, checksum}",
      py::arg("n_bytes"), py::arg("n_threads"), py::arg("seconds"), py::arg("isa") = "auto");
  m.def("cpu_has_avx512_bf16", &roofline_cpu::has_avx512_bf16,
        "Whether this CPU (and OS) runs AVX512_BF16 (vdpbf16ps): the 'bf16dp' probe needs it");
});

}  // namespace reatt
