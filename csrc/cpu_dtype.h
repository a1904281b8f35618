// fp16 / bf16 <-> fp32 on the host, bit-exact: the one copy of the CPU kernels' dtype conversions (the CUDA kernels use
// the device intrinsics through to_f / from_f in cuda_common.cuh). Round to nearest even on the way down; NaN stays
// NaN, an overflow goes to inf.
#pragma once
#include <cstdint>
#include <cstring>

namespace reatt {

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

// Round to nearest even; NaN stays a (quiet) NaN. Branch-free (a select, not an early return) so loops over rows
// vectorise.
inline uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const bool nan = (x & 0x7fffffffu) > 0x7f800000u;
  const uint32_t quiet = (x >> 16) | 0x40u;
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(nan ? quiet : x >> 16);
}

inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 (or inf) rounds to inf
  const uint32_t e = ax >> 23;
  if (ax < 0x38800000u) {  // below 2^-14: a half subnormal, in units of 2^-24
    if (ax < 0x33000000u) return sign;  // < 2^-25 (2^-25 itself ties to even: 0)
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t s = 126u - e;  // 14..24
    uint32_t q = m >> s;
    const uint32_t rem = m & ((1u << s) - 1u), half = 1u << (s - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return sign | static_cast<uint16_t>(q);
  }
  uint32_t h = ((e - 112u) << 10) | ((ax & 0x7fffffu) >> 13);
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is the correct rounding
  return sign | static_cast<uint16_t>(h);
}

}  // namespace reatt
