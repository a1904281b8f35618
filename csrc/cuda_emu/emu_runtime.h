// The one header every .cu file includes for the CUDA runtime, in both builds.
//
// * nvcc (REATT_CUDA_EMU undefined): the real CUDA headers, plus the two macros the kernel sources use for the only
//   syntax host C++ lacks: REATT_LAUNCH(kernel, grid, block, smem, stream)(args...) = kernel<<<...>>>(args...), and
//   REATT_DYNAMIC_SMEM(T, name, align) = extern __shared__ __align__(align) T name[].
// * host C++ (REATT_CUDA_EMU defined; g++/clang++ -std=c++17, no nvcc): a CPU emulation of the CUDA execution model,
//   used by the reatt_kernels._C_emu module so the unchanged kernels run (and are tested) on every commit.
//
// Emulation model (a test tool, not a fast path):
// * Every CUDA thread is a real OS thread (std::thread), so ThreadSanitizer sees real concurrency. Several blocks are
//   resident at once (REATT_EMU_RESIDENT, default 3), each on its own group of blockDim threads with its own barriers,
//   warps and shared memory; the resident groups take the grid's blocks in a random order (a seeded permutation) and
//   start with seeded jitter, so blocks really overlap and race. REATT_EMU_SEED=<n> fixes the seed (it is printed on
//   every abort and, by tests/conftest.py, on every failed test); REATT_EMU_SERIAL=1 runs one block at a time, in
//   order, for debugging. Launches are serialised by a global mutex.
// * threadIdx/blockIdx/blockDim/gridDim are thread-local. __syncthreads and its _or/_and/_count forms are real barriers
//   (a mutex-guarded count + a futex on a generation counter); exited threads stop counting, as on hardware. Every
//   barrier records its call site and kind: threads of one block that meet at different sites or kinds (a divergent
//   __syncthreads, or __syncthreads mixed with __syncthreads_or) abort with the kernel and both sites.
// * Warp collectives (__shfl*_sync, __all/__any/__ballot/__match_any_sync, __syncwarp, ldmatrix, mma) rendezvous
//   through a double-buffered per-warp slot array: every lane named in the mask must arrive at the same call site
//   (file:line, taken with __builtin_FILE/__builtin_LINE at the caller; a helper such as warp_sum takes
//   REATT_SITE_PARAM and passes REATT_SITE_FWD on, so the site is its caller's); anything else aborts with the kernel,
//   file and line. A lane that exited while named in a mask aborts too. When no thread of a block can run (all wait at
//   barriers or collectives that cannot complete), the emulator aborts with where each thread waits, instead of
//   hanging.
// * Shared memory is per resident block and poisoned at EVERY block start with the byte 0x7B: as fp32 or bf16 that is
//   ~1.3e36 and as fp16 61280 (huge, finite: it wins any max and swamps any sum, where a NaN would be skipped by fmaxf),
//   and as int32/int16/int8 it is 2071690107/31611/123 (far out of range for an index; never the -1 "skip" sentinel).
//   The dynamic `extern __shared__` buffer (REATT_DYNAMIC_SMEM) is heap-allocated at exactly the launch's size: under
//   ASan an overrun is a heap-buffer-overflow report; otherwise 64 guard bytes follow it and a write into them fails
//   the launch with cudaErrorIllegalAddress. Static shared arrays are declared with REATT_SHARED_ARRAY(T, name, n)
//   (a plain `__shared__` is a compile error under emulation: a `static` would be one array for every block).
// * cp.async (16 B, commit_group, wait_group N) is deferred: the source is read and the destination poisoned (0x7B)
//   when the copy is issued; the data lands when the issuing thread waits for its group, so a missing wait or barrier
//   reads the poison on every run, whichever element is lost. ldmatrix.x4 and mma.m16n8k16 (f16/bf16 -> f32) gather
//   the warp's lanes and use the PTX ISA fragment layouts (asserted lane by lane in tests/kernels/test_cuda_emu.py against
//   tables typed out from the ISA). The mma sums its 16 products in k order, pairwise or in reverse k order
//   (REATT_EMU_MMA_ORDER=seq|pairwise|reverse): the tensor cores' order is unspecified, so tests must pass in each.
// * Launch checks, like the driver's: block and grid dimensions within the device limits (1024 threads, 1024 x 1024 x
//   64, grid 2^31-1 x 65535 x 65535), dynamic shared memory within the default 48 KB or the cudaFuncSetAttribute
//   opt-in (itself within the device's), and threads per block within the kernel's __launch_bounds__ (a kernel with
//   bounds starts with REATT_EMU_LAUNCH_BOUNDS(n); tests/kernels/test_cuda_emu.py checks that n matches the attribute). A
//   violation fails the launch (cudaErrorLaunchOutOfResources / InvalidConfiguration / InvalidValue). Registers per
//   thread cannot be checked: the host compiler allocates none.
// * Host API: errors are thread-local and cleared by cudaGetLastError. The SM count and the opt-in limit are set by
//   reatt_kernels._C_emu.set_device_limits().
#pragma once

