// Shared helpers for reatt_kernels._C. No libtorch: tensors cross the boundary as (data pointer, sizes, strides,
// dtype code), and CUDA work runs on the stream handle the caller passes.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace reatt {

// Dtype codes; must match reatt_kernels/_ext.py::DTYPE_CODES.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt32 = 3, kInt64 = 4, kUInt8 = 5, kBool = 6, kInt16 = 7 };

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
    default: return "unknown";
  }
}

#define REATT_CHECK(cond, msg)                                                   \
  do {                                                                           \
    if (!(cond)) throw std::invalid_argument(std::string("reatt: ") + (msg));     \
  } while (0)

// fp16 / bf16 <-> fp32 on the host, bit-exact (round-to-nearest-even on the way down).
inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      u = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

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
