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
INDEX = "tests/index/test_index.py"  # the codec's use of the spec's bit layout

MUTANTS = [
    # ---- Python, Triton and C++ CPU ----
    dict(name="cpp-residual-tile-tail-dropped", path="csrc/residual_maxsim/residual_maxsim_cpu.cpp",
         old="for (int j = 0; j < nt; ++j) m = std::max(m, acc[k][j]);",
         new="for (int j = 0; j < nt - 1; ++j) m = std::max(m, acc[k][j]);", build="cpu",
         tests=[RESIDUAL, "-k", "residual_maxsim_matches and cpu"]),
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
