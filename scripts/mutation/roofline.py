"""Mutants of the CPU roofline probes (csrc/roofline_cpu.cpp): the ceilings every CPU benchmark row is judged by.

Loaded by the mutation gate (scripts/mutation/gate.py); the format is that of maxsim.py. The probes' speeds cannot be
asserted (no timed tests), so the mutants are the bugs a test can see: argument checks and the byte count a rate is
computed from.
"""

ROOF = "tests/tooling/test_roofline.py"
ISA_TESTS = "tests/tooling/test_isa.py"

MUTANTS = [
    dict(name="roofline-threads-check-off-by-one", path="csrc/roofline_cpu.cpp",
         old="REATT_CHECK(n_threads >= 1, ", new="REATT_CHECK(n_threads >= 0, ", build="cpu",
         tests=[ROOF, "-k", "arguments_are_checked"]),
    dict(name="roofline-bytes-not-page-rounded", path="csrc/roofline_cpu.cpp",
         old="const int64_t bytes = n_bytes / 4096 * 4096;", new="const int64_t bytes = n_bytes;", build="cpu",
         tests=[ROOF, "-k", "read_bandwidth_is_a_positive_rate"]),
    # csrc/cpu_isa.h, the one answer every CPU kernel dispatches on. Each needs a CPU above the level it breaks:
    # REATT_CPU_ISA_CAP ignored is visible only where the cap hides something (a CPU above avx2); "auto" not capped
    # by the kernel's best path only where the CPU has more (avx512_bf16, beyond the fp32 probes' avx512).
    dict(name="cpu-isa-cap-ignored", path="csrc/cpu_isa.h", isa="avx512",
         old="inline int best() { return std::min(detected(), cap()); }", new="inline int best() { return detected(); }",
         build="cpu", tests=[ROOF, ISA_TESTS, "-k", "refuses or cap"]),
    dict(name="cpu-isa-auto-ignores-the-kernels-best-path", path="csrc/cpu_isa.h", isa="avx512_bf16",
         old="  const int have = std::min(best(), top);", new="  const int have = best();",
         build="cpu", tests=[ROOF, "-k", "every_probe_path"]),
]