#ifndef REATT_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define REATT_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define REATT_DYNAMIC_SMEM(T, name, align) extern __shared__ __align__(align) T name[]
#define REATT_SHARED_ARRAY(T, name, n) __shared__ T name[n]
#define REATT_EMU_LAUNCH_BOUNDS(n) \
  do {                             \
  } while (0)
// A device helper that wraps a collective or a barrier takes the caller's site under emulation (nothing on a GPU):
//   __device__ float warp_sum(float v REATT_SITE_PARAM) { ... __shfl_xor_sync(m, v, o, 32 REATT_SITE_FWD) ... }
#define REATT_SITE_PARAM
#define REATT_SITE_FWD
#define REATT_SITE_ONLY
#else  // ---- emulation ------------------------------------------------------------------------------------------------

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// A `static` array would be ONE array for every block of every launch (and keep the previous block's values): under
// emulation a plain __shared__ declaration is an error (-Werror=deprecated-declarations in CMakeLists.txt).
#define __shared__ \
  __attribute__((deprecated("declare static shared memory with REATT_SHARED_ARRAY(T, name, n) (per block, poisoned)"))) static
#define REATT_EMU_SITE const char *emu_file_ = __builtin_FILE(), int emu_line_ = __builtin_LINE()
#define REATT_EMU_SITE_ARGS emu_file_, emu_line_
#define REATT_SITE_PARAM , REATT_EMU_SITE
#define REATT_SITE_FWD , emu_file_, emu_line_
#define REATT_SITE_ONLY emu_file_, emu_line_

// ---- vector and index types ---------------------------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

// ---- half / bfloat16 (own minimal types: conversions only, round-to-nearest-even) ----------------------------------------
struct __half {
  uint16_t __x;
};
struct __nv_bfloat16 {
  uint16_t __x;
};

namespace reatt_emu {
inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1f) return u2f(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    // subnormal or zero: mant * 2^-24, exact in fp32
    const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return u2f(sign | ((exp + 112) << 23) | (mant << 13));
}
inline uint16_t float_to_half_bits(float f) {
  const uint32_t u = f2u(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u);  // NaN (quiet) / inf
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                        // below the smallest normal half (2^-14): subnormal or zero
    // value / 2^-24, rounded to nearest even, is the subnormal mantissa (may round up to the smallest normal)
    const float v = u2f(a) * 16777216.0f;  // exact (power of two scaling)
    return sign | static_cast<uint16_t>(std::nearbyint(v));
  }
  // normal: drop 13 mantissa bits with round-to-nearest-even
  const uint32_t rebias = a - (112u << 23);
  const uint32_t lsb = (rebias >> 13) & 1u;
  return sign | static_cast<uint16_t>((rebias + 0xfffu + lsb) >> 13);
}
inline float bf16_bits_to_float(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = f2u(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  const uint32_t lsb = (u >> 16) & 1u;
  return static_cast<uint16_t>((u + 0x7fffu + lsb) >> 16);
}
}  // namespace reatt_emu

