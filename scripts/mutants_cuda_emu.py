"""Mutants of the CUDA kernels that the emulated tests (backend "cuda_emu") must kill.

Loaded by the mutation gate (scripts/mutants.py): each entry replaces the unique text ``old`` in ``path`` by ``new``,
rebuilds reatt_kernels._C_emu (``build="emu"``), runs ``pytest <tests>`` and expects a failure. The README section
"Testing the CUDA kernels on CPU" lists which test caught each one when it was recorded.
"""

FWD = "csrc/maxsim/maxsim_fwd.cu"
BWD = "csrc/maxsim/maxsim_bwd.cu"
LAUNCH = "csrc/maxsim/maxsim_launch.cu"  # the launch plans
HEADER = "csrc/maxsim/maxsim_cuda.cuh"

MUTANTS = [
    # 1. A barrier of the forward pipeline removed: other threads' cp.async copies of the chunk may not have landed
    #    (they land at each issuing thread's wait), so a warp reads poisoned (NaN) smem.
    dict(name="maxsim-fwd-missing-syncthreads", path=FWD,
         old="      __syncthreads();    // ... and everyone else's\n",
         new="\n",
         tests=["tests/test_maxsim_cuda.py", "-k", "cuda_emu and tilings"], build="emu"),
    # 2. cp.async.wait_group skipped: the chunk is read before this thread's own copies land.
    dict(name="maxsim-fwd-skip-cp-async-wait", path=FWD,
         old="      cp_async_wait_1();  // this thread's copies of chunk `buf` have landed ...\n",
         new="\n",
         tests=["tests/test_maxsim.py", "-k", "cuda_emu and fwd"], build="emu"),
    # 3. Two registers of the mma A fragment swapped (a1 <-> a2: rows g+8 and columns +8 exchanged).
    dict(name="maxsim-fwd-mma-a-fragment-swap", path=FWD,
         old="for (int x = 0; x < 4; ++x) a[x] = areg[mt][kt][x];",
         new="for (int x = 0; x < 4; ++x) a[x] = areg[mt][kt][x == 1 ? 2 : x == 2 ? 1 : x];",
         tests=["tests/test_maxsim.py", "-k", "cuda_emu and fwd"], build="emu"),
    # 4. The document-tail bound off by one: one token past the document's end is scored.
    dict(name="maxsim-fwd-doc-tail-off-by-one", path=FWD,
         old="const int nvalid = max(0, min(BN, s.len - j0));",
         new="const int nvalid = max(0, min(BN, s.len - j0 + 1));",
         tests=["tests/test_maxsim.py", "-k", "cuda_emu and fwd"], build="emu"),
    # 5. The forward's shared-memory size formula 16 bytes short (the kernel's carve-up overruns the buffer).
    dict(name="maxsim-fwd-smem-16-bytes-short", path=HEADER,
         old="bytes += ((2 * BN * DS + 15) / 16) * 16;  // masks",
         new="bytes += ((2 * BN * DS + 15) / 16) * 16 - 16;  // masks",
         tests=["tests/test_maxsim.py", "-k", "cuda_emu and fwd"], build="emu"),
    # 6. Tiles planned against a fixed 112 KB cap instead of the device's opt-in limit (fails on 99 KB parts).
    dict(name="maxsim-smem-plan-ignores-optin", path=LAUNCH,
         old="std::min<int64_t>(112 * 1024, lim.smem_optin)",
         new="std::min<int64_t>(112 * 1024, 112 * 1024)",
         tests=["tests/test_cuda_emu.py", "-k", "smem_limit"], build="emu"),
    # 7. The deterministic dd kernel's token tile sized for 64 KB regardless of the device (129 KB at dim 250).
    dict(name="maxsim-bwd-dd-tile-ignores-optin", path=LAUNCH,
         old="std::min<int64_t>(64 * 1024, lim.smem_optin - static_cast<int64_t>(dd_det_smem(0, a.D)))",
         new="std::min<int64_t>(64 * 1024, 64 * 1024)",
         tests=["tests/test_cuda_emu.py", "-k", "smem_limit"], build="emu"),
    # 8. The mean's 1/n_a in the backward counts one query token too many (every dq, dd and dbias scaled off).
    dict(name="maxsim-bwd-mean-weight-n+1", path=BWD,
         old="return p.mean ? w / static_cast<float>(max(1, p.nq[a])) : w;",
         new="return p.mean ? w / static_cast<float>(max(1, p.nq[a] + 1)) : w;",
         tests=["tests/test_maxsim.py", "-k", "cuda_emu and test_maxsim_bwd"], build="emu"),
    # 9. The backward plan's atomic threshold off by one: exactly ATOMIC_MIN_ENTRIES entries per document take atomics.
    dict(name="maxsim-plan-atomic-threshold-off-by-one", path=LAUNCH,
         old="pl.ordered_dd = a.deterministic || entries_per_doc <= atomic_min;",
         new="pl.ordered_dd = a.deterministic || entries_per_doc < atomic_min;",
         tests=["tests/test_cuda_emu.py", "-k", "plan"], build="emu"),
    # 10. The forward plan packs one query too many into a row block (its rows fall past the block: never scored).
    dict(name="maxsim-plan-one-query-too-many-per-block", path=LAUNCH,
         old="pl.QPB = static_cast<int>(RB / a.Lq);",
         new="pl.QPB = static_cast<int>(RB / a.Lq + 1);",
         tests=["tests/test_cuda_emu.py", "-k", "plan"], build="emu"),
]
