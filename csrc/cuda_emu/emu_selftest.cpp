// Self-test kernels of the emulator, written in CUDA syntax, exposed through _C_emu for tests/kernels/test_cuda_emu.py: warp
// collectives and block barriers, one mma.m16n8k16 / ldmatrix.x4 per call with caller-supplied fragments (the test
// checks every lane against the PTX ISA tables), the deferred cp.async, the shared-memory limit, and misuse that must
// abort (run in a subprocess by the tests).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../common.h"
#include "emu_runtime.h"

namespace py = pybind11;

namespace reatt {
namespace {

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("reatt: launching ") + what + " failed: " + cudaGetErrorString(e));
}

// out int64 [blockDim, 13] per thread (one block of 64 threads).
__global__ void warp_ops_kernel(int64_t* out) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const unsigned full = 0xffffffffu;
  int64_t* o = out + tid * 13;
  o[0] = __shfl_sync(full, tid * 10, (lane + 3) % 32);
  o[1] = __shfl_xor_sync(full, tid, 5);
  o[2] = __shfl_up_sync(full, tid, 3);
  o[3] = __shfl_down_sync(full, tid, 3);
  o[4] = static_cast<int64_t>(__ballot_sync(full, lane % 3 == 0));
  o[5] = __all_sync(full, lane < 40);
  o[6] = __any_sync(full, lane == 7 && warp == 1);
  o[7] = static_cast<int64_t>(__match_any_sync(full, lane % 5));
  o[8] = __syncthreads_count(tid % 7 == 0);
  o[9] = __syncthreads_or(tid == 63);
  o[10] = __syncthreads_and(tid < 63);
  o[11] = __shfl_sync(full, (static_cast<long long>(tid) << 33) + 1, 0);
  o[12] = __float_as_uint(__shfl_xor_sync(full, 0.5f + tid, 1));
}

// Block/grid indices: out int32 [gx*gy, bx, 4] = (blockIdx.x, blockIdx.y, threadIdx.x, atomicAdd ticket).
__global__ void index_kernel(int32_t* out, int32_t* counter) {
  const int64_t b = blockIdx.y * static_cast<int64_t>(gridDim.x) + blockIdx.x;
  int32_t* o = out + (b * blockDim.x + threadIdx.x) * 4;
  o[0] = static_cast<int32_t>(blockIdx.x);
  o[1] = static_cast<int32_t>(blockIdx.y);
  o[2] = static_cast<int32_t>(threadIdx.x);
  o[3] = atomicAdd(counter, 1);
}

struct MmaArgs {
  const uint32_t* a;  // [32][4]
  const uint32_t* b;  // [32][2]
  const float* c;     // [32][4]
  float* d;           // [32][4]
  int dtype;
};
__global__ void mma_kernel(const MmaArgs p) {
  const int l = threadIdx.x;
  uint32_t a[4];
  float c[4];
  for (int x = 0; x < 4; ++x) {
    a[x] = p.a[l * 4 + x];
    c[x] = p.c[l * 4 + x];
  }
  reatt_emu::warp_mma_16816(p.dtype, c, a, p.b[l * 2], p.b[l * 2 + 1], __FILE__, __LINE__);
  for (int x = 0; x < 4; ++x) p.d[l * 4 + x] = c[x];
}

struct LdmArgs {
  const uint16_t* src;  // [nrows][16] b16 elements, copied to dynamic smem
  const int32_t* row;   // [32] row index each lane points at
  uint32_t* out;        // [32][4]
  int nrows, trans;
};
__global__ void ldmatrix_kernel(const LdmArgs p) {
  REATT_DYNAMIC_SMEM(uint16_t, sm, 16);
  for (int x = threadIdx.x; x < p.nrows * 16; x += blockDim.x) sm[x] = p.src[x];
  __syncthreads();
  uint32_t r[4];
  reatt_emu::warp_ldmatrix_x4(r, sm + p.row[threadIdx.x] * 16, p.trans != 0, __FILE__, __LINE__);
  for (int m = 0; m < 4; ++m) p.out[threadIdx.x * 4 + m] = r[m];
}

