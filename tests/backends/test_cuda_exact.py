"""What only exact mode on the CUDA kernels (csrc/cuda/kernels/exact.cu) has, on a GPU: 2^26 and 2^31
elements, misaligned views, every element bad, direct op calls, the current stream, a second device and
compute-sanitizer (the shared cases are in tests/ops/test_exact.py).

Every test here is marked gpu: without a CUDA device tests/conftest.py skips them with that reason (the
kernels are compiled by tests/backends/test_cuda_build.py and run on the CPU by tests/cuda_emulation/).
Results are integers, so every comparison is torch.equal on state, remainder and status, with the
reference computed on the same device from the same inputs.
"""

import textwrap

import pytest
import torch

import revdeq_kernels as rk
from helpers.cuda_cases import launch_after_a_late_write, run_compute_sanitizer, skip_if_cuda_build_skipped
from helpers.exact_cases import (
    assert_same,
    beta_id,
    check_against_reference,
    random_f,
    random_state,
    run,
)
from revdeq_kernels import exact as fxp
from revdeq_kernels.backends import compiled as extension
from revdeq_kernels.exact import DyadicBeta, FixedStatus

pytestmark = [pytest.mark.gpu, skip_if_cuda_build_skipped]

DEVICE = "cuda"
LARGE = 1 << 26


def test_extension_serves_exact_mode():
    assert extension.unavailable_reason("cuda", "exact") is None, extension.unavailable_reason("cuda", "exact")
    assert rk.available_backends()["exact"]["cuda"][0] == "cuda"


