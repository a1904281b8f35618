"""The CPU emulation of the CUDA execution model (reatt_kernels._C_emu, csrc/cuda_emu/): its primitives checked against
the CUDA documentation and the PTX ISA, its misuse detection, and the maxsim kernels under three shared-memory limits.

The maxsim kernels' own test matrix runs under emulation in tests/kernels/test_maxsim.py and tests/kernels/test_maxsim_cuda.py
(backend "cuda_emu"). The fragment layouts below are typed out from the PTX ISA ("Matrix Fragments for
mma.m16n8k16 with floating point type" and "ldmatrix"), never derived from the emulator's code.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import reatt_kernels as rk
from reatt_kernels import _ext

from .test_maxsim import _leaf, make_case, run_api, run_ref
from ..utils import assert_close_to_ref, discrete, needs_cuda_emu


def test_emu_module_built_with_the_extension():
    """_C_emu comes from the same CMake run as _C: where _C exists, a missing _C_emu is a build failure, not a skip."""
    if _ext.ext() is not None:
        assert _ext.emu() is not None, f"reatt_kernels._C_emu failed to import: {_ext.emu_import_error()}"
    ab = rk.available_backends()
    assert "cuda_emu" in ab
    if _ext.emu() is not None:
        assert ab["cuda_emu"] == "ok"


pytestmark = needs_cuda_emu


def emu():
    return _ext.emu()


@pytest.fixture
def limits():
    """Restore the emulated device (an H100: 227 KB opt-in smem, 132 SMs) after a test changes it."""
    before = emu().set_device_limits()
    yield
    emu().set_device_limits(smem_optin=before["smem_optin"], sm_count=before["sm_count"])


def test_cuda_emu_never_auto(monkeypatch):
    monkeypatch.delenv("REATT_BACKEND", raising=False)
    q, d = torch.randn(2, 3, 16), torch.randn(4, 5, 16)
    from reatt_kernels._dispatch import AUTO_ORDER, select

    assert all("cuda_emu" not in order for order in AUTO_ORDER.values())
    assert select("maxsim", [q, d], "auto", dim=16, layout="padded", n_q=2) != "cuda_emu"
    with pytest.raises(rk.BackendUnavailableError, match="tensors on meta"):
        rk.maxsim(q.to("meta"), d.to("meta"), backend="cuda_emu")


# ---- warp collectives, barriers, indices, atomics ---------------------------------------------------------------------
def test_warp_collectives_and_block_barriers():
    """One block of 64 threads (2 warps); expected values from the CUDA programming guide's definitions."""
    rows = emu().emu_selftest_warp_ops()
    for tid in range(64):
        lane, warp = tid % 32, tid // 32
        r = rows[tid]
        assert r[0] == (warp * 32 + (lane + 3) % 32) * 10, "__shfl_sync"
        assert r[1] == warp * 32 + (lane ^ 5), "__shfl_xor_sync"
        assert r[2] == (tid - 3 if lane >= 3 else tid), "__shfl_up_sync keeps its own value below delta"
        assert r[3] == (tid + 3 if lane + 3 < 32 else tid), "__shfl_down_sync keeps its own value past the end"
        assert r[4] == sum(1 << k for k in range(32) if k % 3 == 0), "__ballot_sync"
        assert r[5] == 1, "__all_sync"
        assert r[6] == (1 if warp == 1 else 0), "__any_sync"
        assert r[7] == sum(1 << k for k in range(32) if k % 5 == lane % 5), "__match_any_sync"
        assert r[8] == len([t for t in range(64) if t % 7 == 0]), "__syncthreads_count"
        assert r[9] == 1 and r[10] == 0, "__syncthreads_or / _and"
        assert r[11] == ((warp * 32) << 33) + 1, "64-bit __shfl_sync"
        other = torch.tensor([0.5 + (warp * 32 + (lane ^ 1))], dtype=torch.float32).view(torch.int32).item()
        assert r[12] == other & 0xFFFFFFFF, "float __shfl_xor_sync"


