"""What only the CUDA kernels (revdeq_kernels._C built with CUDA) have, on a GPU: relatively misaligned views,
2^26 and 2^31 elements, run-to-run determinism, direct op calls, errors earlier work left pending, the
current stream, a second device and compute-sanitizer (the shared cases are in tests/ops/).

Every test here is marked gpu: without a CUDA device tests/conftest.py skips them with that reason.
On a machine with a GPU, an extension built without its CUDA kernels fails here rather than skipping
(unless the build was skipped on purpose), as tests/backends/test_cpp.py does for the CPU kernels.
"""

import textwrap

import pytest
import torch

import revdeq_kernels as rk
from helpers.cuda_cases import launch_after_a_late_write, run_compute_sanitizer, skip_if_cuda_build_skipped
from helpers.op_cases import (
    DTYPE_PAIRS,
    POINTWISE_OPS,
    assert_close,
    check_pointwise,
    check_residual,
    expected_pointwise,
    expected_residual,
    pair_id,
)
from revdeq_kernels.backends import compiled as extension

pytestmark = [pytest.mark.gpu, skip_if_cuda_build_skipped]

DEVICE = "cuda"
LARGE = 1 << 26
# A float32 state with bfloat16 f is the mixed pair RevDEQ uses most; the rest cover each element size.
LARGE_PAIRS = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
               (torch.float64, torch.float64)]


def test_extension_is_built_with_cuda():
    assert extension.built_with_cuda(), extension.unavailable_reason("cuda")
    assert rk.available_backends()["cuda"][0] == "cuda"


def _offset_pair(n, pair, state_offset, f_offset, seed=0):
    g = torch.Generator().manual_seed(seed)
    state_base = torch.randn(n + 8, dtype=torch.float64, generator=g).to(DEVICE, pair[0])
    f_base = torch.randn(n + 8, dtype=torch.float64, generator=g).to(DEVICE, pair[1])
    return state_base, state_base[state_offset:state_offset + n], f_base[f_offset:f_offset + n]


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("offsets", [(0, 1), (1, 0), (1, 3), (3, 2)], ids=lambda o: f"state+{o[0]}-f+{o[1]}")
def test_relatively_misaligned_views(offsets, pair):
    # Offsets that no scalar head can align for both pointers take the scalar path for every
    # element; others still vectorize after a head (a float64 state at +1 with a float16 f at +3:
    # one head element aligns both). Either way: right values, nothing written outside the view.
    for n in (1, 5, 1023, 70001):
        base, state, f = _offset_pair(n, pair, *offsets)
        for op in POINTWISE_OPS:
            want = expected_pointwise(op, state, f, 0.8)
            before = base.clone()
            getattr(rk, op)(state, f, 0.8, backend="cuda")
            what = f"cuda {op} n={n} {pair_id(pair)} offsets={offsets}"
            assert_close(state, want, pair[0], amplification=4 if op == "relax_" else 4 / 0.2, what=what)
            outside = torch.ones(base.numel(), dtype=torch.bool, device=DEVICE)
            outside[offsets[0]:offsets[0] + n] = False
            assert torch.equal(base[outside], before[outside]), f"{what}: wrote outside the state view"
        got = rk.residual(state, f, backend="cuda")
        want = expected_residual(state, f)
        rel = ((got.double() - want).abs() / want).max().item()
        assert rel <= (1e-12 if pair[0] == torch.float64 else 1e-5), f"residual {pair_id(pair)} {offsets}: {rel:.3e}"


@pytest.mark.slow
@pytest.mark.parametrize("pair", LARGE_PAIRS, ids=pair_id)
def test_large(pair):
    for op in POINTWISE_OPS:
        check_pointwise("cuda", op, LARGE, pair, 0.8, DEVICE)
    check_residual("cuda", LARGE, pair, DEVICE)
    check_residual("cuda", LARGE, pair, DEVICE, "offset")


