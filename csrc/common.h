// Shared helpers for reatt_kernels._C. No libtorch: tensors cross the boundary as (data pointer, sizes, strides,
// dtype code), and CUDA work runs on the stream handle the caller passes.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace reatt {

// Dtype codes; must match reatt_kernels/_ext.py::DTYPE_CODES.
enum DType : int {
  kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt32 = 3, kInt64 = 4, kUInt8 = 5, kBool = 6, kInt16 = 7, kUInt16 = 8
};

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    case kInt32: return "int32";
    case kInt64: return "int64";
    case kUInt8: return "uint8";
    case kBool: return "bool";
    case kInt16: return "int16";
    case kUInt16: return "uint16";
    default: return "unknown";
  }
}

#define REATT_CHECK(cond, msg)                                                   \
  do {                                                                           \
    if (!(cond)) throw std::invalid_argument(std::string("reatt: ") + (msg));     \
  } while (0)

// Every source file registers its bindings through this list, so adding an op never edits bindings.cpp.
using Registrar = std::function<void(pybind11::module_&)>;
inline std::vector<Registrar>& registrars() {
  static std::vector<Registrar> list;
  return list;
}
struct RegisterBindings {
  explicit RegisterBindings(Registrar fn) { registrars().push_back(std::move(fn)); }
};

}  // namespace reatt