inline float __half2float(__half h) { return reatt_emu::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) { return __half{reatt_emu::float_to_half_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return reatt_emu::bf16_bits_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{reatt_emu::float_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

// ---- device math ----------------------------------------------------------------------------------------------------------
// CUDA's min/max are overloaded for every integer and float type; one template with the usual conversions does the same.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline unsigned __float_as_uint(float f) { return reatt_emu::f2u(f); }
inline float __uint_as_float(unsigned u) { return reatt_emu::u2f(u); }
inline int __float_as_int(float f) { return static_cast<int>(reatt_emu::f2u(f)); }
inline float __int_as_float(int i) { return reatt_emu::u2f(static_cast<unsigned>(i)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// ---- host runtime API -------------------------------------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace reatt_emu {
// Emulated device (defaults: an H100: 132 SMs, 227 KB opt-in shared memory per block).
struct DeviceLimits {
  int sm_count = 132;
  int smem_optin = 227 * 1024;
  int smem_default = 48 * 1024;
};
DeviceLimits& device_limits();
// Emulator settings (initial values from REATT_EMU_SEED / _RESIDENT / _SERIAL / _MMA_ORDER). Setting the seed restarts
// the launch count, so a test that sets it at its start replays the same block orders.
uint64_t emu_seed();
uint64_t emu_launches();
void set_emu_seed(uint64_t seed);
int emu_resident();
void set_emu_resident(int n);
bool emu_serial();
void set_emu_serial(bool on);
int emu_mma_order();  // 0 k order, 1 pairwise, 2 reverse k
void set_emu_mma_order(int order);
cudaError_t& last_error();  // thread-local, like the CUDA runtime's
cudaError_t set_error(cudaError_t e);
cudaError_t func_set_attribute(const void* fn, cudaFuncAttribute attr, int value);
}  // namespace reatt_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = reatt_emu::last_error();
  reatt_emu::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return reatt_emu::last_error(); }
const char* cudaGetErrorString(cudaError_t e);
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  return reatt_emu::func_set_attribute(reinterpret_cast<const void*>(fn), attr, value);
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

// ---- execution model ------------------------------------------------------------------------------------------------------
namespace reatt_emu {

// Barriers and collectives (all defined in emu_runtime.cpp).
int block_barrier(int kind, int pred, const char* file, int line);  // kind: 0 plain, 1 or, 2 and, 3 count
void* dynamic_smem();
uint64_t warp_shfl(int kind, unsigned mask, uint64_t v, int arg, int width, const char* file, int line);
unsigned warp_vote(int kind, unsigned mask, int pred, const char* file, int line);
unsigned warp_match_any(unsigned mask, uint64_t v, const char* file, int line);
void warp_ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans, const char* file, int line);
void warp_mma_16816(int dtype, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const char* file,
                    int line);
void* static_smem(const void* key, size_t bytes, size_t align);
bool launch_bounds_exceeded(int max_threads, const char* file, int line);
void cp_async16(void* dst, const void* src);
void cp_async_commit();
void cp_async_wait(int n);

enum ShflKind { kShflIdx = 0, kShflXor = 1, kShflUp = 2, kShflDown = 3 };
enum VoteKind { kVoteAll = 0, kVoteAny = 1, kVoteBallot = 2, kSyncWarp = 3 };
enum MmaDtype { kMmaF16 = 0, kMmaBF16 = 1 };

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 64 bits");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// A kernel launch: REATT_LAUNCH(kernel, grid, block, smem, stream)(args...). The arguments are copied once; every
// emulated thread calls the kernel with its own copy (kernels take their parameters by value).
void launch_impl(const char* name, const char* func, const char* file, int line, const void* fn, dim3 grid,
                 dim3 block, size_t smem, const std::function<void()>& body);

template <typename... P>
struct Launch {
  const char* name;
  const char* func;  // the launching function (with its template arguments), for messages
  const char* file;
  int line;
  void (*fn)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto f = fn;
    launch_impl(name, func, file, line, reinterpret_cast<const void*>(fn), grid, block, smem,
                [&params, f]() {
                  std::tuple<std::decay_t<P>...> mine = params;
                  std::apply(f, mine);
                });
  }
};
template <typename... P>
inline Launch<P...> make_launch(const char* name, const char* func, const char* file, int line, void (*fn)(P...),
                                dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  return Launch<P...>{name, func, file, line, fn, grid, block, smem};
}
}  // namespace reatt_emu

#define REATT_LAUNCH(kernel, grid, block, smem, stream) \
  ::reatt_emu::make_launch(#kernel, __PRETTY_FUNCTION__, __FILE__, __LINE__, kernel, dim3(grid), dim3(block), (smem), \
                           (stream))
#define REATT_DYNAMIC_SMEM(T, name, align) T* name = static_cast<T*>(::reatt_emu::dynamic_smem())
// Per resident block, poisoned at every block start; the key (one static byte per declaration) names the array.
#define REATT_SHARED_ARRAY(T, name, n)                                                                 \
  static const char reatt_emu_key_##name = 0;                                                          \
  T(&name)[n] = *static_cast<T(*)[n]>(::reatt_emu::static_smem(&reatt_emu_key_##name, sizeof(T[n]), \
                                                                alignof(T)))
// First statement of a kernel declared with __launch_bounds__(n): a launch with more threads per block fails (as
// cudaErrorLaunchOutOfResources on a GPU) and no thread runs the body.
#define REATT_EMU_LAUNCH_BOUNDS(n) \
  if (::reatt_emu::launch_bounds_exceeded((n), __FILE__, __LINE__)) return

// ---- device intrinsics --------------------------------------------------------------------------------------------------
inline void __syncthreads(REATT_EMU_SITE) { reatt_emu::block_barrier(0, 0, REATT_EMU_SITE_ARGS); }
inline int __syncthreads_or(int pred, REATT_EMU_SITE) {
  return reatt_emu::block_barrier(1, pred != 0, REATT_EMU_SITE_ARGS);
}
inline int __syncthreads_and(int pred, REATT_EMU_SITE) {
  return reatt_emu::block_barrier(2, pred != 0, REATT_EMU_SITE_ARGS);
}
inline int __syncthreads_count(int pred, REATT_EMU_SITE) {
  return reatt_emu::block_barrier(3, pred != 0, REATT_EMU_SITE_ARGS);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, REATT_EMU_SITE) {
  reatt_emu::warp_vote(reatt_emu::kSyncWarp, mask, 0, REATT_EMU_SITE_ARGS);
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32, REATT_EMU_SITE) {
  return reatt_emu::from_bits<T>(
      reatt_emu::warp_shfl(reatt_emu::kShflIdx, mask, reatt_emu::to_bits(v), src, width, REATT_EMU_SITE_ARGS));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, REATT_EMU_SITE) {
  return reatt_emu::from_bits<T>(
      reatt_emu::warp_shfl(reatt_emu::kShflXor, mask, reatt_emu::to_bits(v), lane_mask, width, REATT_EMU_SITE_ARGS));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, REATT_EMU_SITE) {
  return reatt_emu::from_bits<T>(reatt_emu::warp_shfl(reatt_emu::kShflUp, mask, reatt_emu::to_bits(v),
                                                      static_cast<int>(delta), width, REATT_EMU_SITE_ARGS));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, REATT_EMU_SITE) {
  return reatt_emu::from_bits<T>(reatt_emu::warp_shfl(reatt_emu::kShflDown, mask, reatt_emu::to_bits(v),
                                                      static_cast<int>(delta), width, REATT_EMU_SITE_ARGS));
}
inline int __all_sync(unsigned mask, int pred, REATT_EMU_SITE) {
  return static_cast<int>(reatt_emu::warp_vote(reatt_emu::kVoteAll, mask, pred != 0, REATT_EMU_SITE_ARGS));
}
inline int __any_sync(unsigned mask, int pred, REATT_EMU_SITE) {
  return static_cast<int>(reatt_emu::warp_vote(reatt_emu::kVoteAny, mask, pred != 0, REATT_EMU_SITE_ARGS));
}
inline unsigned __ballot_sync(unsigned mask, int pred, REATT_EMU_SITE) {
  return reatt_emu::warp_vote(reatt_emu::kVoteBallot, mask, pred != 0, REATT_EMU_SITE_ARGS);
}
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T v, REATT_EMU_SITE) {
  return reatt_emu::warp_match_any(mask, reatt_emu::to_bits(v), REATT_EMU_SITE_ARGS);
}