@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                  (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)], ids=pair_id)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset"])
def test_residual_is_identical_across_runs(offset, pair):
    g = torch.Generator(device=DEVICE).manual_seed(5)
    n = LARGE + 3
    z = torch.randn(n + offset, device=DEVICE, generator=g).to(pair[0])[offset:]
    fz = torch.randn(n + offset, device=DEVICE, generator=g).to(pair[1])[offset:]
    first = rk.residual(z, fz, backend="cuda")
    for run in range(4):
        again = rk.residual(z, fz, backend="cuda")
        assert torch.equal(first, again), f"run {run + 2}: {again.tolist()} differs from run 1: {first.tolist()}"


@pytest.mark.slow
def test_more_than_2_31_elements():
    # 64-bit indexing, checked on the device in chunks. bfloat16 keeps the tensors (state with one
    # spare element, its copy, f) at 13 GB; the float64 chunks of the comparison take about 8 GB more.
    n = (1 << 31) + 37
    chunk = 1 << 28
    need = 3 * (n + 1) * 2 + 5 * chunk * 8
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory for 2^31 + 37 bfloat16 elements, "
                    f"{free / 2**30:.1f} GiB free")
    g = torch.Generator(device=DEVICE).manual_seed(7)
    base = torch.randn(n + 1, device=DEVICE, dtype=torch.bfloat16, generator=g)
    f = torch.randn(n, device=DEVICE, dtype=torch.bfloat16, generator=g)
    original = base.clone()
    # offset 0: vectorized; offset 1 against an aligned f: every element on the scalar path.
    for offset in (0, 1):
        state = base[offset:offset + n]
        rk.relax_(state, f, 0.8, backend="cuda")
        what = f"relax_ n=2^31+37 offset={offset}"
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            want = 0.2 * original[offset + start:offset + stop].double() + 0.8 * f[start:stop].double()
            torch.testing.assert_close(state[start:stop].double(), want, atol=4e-2, rtol=1e-2,
                                       msg=lambda m, w=what, s=start: f"{w}, chunk at {s}: {m}")
        untouched = torch.equal(base[:offset], original[:offset]) and torch.equal(base[offset + n:],
                                                                                 original[offset + n:])
        assert untouched, f"{what}: wrote outside the view"
        got = rk.residual(state, f, backend="cuda")
        want = sum(expected_residual(state[i:i + chunk], f[i:i + chunk]) for i in range(0, n, chunk))
        rel = ((got.double() - want).abs() / want).max().item()
        assert rel <= 1e-4, f"residual n=2^31+37 offset={offset}: relative error {rel:.3e}"
        base.copy_(original)


def test_direct_op_call_checks_arguments():
    s = torch.randn(5, device=DEVICE)
    with pytest.raises(ValueError, match=r"relax_: f_val is on cpu but state is on cuda:\d"):
        torch.ops.revdeq.relax_(s, torch.randn(5), 0.5)
    with pytest.raises(ValueError, match=r"unrelax_: f_val has shape \[4\] but state has shape \[5\]"):
        torch.ops.revdeq.unrelax_(s, torch.randn(4, device=DEVICE), 0.5)
    with pytest.raises(ValueError, match="internal overlap"):
        torch.ops.revdeq.relax_(torch.randn(1, device=DEVICE).expand(5), torch.randn(5, device=DEVICE), 0.5)
    with pytest.raises(TypeError, match="residual: fz has dtype Float, which z"):
        torch.ops.revdeq.residual(s.half(), s)


def test_direct_op_call_refuses_overlapping_state_and_f():
    x = torch.randn(4096, device=DEVICE)
    for op in (torch.ops.revdeq.relax_, torch.ops.revdeq.unrelax_):
        with pytest.raises(ValueError, match="f_val shares memory with state"):
            op(x[1:], x[:-1], 0.5)


