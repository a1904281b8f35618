// Which instruction-set path a CPU kernel runs: one answer for every CPU kernel of reatt_kernels._C (maxsim,
// residual_maxsim, centroid_interaction, reader_teacher, the roofline probes).
//
// Why one place: the development and CI machines change from AVX2-only Zen 3 to AVX-512 + AVX512_BF16 Zen 5, and a
// path must never be picked by a belief about the hardware. Every dispatcher asks `resolve` here, so
//   - "auto" is the best path the running CPU executes (checked with __builtin_cpu_supports, which also checks that
//     the OS saves the wider register state, XCR0), capped by the best path the kernel has;
//   - a named path (REATT_CPU_ISA, forwarded by the launchers) runs exactly that path, or fails with the
//     instructions the CPU lacks: the tests force every supported path against the float64 oracle;
//   - REATT_CPU_ISA_CAP=<level> makes the whole extension behave as on a CPU whose best level is <level> (an AVX-512
//     machine then runs, tests and reports exactly what an AVX2-only one would). The mutation gate and the test
//     report read the same answer, so "not testable here" means the same everywhere.
//
// Levels are cumulative: each needs every instruction of the levels below it.
//   scalar       the baseline x86-64 (SSE2) code the compiler vectorises; the only path off x86 or off GCC
//   avx2         + avx2, fma, f16c
//   avx512       + avx512f, avx512bw, avx512dq, avx512vl
//   avx512_bf16  + avx512bf16 (vdpbf16ps)
#pragma once

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "common.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define REATT_ISA_X86 1
#else
#define REATT_ISA_X86 0
#endif

namespace reatt {
namespace cpu_isa {

enum Level : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
constexpr int kLevels = 4;
inline const char* const kNames[kLevels] = {"scalar", "avx2", "avx512", "avx512_bf16"};

// The CPU features (as __builtin_cpu_supports names them) each level adds to the one below.
struct Feature {
  const char* name;
  int level;
};
inline const Feature kFeatures[] = {
    {"avx2", kAvx2},         {"fma", kAvx2},          {"f16c", kAvx2},         {"avx512f", kAvx512},
    {"avx512bw", kAvx512},   {"avx512dq", kAvx512},   {"avx512vl", kAvx512},   {"avx512bf16", kAvx512Bf16},
};

inline bool cpu_has(const char* feature) {
#if REATT_ISA_X86
  __builtin_cpu_init();
  // __builtin_cpu_supports takes a string literal only, hence the table.
  const std::string f(feature);
  if (f == "avx2") return __builtin_cpu_supports("avx2");
  if (f == "fma") return __builtin_cpu_supports("fma");
  if (f == "f16c") return __builtin_cpu_supports("f16c");
  if (f == "avx512f") return __builtin_cpu_supports("avx512f");
  if (f == "avx512bw") return __builtin_cpu_supports("avx512bw");
  if (f == "avx512dq") return __builtin_cpu_supports("avx512dq");
  if (f == "avx512vl") return __builtin_cpu_supports("avx512vl");
  if (f == "avx512bf16") return __builtin_cpu_supports("avx512bf16");
#else
  (void)feature;
#endif
  return false;
}

// The highest level whose every feature (and every lower level's) the CPU has.
inline int detected() {
  static const int level = [] {
    int best = kScalar;
    for (int l = kAvx2; l < kLevels; ++l) {
      for (const Feature& f : kFeatures)
        if (f.level <= l && !cpu_has(f.name)) return best;
      best = l;
    }
    return best;
  }();
  return level;
}

inline int level_of(const std::string& name) {
  for (int l = 0; l < kLevels; ++l)
    if (name == kNames[l]) return l;
  return -1;
}

// REATT_CPU_ISA_CAP, read on every call (tests change it between calls); unset or empty = no cap.
inline int cap() {
  const char* env = std::getenv("REATT_CPU_ISA_CAP");
  if (env == nullptr || *env == '\0') return kLevels - 1;
  const int l = level_of(env);
  REATT_CHECK(l >= 0, std::string("REATT_CPU_ISA_CAP must be one of scalar, avx2, avx512, avx512_bf16, got '") + env +
                          "'");
  return l;
}

inline int best() { return std::min(detected(), cap()); }

// The features `level` needs that this CPU lacks (or that REATT_CPU_ISA_CAP hides), comma-separated.
inline std::string missing(int level) {
  std::string out;
  const bool capped = level > cap();
  for (const Feature& f : kFeatures) {
    if (f.level > level) continue;
    if (!cpu_has(f.name) || (capped && f.level > cap())) out += (out.empty() ? "" : ", ") + std::string(f.name);
  }
  if (capped && detected() >= level) out += std::string(" (hidden by REATT_CPU_ISA_CAP=") + kNames[cap()] + ")";
  return out;
}

// The level a kernel runs. `top`: the best path that kernel has (one without a bf16-specific path stops at kAvx512).
// `isa`: "auto" (min(best(), top)) or a level name, which must not exceed best() or top.
inline int resolve(const std::string& isa, int top, const char* op) {
  const int have = std::min(best(), top);
  if (isa.empty() || isa == "auto") return have;
  const int want = level_of(isa);
  std::string names;
  for (int l = 0; l <= top; ++l) names += (l ? ", " : "") + std::string(kNames[l]);
  REATT_CHECK(want >= 0 && want <= top,
              std::string(op) + ": isa must be auto, " + names + " (REATT_CPU_ISA), got '" + isa + "'");
  REATT_CHECK(want <= best(), std::string(op) + ": isa '" + isa + "' cannot run on this CPU: it lacks " +
                                  missing(want) + " (best: " + kNames[best()] + ")");
  return want;
}

}  // namespace cpu_isa
}  // namespace reatt
