// Shared plumbing of the CUDA sources (csrc/*/*.cu): the CUDA headers (or their CPU emulation), error checks, dtype
// conversion, device limits and the shared-memory opt-in. Every .cu file includes this header instead of writing its own.
//
// Under REATT_CUDA_EMU (reatt_kernels._C_emu) the same text compiles as host C++ against csrc/cuda_emu/emu_runtime.h:
// the runtime calls below are then the emulator's, and the device limits are the emulated device's
// (set_device_limits), so the launch planning is tested against every device size on a CPU.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"
#include "cuda_emu/emu_runtime.h"  // the CUDA headers (nvcc), or the CPU emulation (REATT_CUDA_EMU, for tests)

namespace reatt {

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

// ---- dtype conversion: the kernels load T, compute in fp32 and store T (round to nearest even) -----------------------
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
__host__ __device__ __forceinline__ int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- the current device ------------------------------------------------------------------------------------------------
// Launch plans are functions of these two numbers (and the shapes), so they are passed into the plan functions rather
// than queried inside them: a test can then ask for the plan of any device.
struct DeviceLimits {
  int sm_count;      // streaming multiprocessors (132 on an H100 SXM)
  int64_t smem_optin;  // dynamic shared memory one block may opt into (227 KB H100, 163 KB A100, 99 KB sm_86/sm_89)
};

inline DeviceLimits current_device_limits() {
  int dev = 0, sms = 0, smem = 0;
  REATT_CUDA_CHECK(cudaGetDevice(&dev));
  REATT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  REATT_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return DeviceLimits{sms, smem};
}

// Ask for `bytes` of dynamic shared memory for `kernel` (the opt-in needed above the 48 KB default; asked always, so a
// kernel's attribute never keeps a stale value). Above the device's opt-in limit this throws, never a failed launch.
template <typename Kernel>
inline void set_dynamic_smem(Kernel kernel, size_t bytes, const char* name) {
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(bytes));
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the pending error, or the next valid launch would report it
    throw std::runtime_error(std::string("reatt: ") + name + ": cannot opt in to " + std::to_string(bytes) +
                             " bytes of shared memory: " + cudaGetErrorString(err));
  }
}

// The stream handle a binding receives (torch.cuda.current_stream().cuda_stream; 0 under emulation).
inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

}  // namespace reatt