def _cudart_of_extension():
    """ctypes handle of the CUDA runtime revdeq_kernels._C uses (the one mapped into this process)."""
    import ctypes

    with open("/proc/self/maps") as fh:
        paths = sorted({line.split()[-1] for line in fh if "libcudart" in line and line.split()[-1].startswith("/")})
    if len(paths) != 1:
        pytest.skip(f"cannot tell which CUDA runtime the extension uses: {paths or 'none mapped'}")
    return ctypes.CDLL(paths[0])


def test_an_error_earlier_work_left_pending_is_reported_as_such():
    # A failed runtime call leaves its error pending until cudaGetLastError reads it; before the fix the
    # next op read it after its own launch and reported it as its kernel's failure.
    import ctypes

    x, f = torch.randn(1000, device=DEVICE), torch.randn(1000, device=DEVICE)
    cudart = _cudart_of_extension()
    assert cudart.cudaSetDevice(ctypes.c_int(1 << 20)) != 0  # no such device: cudaErrorInvalidDevice, pending
    with pytest.raises(RuntimeError, match=r"relax_: a CUDA error from earlier work on this device was pending when "
                                           r"relax_ was called: cudaErrorInvalidDevice .*It is not from relax_"):
        torch.ops.revdeq.relax_(x, f, 0.5)
    want = 0.5 * x + 0.5 * f  # reported once, then cleared: the next call runs
    torch.ops.revdeq.relax_(x, f, 0.5)
    torch.testing.assert_close(x, want)


def test_runs_on_the_current_stream():
    # f is written on a side stream after a long sleep. Launched on that stream, the kernels see the
    # new f; launched on any other stream they would race ahead and read the old one.
    n = 1 << 20
    state = torch.randn(n, device=DEVICE)
    f = torch.zeros(n, device=DEVICE)
    new_f = torch.randn(n, device=DEVICE)
    want_state = 0.2 * state + 0.8 * new_f

    def launch():
        rk.relax_(state, f, 0.8, backend="cuda")
        return rk.residual(state, f, backend="cuda")

    out = launch_after_a_late_write(f, new_f, launch)
    torch.testing.assert_close(state, want_state)
    torch.testing.assert_close(out, torch.stack([((want_state - new_f) ** 2).sum(), (new_f ** 2).sum()]),
                               rtol=1e-5, atol=0)


def test_tensors_on_another_device():
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA devices to test the device guard, {torch.cuda.device_count()} visible")
    with torch.cuda.device(0):
        for pair in [(torch.float32, torch.bfloat16), (torch.float64, torch.float64)]:
            check_pointwise("cuda", "relax_", 70001, pair, 0.8, "cuda:1")
            check_residual("cuda", 70001, pair, "cuda:1")


# A small run of every kernel: each dtype pair, sizes around the pack and block boundaries, aligned
# and misaligned views, run under compute-sanitizer by run_compute_sanitizer.
_SANITIZER_SCRIPT = textwrap.dedent("""
    import torch
    import revdeq_kernels  # registers torch.ops.revdeq
    dtypes = [(torch.float64, torch.float64), (torch.float64, torch.float32), (torch.float64, torch.float16),
              (torch.float64, torch.bfloat16), (torch.float32, torch.float32), (torch.float32, torch.float16),
              (torch.float32, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)]
    for s_dtype, f_dtype in dtypes:
        for n in (1, 7, 17, 1023, 4099):
            for s_off, f_off in ((0, 0), (1, 1), (0, 1), (3, 0)):
                s = torch.randn(n + s_off, device="cuda").to(s_dtype)[s_off:]
                f = torch.randn(n + f_off, device="cuda").to(f_dtype)[f_off:]
                torch.ops.revdeq.relax_(s, f, 0.8)
                torch.ops.revdeq.unrelax_(s, f, 1.3)
                torch.ops.revdeq.residual(s, f)
    torch.cuda.synchronize()
    print("sanitizer script done")
""")


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool):
    output = run_compute_sanitizer(tool, _SANITIZER_SCRIPT)
    assert "ERROR SUMMARY: 0 errors" in output or "RACECHECK SUMMARY: 0 hazards" in output, output[-6000:]
