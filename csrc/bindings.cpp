// PYBIND11_MODULE(_C): build info plus every op's thin m.def lines, collected from the per-op source files.
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

#ifdef REATT_WITH_CUDA
namespace reatt {
py::dict cuda_runtime_info();       // csrc/cuda_info.cu
std::string cuda_compiled_archs();  // csrc/cuda_info.cu
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "reatt_kernels compiled kernels (C++ CPU, and CUDA when built); links no libtorch";
  m.def("build_info", []() {
    py::dict info;
#ifdef REATT_WITH_CUDA
    info["cuda"] = true;
    info["cuda_archs"] = REATT_CUDA_ARCHS;  // as requested from CMake, e.g. "80-real,90" (90: SASS + PTX)
    info["cuda_compiled_archs"] = reatt::cuda_compiled_archs();  // what nvcc compiled, e.g. "800,900"
#else
    info["cuda"] = false;
    info["cuda_archs"] = "";
    info["cuda_compiled_archs"] = "";
#endif
#ifdef REATT_WITH_OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    info["compiler"] = __VERSION__;
    return info;
  });
#ifdef REATT_WITH_CUDA
  m.def("cuda_runtime_info", &reatt::cuda_runtime_info,
        "Driver/runtime versions and device count (no context is created unless a device exists)");
#endif
  for (auto& fn : reatt::registrars()) fn(m);
}
