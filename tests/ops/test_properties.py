"""Property-based tests (hypothesis) of the fused ops against float64 math, on every backend here.

Hypothesis draws the shape, the memory layout of each argument (a strided slice at an offset into a
larger buffer, a transposed view), the dtype pair, beta on both sides of 1, the values' scale (from
subnormal-adjacent to the top of float32's range) and the single-tensor or list form. Each example checks
relax_, unrelax_ and residual on fresh copies: the result against float64 math from the same inputs, and
that nothing outside the state's view was written. Bounded for CI: a fixed number of examples per
backend, derandomized so that a failure reproduces.
"""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the test extra: pip install -e .[test]")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import revdeq_kernels as rk  # noqa: E402
from helpers import backends as targets  # noqa: E402
from helpers.op_cases import DTYPE_PAIRS, TOLERANCE, expected_residual  # noqa: E402

EXAMPLES = {"reference": 150, "cpp": 150, "triton": 60, "cuda": 150}
# Multiplies standard normal values: float32 states and f up to near the top of their range (the
# overflow the old unrelax_ coefficients hit), float64 further.
SCALES = {torch.float32: [1e-30, 1e-3, 1.0, 1e6, 1e30, 1e37], torch.float64: [1e-300, 1e-3, 1.0, 1e6, 1e300]}


@st.composite
def views(draw, shape, dtype, device, generator_seed):
    """A tensor of ``shape`` laid out as hypothesis picks, inside a base buffer with guard elements."""
    layout = draw(st.sampled_from(["contiguous", "offset", "strided", "transposed"]))
    g = torch.Generator().manual_seed(generator_seed)
    numel = math.prod(shape)
    if layout == "contiguous":
        base = torch.randn(numel, generator=g, dtype=torch.float64)
        return base.to(dtype).to(device).view(shape), None
    if layout == "offset":
        offset = draw(st.integers(1, 7))
        base = torch.randn(numel + offset + 3, generator=g, dtype=torch.float64).to(dtype).to(device)
        return base[offset:offset + numel].view(shape), base
    if layout == "strided":
        step = draw(st.integers(2, 3))
        base = torch.randn(numel * step + 2, generator=g, dtype=torch.float64).to(dtype).to(device)
        return base[1:1 + numel * step:step].view(shape) if len(shape) == 1 else \
            base[1:1 + numel * step:step].as_strided(shape, [s * step for s in _contiguous_strides(shape)]), base
    base = torch.randn(*reversed(shape), generator=g, dtype=torch.float64).to(dtype).to(device)
    return base.permute(*reversed(range(len(shape)))), None


def _contiguous_strides(shape):
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= size
    return list(reversed(strides))


@st.composite
def cases(draw, device):
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    pair = draw(st.sampled_from(DTYPE_PAIRS))
    beta = draw(st.one_of(st.floats(0.05, 0.95), st.floats(1.05, 1.95)))
    both_wide = pair[1] in (torch.float64, torch.float32)
    scale = draw(st.sampled_from(SCALES[pair[1]])) if both_wide else 1.0  # f's dtype bounds the range
    seed = draw(st.integers(0, 2 ** 16))
    state, state_base = draw(views(shape, pair[0], device, seed))
    f, _ = draw(views(shape, pair[1], device, seed + 1))
    if scale != 1.0:  # scale exactly (a power-of-ten factor, then rounded once to each dtype)
        state.copy_((state.double() * scale).to(pair[0]))
        f.copy_((f.double() * scale).to(pair[1]))
    as_list = draw(st.booleans())
    return state, state_base, f, beta, scale, as_list


def _check_case(backend, case):
    state, base, f, beta, scale, as_list = case
    atol, rtol = TOLERANCE[state.dtype]
    s64, f64 = state.double().cpu(), f.double().cpu()
    for op in ("relax_", "unrelax_"):
        work = state.clone() if base is None else None
        if base is not None:  # update the view in place inside its own copy of the base buffer
            base_copy = base.clone()
            work = base_copy.as_strided(state.shape, state.stride(), state.storage_offset())
        getattr(rk, op)([work] if as_list else work, [f] if as_list else f, beta, backend=backend)
        want = (1 - beta) * s64 + beta * f64 if op == "relax_" else (s64 - beta * f64) / (1 - beta)
        amplification = 4 if op == "relax_" else 4 / abs(1 - beta)
        if state.dtype in (torch.float16, torch.bfloat16):
            want = want.to(state.dtype).double()  # the result must first fit the state's range and ulp
        bound = scale * atol * amplification + rtol * amplification * want.abs()
        got = work.double().cpu()
        bad = ~((got - want).abs() <= bound)
        assert not bad.any(), (f"{backend} {op} beta={beta} {state.dtype}/{f.dtype} shape={tuple(state.shape)} "
                               f"stride={state.stride()} scale={scale}: {int(bad.sum())} off, got "
                               f"{got[bad][:3].tolist()} want {want[bad][:3].tolist()}")
        if base is not None:  # nothing outside the view was written
            outside = torch.ones(base.numel(), dtype=torch.bool, device=base.device)
            index = torch.arange(base.numel(), device=base.device).as_strided(
                state.shape, state.stride(), state.storage_offset())
            outside[index.reshape(-1)] = False
            assert torch.equal(base_copy[outside], base[outside]), f"{backend} {op} wrote outside the state's view"
    if scale not in (1e-3, 1.0, 1e6):
        return  # residual returns squared norms: 1e-30 squared underflows float32, 1e300 squared overflows (README)
    got = rk.residual([state] if as_list else state, [f] if as_list else f, backend=backend).double().cpu()
    want = expected_residual(s64, f64)
    tol = 1e-10 if state.dtype == torch.float64 else 1e-4
    assert ((got - want).abs() <= tol * want.abs() + 1e-300).all(), (backend, got.tolist(), want.tolist())


def _property_test(target):
    @settings(max_examples=EXAMPLES[target.backend], deadline=None, derandomize=True, database=None)
    @given(cases(target.device))
    def run(case):
        _check_case(target.backend, case)
    run()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in Triton's interpreter
@pytest.mark.parametrize("target", targets.params())
def test_ops_match_float64_math_on_random_shapes_strides_offsets_dtypes_and_betas(target):
    _property_test(target)
