"""The C++ CPU kernels (revdeq_kernels._C) against float64 math, plus their op registration."""

import os

import pytest
import torch

import revdeq_kernels as rk
from op_cases import (
    BETAS,
    DTYPE_PAIRS,
    LAYOUTS,
    POINTWISE_OPS,
    SIZES,
    check_layouts,
    check_pointwise,
    check_residual,
    opcheck_ops,
    pair_id,
)
from revdeq_kernels.backends import extension

# A pure-Python install (REVDEQ_SKIP_BUILD=1) has no C++ backend to test; anywhere else a missing
# extension is a build failure, so it fails here rather than skipping.
pytestmark = pytest.mark.skipif(os.environ.get("REVDEQ_SKIP_BUILD") == "1",
                                reason="REVDEQ_SKIP_BUILD=1: installed without the C++ extension")


def test_extension_is_built():
    assert extension.loaded(), extension.unavailable_reason("cpu")


def test_cpp_is_the_default_for_cpu_tensors():
    assert rk.available_backends()["cpu"][0] == "cpp"


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("op", POINTWISE_OPS)
def test_pointwise(op, n, pair):
    for beta in BETAS:
        check_pointwise("cpp", op, n, pair, beta, "cpu")


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("n", SIZES)
def test_residual(n, pair):
    check_residual("cpp", n, pair, "cpu")


@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                  (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float32)], ids=pair_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(layout, pair):
    check_layouts("cpp", layout, pair, "cpu", sizes=(7, 70001))


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


@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.float64, torch.bfloat16),
                                  (torch.bfloat16, torch.bfloat16)], ids=pair_id)
def test_opcheck(pair):
    opcheck_ops("", pair, "cpu")


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
