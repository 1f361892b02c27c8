"""relax_, unrelax_ and residual on every backend, against float64 math (the reference backend is itself
one of the targets: it is the oracle the solver and the other test files lean on).

Each target runs the same cases: every dtype pair at sizes around its tiles, every layout a caller may
pass, an empty tensor through the op, ``torch.library.opcheck`` on its registered ops and a
``torch.compile(fullgraph=True)`` trace. What only one backend has (thread-count independence,
autotuning, streams, 2^31 elements, compute-sanitizer) is in tests/backends/.
"""

import pytest
import torch

import revdeq_kernels as rk
from helpers.backends import TARGETS, WITH_OPS, params
from helpers.op_cases import (
    BETAS,
    DTYPE_PAIRS,
    LAYOUTS,
    POINTWISE_OPS,
    SIZES,
    assert_close,
    check_layouts,
    check_pointwise,
    check_residual,
    expected_pointwise,
    expected_residual,
    opcheck_ops,
    pair_id,
)

# Triton's interpreter takes 1024-element programs one at a time: its sizes reach every path (one masked
# tile, tails around a block, many programs; for residual several tiles per program) with few programs.
TRITON_SIZES = [1, 7, 1023, 4097, 3 * 8192 + 5]
LAYOUT_PAIRS = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                (torch.float64, torch.float32)]


def _sizes(target):
    return TRITON_SIZES if target.backend == "triton" else SIZES


def _layout_cases(target):
    pairs = DTYPE_PAIRS if target.backend == "cuda" else LAYOUT_PAIRS
    return [(layout, pair_id(pair)) for layout in LAYOUTS for pair in pairs]


_PAIRS_BY_ID = {pair_id(p): p for p in DTYPE_PAIRS}


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("op", POINTWISE_OPS)
@pytest.mark.parametrize("target, n", params(per_target=_sizes))
def test_pointwise(target, n, op, pair):
    for beta in BETAS:
        check_pointwise(target.backend, op, n, pair, beta, target.device)


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("target, n", params(per_target=_sizes))
def test_residual(target, n, pair):
    check_residual(target.backend, n, pair, target.device)  # also checks that two runs agree bitwise


@pytest.mark.parametrize("target, layout, pair", params(per_target=_layout_cases))
def test_layouts(target, layout, pair):
    # "offset" is x[1:] for both arguments: a head realigns them for the vectorized kernels.
    sizes = (7, 4097) if target.backend == "triton" else (7, 70001)
    check_layouts(target.backend, layout, _PAIRS_BY_ID[pair], target.device, sizes=sizes)


@pytest.mark.parametrize("target", params())
def test_multidimensional_state_with_permuted_f(target):
    g = torch.Generator().manual_seed(5)
    state = torch.randn(3, 40, 33, generator=g).permute(2, 0, 1).to(target.device)  # dense, not contiguous
    f = torch.randn(33, 3, 40, generator=g).to(target.device, torch.bfloat16)      # contiguous: another order
    want = expected_pointwise("relax_", state, f, 0.7)
    rk.relax_(state, f, 0.7, backend=target.backend)
    assert_close(state, want, torch.float32, amplification=4, what=f"{target} permuted relax_")
    got = rk.residual(state, f, backend=target.backend)
    assert_close(got, expected_residual(state, f), torch.float32, what=f"{target} permuted residual")


@pytest.mark.parametrize("shape", [(0,), (3, 0)])
@pytest.mark.parametrize("target", params(WITH_OPS))
def test_empty_tensors_through_the_op(target, shape):
    # rk.* return early on empty tensors; torch.ops.revdeq.* reach each backend's own handling.
    ops, prefix = torch.ops.revdeq, target.op_prefix
    state = torch.empty(shape, device=target.device)
    f = torch.empty(shape, device=target.device, dtype=torch.bfloat16)
    getattr(ops, f"{prefix}relax_")(state, f, 0.5)
    getattr(ops, f"{prefix}unrelax_")(state, f, 0.5)
    out = getattr(ops, f"{prefix}residual")(state, f)
    assert out.shape == (2,) and out.dtype == torch.float32 and out.device == state.device
    assert torch.equal(out.cpu(), torch.zeros(2))
    assert getattr(ops, f"{prefix}residual")(state.double(), f).dtype == torch.float64


@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.float64, torch.bfloat16),
                                  (torch.bfloat16, torch.bfloat16)], ids=pair_id)
@pytest.mark.parametrize("target", params(WITH_OPS))
def test_opcheck(target, pair):
    opcheck_ops(target.op_prefix, pair, target.device)


def compile_and_check(target, compile_backend):
    """relax_, unrelax_ and residual inside torch.compile(fullgraph=True), on float64 states and an f laid out
    otherwise, against float64 math."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend=compile_backend)
    def step(y, z, fz, beta):
        rk.relax_(y, fz, beta, backend=target.backend)
        rk.unrelax_(z, fz, beta, backend=target.backend)
        return rk.residual(z, fz, backend=target.backend).sqrt()

    g = torch.Generator().manual_seed(7)
    y, z = (torch.randn(33, 31, generator=g, dtype=torch.float64).to(target.device) for _ in range(2))
    fz = torch.randn(31, 33, generator=g).to(target.device).t()  # another layout than the states
    y_want = expected_pointwise("relax_", y, fz, 0.8)
    z_want = expected_pointwise("unrelax_", z, fz, 0.8)
    out = step(y, z, fz, 0.8)
    what = f"{target} compiled ({compile_backend})"
    assert_close(y, y_want, torch.float64, amplification=4, what=f"{what} relax_")
    assert_close(z, z_want, torch.float64, amplification=20, what=f"{what} unrelax_")
    assert_close(out, expected_residual(z_want, fz).sqrt(), torch.float64, what=f"{what} residual")


@pytest.mark.parametrize("target", params())
def test_torch_compile_fullgraph(target):
    # aot_eager traces every op without a graph break (inductor would too, but spends ~25 s compiling
    # the surrounding CPU code; the GPU tests run inductor).
    compile_and_check(target, "aot_eager")


@pytest.mark.gpu
@pytest.mark.parametrize("target", params(("triton", "cuda")))
def test_gpu_torch_compile_fullgraph_inductor(target):
    compile_and_check(target, "inductor")


def test_every_backend_is_a_target():
    # A backend added to the registry must be added to the targets here, or its kernels go untested.
    from revdeq_kernels import backends

    assert set(TARGETS) == set(backends.NAMES)