// Each lane copies two 16-byte groups; out float [32][4][4]: after issue, after wait_group 1, the second group before
// wait_group 0, after wait_group 0.
__global__ void cp_async_kernel(const float* src, float* out) {
  REATT_DYNAMIC_SMEM(float, sm, 16);
  const int l = threadIdx.x;
  float* o = out + l * 16;
  reatt_emu::cp_async16(sm + l * 4, src + l * 4);
  for (int k = 0; k < 4; ++k) o[k] = sm[l * 4 + k];
  reatt_emu::cp_async_commit();
  reatt_emu::cp_async16(sm + 128 + l * 4, src + 128 + l * 4);
  reatt_emu::cp_async_commit();
  reatt_emu::cp_async_wait(1);
  for (int k = 0; k < 4; ++k) o[4 + k] = sm[l * 4 + k];
  for (int k = 0; k < 4; ++k) o[8 + k] = sm[128 + l * 4 + k];
  reatt_emu::cp_async_wait(0);
  for (int k = 0; k < 4; ++k) o[12 + k] = sm[128 + l * 4 + k];
}

// fp32 -> fp16/bf16 (round to nearest even) -> fp32, elementwise: out16 [n] the bits, back [n] the value.
struct ConvArgs {
  const float* x;
  uint16_t* bits;
  float* back;
  int64_t n;
  int bf16;
};
__global__ void convert_kernel(const ConvArgs p) {
  for (int64_t i = threadIdx.x; i < p.n; i += blockDim.x) {
    if (p.bf16) {
      const __nv_bfloat16 h = __float2bfloat16_rn(p.x[i]);
      std::memcpy(p.bits + i, &h, 2);
      p.back[i] = __bfloat162float(h);
    } else {
      const __half h = __float2half_rn(p.x[i]);
      std::memcpy(p.bits + i, &h, 2);
      p.back[i] = __half2float(h);
    }
  }
}

__global__ void smem_kernel(int n_write) {
  REATT_DYNAMIC_SMEM(unsigned char, sm, 16);
  if (threadIdx.x == 0)
    for (int i = 0; i < n_write; ++i) sm[i] = 1;
}

// A helper around a collective, as the kernels write them: the site recorded is its caller's.
__device__ int helper_sum(int v REATT_SITE_PARAM) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o, 32 REATT_SITE_FWD);
  return v;
}

// Misuse that is undefined behaviour on a GPU; the emulator must abort with the site.
__global__ void misuse_kernel(int kind) {
  const int tid = threadIdx.x, lane = tid % 32;
  if (kind == 0) {  // deadlock: lane 0 and warp 1 wait at __syncthreads, lanes 1-31 at a __syncwarp naming lane 0
    if (tid > 0 && tid < 32)
      __syncwarp();
    else
      __syncthreads();
  } else if (kind == 1) {  // the lanes of a warp call the same collective from two call sites
    int v = 0;
    if (lane < 16)
      v = __shfl_sync(0xffffffffu, lane, 0);
    else
      v = __shfl_sync(0xffffffffu, lane, 0);
    (void)v;
  } else if (kind == 2) {  // a lane named in the mask returns first
    if (lane == 5) return;
    (void)__shfl_xor_sync(0xffffffffu, lane, 1);
  } else if (kind == 3) {  // a divergent __syncthreads: the two warps reach different barriers
    if (tid < 32)
      __syncthreads();
    else
      __syncthreads();
  } else if (kind == 4) {  // __syncthreads mixed with __syncthreads_or at one site
    if (tid < 32) __syncthreads(); else (void)__syncthreads_or(1);
  } else if (kind == 5) {  // one helper, two callers: the helper's collectives carry the callers' sites
    int v = 0;
    if (lane < 16)
      v = helper_sum(lane);
    else
      v = helper_sum(lane);
    (void)v;
  }
}

// __launch_bounds__(64): the first statement refuses a bigger block (the GPU driver would refuse the launch).
__global__ void __launch_bounds__(64) bounded_kernel(int* out) {
  REATT_EMU_LAUNCH_BOUNDS(64);
  atomicAdd(out, 1);
}