// Atomics: compare-and-swap loops on the value's bits (global and shared memory alike).
template <typename T>
inline T reatt_emu_atomic_rmw(T* addr, T (*op)(T, T), T val) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomics on 4- or 8-byte values only");
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  U* p = reinterpret_cast<U*>(addr);
  U old = __atomic_load_n(p, __ATOMIC_RELAXED);
  for (;;) {
    T cur;
    std::memcpy(&cur, &old, sizeof(T));
    const T nv = op(cur, val);
    U nu;
    std::memcpy(&nu, &nv, sizeof(T));
    if (__atomic_compare_exchange_n(p, &old, nu, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return cur;
  }
}
template <typename T>
inline T atomicAdd(T* addr, T val) {
  return reatt_emu_atomic_rmw<T>(addr, [](T a, T b) { return static_cast<T>(a + b); }, val);
}
template <typename T>
inline T atomicMax(T* addr, T val) {
  return reatt_emu_atomic_rmw<T>(addr, [](T a, T b) { return a < b ? b : a; }, val);
}
template <typename T>
inline T atomicMin(T* addr, T val) {
  return reatt_emu_atomic_rmw<T>(addr, [](T a, T b) { return b < a ? b : a; }, val);
}
template <typename T>
inline T atomicExch(T* addr, T val) {
  return reatt_emu_atomic_rmw<T>(addr, [](T, T b) { return b; }, val);
}
template <typename T>
inline T atomicCAS(T* addr, T compare, T val) {
  T expected = compare;
  __atomic_compare_exchange_n(addr, &expected, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;
}

// Shared-memory addresses: under emulation a shared "address" is the pointer itself (only ever handed back to the
// emulated PTX twins, which take the generic pointer).
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }

#endif  // REATT_CUDA_EMU