@pytest.mark.slow
@pytest.mark.parametrize("f_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("beta", [DyadicBeta(13, 4), DyadicBeta(255, 8), DyadicBeta(21, 4)], ids=beta_id)
def test_large(beta, f_dtype):
    # 2^26 elements: the size of the bandwidth goal, many waves of the grid-stride loop.
    check_against_reference("cuda", LARGE, beta, f_dtype, DEVICE)


@pytest.mark.slow
def test_large_with_a_partial_last_tile():
    check_against_reference("cuda", LARGE + 77, DyadicBeta(1, 1), torch.float64, DEVICE)


@pytest.mark.parametrize("offsets", [(1, 0), (0, 1), (3, 5)], ids=lambda o: f"state+{o[0]}-f+{o[1]}")
def test_misaligned_views_write_nothing_outside(offsets):
    # Views starting at odd elements: every access is one element per lane, so no alignment is needed
    # beyond the element size; the elements around the view must keep their values.
    beta = DyadicBeta(13, 4)
    for n in (1, 33, 4097, 70001):
        g = torch.Generator().manual_seed(n)
        base, f_base = random_state(n + 8, g).to(DEVICE), random_f(n + 8, torch.bfloat16, g).to(DEVICE)
        state, f = base[offsets[0]:offsets[0] + n], f_base[offsets[1]:offsets[1] + n]
        rem = torch.zeros(fxp.remainder_shape(n, beta.m), dtype=torch.int32, device=DEVICE)
        want = run("relax_fixed_", "reference", state, f, beta, rem)
        before = base.clone()
        got_rem, status = rem.clone(), fxp.new_status(DEVICE)
        rk.relax_fixed_(state, f, beta, got_rem, status=status, backend="cuda")
        assert_same((state, got_rem, status), want, f"n={n} offsets={offsets}")
        outside = torch.ones(n + 8, dtype=torch.bool, device=DEVICE)
        outside[offsets[0]:offsets[0] + n] = False
        assert torch.equal(base[outside], before[outside]), f"n={n} offsets={offsets}: wrote outside the view"


def test_many_bad_elements_set_the_flag_once_per_kind():
    # Every element bad, in every block: the per-warp OR and the atomics still give exactly the flags.
    n = (1 << 22) + 5
    state = torch.zeros(n, dtype=torch.int64, device=DEVICE)
    f = torch.full((n,), float("nan"), device=DEVICE)
    f[1::2] = 5e6
    rem, status = torch.full((4, -(-n // 32)), -1, dtype=torch.int32, device=DEVICE), fxp.new_status(DEVICE)
    rk.relax_fixed_(state, f, (13, 4), rem, status=status, backend="cuda")
    assert status.item() == FixedStatus.F_NOT_FINITE | FixedStatus.F_OUT_OF_RANGE
    assert int(state.count_nonzero()) == 0 and int(rem.count_nonzero()) == 0, "bad elements: unchanged, zero bits"


def test_direct_op_call_checks_arguments():
    state = fxp.to_fixed(torch.ones(40)).to(DEVICE)
    f, rem, status = torch.ones(40, device=DEVICE), torch.zeros(4, 2, dtype=torch.int32, device=DEVICE), \
        fxp.new_status(DEVICE)
    op = torch.ops.revdeq.relax_fixed_
    cases = [
        ((state, f.cpu(), rem, status, 13, 4, 32), ValueError, r"relax_fixed_: f_val is on cpu but state is on cuda"),
        ((state, f, rem.cpu(), status, 13, 4, 32), ValueError, r"remainder is on cpu but state is on cuda"),
        ((state, f, rem, status.cpu(), 13, 4, 32), ValueError, r"status is on cpu but state is on cuda"),
        ((state, f, rem[:3], status, 13, 4, 32), ValueError, r"remainder must have shape \[4, 2\]"),
        ((state, f, rem, status, 13, 9, 32), ValueError, r"needs m in \[1, 8\], got m=9"),
        ((state, f, rem, rem[0, :1], 13, 4, 32), ValueError, "status shares memory with remainder"),
        ((state[:1].expand(40), f, rem, status, 13, 4, 32), ValueError, "internal overlap"),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            op(*args)


def test_runs_on_the_current_stream():
    # f is written on a side stream after a long sleep. Launched on that stream, the kernels see the new
    # f; launched on any other stream they would race ahead and read the old one.
    n, beta = 1 << 20, DyadicBeta(13, 4)
    g = torch.Generator().manual_seed(9)
    state, new_f = random_state(n, g).to(DEVICE), random_f(n, torch.float32, g).to(DEVICE)
    f = torch.zeros(n, device=DEVICE)
    rem = torch.zeros(fxp.remainder_shape(n, beta.m), dtype=torch.int32, device=DEVICE)
    want = run("relax_fixed_", "reference", state, new_f, beta, rem)
    status = fxp.new_status(DEVICE)
    launch_after_a_late_write(f, new_f, lambda: rk.relax_fixed_(state, f, beta, rem, status=status, backend="cuda"))
    assert_same((state, rem, status), want, "side stream")


def test_tensors_on_another_device():
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA devices to test the device guard, {torch.cuda.device_count()} visible")
    with torch.cuda.device(0):
        check_against_reference("cuda", 70001, DyadicBeta(13, 4), torch.float32, "cuda:1")


@pytest.mark.slow
def test_more_than_2_31_elements():
    # 64-bit indexing, checked against the reference in chunks whose starts are multiples of 32, so
    # each chunk's remainder words are a slice of the whole tensor's.
    n, beta, chunk = (1 << 31) + 37, DyadicBeta(13, 4), 1 << 26
    need = n * (8 + 8 + 2) + 16 * chunk * 8 * beta.m  # start, state, f; the reference's unpacked bits
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory for 2^31 + 37 elements, {free / 2**30:.0f} free")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    start = torch.randint(-(1 << 42), 1 << 42, (n,), device=DEVICE, generator=gen)  # |x| < 1024 at F = 32
    f = torch.randn(n, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    state = start.clone()
    words = fxp.remainder_shape(n, beta.m)[1]
    rem, status = torch.empty(beta.m, words, dtype=torch.int32, device=DEVICE), fxp.new_status(DEVICE)
    rk.relax_fixed_(state, f, beta, rem, status=status, backend="cuda")
    assert status.item() == 0
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        part = torch.empty(fxp.remainder_shape(hi - lo, beta.m), dtype=torch.int32, device=DEVICE)
        want = run("relax_fixed_", "reference", start[lo:hi], f[lo:hi], beta, part)
        got = (state[lo:hi], rem[:, lo // 32:lo // 32 + part.shape[1]], fxp.new_status(DEVICE))
        assert_same(got, want, f"2^31 + 37 elements, chunk at {lo}")
    rk.unrelax_fixed_(state, f, beta, rem, status=status, backend="cuda")
    assert status.item() == 0 and torch.equal(state, start), "round trip over 2^31 + 37 elements"


# A small run of both kernels over every f dtype, sizes around the word and tile boundaries, odd
# offsets and bad elements, run under compute-sanitizer by run_compute_sanitizer.
_SANITIZER_SCRIPT = textwrap.dedent("""
    import torch
    import revdeq_kernels  # registers torch.ops.revdeq
    for f_dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        for n in (1, 31, 33, 129, 4099):
            for s_off, f_off in ((0, 0), (1, 3)):
                for p, m in ((13, 4), (255, 8), (21, 4)):
                    s = (torch.randn(n + s_off, device="cuda", dtype=torch.float64) * 2**32).long()[s_off:]
                    f = torch.randn(n + f_off, device="cuda").to(f_dtype)[f_off:]
                    f[n // 2] = float("nan")
                    rem = torch.zeros(m, (n + 31) // 32, dtype=torch.int32, device="cuda")
                    status = torch.zeros(1, dtype=torch.int32, device="cuda")
                    torch.ops.revdeq.relax_fixed_(s, f, rem, status, p, m, 32)
                    torch.ops.revdeq.unrelax_fixed_(s, f, rem, status, p, m, 32)
    torch.cuda.synchronize()
    print("sanitizer script done")
""")


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "synccheck"])
def test_compute_sanitizer(tool):
    output = run_compute_sanitizer(tool, _SANITIZER_SCRIPT)
    assert "ERROR SUMMARY: 0 errors" in output, output[-6000:]
