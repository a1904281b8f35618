"""Mutants of the CUDA kernels that the emulated tests (backend "cuda_emu") must kill.

Loaded by the mutation gate (scripts/mutants.py): each entry replaces the unique text ``old`` in ``path`` by ``new``,
rebuilds reatt_kernels._C_emu (``build="emu"``), runs ``pytest <tests>`` and expects a failure. The README section
"Testing the CUDA kernels on CPU" lists which test caught each one when it was recorded.
"""

MAXSIM = "csrc/maxsim/maxsim_cuda.cu"

MUTANTS = [
    # 1. A barrier of the forward pipeline removed: other threads' cp.async copies of the chunk may not have landed
    #    (they land at each issuing thread's wait), so a warp reads poisoned smem (0x7B: huge, it wins the max).
    dict(name="maxsim-fwd-missing-syncthreads", path=MAXSIM,
         old="      __syncthreads();    // ... and everyone else's\n",
         new="\n",
         tests=["tests/test_maxsim_cuda.py", "-k", "cuda_emu and tilings"], build="emu"),
    # 2. cp.async.wait_group skipped: the chunk is read before this thread's own copies land. Caught on every run, not
    #    by timing: the copy lands only at the wait, and until then the destination holds the poison, which wins the
    #    row max whichever element was lost (a NaN poison was skipped by the max).
    dict(name="maxsim-fwd-skip-cp-async-wait", path=MAXSIM,
         old="      cp_async_wait_1();  // this thread's copies of chunk `buf` have landed ...\n",
         new="\n",
         tests=["tests/test_maxsim.py", "-k", "cuda_emu and fwd"], build="emu"),
    # 3. Two registers of the mma A fragment swapped (a1 <-> a2: rows g+8 and columns +8 exchanged).
    dict(name="maxsim-fwd-mma-a-fragment-swap", path=MAXSIM,
         old="for (int x = 0; x < 4; ++x) a[x] = areg[mt][kt][x];",
         new="for (int x = 0; x < 4; ++x) a[x] = areg[mt][kt][x == 1 ? 2 : x == 2 ? 1 : x];",
         tests=["tests/test_maxsim.py", "-k", "cuda_emu and fwd"], build="emu"),
    # 4. The document-tail bound off by one: one token past the document's end is scored.
    dict(name="maxsim-fwd-doc-tail-off-by-one", path=MAXSIM,
         old="const int nvalid = max(0, min(BN, s.len - j0));",
         new="const int nvalid = max(0, min(BN, s.len - j0 + 1));",
         tests=["tests/test_maxsim.py", "-k", "cuda_emu and fwd"], build="emu"),
    # 5. The forward's shared-memory size formula 16 bytes short (the kernel's carve-up overruns the buffer).
    dict(name="maxsim-fwd-smem-16-bytes-short", path=MAXSIM,
         old="bytes += ((2 * BN * DS + 15) / 16) * 16;  // masks",
         new="bytes += ((2 * BN * DS + 15) / 16) * 16 - 16;  // masks",
         tests=["tests/test_maxsim.py", "-k", "cuda_emu and fwd"], build="emu"),
    # 6. Tiles planned against a fixed 112 KB cap instead of the device's opt-in limit (fails on 99 KB parts).
    dict(name="maxsim-smem-plan-ignores-optin", path=MAXSIM,
         old="std::min<int64_t>(112 * 1024, smem_optin())",
         new="std::min<int64_t>(112 * 1024, 112 * 1024)",
         tests=["tests/test_cuda_emu.py", "-k", "smem_limit"], build="emu"),
    # 7. The deterministic dd kernel's token tile sized for 64 KB regardless of the device (129 KB at dim 250).
    dict(name="maxsim-bwd-dd-tile-ignores-optin", path=MAXSIM,
         old="std::min<int64_t>(64 * 1024, smem_optin() - static_cast<int64_t>(dd_det_smem(0, p.D)))",
         new="std::min<int64_t>(64 * 1024, 64 * 1024)",
         tests=["tests/test_cuda_emu.py", "-k", "smem_limit"], build="emu"),
    # ---- issue 19: bugs between blocks, at launch and past 2^31 (each survived every emulated test before) --------
    # 8. A slot's running (max, argmax) is not reset when it streams its next document: needs a CTA whose slot gets a
    #    second document (1 emulated SM: tests/test_cuda_emu_races.py, and the tilings sweep with 1 SM).
    dict(name="maxsim-fwd-no-per-document-reset", path=MAXSIM,
         old="              best[mt][h] = -INFINITY;\n              arg[mt][h] = -1;\n",
         new="",
         tests=["tests/test_cuda_emu_races.py", "-k", "streams_documents"], build="emu"),
    # 9. atomicAdd -> plain += in the atomic dd scatter: blocks (3 resident) and warps race on the same dd rows;
    #    ThreadSanitizer reports it whatever the timing.
    dict(name="maxsim-bwd-dd-atomic-plain-add", path=MAXSIM,
         old="atomicAdd(dst + k2, w * to_f<T>(qr[k2]));",
         new="dst[k2] += w * to_f<T>(qr[k2]);",
         tests=["tests/test_cuda_emu_races.py", "-k", "dd_atomic"], build="emu-tsan"),
    # 10. A divergent __syncthreads: the end-of-chunk barrier only in the slots that still have a document; the others
    #     go on to the loop's __syncthreads_or (undefined behaviour: a GPU may pair the two barriers, or hang). The
    #     emulator aborts with both sites (each barrier records its site and kind).
    dict(name="maxsim-fwd-divergent-syncthreads", path=MAXSIM,
         old="      __syncthreads();  // sRow is complete; buffer `buf` may be refilled by the next iteration\n",
         new="      if (cp_active) __syncthreads();\n",
         tests=["tests/test_cuda_emu_races.py", "-k", "streams_documents"], build="emu"),
    # 11. The dq kernel launched with 256 threads, above its __launch_bounds__(128) (a GPU refuses the launch; the
    #     kernel's row indexing would even tolerate it: rows overlap and are written twice with the same values).
    dict(name="maxsim-bwd-block-above-launch-bounds", path=MAXSIM,
         old="REATT_LAUNCH(maxsim_bwd_dq_kernel<T>, grid, 128, 0, stream)(p);",
         new="REATT_LAUNCH(maxsim_bwd_dq_kernel<T>, grid, 256, 0, stream)(p);",
         tests=["tests/test_cuda_emu_races.py", "-k", "dd_det"], build="emu"),
    # 12. The 64-bit element offset of the winning document row narrowed to int in the backward's dq gather: documents
    #     past 2^31 elements are read from the wrong place (a sparse 17 GB mapping under emulation).
    dict(name="maxsim-bwd-offset-narrowed-to-int", path=MAXSIM,
         old="    int64_t base = 0;\n    if (c < c1) {",
         new="    int base = 0;\n    if (c < c1) {",
         tests=["tests/test_maxsim_cuda.py", "-k", "past_2e31"], build="emu"),
]
