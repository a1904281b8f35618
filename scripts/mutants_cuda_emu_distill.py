"""Mutants of csrc/distill/distill_cuda.cu and csrc/index/residual_cuda.cu that the emulated tests (backend="cuda_emu")
must catch. Same format as scripts/mutants_cuda_emu.py (the maxsim list); kept in its own file so the two lists never
conflict. Each entry is a small, realistic bug: ``old`` is an exact text that occurs once in ``path``, ``new`` its
replacement, ``tests`` the pytest arguments that must FAIL with the mutant (and pass without it), and ``build="emu"``
rebuilds reatt_kernels._C_emu with the mutated source.
"""

MUTANTS = [
    # ---- distill_cuda.cu -------------------------------------------------------------------------------------------
    dict(
        name="distill: reader_teacher smem formula forgets the block accumulator (8 warps' bins only)",
        path="csrc/distill/distill_cuda.cu",
        old="const size_t smem = static_cast<size_t>(kWarps + 1) * n_docs * sizeof(float);",
        new="const size_t smem = static_cast<size_t>(kWarps) * n_docs * sizeof(float);",
        tests=["tests/test_distill.py", "-x", "-q", "-k", "test_reader_teacher and cuda_emu and shape0"],
        build="emu",
    ),
    dict(
        name="distill: reader_teacher token tail bound off by one (reads token S of the row)",
        path="csrc/distill/distill_cuda.cu",
        old="        if (s < S) {\n          const int di = drow[s];",
        new="        if (s <= S) {\n          const int di = drow[s];",
        tests=["tests/test_distill.py", "-x", "-q", "-k", "test_reader_teacher and cuda_emu"],
        build="emu",
    ),
    dict(
        name="distill: reader_teacher keeps the old row sum when the running max grows (no z rescale)",
        path="csrc/distill/distill_cuda.cu",
        old="          z *= alpha;\n",
        new="",
        tests=["tests/test_distill.py", "-x", "-q", "-k", "long_rows and cuda_emu"],
        build="emu",
    ),
    dict(
        name="distill: sparse distill_kl rounds the gradient twice (reads back the rounded T * p)",
        path="csrc/distill/distill_cuda.cu",
        old="grad[b * M + c] = from_f<T>((t_mass * p - tv) * grad_scale);",
        new="grad[b * M + c] = from_f<T>(to_f<T>(grad[b * M + c]) - tv * grad_scale);",
        tests=["tests/test_distill.py", "-x", "-q", "-k", "rounds_once and cuda_emu"],
        build="emu",
    ),
    dict(
        name="distill: a normalised teacher row without mass keeps T_b = 1 (gradient = softmax)",
        path="csrc/distill/distill_cuda.cu",
        old="const float t_mass = normalize ? (ts > 0.f ? 1.f : 0.f) : ts;",
        new="const float t_mass = normalize ? 1.f : ts;",
        tests=["tests/test_nan_semantics.py", "-x", "-q", "-k", "without_teacher_mass and cuda_emu"],
        build="emu",
    ),
    dict(
        name="distill: the launcher wants a teacher pointer even for an empty teacher (M = 0 or n = 0 throws)",
        path="csrc/distill/distill_cuda.cu",
        old="REATT_CHECK(sparse ? (n == 0 || (tprobs != 0 && tcols != 0)) : (M == 0 || teacher != 0),",
        new="REATT_CHECK(teacher != 0 || (tprobs != 0 && tcols != 0),",
        tests=["tests/test_distill.py", "-x", "-q", "-k", "empty_teacher and cuda_emu"],
        build="emu",
    ),
    # ---- residual_cuda.cu ------------------------------------------------------------------------------------------
    dict(
        name="residual: shared-memory formula 16 bytes short (row maxima overrun the buffer)",
        path="csrc/index/residual_cuda.cu",
        old="static_cast<size_t>(TILE_T) * (D + 1) + Lq);\n}",
        new="static_cast<size_t>(TILE_T) * (D + 1) + Lq - 4);\n}",
        tests=["tests/test_index.py", "-x", "-q", "-k", "residual_maxsim_matches_reference and cuda_emu"],
        build="emu",
    ),
    dict(
        name="residual: token tile written without its bank-conflict pad (read with it)",
        path="csrc/index/residual_cuda.cu",
        old="vs[j * (D + 1) + d] = centroids",
        new="vs[j * D + d] = centroids",
        tests=["tests/test_index.py", "-x", "-q", "-k", "residual_maxsim_matches_reference and cuda_emu"],
        build="emu",
    ),
    dict(
        name="residual: no barrier between scoring a token tile and decoding the next one",
        path="csrc/index/residual_cuda.cu",
        old="      if (lane == 0) best[i] = fmaxf(best[i], acc);\n    }\n    __syncthreads();",
        new="      if (lane == 0) best[i] = fmaxf(best[i], acc);\n    }",
        tests=["tests/test_index.py", "-x", "-q", "-k", "residual_maxsim_matches_reference and cuda_emu"],
        build="emu",
    ),
    # ---- issue 19 ----------------------------------------------------------------------------------------------------
    dict(
        name="distill: reader_teacher per-lane bin update is a plain += (lanes of a warp race on a document's bin)",
        path="csrc/distill/distill_cuda.cu",
        old="          atomicAdd(&bins[d[j]], e);",
        new="          bins[d[j]] += e;",
        tests=["tests/test_cuda_emu_races.py", "-k", "reader_teacher"],
        build="emu-tsan",
    ),
    dict(
        name="distill: distill_kl block reduction reads the 24 shared slots no warp wrote",
        path="csrc/distill/distill_cuda.cu",
        old="  v = lane < kKlThreads / 32 ? red[lane] : 0.f;",
        new="  v = red[lane];",
        tests=["tests/test_cuda_emu_races.py", "-k", "distill_kl"],
        build="emu",
    ),
]
