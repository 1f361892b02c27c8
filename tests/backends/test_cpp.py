"""What only the C++ CPU kernels (revdeq_kernels._C) have: the build, being the CPU default, thread-count
independence, and the checks of direct op calls, for the float ops and exact mode (the shared cases are in
tests/ops/)."""

import os

import pytest
import torch

import revdeq_kernels as rk
from helpers.exact_cases import assert_equal, random_f, random_state, run
from revdeq_kernels import backends
from revdeq_kernels import exact as fxp
from revdeq_kernels.backends import compiled as extension
from revdeq_kernels.exact import DyadicBeta, FixedStatus

# A pure-Python install (REVDEQ_SKIP_BUILD=1) has no C++ backend to test; anywhere else a missing
# extension is a build failure, so it fails here rather than skipping.
pytestmark = pytest.mark.skipif(os.environ.get("REVDEQ_SKIP_BUILD") == "1",
                                reason="REVDEQ_SKIP_BUILD=1: installed without the C++ extension")


def test_extension_is_built():
    assert extension.loaded(), extension.unavailable_reason("cpu")


def test_cpp_is_the_default_for_cpu_tensors():
    assert rk.available_backends()["cpu"][0] == "cpp"


def test_residual_is_independent_of_thread_count():
    z, fz = torch.randn(3 * (1 << 16) + 5), torch.randn(3 * (1 << 16) + 5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rk.residual(z, fz, backend="cpp")
        torch.set_num_threads(max(2, threads))
        many = rk.residual(z, fz, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many), f"1 thread {one.tolist()} vs {max(2, threads)} threads {many.tolist()}"


@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(),
                    reason="torch's at::parallel_for is not OpenMP here")
def test_kernels_run_at_parallel_for_on_torchs_openmp_threads():
    # at::parallel_for is a `#pragma omp parallel` in a header: compiled without -fopenmp (as _C was until
    # setup.py added it) every kernel ran on one thread and the thread-count tests above passed vacuously.
    import shutil
    import subprocess

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    symbols = subprocess.run([nm, "-D", extension._C.__file__], capture_output=True, text=True, check=True).stdout
    assert "GOMP_parallel" in symbols, "revdeq_kernels._C was compiled without OpenMP: its kernels use one thread"
    needed = subprocess.run([shutil.which("readelf") or "readelf", "-d", extension._C.__file__], capture_output=True,
                            text=True).stdout
    assert "gomp" not in "".join(line for line in needed.splitlines() if "NEEDED" in line), (
        "_C must use the OpenMP runtime torch loads, not link a second one")