// Static shared memory: out int32 [n_blocks, 3] = (the never-written slot's bits, the block's own value read back
// after a barrier, blockIdx.x). A static array shared by every block (the old emulation) fails the second column
// when blocks overlap and keeps the previous block's value in the first.
__global__ void static_smem_kernel(int32_t* out) {
  REATT_SHARED_ARRAY(int32_t, s, 8);
  const int b = blockIdx.x;
  if (threadIdx.x == 0) out[b * 3] = s[7];  // never written by this block
  __syncthreads();
  if (threadIdx.x == 0) s[0] = b;
  __syncthreads();
  for (int k = 0; k < 8; ++k) std::this_thread::yield();  // give a concurrent block time to clobber s[0]
  __syncthreads();
  if (threadIdx.x == 1) {
    out[b * 3 + 1] = s[0];
    out[b * 3 + 2] = b;
  }
  if (threadIdx.x == 0) s[7] = 12345;  // what the next block on this slot would read without the poison
}

// Concurrency: out int64 [n_blocks, 2] = (start ticket, blocks running when this one started); max_running[0] the
// most blocks seen running at once.
__global__ void overlap_kernel(int64_t* out, int* running, int* ticket, int* max_running) {
  const int b = blockIdx.x;
  if (threadIdx.x == 0) {
    const int r = atomicAdd(running, 1) + 1;
    atomicMax(max_running, r);
    out[b * 2] = atomicAdd(ticket, 1);
    out[b * 2 + 1] = r;
  }
  __syncthreads();
  for (int k = 0; k < 8; ++k) std::this_thread::yield();  // hold the block open a little
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(running, -1);
}

py::list selftest_warp_ops() {
  std::vector<int64_t> out(64 * 13, -999);
  REATT_LAUNCH(warp_ops_kernel, 1, 64, 0, nullptr)(out.data());
  check_launch("warp_ops_kernel");
  py::list rows;
  for (int t = 0; t < 64; ++t) {
    py::list r;
    for (int k = 0; k < 13; ++k) r.append(out[t * 13 + k]);
    rows.append(r);
  }
  return rows;
}

void selftest_indices(uintptr_t out, uintptr_t counter, int gx, int gy, int bx) {
  REATT_LAUNCH(index_kernel, dim3(gx, gy), bx, 0, nullptr)(reinterpret_cast<int32_t*>(out),
                                                             reinterpret_cast<int32_t*>(counter));
  check_launch("index_kernel");
}

void selftest_mma(uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d, int dtype) {
  REATT_CHECK(dtype == kFloat16 || dtype == kBFloat16, "emu_selftest_mma: dtype must be float16 or bfloat16");
  MmaArgs p{reinterpret_cast<const uint32_t*>(a), reinterpret_cast<const uint32_t*>(b),
            reinterpret_cast<const float*>(c), reinterpret_cast<float*>(d),
            dtype == kFloat16 ? reatt_emu::kMmaF16 : reatt_emu::kMmaBF16};
  REATT_LAUNCH(mma_kernel, 1, 32, 0, nullptr)(p);
  check_launch("mma_kernel");
}

void selftest_ldmatrix(uintptr_t src, int nrows, uintptr_t rows, uintptr_t out, bool trans) {
  LdmArgs p{reinterpret_cast<const uint16_t*>(src), reinterpret_cast<const int32_t*>(rows),
            reinterpret_cast<uint32_t*>(out), nrows, trans ? 1 : 0};
  REATT_LAUNCH(ldmatrix_kernel, 1, 32, static_cast<size_t>(nrows) * 32, nullptr)(p);
  check_launch("ldmatrix_kernel");
}

void selftest_cp_async(uintptr_t src, uintptr_t out) {
  REATT_LAUNCH(cp_async_kernel, 1, 32, 256 * 4, nullptr)(reinterpret_cast<const float*>(src),
                                                         reinterpret_cast<float*>(out));
  check_launch("cp_async_kernel");
}

