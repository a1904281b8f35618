// Device query for available_backends(): runtime/driver versions and device count, with the CUDA error string when
// the query fails (no driver, no device), so Python can report *why* the cuda backend cannot run.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

namespace reatt {

// The architectures nvcc compiled this file for (its __CUDA_ARCH_LIST__, e.g. "800,900"): what the binary holds, as
// opposed to what CMake was asked for.
#define REATT_STR2(...) #__VA_ARGS__
#define REATT_STR(...) REATT_STR2(__VA_ARGS__)
std::string cuda_compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  return REATT_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

py::dict cuda_runtime_info() {
  py::dict info;
  int runtime = 0, driver = 0, count = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  info["runtime_version"] = runtime;
  info["driver_version"] = driver;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    info["device_count"] = 0;
    info["error"] = std::string(cudaGetErrorString(err));
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return info;
  }
  info["device_count"] = count;
  py::list devices;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, i) == cudaSuccess) {
      py::dict d;
      d["name"] = std::string(prop.name);
      d["cc"] = prop.major * 10 + prop.minor;
      d["sms"] = prop.multiProcessorCount;
      d["total_mem"] = static_cast<size_t>(prop.totalGlobalMem);
      devices.append(d);
    }
  }
  info["devices"] = devices;
  return info;
}

}  // namespace reatt
