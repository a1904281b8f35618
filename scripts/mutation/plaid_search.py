"""Mutants of the plaid_search slice (csrc/plaid_search/, reference/plaid_search.py, ops/plaid_search.py) and of the
index features built on it (subset allow-lists, load-time validation). Format: maxsim.py's docstring."""

PS = "tests/kernels/test_plaid_search.py"
KERNEL = "csrc/plaid_search/plaid_search_cpu_isa.h"
ROW_MAX = "csrc/centroid_row_max_cpu.h"  # shared with centroid_interaction (residual_maxsim_cpu_isa.h)
SUBSET = "tests/index/test_index_subset.py"
VALIDATE = "tests/index/test_index_validate.py"

MUTANTS = [
    # ---- the C++ kernel ----
    dict(name="cpp-plaid-ties-to-the-higher-row", path=KERNEL, ci=True,
         old="return sa > sb || (sa == sb && da < db);", new="return sa > sb || (sa == sb && da > db);", build="cpu",
         tests=[PS, "-k", "ties and cpu"]),
    dict(name="cpp-plaid-duplicate-candidates-kept", path=KERNEL,
         old="      if (cand) {\n        // a document listed twice", new="      if (false) {\n        // a document listed twice",
         build="cpu", tests=[PS, "-k", "isa_paths"]),
    dict(name="cpp-plaid-deleted-documents-selected", path=KERNEL,
         old="(!live || live[b]) && (!allow || allow[a * Nd + b])", new="(!allow || allow[a * Nd + b])", build="cpu",
         tests=[PS, "-k", "dyadic and cpu"]),
    dict(name="cpp-plaid-allow-list-ignored", path=KERNEL,
         old="(!live || live[b]) && (!allow || allow[a * Nd + b])", new="(!live || live[b])", build="cpu",
         tests=[SUBSET, "-k", "residual_subset"]),
    dict(name="cpp-plaid-rerank-drops-last-query-token", path=KERNEL,
         old="    for (int64_t i = 0; i < nv[a]; ++i) s += best[w * LP + i];",
         new="    for (int64_t i = 0; i + 1 < nv[a]; ++i) s += best[w * LP + i];", build="cpu",
         tests=[PS, "-k", "dyadic and cpu"]),
    # the AVX-512 decoder (vpermps from a register of weights): only an AVX-512 CPU runs it
    dict(name="cpp-plaid-avx512-decode-shift-off-by-a-field", path=KERNEL, isa="avx512",
         old="_mm512_srli_epi32(word, s * NBITS)", new="_mm512_srli_epi32(word, ((s + 1) % PER_WORD) * NBITS)",
         build="cpu", tests=[PS, "-k", "dyadic and cpu"]),
    dict(name="cpp-plaid-avx512-decode-skips-the-tail-bytes", path=KERNEL, isa="avx512",
         old="    d_done = words * PER_WORD;", new="    d_done = D;", build="cpu", tests=[PS, "-k", "dyadic and cpu"]),
    # the SIMD centroid row max (two accumulator sets, even and odd tokens): the merge and the odd tail
    dict(name="cpp-plaid-simd-ci-odd-tokens-dropped", path=ROW_MAX, isa="avx2",
         old="ci_store(acc + v * W, ci_max(b[v], a[v]));", new="ci_store(acc + v * W, a[v]);",
         build="cpu", tests=[PS, "-k", "dyadic and cpu"]),
    dict(name="cpp-plaid-simd-ci-last-token-of-odd-tail-skipped", path=ROW_MAX, isa="avx2",
         old="  if (t < t1) {\n    const float* ra = row(t);", new="  if (false) {\n    const float* ra = row(t);",
         build="cpu", tests=[PS, "-k", "every_token_position"]),
    # the avx512_bf16 rerank's pair packing (each lane: one token's dimensions 2p, 2p + 1)
    dict(name="cpp-plaid-bf16-pairs-even-twice", path=KERNEL, isa="avx512_bf16",
         old="  return _mm512_or_si512(e, _mm512_slli_epi32(o, 16));", new="  return _mm512_or_si512(e, _mm512_slli_epi32(e, 16));",
         build="cpu", tests=[PS, "-k", "isa_paths and avx512_bf16"]),
    # ---- dispatch (plaid_search_cpu.cpp) ----
    dict(name="cpp-plaid-dispatch-nbits-2-as-4", path="csrc/plaid_search/plaid_search_cpu.cpp",
         old="    case 2: run<2, Code>(level, a); return;", new="    case 2: run<4, Code>(level, a); return;",
         build="cpu", tests=[PS, "-k", "dyadic and cpu"]),
    # ---- Python ----
    dict(name="ref-plaid-ties-to-the-higher-row", path="reatt_kernels/reference/plaid_search.py", ci=True,
         old="    o = torch.argsort(doc, stable=True)\n", new="    o = torch.argsort(-doc, stable=True)\n",
         tests=[PS, "-k", "ties and torch"]),
    dict(name="ops-plaid-pack-drops-the-last-valid-token", path="reatt_kernels/ops/plaid_search.py", ci=True,
         old="    keep = torch.arange(Lq, device=q.device)[None, :] < n_valid[:, None]",
         new="    keep = torch.arange(Lq, device=q.device)[None, :] < (n_valid[:, None] - 1).clamp(min=1)",
         tests=[PS, "-k", "dyadic and torch"]),
    dict(name="index-subset-ignored-by-exact-search", path="reatt_kernels/index/exact.py",
         old="            s = s.masked_fill(~allow[:, rows], float(\"-inf\"))\n", new="",
         tests=[SUBSET, "-k", "exact_subset"]),
    dict(name="index-validate-accepts-any-code", path="reatt_kernels/index/residual.py",
         old="            if lo < 0 or hi >= C:", new="            if lo < 0 or hi > C:", tests=[VALIDATE]),
]
