"""Mutants of the maxsim slice: reference, ops, Triton, C++ CPU kernels and the CUDA kernel (under emulation).

Loaded by the mutation gate (scripts/mutation/gate.py). Each entry is a small, realistic bug:
``dict(name=, path=, old=, new=, tests=[pytest args], build=None | "cpu" | "emu" | "emu-tsan")``: ``old`` occurs exactly once in
``path`` and is replaced by ``new``; ``build="cpu"`` rebuilds reatt_kernels._C, ``"emu"`` the CUDA emulation module
reatt_kernels._C_emu; the ``tests`` must FAIL with the mutant (and pass without it). ``isa=`` names the
instruction-set level the mutated code needs (csrc/cpu_isa.h): the avx512 helpers, the avx2 namespace, the
avx512_bf16 filter; a CPU below it reports the mutant as not runnable. ``issue13=True`` marks the seven
bugs of issue 13 (always in the CI selection); ``ci=True`` keeps a mutant in the CI selection beside the first mutant
of each file.
"""

MAXSIM = "tests/kernels/test_maxsim.py"
FWD_CU = "csrc/maxsim/maxsim_fwd.cu"
BWD_CU = "csrc/maxsim/maxsim_bwd.cu"
LAUNCH_CU = "csrc/maxsim/maxsim_launch.cu"  # the launch plans
HEADER_CUH = "csrc/maxsim/maxsim_cuda.cuh"
QM = "tests/kernels/test_maxsim_qmask.py"  # masked query tokens, every backend
PREP = "tests/kernels/test_maxsim_prepared.py"  # a corpus prepared once

