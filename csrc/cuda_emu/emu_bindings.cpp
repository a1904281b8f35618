// PYBIND11_MODULE(_C_emu): the CUDA kernels of csrc/**/*.cu compiled as host C++ against the CPU emulation of the CUDA
// execution model (emu_runtime.h). The bindings are the .cu files' own (same names as in _C, CPU pointers, stream 0),
// collected through reatt::registrars() like _C's, plus the emulated device's limits and the runtime's self-tests.
#include <pybind11/pybind11.h>

#include "../common.h"
#include "emu_runtime.h"

namespace py = pybind11;

PYBIND11_MODULE(_C_emu, m) {
  m.doc() = "reatt_kernels CUDA kernels under CPU emulation (a test tool: every CUDA thread is an OS thread)";
  m.def("build_info", []() {
    py::dict info;
    info["cuda_emu"] = true;
#if defined(__SANITIZE_ADDRESS__)
    info["asan"] = true;
#else
    info["asan"] = false;
#endif
#if defined(__SANITIZE_THREAD__)
    info["tsan"] = true;
#else
    info["tsan"] = false;
#endif
    info["compiler"] = __VERSION__;
    return info;
  });
  m.def(
      "set_device_limits",
      [](py::object smem_optin, py::object sm_count) {
        auto& d = reatt_emu::device_limits();
        if (!smem_optin.is_none()) {
          const int v = smem_optin.cast<int>();
          REATT_CHECK(v >= 48 * 1024, "set_device_limits: smem_optin must be >= 49152 bytes");
          d.smem_optin = v;
        }
        if (!sm_count.is_none()) {
          const int v = sm_count.cast<int>();
          REATT_CHECK(v >= 1, "set_device_limits: sm_count must be >= 1");
          d.sm_count = v;
        }
        py::dict out;
        out["smem_optin"] = d.smem_optin;
        out["sm_count"] = d.sm_count;
        return out;
      },
      "Set the emulated device's opt-in shared memory per block (bytes) and SM count; returns the current values",
      py::arg("smem_optin") = py::none(), py::arg("sm_count") = py::none());
  m.def("get_last_error", []() { return static_cast<int>(cudaGetLastError()); },
        "cudaGetLastError() on the calling thread (returns and clears the pending error code)");
  for (auto& fn : reatt::registrars()) fn(m);
}
