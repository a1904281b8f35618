"""Mutants of the distill slice: reference, ops, Triton, C++ CPU kernels and the CUDA kernel (under emulation).

Loaded by the mutation gate (scripts/mutation/gate.py). Each entry is a small, realistic bug:
``dict(name=, path=, old=, new=, tests=[pytest args], build=None | "cpu" | "emu")``: ``old`` occurs exactly once in
``path`` and is replaced by ``new``; ``build="cpu"`` rebuilds reatt_kernels._C, ``"emu"`` the CUDA emulation module
reatt_kernels._C_emu; the ``tests`` must FAIL with the mutant (and pass without it). ``issue13=True`` marks the seven
bugs of issue 13 (always in the CI selection); ``ci=True`` keeps a mutant in the CI selection beside the first mutant
of each file.
"""

DISTILL = "tests/kernels/test_distill.py"

MUTANTS = [
    # ---- Python, Triton and C++ CPU ----
    dict(issue13=True, name="reduce_rows-batchmean-is-sum/(B*M)", path="reatt_kernels/reference/distill.py",
         old="return loss_rows.sum() / max(B, 1), 1.0 / max(B, 1)",
         new="return loss_rows.sum() / max(B * M, 1), 1.0 / max(B * M, 1)",
         tests=[DISTILL, "-k", "test_distill_kl and torch and dtype0"]),
    dict(issue13=True, name="distill_kl-grad-without-1/B", path="reatt_kernels/ops/distill.py",
         old="_, grad_scale = reduce_rows(student.new_empty((B,)), reduction, M)",
         new="_, grad_scale = reduce_rows(student.new_empty((B,)), 'sum', M)",
         tests=[DISTILL, "-k", "test_distill_kl and torch and dtype0"]),
    dict(name="cpp-reader-teacher-mean-over-R-1", path="csrc/distill/distill_cpu_isa.h",
         old="const double inv_r = 1.0 / static_cast<double>(std::max<int64_t>(R, 1));",
         new="const double inv_r = 1.0 / static_cast<double>(std::max<int64_t>(R - 1, 1));", build="cpu",
         tests=[DISTILL, "-k", "test_reader_teacher and cpu"]),
    # the dtype dispatch (distill_cpu.cpp): fp16 attention read as bf16
    dict(name="cpp-reader-teacher-fp16-read-as-bf16", path="csrc/distill/distill_cpu.cpp",
         old="reader_teacher_rows(level, reinterpret_cast<const F16*>(attn),",
         new="reader_teacher_rows(level, reinterpret_cast<const BF16*>(attn),", build="cpu",
         tests=[DISTILL, "-k", "test_reader_teacher and cpu"]),
    dict(name="triton-kl-dense-grad-unscaled", path="reatt_kernels/triton/distill.py",
         old="(g * grad_scale).to(grad_ptr.dtype.element_ty), mask=ok)",
         new="g.to(grad_ptr.dtype.element_ty), mask=ok)",
         tests=[DISTILL, "-k", "test_distill_kl and triton and dtype0"]),
    dict(name="ref-reader-teacher-mean-over-R-1", path="reatt_kernels/reference/distill.py",
         old="    return out / max(R, 1)\n", new="    return out / max(R - 1, 1)\n",
         tests=[DISTILL, "-k", "test_reader_teacher and torch"]),
    # ---- distill_cuda.cu -------------------------------------------------------------------------------------------
    dict(
        name="distill: reader_teacher smem formula forgets the block accumulator (8 warps' bins only)",
        path="csrc/distill/distill_cuda.cu",
        old="const size_t smem = static_cast<size_t>(kWarps + 1) * n_docs * sizeof(float);",
        new="const size_t smem = static_cast<size_t>(kWarps) * n_docs * sizeof(float);",
        tests=["tests/kernels/test_distill.py", "-x", "-q", "-k", "test_reader_teacher and cuda_emu and shape0"],
        build="emu",
    ),
    dict(
        name="distill: reader_teacher token tail bound off by one (reads token S of the row)",
        path="csrc/distill/distill_cuda.cu",
        old="        if (s < S) {\n          const int di = drow[s];",
        new="        if (s <= S) {\n          const int di = drow[s];",
        tests=["tests/kernels/test_distill.py", "-x", "-q", "-k", "test_reader_teacher and cuda_emu"],
        build="emu",
    ),
    dict(
        name="distill: reader_teacher keeps the old row sum when the running max grows (no z rescale)",
        path="csrc/distill/distill_cuda.cu",
        old="          z *= alpha;\n",
        new="",
        tests=["tests/kernels/test_distill.py", "-x", "-q", "-k", "long_rows and cuda_emu"],
        build="emu",
    ),
    dict(
        name="distill: sparse distill_kl rounds the gradient twice (reads back the rounded T * p)",
        path="csrc/distill/distill_cuda.cu",
        old="grad[b * M + c] = from_f<T>((t_mass * p - tv) * grad_scale);",
        new="grad[b * M + c] = from_f<T>(to_f<T>(grad[b * M + c]) - tv * grad_scale);",
        tests=["tests/kernels/test_distill.py", "-x", "-q", "-k", "rounds_once and cuda_emu"],
        build="emu",
    ),
    dict(
        name="distill: a normalised teacher row without mass keeps T_b = 1 (gradient = softmax)",
        path="csrc/distill/distill_cuda.cu",
        old="const float t_mass = normalize ? (ts > 0.f ? 1.f : 0.f) : ts;",
        new="const float t_mass = normalize ? 1.f : ts;",
        tests=["tests/kernels/test_nan_semantics.py", "-x", "-q", "-k", "without_teacher_mass and cuda_emu"],
        build="emu",
    ),
    dict(
        name="distill: the launcher wants a teacher pointer even for an empty teacher (M = 0 or n = 0 throws)",
        path="csrc/distill/distill_cuda.cu",
        old="REATT_CHECK(sparse ? (n == 0 || (tprobs != 0 && tcols != 0)) : (M == 0 || teacher != 0),",
        new="REATT_CHECK(teacher != 0 || (tprobs != 0 && tcols != 0),",
        tests=["tests/kernels/test_distill.py", "-x", "-q", "-k", "empty_teacher and cuda_emu"],
        build="emu",
    ),
    # ---- issue 19 ----------------------------------------------------------------------------------------------------
    dict(
        name="distill: reader_teacher per-lane bin update is a plain += (lanes of a warp race on a document's bin)",
        path="csrc/distill/distill_cuda.cu",
        old="          atomicAdd(&bins[d[j]], e);",
        new="          bins[d[j]] += e;",
        tests=["tests/kernels/test_cuda_emu_races.py", "-k", "reader_teacher"],
        build="emu-tsan",
    ),
    dict(
        name="distill: distill_kl block reduction reads the 24 shared slots no warp wrote",
        path="csrc/distill/distill_cuda.cu",
        old="  v = lane < kKlThreads / 32 ? red[lane] : 0.f;",
        new="  v = red[lane];",
        tests=["tests/kernels/test_cuda_emu_races.py", "-k", "distill_kl"],
        build="emu",
    ),
]
