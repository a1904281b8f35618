"""Test configuration: seeds, the gpu marker, the test tiers (markers slow / emu / sanitize, below), and the Triton
interpreter on CPU-only machines.

No CUDA is touched at import or collection time beyond ``torch.cuda.is_available()`` (which creates no context).
"""
import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is imported, so it must be set before any test imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every launcher output starts NaN-filled (reatt_kernels._alloc), so unwritten elements fail the tests.
os.environ.setdefault("REATT_POISON", "1")


def _emu():
    """reatt_kernels._C_emu (the CUDA kernels under CPU emulation), or None."""
    try:
        from reatt_kernels import _ext

        return _ext.emu()
    except Exception:  # pragma: no cover - a broken build is reported by the tests themselves
        return None


# The emulator's seed (block order and jitter) for this session: REATT_EMU_SEED, else a random one. Every test that
# involves cuda_emu restarts from it, so `REATT_EMU_SEED=<seed> pytest <that test>` replays the failing block orders.
_EMU_SEED = None


def pytest_report_header(config):
    m = _emu()
    if m is not None:
        c = m.emu_config()
        return (f"cuda_emu: REATT_EMU_SEED={c['seed']} resident={c['resident']} serial={c['serial']} "
                f"mma_order={c['mma_order']}")
    return None


@pytest.fixture(autouse=True)
def _seed(request):
    global _EMU_SEED
    torch.manual_seed(0)
    if "emu" in request.node.nodeid:
        m = _emu()
        if m is not None:
            if _EMU_SEED is None:
                _EMU_SEED = m.emu_config()["seed"]
            m.set_emu_config(seed=_EMU_SEED)
    yield


@pytest.fixture
def force_isa(monkeypatch):
    """force_isa(level): every CPU kernel this test calls runs that instruction-set path (REATT_CPU_ISA)."""
    def force(level: str):
        monkeypatch.setenv("REATT_CPU_ISA", level)

    return force


# ---- which ISA paths this run exercised (tests/isa.py) ----------------------------------------------------------
# kernel -> {level: "passed" | "failed" | "not testable: <missing instructions>"}
_ISA_RESULTS: dict = {}