MUTANTS = [
    # ---- Python, Triton and C++ CPU ----
    dict(issue13=True, name="triton-bias-beyond-R-reads-0", path="reatt_kernels/triton/maxsim.py",
         old="""        r = tl.minimum(tl.maximum(na[:, None] + j[None, :] - i[:, None], 0), R - 1)
        s += tl.load(bias_ptr + r)""",
         new="""        r = tl.maximum(na[:, None] + j[None, :] - i[:, None], 0)
        s += tl.load(bias_ptr + r, mask=r < R, other=0.0)""",
         tests=[MAXSIM, "-k", "test_maxsim_fwd and triton and dtype0"]),
    dict(issue13=True, name="torch-packed-bwd-offset+1", path="reatt_kernels/reference/maxsim.py",
         old="        base = d_offsets[doc]\n", new="        base = d_offsets[doc] + 1\n",
         tests=[MAXSIM, "-k", "test_maxsim_bwd and torch and packed"]),
    dict(issue13=True, name="triton-scores-through-bf16", path="reatt_kernels/triton/maxsim.py",
         old="qa.to(tl.int64) * C + col64, score, mask=qa < Bq)",
         new="qa.to(tl.int64) * C + col64, score.to(tl.bfloat16).to(tl.float32), mask=qa < Bq)",
         tests=[MAXSIM, "-k", "test_maxsim_fwd and triton and dtype0"]),
    dict(issue13=True, name="cpp-avx512-tie-break->=", path="csrc/maxsim/maxsim_cpu_avx512.h", isa="avx512",
         old="_mm512_cmp_ps_mask(s, m, _CMP_GT_OQ)", new="_mm512_cmp_ps_mask(s, m, _CMP_GE_OQ)", build="cpu",
         tests=[MAXSIM, "-k", "test_maxsim_bwd and cpu"]),
    dict(issue13=True, name="cpp-bias-clamp-R-2", path="csrc/maxsim/maxsim_cpu_isa.h",
         old="r = r < 0 ? 0 : (r > A.R - 1 ? A.R - 1 : r);", new="r = r < 0 ? 0 : (r > A.R - 2 ? A.R - 2 : r);",
         build="cpu", tests=[MAXSIM, "-k", "test_maxsim_fwd and cpu"]),
    dict(name="cpp-bf16-store-truncates", path="csrc/cpu_dtype.h",
         old="  x += 0x7fffu + ((x >> 16) & 1u);\n", new="  x += 0u;\n", build="cpu",
         tests=[MAXSIM, "-k", "test_maxsim_bwd and cpu and dtype2"]),
    dict(name="cpp-avx2-tie-break->=", path="csrc/maxsim/maxsim_cpu.cpp", isa="avx2",
         old="_mm256_cmp_ps(s, m, _CMP_GT_OQ)", new="_mm256_cmp_ps(s, m, _CMP_GE_OQ)", build="cpu",
         tests=["tests/kernels/test_maxsim_cpu.py", "-k", "isa_fwd_bwd and avx2-"]),
    dict(name="cpp-bwd-dbias-distance-sign", path="csrc/maxsim/maxsim_cpu_isa.h",
         old="int64_t r = n_valid[a] + j - i;", new="int64_t r = n_valid[a] + i - j;",
         build="cpu", tests=[MAXSIM, "-k", "test_maxsim_bwd and cpu and dtype0"]),
    # issue 22: the fp32 filter's runner-up skip decided for the whole 16-lane group instead of per lane; dq's
    # column-major loop keeping the first query's weight; the padded-document trim stopping one token short.
    dict(name="cpp-filter-scan-only-when-every-lane-needs", path="csrc/maxsim/maxsim_cpu_isa.h", isa="avx512_bf16",
         old="    if (!need) continue;\n", new="    if (need != live) continue;\n", build="cpu",
         tests=["tests/kernels/test_maxsim_cpu.py", "-k", "runner_up"]),
    dict(name="cpp-bwd-dq-stale-query-weight", path="csrc/maxsim/maxsim_cpu_isa.h",
         old="        wv = w[a * B.C + c];\n", new="        wv = w[c];\n", build="cpu",
         tests=[MAXSIM, "-k", "test_maxsim_bwd and cpu and dtype0"]),
    dict(name="cpp-fwd-trim-drops-last-valid-token", path="csrc/maxsim/maxsim_cpu_isa.h",
         old="      while (len > 0 && !jmask[len - 1]) --len;\n",
         new="      while (len > 1 && !jmask[len - 2]) --len;\n", build="cpu",
         tests=[MAXSIM, "-k", "test_maxsim_fwd and cpu and dtype0"]),
    dict(name="triton-dq-mean-not-divided", path="reatt_kernels/triton/maxsim.py",
         old="""        g = tl.load(grad_ptr + a64 * stride_gb + c64 * stride_gc, mask=c_ok, other=0.0)
        if MEAN:
            g = g / tl.maximum(na, 1).to(tl.float32)
        if GROUPED:""",
         new="""        g = tl.load(grad_ptr + a64 * stride_gb + c64 * stride_gc, mask=c_ok, other=0.0)
        if GROUPED:""",
         tests=[MAXSIM, "-k", "test_maxsim_bwd and triton and dtype0"]),
    dict(name="ops-maxsim-upstream-grad-in-input-dtype", path="reatt_kernels/ops/maxsim.py",
         old="g = g_scores.to(_score_dtype(q))", new="g = g_scores.to(q.dtype)",
         tests=[MAXSIM, "-k", "test_maxsim_bwd and torch and dtype2"]),
    # ---- csrc/maxsim/maxsim_{fwd,bwd,launch}.cu, maxsim_cuda.cuh under emulation (backend cuda_emu) ----
    # 1. A barrier of the forward pipeline removed: other threads' cp.async copies of the chunk may not have landed
    #    (they land at each issuing thread's wait), so a warp reads poisoned smem (0x7B: huge, it wins the max).
    dict(name="maxsim-fwd-missing-syncthreads", path=FWD_CU,
         old="      __syncthreads();    // ... and everyone else's\n",
         new="\n",
         tests=["tests/kernels/test_maxsim_cuda.py", "-k", "cuda_emu and tilings"], build="emu"),
    # 2. cp.async.wait_group skipped: the chunk is read before this thread's own copies land.
    #    Caught on every run, not by timing: the copy lands only at the wait; until then the destination holds the
    #    poison, which wins the row max whichever element was lost (a NaN poison was skipped by the max).
    dict(name="maxsim-fwd-skip-cp-async-wait", path=FWD_CU,
         old="      cp_async_wait_1();  // this thread's copies of chunk `buf` have landed ...\n",
         new="\n",
         tests=["tests/kernels/test_maxsim.py", "-k", "cuda_emu and fwd"], build="emu"),
    # 3. Two registers of the mma A fragment swapped (a1 <-> a2: rows g+8 and columns +8 exchanged).
    dict(name="maxsim-fwd-mma-a-fragment-swap", path=FWD_CU,
         old="for (int x = 0; x < 4; ++x) a[x] = areg[mt][kt][x];",
         new="for (int x = 0; x < 4; ++x) a[x] = areg[mt][kt][x == 1 ? 2 : x == 2 ? 1 : x];",
         tests=["tests/kernels/test_maxsim.py", "-k", "cuda_emu and fwd"], build="emu"),
    # 4. The document-tail bound off by one: one token past the document's end is scored.
    dict(name="maxsim-fwd-doc-tail-off-by-one", path=FWD_CU,
         old="const int nvalid = max(0, min(BN, s.len - j0));",
         new="const int nvalid = max(0, min(BN, s.len - j0 + 1));",
         tests=["tests/kernels/test_maxsim.py", "-k", "cuda_emu and fwd"], build="emu"),
    # 5. The forward's shared-memory size formula 16 bytes short (the kernel's carve-up overruns the buffer).
    dict(name="maxsim-fwd-smem-16-bytes-short", path=HEADER_CUH,
         old="bytes += ((2 * BN * DS + 15) / 16) * 16;  // masks",
         new="bytes += ((2 * BN * DS + 15) / 16) * 16 - 16;  // masks",
         tests=["tests/kernels/test_maxsim.py", "-k", "cuda_emu and fwd"], build="emu"),
    # 6. Tiles planned against a fixed 112 KB cap instead of the device's opt-in limit (fails on 99 KB parts).
    dict(name="maxsim-smem-plan-ignores-optin", path=LAUNCH_CU,
         old="std::min<int64_t>(112 * 1024, lim.smem_optin)",
         new="std::min<int64_t>(112 * 1024, 112 * 1024)",
         tests=["tests/kernels/test_cuda_emu.py", "-k", "smem_limit"], build="emu"),
    # 7. The deterministic dd kernel's token tile sized for 64 KB regardless of the device (129 KB at dim 250).
    dict(name="maxsim-bwd-dd-tile-ignores-optin", path=LAUNCH_CU,
         old="std::min<int64_t>(64 * 1024, lim.smem_optin - static_cast<int64_t>(dd_det_smem(0, a.D)))",
         new="std::min<int64_t>(64 * 1024, 64 * 1024)",
         tests=["tests/kernels/test_cuda_emu.py", "-k", "smem_limit"], build="emu"),
    # 8. The mean's 1/n_a in the backward counts one query token too many (every dq, dd and dbias scaled off).
    dict(name="maxsim-bwd-mean-weight-n+1", path=BWD_CU,
         old="return p.mean ? w / static_cast<float>(max(1, p.nq[a])) : w;",
         new="return p.mean ? w / static_cast<float>(max(1, p.nq[a] + 1)) : w;",
         tests=["tests/kernels/test_maxsim.py", "-k", "cuda_emu and test_maxsim_bwd"], build="emu"),
    # 9. The backward plan's atomic threshold off by one: exactly ATOMIC_MIN_ENTRIES entries per document take atomics.
    dict(name="maxsim-plan-atomic-threshold-off-by-one", path=LAUNCH_CU,
         old="pl.ordered_dd = a.deterministic || entries_per_doc <= atomic_min;",
         new="pl.ordered_dd = a.deterministic || entries_per_doc < atomic_min;",
         tests=["tests/kernels/test_cuda_emu.py", "-k", "plan"], build="emu"),
    # 10. The forward plan packs one query too many into a row block (its rows fall past the block: never scored).
    dict(name="maxsim-plan-one-query-too-many-per-block", path=LAUNCH_CU,
         old="pl.QPB = static_cast<int>(RB / a.Lq);",
         new="pl.QPB = static_cast<int>(RB / a.Lq + 1);",
         tests=["tests/kernels/test_cuda_emu.py", "-k", "plan"], build="emu"),
    # ---- issue 19: bugs between blocks, at launch and past 2^31 (each survived every emulated test before) --------
    # 8. A slot's running (max, argmax) is not reset when it streams its next document: needs a CTA whose slot gets a
    #    second document (1 emulated SM: tests/kernels/test_cuda_emu_races.py, and the tilings sweep with 1 SM).
    dict(name="maxsim-fwd-no-per-document-reset", path=FWD_CU,
         old="              best[mt][h] = -INFINITY;\n              arg[mt][h] = -1;\n",
         new="",
         tests=["tests/kernels/test_cuda_emu_races.py", "-k", "streams_documents"], build="emu"),
    # 9. atomicAdd -> plain += in the atomic dd scatter: blocks (3 resident) and warps race on the same dd rows;
    #    ThreadSanitizer reports it whatever the timing.
    dict(name="maxsim-bwd-dd-atomic-plain-add", path=BWD_CU,
         old="atomicAdd(dst + k2, w * to_f<T>(qr[k2]));",
         new="dst[k2] += w * to_f<T>(qr[k2]);",
         tests=["tests/kernels/test_cuda_emu_races.py", "-k", "dd_atomic"], build="emu-tsan"),
    # 10. A divergent __syncthreads: the end-of-chunk barrier only in the slots that still have a document; the others
    #     go on to the loop's __syncthreads_or (undefined behaviour: a GPU may pair the two barriers, or hang). The
    #     emulator aborts with both sites (each barrier records its site and kind).
    dict(name="maxsim-fwd-divergent-syncthreads", path=FWD_CU,
         old="      __syncthreads();  // sRow is complete; buffer `buf` may be refilled by the next iteration\n",
         new="      if (cp_active) __syncthreads();\n",
         tests=["tests/kernels/test_cuda_emu_races.py", "-k", "streams_documents"], build="emu"),
    # 11. The dq kernel launched with 256 threads, above its __launch_bounds__(128) (a GPU refuses the launch; the
    #     kernel's row indexing would even tolerate it: rows overlap and are written twice with the same values).
    dict(name="maxsim-bwd-block-above-launch-bounds", path=BWD_CU,
         old="REATT_LAUNCH(maxsim_bwd_dq_kernel<T>, grid, 128, 0, stream)(p);",
         new="REATT_LAUNCH(maxsim_bwd_dq_kernel<T>, grid, 256, 0, stream)(p);",
         tests=["tests/kernels/test_cuda_emu_races.py", "-k", "dd_det"], build="emu"),
    # 12. The 64-bit element offset of the winning document row narrowed to int in the backward's dq gather: documents
    #     past 2^31 elements are read from the wrong place (a sparse 17 GB mapping under emulation).
    dict(name="maxsim-bwd-offset-narrowed-to-int", path=BWD_CU,
         old="    int64_t base = 0;\n    if (c < c_stop) {",
         new="    int base = 0;\n    if (c < c_stop) {",
         tests=["tests/kernels/test_maxsim_cuda.py", "-k", "past_2e31"], build="emu"),
    # ---- issue 29 item 0: masked query tokens packed out of the work (cpu lanes, cuda rows, triton chunks) -----------
    # The bias of a contiguous tile read from the packed lane's position instead of its original token index.
    dict(name="cpp-qpack-bias-at-lane-not-token", path="csrc/maxsim/maxsim_cpu_isa.h",
         old="  if (qidx[p0 + nl - 1] - qidx[p0] == nl - 1) return {btab + qidx[p0] - j0, nullptr};",
         new="  if (qidx[p0 + nl - 1] - qidx[p0] == nl - 1) return {btab + p0 - j0, nullptr};", build="cpu",
         tests=[QM, "-k", "test_maxsim_qmask_patterns and cpu"]),
    # The contiguity test of a tile looks at its first two lanes only: a tile with a hole further on reads one run.
    dict(name="cpp-qpack-contiguity-first-pair-only", path="csrc/maxsim/maxsim_cpu_isa.h",
         old="  if (qidx[p0 + nl - 1] - qidx[p0] == nl - 1) return",
         new="  if (qidx[p0 + 1] - qidx[p0] == 1) return", build="cpu",
         tests=[QM, "-k", "cpu_bias_gather"]),
    # argmax of packed lane p written to token p instead of its original token qidx[p].
    dict(name="cpp-qpack-argmax-to-lane", path="csrc/maxsim/maxsim_cpu_isa.h",
         old="      am[qidx[p]] = idx[p];", new="      am[p] = idx[p];", build="cpu",
         tests=[QM, "-k", "test_maxsim_qmask_patterns and cpu"]),
    # The epilogue's valid count off by one: the last packed lane (the query's last valid token) is dropped.
    dict(name="cpp-qpack-epilogue-drops-last-lane", path="csrc/maxsim/maxsim_cpu_isa.h",
         old="  for (int64_t p = 0; p < n; ++p) {\n    if (idx[p] >= 0) {",
         new="  for (int64_t p = 0; p + 1 < n; ++p) {\n    if (idx[p] >= 0) {", build="cpu",
         tests=[QM, "-k", "test_maxsim_qmask_patterns and cpu"]),
    # The scored lanes rounded down instead of up: the tail vector of valid tokens is never scored.
    dict(name="cpp-qpack-lanes-rounded-down", path="csrc/maxsim/maxsim_cpu_isa.h",
         old="    const int64_t Lqa = (A.n_valid[a] + W - 1) / W * W;",
         new="    const int64_t Lqa = A.n_valid[a] / W * W;", build="cpu",
         tests=[QM, "-k", "test_maxsim_qmask_patterns and cpu"]),
    # The fp32 filter's exact rescoring adds the bias of the lane's position, not of its token (avx512_bf16 only).
    dict(name="cpp-qpack-filter-rescore-bias-at-lane", path="csrc/maxsim/maxsim_cpu_isa.h", isa="avx512_bf16",
         old="      float e = dot_f32(q32 + i * D, row32(j - s0), D);\n      if (btab != nullptr) e += btab[qi[i] - j];",
         new="      float e = dot_f32(q32 + i * D, row32(j - s0), D);\n      if (btab != nullptr) e += btab[i - j];",
         build="cpu", tests=[QM, "-k", "cpu_isa and avx512_bf16 and dtype0"]),
    # Backward: dq of packed row r stored at row r instead of its (query, token) row vrows[r].
    dict(name="cpp-qpack-bwd-dq-at-packed-row", path="csrc/maxsim/maxsim_cpu_isa.h",
         old="    char* out = static_cast<char*>(B.dq) + vrows[r] * D * esz;",
         new="    char* out = static_cast<char*>(B.dq) + r * D * esz;", build="cpu",
         tests=[QM, "-k", "test_maxsim_qmask_patterns and cpu"]),
    # Backward: dd / dbias take the packed position as the token index (wrong argmax entry, wrong distance).
    dict(name="cpp-qpack-bwd-dd-packed-position-as-token", path="csrc/maxsim/maxsim_cpu_isa.h",
         old="          const int64_t i = vrows[p] - a * B.Lq;", new="          const int64_t i = p - vstart[a];",
         build="cpu", tests=[QM, "-k", "test_maxsim_qmask_patterns and cpu"]),
    # CUDA: the bias offset n_a - i of a packed row taken from its packed position instead of its original token.
    dict(name="maxsim-qpack-bias-at-packed-row", path=FWD_CU,
         old="bbase[mt][h] = rvalid[mt][h] ? sNa[sRowX[r]] - sRowI[r] : 0;",
         new="bbase[mt][h] = rvalid[mt][h] ? sNa[sRowX[r]] - r : 0;", build="emu",
         tests=[QM, "-k", "test_maxsim_qmask_patterns and cuda_emu"]),
    # CUDA: the mean's division at the planned last row chunk, not the last chunk holding valid rows (a 150-token
    # query with fewer than 128 valid tokens is never divided).
    dict(name="maxsim-qpack-mean-at-planned-chunk", path=FWD_CU,
         old="if (rc == n_rc - 1 && p.mean)", new="if (rc == p.n_rc - 1 && p.mean)", build="emu",
         tests=[QM, "-k", "long_query and cuda_emu"]),
    # CUDA: the masked tokens' argmax never written (left as the poisoned output).
    dict(name="maxsim-qpack-masked-argmax-unwritten", path=FWD_CU,
         old="          if (p.q_mask[a * p.sqmb + i * p.sqmi] == 0) p.argmax[(a * C + cp.col) * Lq + i] = -1;",
         new="          (void)a;", build="emu",
         tests=[QM, "-k", "test_maxsim_qmask_patterns and cuda_emu"]),
    # CUDA: the packed-row walk counts the chunk's rows from 0 instead of the query's first packed row.
    dict(name="maxsim-qpack-row-walk-ignores-query-start", path=FWD_CU,
         old="      int k = sStart[x];\n", new="      int k = 0;\n", build="emu",
         tests=[QM, "-k", "test_maxsim_qmask_patterns and cuda_emu"]),
    # Triton: the valid-row test off by one (row n_a, a masked token, is scored and summed).
    dict(name="triton-qpack-valid-count-off-by-one", path="reatt_kernels/triton/maxsim.py",
         old="    valid = row_ok & (pk < na)\n", new="    valid = row_ok & (pk <= na)\n",
         tests=[QM, "-k", "test_maxsim_qmask_patterns and triton"]),
    # Triton: a dq token chunk with a single valid row is taken for an empty one and skipped.
    dict(name="triton-qpack-dq-skips-one-row-chunk", path="reatt_kernels/triton/maxsim.py",
         old="    c_hi = tl.where(i0 < na, c_hi, c_lo)", new="    c_hi = tl.where(i0 + 1 < na, c_hi, c_lo)",
         tests=[QM, "-k", "test_maxsim_qmask_patterns and triton"]),
    # Triton: the forward uses each row's packed position as its token (q rows, bias distance and argmax row).
    dict(name="triton-qpack-row-is-packed-position", path="reatt_kernels/triton/maxsim.py",
         old="    i64 = i.to(tl.int64)\n    valid = row_ok & (pk < na)\n",
         new="    i64 = pk.to(tl.int64)\n    valid = row_ok & (pk < na)\n",
         tests=[QM, "-k", "test_maxsim_qmask_patterns and triton"]),
    # ---- issue 29 item 1: a corpus prepared once (rk.prepare_corpus; read by the avx512_bf16 filter) ----------------
    # The per-document norm bound taken from the document's first row: the screen's eps no longer covers its rows.
    dict(name="cpp-prepared-norm-bound-first-row-only", path="csrc/maxsim/maxsim_cpu.cpp", isa="avx512_bf16",
         old="      if (s2 > mx2) mx2 = s2;\n", new="      if (t == off[b]) mx2 = s2;\n", build="cpu",
         tests=[PREP, "-k", "layout"]),
    # A later segment of a long prepared document reads the screen rows of its first segment.
    dict(name="cpp-prepared-screen-ignores-segment", path="csrc/maxsim/maxsim_cpu_isa.h", isa="avx512_bf16",
         old="A.d16 + (A.offsets[b] + s0) * A.Dq, row0 + s0 * A.sd_l};",
         new="A.d16 + A.offsets[b] * A.Dq, row0 + s0 * A.sd_l};", build="cpu",
         tests=[PREP, "-k", "equals_unprepared and avx512_bf16"]),
    # A candidate row of a prepared fp16 corpus converted from the wrong place (an element offset, not a row offset).
    dict(name="cpp-prepared-rescore-row-offset", path="csrc/maxsim/maxsim_cpu_isa.h", isa="avx512_bf16",
         old="    row_to_f32(elem_ptr(A.d, A.dtype, g.row_s0 + r * A.sd_l), A.dtype, A.sd_d, D, t32);\n",
         new="    row_to_f32(elem_ptr(A.d, A.dtype, g.row_s0 + r), A.dtype, A.sd_d, D, t32);\n", build="cpu",
         tests=[PREP, "-k", "equals_unprepared and avx512_bf16"]),
    # The fallback converts a prepared fp16 segment but keeps the segment's row stride (0: every row is row 0).
    dict(name="cpp-prepared-fallback-keeps-row-stride", path="csrc/maxsim/maxsim_cpu_isa.h", isa="avx512_bf16",
         old="    r32 = t32;\n    ld32 = D;\n", new="    r32 = t32;\n", build="cpu",
         tests=[PREP, "-k", "adversarial"]),
]
