"""Mutants of the CPU roofline probes (csrc/roofline_cpu.cpp): the ceilings every CPU benchmark row is judged by.

Loaded by the mutation gate (scripts/mutation/gate.py); the format is that of maxsim.py. The probes' speeds cannot be
asserted (no timed tests), so the mutants are the bugs a test can see: argument checks and the byte count a rate is
computed from.
"""

ROOF = "tests/tooling/test_roofline.py"

MUTANTS = [
    dict(name="roofline-threads-check-off-by-one", path="csrc/roofline_cpu.cpp",
         old="REATT_CHECK(n_threads >= 1, ", new="REATT_CHECK(n_threads >= 0, ", build="cpu",
         tests=[ROOF, "-k", "arguments_are_checked"]),
    dict(name="roofline-bytes-not-page-rounded", path="csrc/roofline_cpu.cpp",
         old="const int64_t bytes = n_bytes / 4096 * 4096;", new="const int64_t bytes = n_bytes;", build="cpu",
         tests=[ROOF, "-k", "read_bandwidth_is_a_positive_rate"]),
]