def _record_isa(item, rep):
    mark = item.get_closest_marker("isa_path")
    callspec = getattr(item, "callspec", None)
    if mark is None or callspec is None or "isa" not in callspec.params:
        return
    kernel, level = mark.args[0], callspec.params["isa"]
    seen = _ISA_RESULTS.setdefault(kernel, {})
    if rep.skipped and rep.when == "setup":
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if "not testable on this CPU" in reason:
            seen.setdefault(level, "not testable: " + reason.split(" needs ", 1)[-1])
    elif rep.when == "call" or rep.failed:
        if rep.failed:
            seen[level] = "failed"
        elif rep.passed:
            seen.setdefault(level, "passed")
            if seen[level].startswith("not testable"):
                seen[level] = "passed"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _ISA_RESULTS:
        return
    from .isa import isa_summary, merge_isa_results

    terminalreporter.write_line(isa_summary(_ISA_RESULTS))
    path = os.environ.get("REATT_ISA_REPORT")
    if path:
        import json

        merged = {}
        if os.path.exists(path):
            with open(path) as fh:
                merged = json.load(fh)
        merge_isa_results(merged, _ISA_RESULTS)
        with open(path, "w") as fh:
            json.dump(merged, fh, indent=1, sort_keys=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    _record_isa(item, rep)
    if rep.failed and "emu" in item.nodeid and _EMU_SEED is not None:
        c = _emu().emu_config()
        rep.sections.append(("cuda_emu replay", f"REATT_EMU_SEED={_EMU_SEED} (resident={c['resident']}, "
                                                f"serial={c['serial']}, mma_order={c['mma_order']})"))


@pytest.hookimpl(tryfirst=True)  # the tier markers must exist before `-m` deselects by them
def pytest_collection_modifyitems(config, items):
    _apply_tiers(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- test tiers ---------------------------------------------------------------------------------------------------
# `make test` runs the fast tier, `-m "not slow"`: every op x every CPU-runnable backend (torch, cpu, the Triton
# interpreter, cuda_emu) x every dtype on the first (small, odd-sized) shape of each matrix, against the oracle, plus
# the semantics, validation and cheap tooling tests. `make ci` runs the rest, each test once: `-m "slow and not
# sanitize"` plainly, and `-m sanitize` (the slow emulated CUDA tests) only under ASan + UBSan
# (scripts/ci/20-cuda-emu-sanitizers.sh). So .ci/run, which runs both targets, runs no test twice. A test may also
# carry `@pytest.mark.slow` itself; these tables keep the tier of existing tests in one readable place.

# Matrix tests: only the first value of the named parameter is in the fast tier (the other shapes are `slow`).
FIRST_SHAPE_ONLY = {
    "tests/kernels/test_maxsim.py": {"test_maxsim_fwd": "shape", "test_maxsim_bwd": "shape"},
    "tests/kernels/test_distill.py": {"test_distill_kl": "shape", "test_reader_teacher": "shape"},
}
# Whole tests that are `slow`: larger shapes, every tiling, interpreter-heavy Triton paths, subprocess builds, index
# builds over a corpus, model training. (file -> test function names; "*" = the whole file)
SLOW = {
    "tests/kernels/test_maxsim_cuda.py": {"test_maxsim_cuda_tilings_fwd_bwd", "test_maxsim_cuda_ties",
                                          "test_maxsim_cuda_unaligned_rows", "test_maxsim_cuda_deterministic_bitwise",
                                          "test_maxsim_cuda_poisoned_outputs"},
    "tests/kernels/test_maxsim_triton.py": {"test_maxsim_triton_dd_modes", "test_maxsim_triton_packed_many_docs",
                                            "test_maxsim_triton_padded_tiled", "test_maxsim_triton_dim256",
                                            "test_maxsim_triton_long_query", "test_maxsim_triton_wide_bias_fallback",
                                            "test_maxsim_triton_deterministic_bitwise", "test_maxsim_triton_torch_compile",
                                            "test_maxsim_triton_compiles_for_sm90"},
    "tests/kernels/test_maxsim_cpu.py": {"test_maxsim_cpu_large_ragged_packed",
                                         "test_maxsim_cpu_segmented_long_documents"},
    "tests/kernels/test_cuda_emu.py": {"test_misuse_aborts_with_the_site", "test_maxsim_within_the_device_smem_limit"},
    "tests/kernels/test_distill.py": {"test_reader_teacher_long_rows_fid_layout", "test_reader_teacher_triton_split_s"},
    "tests/kernels/test_residual_maxsim.py": {"test_residual_maxsim_cuda_emu_smem_limit",
                                              "test_refused_launch_leaves_no_pending_error_cuda_emu"},
    "tests/index/test_index.py": {"test_residual_recall_vs_exact", "test_exact_flat_path_matches_full",
                                  "test_build_input_forms_agree", "test_add_delete_compact",
                                  "test_save_load_search_identical", "test_crash_mid_save_keeps_previous_index",
                                  "test_process_killed_mid_save_keeps_previous_index",
                                  "test_corrupted_or_truncated_file_fails_loading", "test_empty_index",
                                  "test_query_dim_mismatch_raises", "test_non_finite_query_rejected",
                                  "test_streamed_ivf_matches_rebuild"},
    "tests/index/test_index_sharded.py": {"*"},
    "tests/tooling/test_packaging.py": {"*"},
    "tests/tooling/test_bench.py": {"test_reatt_bench_main_tiny", "test_reatt_bench_index_flag"},
    "tests/tooling/test_index_bench.py": {"test_quick_bench_end_to_end"},
    "tests/reatt/test_reatt_faithful.py": {"*"},
    "tests/reatt/test_reatt_gradcache.py": {"*"},
    "tests/reatt/test_reatt_model.py": {"*"},
    "tests/reatt/test_reatt_train.py": {"test_resume_is_exact", "test_ddp_step_matches_single_process"},
    "tests/reatt/test_reatt_cli.py": {"*"},
    "tests/reatt/test_reatt_scale.py": {"test_evaluate_sharded_over_two_gloo_ranks_equals_one_process",
                                        "test_two_rank_training_streams_shares_and_checkpoints_the_file_order",
                                        "test_load_a_fid_fork_checkpoint"},
    "tests/reatt/test_reatt_workflow.py": {"test_build_search_eval_round_trip", "test_search_output_is_reatt_train_input",
                                           "test_exact_index_topk_equals_exact_maxsim",
                                           "test_killed_build_resumes_to_the_same_index",
                                           "test_build_and_search_refuse_other_settings",
                                           "test_ranks_build_parts_searched_as_sharded_index",
                                           "test_plots_skip_without_matplotlib"},
}
_ROOT = os.path.dirname(os.path.abspath(__file__))


def _tier_of(item) -> tuple[bool, bool]:
    """(slow, sanitize) for one collected test."""
    rel = "tests/" + os.path.relpath(str(item.path), _ROOT).replace(os.sep, "/")
    name = item.originalname if hasattr(item, "originalname") else item.name
    slow = item.get_closest_marker("slow") is not None
    names = SLOW.get(rel, ())
    slow = slow or "*" in names or name in names
    param = FIRST_SHAPE_ONLY.get(rel, {}).get(name)
    callspec = getattr(item, "callspec", None)
    if param and callspec is not None and not _is_first_value(item, param):
        slow = True
    # The slow emulated CUDA tests run under the sanitizers instead of plainly. Exception, to keep that run near 5
    # minutes: the shared maxsim matrix's fp16/bf16 cases stay plain, since test_maxsim_cuda.py's emulated matrix
    # (sanitized) takes the same tile geometry for every (tiling, dtype) pair.
    emu = "cuda_emu" in item.nodeid
    shared_half = name in ("test_maxsim_fwd", "test_maxsim_bwd") and callspec is not None \
        and callspec.indices.get("dtype", 0) != 0
    # Likewise the masked-query patterns' other layouts: the sanitized matrix runs every tiling with masks already.
    shared_half = shared_half or name == "test_maxsim_qmask_patterns"
    return slow, slow and emu and not shared_half


def _is_first_value(item, param: str) -> bool:
    """Whether the item runs the first value of ``param`` in its ``parametrize`` list. (Read from the marker:
    ``callspec.indices`` counts per combination since pytest 9, not per parameter.)"""
    value = item.callspec.params.get(param)
    for mark in item.iter_markers("parametrize"):
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if param not in names or not mark.args[1]:
            continue
        first = mark.args[1][0]
        first = first.values if hasattr(first, "values") and not isinstance(first, (tuple, list)) else first
        if len(names) > 1:
            first = first[names.index(param)]
        elif hasattr(mark.args[1][0], "values") and not isinstance(mark.args[1][0], (tuple, list)):
            first = first[0]
        return first is value or first == value
    return True


def _apply_tiers(items):
    for item in items:
        slow, sanitize = _tier_of(item)
        if "cuda_emu" in item.nodeid:
            item.add_marker(pytest.mark.emu)
        if slow and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
        if sanitize:
            item.add_marker(pytest.mark.sanitize)
