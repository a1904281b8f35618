"""Mutants of the residual_maxsim slice (fused decompress + MaxSim): reference (its bit layout included),
Triton, the C++ CPU kernel and the CUDA kernel (under emulation).

Loaded by the mutation gate (scripts/mutation/gate.py). Each entry is a small, realistic bug:
``dict(name=, path=, old=, new=, tests=[pytest args], build=None | "cpu" | "emu")``: ``old`` occurs exactly once in
``path`` and is replaced by ``new``; ``build="cpu"`` rebuilds reatt_kernels._C, ``"emu"`` the CUDA emulation module
reatt_kernels._C_emu; the ``tests`` must FAIL with the mutant (and pass without it). ``issue13=True`` marks the seven
bugs of issue 13 (always in the CI selection); ``ci=True`` keeps a mutant in the CI selection beside the first mutant
of each file.
"""

RESIDUAL = "tests/kernels/test_residual_maxsim.py"
INDEX = "tests/index/test_index.py"
CI_TESTS = "tests/kernels/test_centroid_interaction.py"  # the codec's use of the spec's bit layout

MUTANTS = [
    # ---- Python, Triton and C++ CPU ----
    dict(name="cpp-residual-tile-tail-dropped", path="csrc/residual_maxsim/residual_maxsim_cpu_isa.h",
         old="for (int j = 0; j < nt; ++j) m = std::max(m, acc[k][j] + tab[",
         new="for (int j = 0; j < nt - 1; ++j) m = std::max(m, acc[k][j] + tab[", build="cpu",
         tests=[RESIDUAL, "-k", "residual_maxsim_matches and cpu"]),
    dict(name="cpp-residual-table-column-of-tile-head", path="csrc/residual_maxsim/residual_maxsim_cpu_isa.h", ci=True,
         old="tab[static_cast<int64_t>(tcodes[j]) * LP + i0 + k]",
         new="tab[static_cast<int64_t>(tcodes[j]) * LP + i0]", build="cpu",
         tests=[CI_TESTS, "-k", "table_path"]),
    # the per-ISA dispatch (residual_maxsim_cpu.cpp): 4-bit codes decoded by the 2-bit kernel
    dict(name="cpp-residual-dispatch-nbits-4-as-2", path="csrc/residual_maxsim/residual_maxsim_cpu.cpp",
         old="case 4: REATT_BY_LEVEL(level, residual_maxsim_impl<4>,", new="case 4: REATT_BY_LEVEL(level, residual_maxsim_impl<2>,",
         build="cpu", tests=[RESIDUAL, "-k", "residual_maxsim_matches and cpu"]),
    # ---- centroid_interaction (same C++ file; reference/centroid_interaction.py) ----
    dict(name="cpp-ci-last-token-dropped", path="csrc/residual_maxsim/residual_maxsim_cpu_isa.h",
         old="for (int64_t t = t0 + 1; t < t1; ++t) {", new="for (int64_t t = t0 + 1; t < t1 - 1; ++t) {", build="cpu",
         tests=[CI_TESTS, "-k", "matches_oracle and cpu"]),
    dict(name="cpp-ci-masked-columns-summed", path="csrc/residual_maxsim/residual_maxsim_cpu_isa.h", ci=True,
         old="      if (qm[i]) s += acc[i];", new="      s += acc[i];", build="cpu",
         tests=[CI_TESTS, "-k", "table_semantics and cpu"]),
    dict(name="ref-ci-token-rows-shifted", path="reatt_kernels/reference/centroid_interaction.py", ci=True,
         old="rows = torch.arange(n_tok, device=dev) + start",
         new="rows = (torch.arange(n_tok, device=dev) + start + 1).clamp(max=codes.shape[0] - 1)",
         tests=[CI_TESTS, "-k", "matches_oracle and torch"]),
    dict(name="table-masked-rows-not-zeroed", path="reatt_kernels/ops/centroid_interaction.py",
         old="qf = qf.masked_fill(~q_mask[..., None], 0.0)", new="qf = qf",
         tests=[CI_TESTS, "-k", "table_semantics"]),
    dict(name="triton-residual-buckets-msb-first", path="reatt_kernels/triton/residual_maxsim.py",
         old="shift_d = (offs_d * NBITS) % 8", new="shift_d = 8 - NBITS - (offs_d * NBITS) % 8",
         tests=[RESIDUAL, "-k", "residual_maxsim_matches and triton"]),
    dict(name="codec-pack-order-reversed", path="reatt_kernels/reference/residual_maxsim.py", ci=True,
         old="shifts = (torch.arange(per, device=b.device, dtype=torch.int32) * nbits)",
         new="shifts = (torch.arange(per, device=b.device, dtype=torch.int32) * nbits).flip(0)",
         tests=[INDEX, "-k", "codec_pack_layout"]),
    dict(name="index-ref-token-offset-off-by-doc", path="reatt_kernels/reference/residual_maxsim.py", ci=True,
         old="torch.repeat_interleave(torch.cumsum(dl, 0) - dl, dl)",
         new="torch.repeat_interleave(torch.cumsum(dl, 0) - dl + 1, dl).clamp(max=n_tok - 1)",
         tests=[RESIDUAL, "-k", "residual_maxsim_matches and torch"]),
    # ---- csrc/residual_maxsim/residual_maxsim_cuda.cu under emulation (backend cuda_emu) ----
    dict(
        name="residual: shared-memory formula 16 bytes short (row maxima overrun the buffer)",
        path="csrc/residual_maxsim/residual_maxsim_cuda.cu",
        old="static_cast<size_t>(TILE_T) * (D + 1) + Lq);\n}",
        new="static_cast<size_t>(TILE_T) * (D + 1) + Lq - 4);\n}",
        tests=[RESIDUAL, "-x", "-q", "-k", "residual_maxsim_matches_reference and cuda_emu"],
        build="emu",
    ),
    dict(
        name="residual: token tile written without its bank-conflict pad (read with it)",
        path="csrc/residual_maxsim/residual_maxsim_cuda.cu",
        old="vs[j * (D + 1) + d] = centroids",
        new="vs[j * D + d] = centroids",
        tests=[RESIDUAL, "-x", "-q", "-k", "residual_maxsim_matches_reference and cuda_emu"],
        build="emu",
    ),
    dict(
        name="residual: no barrier between scoring a token tile and decoding the next one",
        path="csrc/residual_maxsim/residual_maxsim_cuda.cu",
        old="      if (lane == 0) best[i] = fmaxf(best[i], acc);\n    }\n    __syncthreads();",
        new="      if (lane == 0) best[i] = fmaxf(best[i], acc);\n    }",
        tests=[RESIDUAL, "-x", "-q", "-k", "residual_maxsim_matches_reference and cuda_emu"],
        build="emu",
    ),
]