def test_grid_walk_and_atomics():
    """Every (block, thread) of a 2-D grid runs exactly once, with its indices; atomicAdd hands out distinct tickets."""
    gx, gy, bx = 5, 3, 96
    out = torch.full((gx * gy, bx, 4), -7, dtype=torch.int32)
    counter = torch.zeros(1, dtype=torch.int32)
    emu().emu_selftest_indices(out.data_ptr(), counter.data_ptr(), gx, gy, bx)
    b = torch.arange(gx * gy)
    assert torch.equal(out[:, :, 0], (b % gx)[:, None].expand(-1, bx).int())
    assert torch.equal(out[:, :, 1], (b // gx)[:, None].expand(-1, bx).int())
    assert torch.equal(out[:, :, 2], torch.arange(bx, dtype=torch.int32)[None].expand(gx * gy, -1))
    assert counter.item() == gx * gy * bx
    assert torch.equal(out[:, :, 3].flatten().sort().values, torch.arange(gx * gy * bx, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_conversions_round_to_nearest_even(dtype):
    """__float2half_rn / __float2bfloat16_rn match torch's conversions bit for bit (ties, subnormals, overflow, NaN)."""
    special = [0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 6e-8, 3e-8, 2.98e-8, 1e-40, float("inf"),
               -float("inf"), 1.0 + 2**-11, 1.0 + 3 * 2**-11, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 2**-14, 2**-24, 2**-25]
    x = torch.cat([torch.tensor(special), torch.randn(2000) * 10.0 ** torch.randint(-9, 6, (2000,))]).float()
    bits = torch.empty(x.numel(), dtype=torch.int16)
    back = torch.empty_like(x)
    emu().emu_selftest_convert(x.data_ptr(), bits.data_ptr(), back.data_ptr(), x.numel(), dtype == torch.bfloat16)
    want = x.to(dtype)
    assert torch.equal(bits, want.view(torch.int16)), "conversion bits differ from torch"
    assert torch.equal(back, want.float())
    nan = torch.tensor([float("nan")])
    emu().emu_selftest_convert(nan.data_ptr(), bits.data_ptr(), back.data_ptr(), 1, dtype == torch.bfloat16)
    assert torch.isnan(back[0])


# ---- mma.sync.m16n8k16 and ldmatrix: every lane against the PTX ISA tables -------------------------------------------
# PTX ISA, mma.m16n8k16, .f16/.bf16 A/B and .f32 C/D; groupID = laneid >> 2, threadID_in_group = laneid % 4.
#   A, elements a0..a7 (two per .b32 register, a0 in the low half of register 0):
#     row = groupID        for a0, a1, a4, a5;   groupID + 8 for a2, a3, a6, a7
#     col = threadID_in_group * 2 + (i & 1)       for a0..a3;   + 8 for a4..a7
#   B, elements b0..b3:  row = threadID_in_group * 2 + (i & 1) for b0, b1;  + 8 for b2, b3;   col = groupID
#   C/D, elements c0..c3: row = groupID for c0, c1;  groupID + 8 for c2, c3;   col = threadID_in_group * 2 + (i & 1)
def isa_a(lane, i):
    g, t = lane >> 2, lane % 4
    row = g if i in (0, 1, 4, 5) else g + 8
    col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def isa_b(lane, i):
    g, t = lane >> 2, lane % 4
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g


def isa_c(lane, i):
    g, t = lane >> 2, lane % 4
    return (g if i < 2 else g + 8), t * 2 + (i & 1)


def _pack(lo, hi):
    return (lo.view(torch.int16).int() & 0xFFFF) | ((hi.view(torch.int16).int() & 0xFFFF) << 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_m16n8k16_fragments_match_the_isa(dtype):
    A = torch.randn(16, 16).to(dtype)
    B = torch.randn(16, 8).to(dtype)
    C = torch.randn(16, 8)
    a = torch.empty(32, 4, dtype=torch.int32)
    b = torch.empty(32, 2, dtype=torch.int32)
    c = torch.empty(32, 4, dtype=torch.float32)
    for lane in range(32):
        for r in range(4):
            (r0, c0), (r1, c1) = isa_a(lane, 2 * r), isa_a(lane, 2 * r + 1)
            a[lane, r] = _pack(A[r0, c0].reshape(1), A[r1, c1].reshape(1))
        for r in range(2):
            (r0, c0), (r1, c1) = isa_b(lane, 2 * r), isa_b(lane, 2 * r + 1)
            b[lane, r] = _pack(B[r0, c0].reshape(1), B[r1, c1].reshape(1))
        for i in range(4):
            c[lane, i] = C[isa_c(lane, i)]
    d = torch.full((32, 4), float("nan"))
    code = _ext.DTYPE_CODES[dtype]
    emu().emu_selftest_mma(a.data_ptr(), b.data_ptr(), c.data_ptr(), d.data_ptr(), code)
    want = A.double() @ B.double() + C.double()
    for lane in range(32):
        for i in range(4):
            got, ref = d[lane, i].item(), want[isa_c(lane, i)].item()
            # products of halves are exact in fp32; 16 fp32 additions
            assert abs(got - ref) <= 1e-5 * (1 + abs(ref)), f"lane {lane} d{i} at {isa_c(lane, i)}: {got} vs {ref}"


# PTX ISA, ldmatrix .m8n8 .x4 .b16: threads 0-7, 8-15, 16-23, 24-31 give the row addresses of matrices 0..3; in the
# destination register i of each thread, lane l holds row l / 4, elements 2 * (l % 4) and 2 * (l % 4) + 1 of matrix i
# (.trans: the matrix is transposed: row 2 * (l % 4) and 2 * (l % 4) + 1, column l / 4).
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_x4_fragments_match_the_isa(trans):
    nrows = 41
    src = torch.randint(-30000, 30000, (nrows, 16), dtype=torch.int16)
    rows = torch.randperm(nrows)[:32].int()  # each lane points at an arbitrary row: the gather must follow them
    out = torch.empty(32, 4, dtype=torch.int32)
    emu().emu_selftest_ldmatrix(src.data_ptr(), nrows, rows.data_ptr(), out.data_ptr(), trans)
    for lane in range(32):
        for m in range(4):
            if not trans:
                row = int(rows[8 * m + lane // 4])
                lo, hi = src[row, 2 * (lane % 4)], src[row, 2 * (lane % 4) + 1]
            else:
                lo = src[int(rows[8 * m + 2 * (lane % 4)]), lane // 4]
                hi = src[int(rows[8 * m + 2 * (lane % 4) + 1]), lane // 4]
            want = (int(lo) & 0xFFFF) | ((int(hi) & 0xFFFF) << 16)
            assert int(out[lane, m]) & 0xFFFFFFFF == want, f"lane {lane} register {m}"


# The shared-memory poison (every byte 0x7B): huge and finite in every float type, so it wins any max and swamps any
# sum (a NaN would be skipped by fmaxf), and far out of range as an integer (never the kernels' -1 "skip" sentinel).
POISON_F32 = torch.tensor([0x7B7B7B7B], dtype=torch.int32).view(torch.float32).item()


def test_poison_is_huge_and_finite_in_every_dtype():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        v = torch.full((4,), 0x7B, dtype=torch.uint8).view(dtype)[0].float().item()
        assert 6e4 < v < float("inf"), (dtype, v)
    assert torch.full((4,), 0x7B, dtype=torch.uint8).view(torch.int32).item() > 2**30


def test_cp_async_is_deferred_until_wait_group():
    """The destination reads the poison from the issue until the thread's matching cp.async.wait_group."""
    src = torch.randn(256)
    out = torch.zeros(32, 16)
    emu().emu_selftest_cp_async(src.data_ptr(), out.data_ptr())
    first, second = src[:128].view(32, 4), src[128:].view(32, 4)
    assert (out[:, 0:4] == POISON_F32).all(), "data visible before the wait"
    assert torch.equal(out[:, 4:8], first), "wait_group 1 must land every group but the newest"
    assert (out[:, 8:12] == POISON_F32).all(), "the newest group landed before wait_group 0"
    assert torch.equal(out[:, 12:16], second)


# ---- blocks: concurrent, in a seeded random order, each with its own poisoned shared memory ----------------------------
@pytest.fixture
def emu_config():
    """Restore the emulator's settings (seed, resident blocks, serial, mma order) after a test changes them."""
    before = emu().emu_config()
    yield emu()
    emu().set_emu_config(seed=before["seed"], resident=before["resident"], serial=before["serial"],
                         mma_order=before["mma_order"])


def _overlap(n_blocks):
    out = torch.full((n_blocks, 2), -1, dtype=torch.int64)
    most = emu().emu_selftest_overlap(out.data_ptr(), n_blocks)
    return out, most


def test_blocks_run_concurrently_in_a_seeded_random_order(emu_config):
    m = emu_config
    m.set_emu_config(seed=1234, resident=3, serial=False)
    out1, most = _overlap(12)
    assert most >= 2, "no two blocks were ever resident at once"
    assert sorted(out1[:, 0].tolist()) == list(range(12)), "every block runs exactly once"
    # Which grid block each resident group takes next follows the seeded order; when the blocks' code starts relative
    # to each other is the OS's (a group can finish a block and take another before a second group has started), so
    # the order is checked with one resident group, where it is the seeded permutation alone.
    m.set_emu_config(resident=1)

    def order(seed):
        m.set_emu_config(seed=seed)  # each launch draws on from the seed's stream: restart it
        return _overlap(12)[0][:, 0].argsort().tolist()

    assert order(1234) == order(1234), "the same seed runs the blocks in the same order"
    orders = {tuple(order(s)) for s in range(4)}
    assert len(orders) > 1, "the block order does not depend on the seed"
    m.set_emu_config(serial=True)
    out, most = _overlap(12)
    assert most == 1 and out[:, 0].tolist() == list(range(12)), "REATT_EMU_SERIAL: one block at a time, in order"


def test_static_shared_memory_is_per_block_and_poisoned(emu_config):
    """Every block sees its own static __shared__ array (REATT_SHARED_ARRAY), poisoned at its start even where the
    previous block on the same resident slot wrote it."""
    emu_config.set_emu_config(resident=4, serial=False)
    n = 16
    out = torch.full((n, 3), -1, dtype=torch.int32)
    emu().emu_selftest_static_smem(out.data_ptr(), n)
    assert (out[:, 0] == 0x7B7B7B7B).all(), f"static smem not poisoned at block start: {out[:, 0].tolist()}"
    assert torch.equal(out[:, 1], out[:, 2]), "a concurrent block overwrote this block's static smem"


def test_plain_shared_is_a_compile_error_under_emulation():
    """`__shared__ T x[n]` would be one static array for every block: the header makes it a (deprecated) error."""
    header = open(os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "cuda_emu", "emu_runtime.h")).read()
    cmake = open(os.path.join(os.path.dirname(__file__), "..", "..", "CMakeLists.txt")).read()
    assert "deprecated(" in header and "-Werror=deprecated-declarations" in cmake


# ---- launch checks ---------------------------------------------------------------------------------------------------
def test_launch_above_launch_bounds_fails():
    assert emu().emu_selftest_bounded(64) == 3 * 64
    with pytest.raises(RuntimeError, match="too many resources"):
        emu().emu_selftest_bounded(96)
    assert emu().get_last_error() == 0
    assert emu().emu_selftest_bounded(32) == 3 * 32  # the next valid launch runs


@pytest.mark.parametrize("dims", [(1025, 1, 1, 1, 1), (1, 1025, 1, 1, 1), (1, 1, 65, 1, 1), (64, 32, 1, 1, 1),
                                  (32, 1, 1, 2**31, 1), (32, 1, 1, 1, 65536), (0, 1, 1, 1, 1)])
def test_launch_outside_the_device_limits_fails(dims):
    with pytest.raises(RuntimeError, match="invalid configuration"):
        emu().emu_selftest_launch_dims(*dims)


def test_every_launch_bounds_has_its_emulation_check():
    """A kernel declared with __launch_bounds__(n) starts with REATT_EMU_LAUNCH_BOUNDS(n) (the emulator cannot read the
    attribute), with the same n."""
    import glob
    import re

    root = os.path.join(os.path.dirname(__file__), "..", "..", "csrc")
    found = 0
    for f in glob.glob(os.path.join(root, "**", "*.cu*"), recursive=True):
        src = open(f).read()
        for m in re.finditer(r"__launch_bounds__\(([^)]*)\)\s*(\w+)\s*\([^)]*\)\s*\{\s*(REATT_EMU_LAUNCH_BOUNDS\(([^)]*)\))?", src):
            found += 1
            assert m.group(3), f"{f}: kernel {m.group(2)} has __launch_bounds__({m.group(1)}) but no REATT_EMU_LAUNCH_BOUNDS"
            assert m.group(4).strip() == m.group(1).split(",")[0].strip(), f"{f}: {m.group(2)}: bounds differ"
    assert found >= 5


# ---- host API: the shared-memory limit ---------------------------------------------------------------------------------
def test_shared_memory_limit(limits):
    m = emu()
    m.set_device_limits(smem_optin=99 * 1024)
    with pytest.raises(RuntimeError, match="invalid argument"):
        m.emu_selftest_smem(60 * 1024, 0, False)  # > 48 KB before the kernel opted in (the attribute then persists)
    assert m.emu_selftest_smem(99 * 1024, 99 * 1024, True) == 0  # the whole opt-in buffer is usable
    with pytest.raises(RuntimeError, match="invalid argument"):
        m.emu_selftest_smem(99 * 1024 + 16, 0, True)  # cudaFuncSetAttribute and the launch both fail
    assert m.get_last_error() == 0, "the launch check must have cleared the error"
    m.set_device_limits(smem_optin=227 * 1024)
    assert m.emu_selftest_smem(200 * 1024, 16, True) == 0
    with pytest.raises(ValueError, match="smem_optin"):
        m.set_device_limits(smem_optin=1024)


@pytest.mark.skipif(_ext.emu() is not None and _ext.emu().build_info()["asan"],
                    reason="under ASan the overrun is AddressSanitizer's report (an abort), checked by the CI script")
def test_shared_memory_overrun_fails_the_launch():
    with pytest.raises(RuntimeError, match="illegal memory access"):
        emu().emu_selftest_smem(1000, 1001, False)
    emu().emu_selftest_smem(1000, 1000, False)  # and the next valid launch works


# ---- misuse that is undefined behaviour on a GPU aborts with the site -------------------------------------------------
@pytest.mark.parametrize("kind,message", [(0, "deadlock"), (1, "diverged at a collective"),
                                          (2, "exited while named in the mask"), (3, "divergent barrier"),
                                          (4, "divergent barrier"), (5, "diverged at a collective")])
def test_misuse_aborts_with_the_site(kind, message):
    code = ("import reatt_kernels._ext as e; m = e.emu(); assert m is not None, e.emu_import_error(); "
            f"m.emu_selftest_misuse({kind})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert r.returncode != 0, "misuse must abort"
    assert message in r.stderr, r.stderr[-2000:]
    assert "emu_selftest.cpp:" in r.stderr and "misuse_kernel" in r.stderr, r.stderr[-2000:]
    assert "REATT_EMU_SEED=" in r.stderr, "the seed is printed on every abort"
    if kind in (3, 4, 5):  # both sides' sites: two different lines of emu_selftest.cpp
        import re

        lines = set(re.findall(r"emu_selftest\.cpp:(\d+)", r.stderr))
        assert len(lines) >= 2, r.stderr[-2000:]
    if kind == 4:
        assert "__syncthreads_or" in r.stderr


# ---- maxsim under the opt-in shared-memory limits of three GPUs -------------------------------------------------------
# (layout, shape, dtype, pos_bias length): cases whose first-choice tiling needs more than 99 KB (fp32 dim 250 with a
# 4000-entry pos_bias cached in smem: 116 KB; fp32 WR=4 at dim 128: 100 KB; the deterministic dd tile at dim 250:
# 129 KB), and one that fits everywhere.
SMEM_CASES = [
    ("padded", (2, 9, 5, 40, 250), torch.float32, 4000),
    ("padded", (5, 32, 2, 37, 128), torch.float32, None),
    ("packed", (1, 32, 9, 70, 128), torch.bfloat16, None),
]


@pytest.mark.parametrize("smem_kb", [227, 163, 99])
def test_maxsim_within_the_device_smem_limit(smem_kb, limits):
    """H100 (227 KB), A100 (163 KB), sm_86/sm_89 (99 KB): the launchers plan every tiling within the opt-in limit
    (the emulator fails any launch above it), and the results still match the float64 reference."""
    emu().set_device_limits(smem_optin=smem_kb * 1024, sm_count=8)
    for layout, shape, dtype, n_bias in SMEM_CASES:
        case = make_case(layout, shape, dtype, torch.device("cpu"), gen=lambda s: discrete(s))
        if n_bias:
            case["pos_bias"] = discrete((n_bias,))
        case = _leaf(case)
        out, am = run_api(case, "cuda_emu", "mean", return_argmax=True, deterministic=True)
        ref_case = _leaf(case)
        ref, am_ref = run_ref(ref_case, "mean")
        assert torch.equal(am, am_ref), f"{layout} {dtype}: argmax differs"
        assert_close_to_ref(out, ref, None, dtype, name=f"{layout} scores")
        g = torch.where(torch.isfinite(ref.detach()), torch.randn(out.shape), torch.zeros(out.shape))
        out.backward(g)
        ref.backward(g.double())
        for name in ("q", "d", "pos_bias"):
            assert_close_to_ref(case[name].grad, ref_case[name].grad, None, dtype, name=f"{layout} d{name}")


# ---- the maxsim launch plan (C++, csrc/maxsim/maxsim_launch.cu), asked for directly -----------------------------------
def _plan_args(Bq, Lq, Nd, Ld, D, dtype=torch.bfloat16, group_size=0, R=0, deterministic=False):
    # Plans read sizes, strides and pointer alignment only: no tensors are needed (0 = absent, 16-byte aligned).
    a = emu().MaxsimArgs()
    return _ext.fill(a, dtype=_ext.DTYPE_CODES[dtype], Bq=Bq, Lq=Lq, D=D, sq_b=Lq * D, sq_l=D, Nd=Nd, Ld=Ld,
                     sd_b=Ld * D, sd_l=D, q_mask=16, pos_bias=16 if R else 0, R=R, group_size=group_size,
                     deterministic=deterministic)


@pytest.mark.parametrize("smem_kb,sms", [(227, 132), (163, 108), (99, 84)])
def test_maxsim_plan_fits_the_device_and_covers_the_output(smem_kb, sms, limits):
    """Forward: every tiling stays within min(112 KB, the device's opt-in limit), and the grid covers every query
    and every column. Backward: the dq splits and dbias partitions follow their formulas, and the ordered dd tile fits."""
    emu().set_device_limits(smem_optin=smem_kb * 1024, sm_count=sms)
    for Bq, Lq, Nd, Ld, D, dtype, gs, R in [(1, 32, 200_000, 128, 128, torch.float16, 0, 0),
                                            (16, 32, 1000, 77, 128, torch.bfloat16, 0, 300),
                                            (2, 200, 5, 70, 64, torch.float32, 0, 0),
                                            (3, 24, 9, 50, 250, torch.float32, 3, 5000),
                                            (64, 32, 64 * 100, 200, 128, torch.bfloat16, 100, 256)]:
        a = _plan_args(Bq, Lq, Nd, Ld, D, dtype, gs, R)
        f = emu().maxsim_plan_cuda(a)
        assert f["smem"] <= min(112 * 1024, smem_kb * 1024), f
        C = gs or Nd
        assert f["threads"] == 32 * f["WR"] * f["DS"] and f["WR"] * f["DS"] <= 4, f
        assert f["grid"][0] * f["QPB"] >= Bq and f["grid"][1] * f["docs_per_cta"] >= C, f
        assert f["n_rc"] * 32 * f["WR"] >= (Lq if f["QPB"] == 1 else 1), f
        assert f["QPB"] == 1 or f["QPB"] * Lq <= 32 * f["WR"], f  # a row block holds whole queries
        b = emu().maxsim_plan_cuda(a, backward=True)
        rows = Bq * Lq
        assert b["n_split"] == max(1, min(-(-C // 128), 8192 // rows, 65535)), b
        assert b["n_part"] == (max(1, min(-(-(Bq * C * Lq) // 2048), 2048)) if R else 0), b
        assert b["dd_smem"] <= smem_kb * 1024 and b["jt"] >= 1, b


def test_maxsim_plan_ordered_or_atomic_dd():
    """dd: ordered when deterministic, else up to 4096 (query, token) entries per document (all pairs: Bq * Lq;
    grouped: Lq); the override -1 keeps that threshold and 0 allows atomics on any shape."""
    def ordered(Bq, Lq, gs=0, det=False, override=-1):
        a = _plan_args(Bq, Lq, Bq * gs if gs else 7, 9, 64, group_size=gs, deterministic=det)
        a.atomic_min_entries = override
        return emu().maxsim_plan_cuda(a, backward=True)["ordered_dd"]

    assert ordered(128, 32) and not ordered(128, 33) and not ordered(4097, 1)
    assert ordered(128, 33, det=True) and ordered(2, 4096, gs=3) and not ordered(2, 4097, gs=3)
    assert not ordered(1, 1, override=0) and ordered(1, 1, det=True, override=0)