def test_direct_op_call_checks_arguments():
    # torch.ops.revdeq.* bypass the Python checks, so the C++ side must refuse unsafe input itself.
    with pytest.raises(ValueError, match=r"relax_: f_val has shape \[4\] but state has shape \[5\]"):
        torch.ops.revdeq.relax_(torch.randn(5), torch.randn(4), 0.5)
    with pytest.raises(TypeError, match="f_val has dtype Double, which state"):
        torch.ops.revdeq.unrelax_(torch.randn(5), torch.randn(5, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="beta must be a finite number in"):
        torch.ops.revdeq.relax_(torch.randn(5), torch.randn(5), 1.0)
    with pytest.raises(ValueError, match="internal overlap"):
        torch.ops.revdeq.relax_(torch.randn(1).expand(5), torch.randn(5), 0.5)
    with pytest.raises(TypeError, match="residual: z must be float64, float32, float16 or bfloat16"):
        torch.ops.revdeq.residual(torch.ones(5, dtype=torch.int32), torch.ones(5, dtype=torch.int32))


@pytest.mark.parametrize("op", ["relax_", "unrelax_"])
def test_direct_op_call_refuses_overlapping_state_and_f(op):
    # The Python check does not run for torch.ops.revdeq.* called directly, nor inside torch.compile: the
    # kernel, which reads f while it writes state, must refuse memory they share. It compares addresses,
    # so two storages over the same memory (numpy views) are caught too.
    x = torch.randn(64, dtype=torch.float64)
    kernel = getattr(torch.ops.revdeq, op)
    with pytest.raises(ValueError, match=rf"{op}: f_val shares memory with state"):
        kernel(x[1:], x[:-1], 0.5)
    np = pytest.importorskip("numpy")
    a = np.random.default_rng(0).standard_normal(5000)
    state, f_val = torch.from_numpy(a[2:]), torch.from_numpy(a[:-2])
    assert state.untyped_storage().data_ptr() != f_val.untyped_storage().data_ptr()  # separate storages
    with pytest.raises(ValueError, match=rf"{op}: f_val shares memory with state"):
        kernel(state, f_val, 0.5)
    before = x.clone()
    with pytest.raises(ValueError, match=rf"{op}: f_val shares memory with state"):
        torch.compile(lambda s, f: kernel(s, f, 0.5), fullgraph=True, backend="eager")(x[1:], x[:-1])
    assert torch.equal(x, before)
    kernel(x[32:], x[:32].clone(), 0.5)  # disjoint halves are fine
    kernel(x[32:], x[:32], 0.5)


# ---------------------------------------------------------------------------------------------------
# Exact mode

def test_exact_result_does_not_depend_on_thread_count():
    g = torch.Generator().manual_seed(2)
    n, beta = (1 << 20) + 3, DyadicBeta(13, 4)
    state, f = random_state(n, g), random_f(n, torch.float32, g)
    remainder = torch.zeros(fxp.remainder_shape(n, beta.m), dtype=torch.int32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("relax_fixed_", "cpp", state, f, beta, remainder)
        torch.set_num_threads(max(2, threads))
        many = run("relax_fixed_", "cpp", state, f, beta, remainder)
    finally:
        torch.set_num_threads(threads)
    for a, b, name in zip(one, many, ("state", "remainder", "status")):
        assert_equal(a, b, f"1 vs {max(2, threads)} threads: {name}")


def test_exact_status_is_ored_not_overwritten():
    status = torch.tensor([FixedStatus.INVERSE_MISMATCH], dtype=torch.int32)
    rk.relax_fixed_(fxp.to_fixed(torch.ones(2)), torch.ones(2), (1, 1), torch.zeros(1, 1, dtype=torch.int32),
                    status=status, backend="cpp")
    assert status.item() == FixedStatus.INVERSE_MISMATCH


def test_cpp_is_the_default_and_reports_fixed_kernels():
    assert extension.unavailable_reason("cpu", "exact") is None
    assert backends.REGISTRY["cpp"].unavailable_reason("cpu", "exact") is None
    assert rk.available_backends()["exact"]["cpu"][0] == "cpp"
    if not extension.built_with_cuda():
        assert "built without CUDA" in extension.unavailable_reason("cuda", "exact")


def test_direct_exact_op_call_checks_arguments():
    state, f, rem, status = fxp.to_fixed(torch.ones(40)), torch.ones(40), torch.zeros(4, 2, dtype=torch.int32), \
        fxp.new_status()
    op = torch.ops.revdeq.relax_fixed_
    cases = [
        ((state.double(), f, rem, status, 13, 4, 32), TypeError, "relax_fixed_: state must be int64"),
        ((state, state, rem, status, 13, 4, 32), TypeError, "relax_fixed_: f_val must be float64, float32"),
        ((state, f[:5], rem, status, 13, 4, 32), ValueError, r"f_val has shape \[5\] but state has shape \[40\]"),
        ((state, f, rem, status, 12, 4, 32), ValueError, "needs p odd in"),
        ((state, f, rem, status, 13, 9, 32), ValueError, r"needs m in \[1, 8\], got m=9"),
        ((state, f, rem, status, 13, 4, 53), ValueError, r"frac_bits must be in \[0, 52\], got 53"),
        ((state, f, rem[:2], status, 13, 4, 32), ValueError, r"remainder must have shape \[4, 2\]"),
        ((state, f, rem.long(), status, 13, 4, 32), TypeError, "remainder must be int32"),
        ((state, f, torch.zeros(4, 4, dtype=torch.int32)[:, ::2], status, 13, 4, 32), ValueError,
         "remainder must be contiguous"),
        ((state, f, rem, torch.zeros(2, dtype=torch.int32), 13, 4, 32), ValueError, "status must have one element"),
        ((state, f, rem, rem[0, :1], 13, 4, 32), ValueError, "status shares memory with remainder"),
        ((state[:1].expand(40), f, rem, status, 13, 4, 32), ValueError, "internal overlap"),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            op(*args)
    with pytest.raises(ValueError, match="unrelax_fixed_: f_val shares memory with state"):
        torch.ops.revdeq.unrelax_fixed_(state, state.view(torch.float64), rem, status, 13, 4, 32)