// Ask for `smem` bytes (cudaFuncSetAttribute when > 48 KB, as the launchers do), write n_write bytes of it. Returns
// the cudaFuncSetAttribute error code (0 = success) and raises when the launch fails.
int selftest_smem(int64_t smem, int n_write, bool set_attribute) {
  auto kernel = smem_kernel;
  int err = 0;
  if (set_attribute) err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  REATT_LAUNCH(kernel, 1, 32, static_cast<size_t>(smem), nullptr)(n_write);
  check_launch("smem_kernel");
  return err;
}

void selftest_convert(uintptr_t x, uintptr_t bits, uintptr_t back, int64_t n, bool bf16) {
  ConvArgs p{reinterpret_cast<const float*>(x), reinterpret_cast<uint16_t*>(bits), reinterpret_cast<float*>(back), n,
             bf16 ? 1 : 0};
  REATT_LAUNCH(convert_kernel, 1, 64, 0, nullptr)(p);
  check_launch("convert_kernel");
}

int selftest_bounded(int threads) {
  std::vector<int> count(1, 0);
  REATT_LAUNCH(bounded_kernel, 3, threads, 0, nullptr)(count.data());
  check_launch("bounded_kernel");
  return count[0];
}

void selftest_static_smem(uintptr_t out, int n_blocks) {
  REATT_LAUNCH(static_smem_kernel, n_blocks, 32, 0, nullptr)(reinterpret_cast<int32_t*>(out));
  check_launch("static_smem_kernel");
}

int selftest_overlap(uintptr_t out, int n_blocks) {
  std::vector<int> st(3, 0);
  REATT_LAUNCH(overlap_kernel, n_blocks, 64, 0, nullptr)(reinterpret_cast<int64_t*>(out), &st[0], &st[1], &st[2]);
  check_launch("overlap_kernel");
  return st[2];
}

void selftest_launch_dims(int bx, int by, int bz, int64_t gx, int gy) {
  REATT_LAUNCH(smem_kernel, dim3(static_cast<unsigned>(gx), gy), dim3(bx, by, bz), 0, nullptr)(0);
  check_launch("smem_kernel");
}

void selftest_misuse(int kind) {
  REATT_LAUNCH(misuse_kernel, 1, 64, 0, nullptr)(kind);
  check_launch("misuse_kernel");
}

const RegisterBindings kRegister([](py::module_& m) {
  m.def("emu_selftest_warp_ops", &selftest_warp_ops);
  m.def("emu_selftest_indices", &selftest_indices, py::call_guard<py::gil_scoped_release>());
  m.def("emu_selftest_mma", &selftest_mma, py::call_guard<py::gil_scoped_release>(), py::arg("a"), py::arg("b"),
        py::arg("c"), py::arg("d"), py::arg("dtype"));
  m.def("emu_selftest_ldmatrix", &selftest_ldmatrix, py::call_guard<py::gil_scoped_release>(), py::arg("src"),
        py::arg("nrows"), py::arg("rows"), py::arg("out"), py::arg("trans"));
  m.def("emu_selftest_cp_async", &selftest_cp_async, py::call_guard<py::gil_scoped_release>());
  m.def("emu_selftest_smem", &selftest_smem, py::call_guard<py::gil_scoped_release>(), py::arg("smem"),
        py::arg("n_write"), py::arg("set_attribute"));
  m.def("emu_selftest_convert", &selftest_convert, py::call_guard<py::gil_scoped_release>());
  m.def("emu_selftest_misuse", &selftest_misuse, py::call_guard<py::gil_scoped_release>());
  m.def("emu_selftest_bounded", &selftest_bounded, py::call_guard<py::gil_scoped_release>());
  m.def("emu_selftest_static_smem", &selftest_static_smem, py::call_guard<py::gil_scoped_release>());
  m.def("emu_selftest_overlap", &selftest_overlap, py::call_guard<py::gil_scoped_release>());
  m.def("emu_selftest_launch_dims", &selftest_launch_dims, py::call_guard<py::gil_scoped_release>());
});

}  // namespace
}  // namespace reatt
