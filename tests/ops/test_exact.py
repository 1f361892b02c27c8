"""Exact mode: the fixed-point format (revdeq_kernels/exact) and relax_fixed_ / unrelax_fixed_ on every backend.

Integers leave no room for tolerances: the reference is checked against a big-integer model of
the spec, every other backend against the reference with torch.equal (state, remainder, status),
and forward-then-inverse must give back the start bit for bit. What only one backend has (thread-count
independence, autotuning, 2^31 elements, streams, compute-sanitizer) is in tests/backends/.
"""

import dataclasses
import math
from fractions import Fraction

import pytest
import torch

import revdeq_kernels as rk
from helpers.backends import WITH_OPS, params
from helpers.exact_cases import (
    BETAS,
    F_DTYPES,
    LAYOUTS,
    F,
    assert_equal,
    assert_same,
    beta_id,
    check_against_reference,
    check_bad_elements,
    check_compiled_half_steps,
    check_errors_raise_or_set_the_status,
    check_layout,
    check_round_trip,
    opcheck_fixed_ops,
    random_f,
    random_state,
    run,
)
from revdeq_kernels import backends, ops
from revdeq_kernels import exact as fxp
from revdeq_kernels.backends import compiled as extension
from revdeq_kernels.exact import LIMIT, DyadicBeta, ExactModeError, FixedStatus

SIZES = [1, 7, 100, 1023, (1 << 20) + 3]


# ---------------------------------------------------------------------------------------------
# The format: dyadic beta, modular inverse, packing, conversions.

@pytest.mark.parametrize("beta, max_bits, want", [
    (0.8125, 8, (13, 4)), (0.5, 8, (1, 1)), (0.375, 8, (3, 3)), (255 / 256, 8, (255, 8)),
    (1.3125, 8, (21, 4)), (0.8, 8, (205, 8)), (0.8, 4, (13, 4)), (0.7, 1, (1, 1)),
    (1.5 / 256, 8, (1, 7)),  # a tie between 1/256 and 2/256: the even one, with fewer bits
    (1 / 512 + 1e-9, 8, (1, 8)), (1.99, 8, (509, 8)),
])
def test_dyadic_beta_rounds_to_the_nearest(beta, max_bits, want):
    got = fxp.dyadic_beta(beta, max_bits)
    assert tuple(got) == want and got.p % 2 == 1
    assert abs(got.value - beta) <= 0.5 / (1 << max_bits)
    assert str(got) == f"{want[0]}/{1 << want[1]}" and got.keep == (1 << want[1]) - want[0]


@pytest.mark.parametrize("beta", [0.0, 1 / 1024, 1.0, 1.001, 0.999, 2.0, -0.5, float("nan"), float("inf")])
def test_dyadic_beta_refuses_what_rounds_out_of_range(beta):
    with pytest.raises(ValueError, match=r"dyadic_beta: beta(=| must be a finite real number)"):
        fxp.dyadic_beta(beta)


def test_dyadic_beta_argument_types():
    with pytest.raises(ValueError, match=r"max_bits must be an integer in \[1, 8\], got 9"):
        fxp.dyadic_beta(0.5, 9)
    with pytest.raises(ValueError, match="beta must be a finite real number, got '0.5'"):
        fxp.dyadic_beta("0.5")


def test_inverse_mod_2_64_for_every_coefficient():
    # Every 2^m - p a valid beta can produce, negative ones included.
    for m in range(1, fxp.MAX_BETA_BITS + 1):
        for p in range(1, 2 << m, 2):
            a = (1 << m) - p
            x = fxp.inverse_mod_2_64(a)
            assert -(1 << 63) <= x < 1 << 63 and (a * x) % (1 << 64) == 1, (p, m)
    with pytest.raises(ValueError, match="must be odd"):
        fxp.inverse_mod_2_64(4)


@pytest.mark.parametrize("m", range(1, 9))
@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000, 4096])
def test_packing_round_trips_in_m_bits_per_element(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    r = torch.randint(0, 1 << m, (n,), generator=g)
    words = fxp.pack_remainder(r, m)
    assert words.dtype == torch.int32 and tuple(words.shape) == fxp.remainder_shape(n, m) == (m, -(-n // 32))
    assert_equal(fxp.unpack_remainder(words, m, n), r, "unpack(pack(r))")
    # The layout itself: bit b of element i is bit i % 32 of word [b, i // 32]; padding bits are 0.
    u = words.to(torch.int64) & 0xFFFFFFFF
    for i in {0, n // 2, n - 1}:
        for b in range(m):
            assert (u[b, i // 32] >> (i % 32)) & 1 == (r[i] >> b) & 1
    if n % 32:
        assert int((u[:, -1] >> (n % 32)).abs().sum()) == 0, "bits past the last element must be zero"


def test_remainder_memory_is_m_bits_per_element_per_half_step():
    n, m, half_steps = 4096, 4, 128
    buf = fxp.remainder_buffer(n, m, half_steps)
    assert buf.shape == (half_steps, m, n // 32) and buf.dtype == torch.int32
    nbytes = buf.numel() * buf.element_size()
    assert nbytes == fxp.remainder_bytes(n, m, half_steps) == m * n * half_steps // 8
    assert fxp.state_bytes(n, half_steps) == 8 * n * half_steps == nbytes * 64 // m
    # Sizes that are not a multiple of 32 round up to whole words: under 32 extra bits per plane.
    assert fxp.remainder_bytes(1000, 3, 1) == 4 * 3 * 32


def test_to_fixed_and_from_fixed():
    x = torch.tensor([1.5, -0.25, 2.0 ** -5, 3.0, -(2.0 ** -6)])
    y = fxp.to_fixed(x, frac_bits=4)
    assert y.dtype == torch.int64 and y.tolist() == [24, -4, 0, 48, -0]  # 2^-5 * 2^4 = 0.5 ties to 0
    assert fxp.to_fixed(torch.tensor([2.0 ** -5 * 3]), 4).tolist() == [2]  # 1.5 ties to 2
    g = torch.Generator().manual_seed(0)
    big = torch.randn(10000, generator=g, dtype=torch.float64) * 1e3
    back = fxp.from_fixed(fxp.to_fixed(big), dtype=torch.float64)
    assert (back - big).abs().max().item() <= 2.0 ** -(F + 1)
    y = random_state(10000, g)
    a, b = fxp.from_fixed(y, F, torch.float32), fxp.from_fixed(y.clone(), F, torch.float32)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert torch.equal(a, (y.double() / 2.0 ** F).float()), "one rounding, from the exact float64 value"
    edge = torch.tensor([LIMIT, -LIMIT], dtype=torch.int64)
    assert fxp.from_fixed(edge, F, torch.float64).tolist() == [2.0 ** 21, -(2.0 ** 21)]
    assert torch.equal(fxp.to_fixed(torch.tensor([2.0 ** 21, -(2.0 ** 21)], dtype=torch.float64)), edge)


def test_to_fixed_errors():
    with pytest.raises(ExactModeError, match=r"to_fixed: x has 2 non-finite elements \(first at index \(1, 0\): "
                                              r"nan\); exact mode cannot represent NaN or Inf"):
        fxp.to_fixed(torch.tensor([[1.0], [float("nan")], [float("inf")]]))
    with pytest.raises(ExactModeError, match=r"to_fixed: x holds values up to 3e\+06 in magnitude, outside the "
                                              r"range \|x\| <= 2\^21 = 2.09715e\+06 that frac_bits=32 represents; "
                                              r".*pass a smaller frac_bits to widen the range"):
        fxp.to_fixed(torch.tensor([1.0, -3e6], dtype=torch.float64))
    assert fxp.to_fixed(torch.tensor([3e6], dtype=torch.float64), frac_bits=30).item() == 3e6 * 2 ** 30
    with pytest.raises(ValueError, match=r"to_fixed: frac_bits must be an integer in \[0, 52\], got 53"):
        fxp.to_fixed(torch.ones(2), 53)
    with pytest.raises(TypeError, match="to_fixed: x must be a floating-point tensor, got torch.int64"):
        fxp.to_fixed(torch.ones(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="from_fixed: state must be an int64 tensor, got torch.float32"):
        fxp.from_fixed(torch.ones(2))


# ---------------------------------------------------------------------------------------------
# The reference against a big-integer model of the spec (exact/format.py's docstring, line by line).

def _model_q(f, frac_bits):
    if not math.isfinite(f):
        return None, FixedStatus.F_NOT_FINITE
    x = Fraction(f) * 2 ** frac_bits
    if abs(x) > LIMIT:
        return None, FixedStatus.F_OUT_OF_RANGE
    return round(x), 0  # Fraction rounds half to even


def _model(op, ys, fs, rs, p, m, frac_bits):
    """Python-int model: returns (states, remainders, status) for flat lists."""
    keep, inv, out, rem, status = (1 << m) - p, pow((1 << m) - p, -1, 1 << 64), [], [], 0
    for i, (y, f) in enumerate(zip(ys, fs)):
        q, flag = _model_q(f, frac_bits)
        new, r = y, 0
        if flag:
            status |= flag
        elif abs(y) > LIMIT:
            status |= FixedStatus.STATE_OUT_OF_RANGE
        elif op == "relax_fixed_":
            t = keep * y + p * q
            if abs(t >> m) > LIMIT:
                status |= FixedStatus.STATE_OUT_OF_RANGE
            else:
                new, r = t >> m, t & ((1 << m) - 1)
        else:
            back = ((y * (1 << m) + rs[i] - p * q) * inv) % (1 << 64)
            back = back - (1 << 64) if back >= 1 << 63 else back
            if abs(back) > LIMIT:
                status |= FixedStatus.INVERSE_MISMATCH
            else:
                new = back
        out.append(new)
        rem.append(r)
    return out, rem, status


@pytest.mark.parametrize("beta", BETAS, ids=beta_id)
@pytest.mark.parametrize("op", ["relax_fixed_", "unrelax_fixed_"])
def test_reference_matches_the_big_integer_model(op, beta):
    g = torch.Generator().manual_seed(beta.p * 7 + beta.m)
    n, frac_bits = 300, 20
    state = random_state(n, g, frac_bits)
    f = random_f(n, torch.float64, g, frac_bits)
    # Edges: the range limits, just past them, int64's extremes, non-finite and overflowing f.
    edge_states = [LIMIT, -LIMIT, LIMIT + 1, -LIMIT - 1, (1 << 63) - 1, -(1 << 63), 0, 1, -1]
    state[:len(edge_states)] = torch.tensor(edge_states)
    lim_f = 2.0 ** (53 - frac_bits)
    edge_f = [lim_f, -lim_f, lim_f * (1 + 2 ** -52), float("nan"), float("inf"), -float("inf"), 1e300, 0.0, -0.0]
    f[len(edge_states):len(edge_states) + len(edge_f)] = torch.tensor(edge_f, dtype=torch.float64)
    f[-len(edge_states):] = torch.tensor(edge_f, dtype=torch.float64)
    state[-len(edge_states):] = torch.tensor(edge_states)  # NaN f with an out-of-range state, etc.
    # Random remainders too: the inverse is defined (modular) even for inconsistent inputs.
    r = torch.randint(0, 1 << beta.m, (n,), generator=g)
    remainder = fxp.pack_remainder(r, beta.m)
    got_state, got_rem, got_status = run(op, "reference", state, f, beta, remainder, frac_bits)
    want_state, want_r, want_status = _model(op, state.tolist(), f.tolist(), r.tolist(), beta.p, beta.m, frac_bits)
    assert got_state.tolist() == want_state
    assert got_status.item() == want_status
    if op == "relax_fixed_":
        assert fxp.unpack_remainder(got_rem, beta.m, n).tolist() == want_r
    else:
        assert torch.equal(got_rem, remainder), "unrelax_fixed_ must not write the remainder"


# ---------------------------------------------------------------------------------------------
# Every backend against the reference, bit for bit (helpers/exact_cases.py holds the checks).

# Triton's interpreter runs 1024-element programs one at a time: sizes that reach one lane of a masked
# tile, a partial last word, one full tile and four with a tail of one element.
TRITON_BLOCK = 1024
TRITON_SIZES = [1, 100, TRITON_BLOCK, 4 * TRITON_BLOCK + 1]
# Around the CUDA warp tile (4 words = 128 elements) and the word (32): a lane alone, partial and exact
# words and tiles, several blocks, and many waves of the grid-stride loop.
CUDA_SIZES = [1, 7, 31, 32, 33, 100, 127, 128, 129, 1023, 4097, 70001, (1 << 20) + 3]
FEW_BETAS = [DyadicBeta(13, 4), DyadicBeta(255, 8), DyadicBeta(21, 4)]  # m = 4, m = 8, beta > 1


def _reference_cases(target):
    """(n, beta, f dtype) cases of test_matches_reference for each target."""
    if target.backend == "cpp":  # every beta at the small sizes; at 2^20 + 3 (seconds each), one of each kind
        return ([(n, beta, d) for n in SIZES[:-1] for beta in BETAS for d in F_DTYPES]
                + [(SIZES[-1], beta, torch.float32) for beta in FEW_BETAS])
    if target.backend == "triton":
        return ([(n, beta, torch.float32) for n in TRITON_SIZES for beta in BETAS]
                + [(2 * TRITON_BLOCK + 37, beta, d) for beta in FEW_BETAS for d in F_DTYPES if d != torch.float32])
    return [(n, beta, d) for n in CUDA_SIZES for beta in BETAS for d in F_DTYPES]


def _case_id(case):
    n, beta, dtype = case
    return f"{n}-{beta_id(beta)}-{str(dtype).replace('torch.', '')}"


def _reference_params():
    out = []
    for p in params(WITH_OPS):
        target = p.values[0]
        out += [pytest.param(target, case, marks=p.marks, id=f"{target}-{_case_id(case)}")
                for case in _reference_cases(target)]
    return out


@pytest.mark.parametrize("target, case", _reference_params())
def test_matches_reference(target, case):
    n, beta, f_dtype = case
    check_against_reference(target.backend, n, beta, f_dtype, target.device)


@pytest.mark.parametrize("beta", [DyadicBeta(13, 4), DyadicBeta(21, 4)], ids=beta_id)
@pytest.mark.parametrize("target", params(WITH_OPS))
def test_bad_elements(target, beta):
    check_bad_elements(target.backend, beta, target.device)


def _layout_cases(target):
    dtypes = [torch.float32, torch.float16] if target.backend == "cuda" else [torch.float32]
    return [(layout, str(d).replace("torch.", "")) for layout in LAYOUTS for d in dtypes]


@pytest.mark.parametrize("target, layout, f_dtype", params(per_target=_layout_cases))
def test_layouts_follow_row_major_element_order(target, layout, f_dtype):
    check_layout(target.backend, layout, target.device, getattr(torch, f_dtype))
    if target.backend == "cuda":
        check_layout(target.backend, layout, target.device, getattr(torch, f_dtype), shape=(301, 223))  # blocks


def _round_trip_cases(target):
    if target.interpreted:  # 32 half-steps through the interpreter, two betas
        return [(DyadicBeta(13, 4), 32), (DyadicBeta(21, 4), 32)]
    return [(beta, 256) for beta in (DyadicBeta(13, 4), DyadicBeta(1, 1), DyadicBeta(21, 4), DyadicBeta(255, 8))]


@pytest.mark.parametrize("target, beta, half_steps", params(per_target=_round_trip_cases))
def test_half_steps_reverse_bit_exactly(target, beta, half_steps):
    n = 100_003 if target.backend == "cuda" else 1000
    check_round_trip(target.backend, beta, target.device, n=n, half_steps=half_steps)


@pytest.mark.parametrize("target", params(WITH_OPS))
def test_frac_bits_other_than_the_default(target):
    # The kernels build 2^frac_bits from its bits; every width must quantise as the reference does.
    for frac_bits in (0, 1, 20, 52):
        g = torch.Generator().manual_seed(frac_bits)
        half_range = fxp.value_range(frac_bits) / 2
        state = fxp.to_fixed((torch.randn(300, generator=g, dtype=torch.float64) * 100).clamp(-half_range, half_range),
                             frac_bits).to(target.device)
        f = random_f(300, torch.float64, g, frac_bits).clamp(-half_range, half_range).to(target.device)
        rem = torch.zeros(fxp.remainder_shape(300, 4), dtype=torch.int32, device=target.device)
        for op in ("relax_fixed_", "unrelax_fixed_"):
            got = run(op, target.backend, state, f, DyadicBeta(13, 4), rem, frac_bits)
            want = run(op, "reference", state, f, DyadicBeta(13, 4), rem, frac_bits)
            assert_same(got, want, f"{target} {op} frac_bits={frac_bits}")


# ---------------------------------------------------------------------------------------------
# Errors: values exact mode cannot hold, on every backend.

@pytest.mark.parametrize("target", params())
def test_errors_raise_or_set_the_status(target):
    state, f, rem = check_errors_raise_or_set_the_status(target.backend, target.device)
    good = fxp.new_status(target.device)
    rk.relax_fixed_(state.clone(), f.nan_to_num(0.0), (13, 4), rem, status=good, backend=target.backend)
    assert good.item() == 0, "a clean call must leave the status alone"
    status = torch.tensor([FixedStatus.INVERSE_MISMATCH], dtype=torch.int32, device=target.device)
    rk.relax_fixed_(state.clone(), f.nan_to_num(0.0), (1, 1), rem[:1], status=status, backend=target.backend)
    assert status.item() == FixedStatus.INVERSE_MISMATCH, "flags already in the status stay"


@pytest.mark.parametrize("target", params())
def test_non_finite_f_raises_and_leaves_those_elements(target):
    device = target.device
    state = fxp.to_fixed(torch.linspace(-1, 1, 8)).to(device)
    f = torch.linspace(0.5, 1.5, 8, device=device)
    f[3], f[6] = float("nan"), float("inf")
    remainder, before = torch.zeros(4, 1, dtype=torch.int32, device=device), state.clone()
    with pytest.raises(ExactModeError, match=r"relax_fixed_: f_val has 2 non-finite elements \(first at index "
                                              r"\(3,\): nan\); exact mode cannot represent NaN or Inf"):
        rk.relax_fixed_(state, f, (13, 4), remainder, backend=target.backend)
    assert state[3] == before[3] and state[6] == before[6]
    ok = torch.tensor([i not in (3, 6) for i in range(8)], device=device)
    assert (state[ok] != before[ok]).all(), "the representable elements are still updated"
    words = remainder.to(torch.int64) & 0xFFFFFFFF
    assert int(((words >> 3) & 1).sum() + ((words >> 6) & 1).sum()) == 0, "rejected elements store zero bits"


@pytest.mark.parametrize("target", params())
def test_out_of_range_values_raise_with_the_range_and_the_fix(target):
    device, backend = target.device, target.backend
    rem = torch.zeros(4, 1, dtype=torch.int32, device=device)
    ones = fxp.to_fixed(torch.ones(3)).to(device)
    with pytest.raises(ExactModeError, match=r"relax_fixed_: f_val holds values up to 5e\+06 in magnitude, outside "
                                              r"the range \|x\| <= 2\^21 = 2.09715e\+06 that frac_bits=32 "
                                              r"represents; .*pass a smaller frac_bits to widen the range"):
        rk.relax_fixed_(ones.clone(), torch.tensor([1.0, -5e6, 2.0], device=device), (13, 4), rem, backend=backend)
    with pytest.raises(ExactModeError, match=r"unrelax_fixed_: f_val holds values up to 70000 .* 2\^5 = 32 that "
                                              r"frac_bits=48"):
        rk.unrelax_fixed_(fxp.to_fixed(torch.ones(3), 48).to(device), torch.tensor([7e4, 1, 1], device=device),
                          (13, 4), rem, frac_bits=48, backend=backend)
    with pytest.raises(ExactModeError, match=r"relax_fixed_: state holds values up to 4.1943e\+06 in magnitude"):
        rk.relax_fixed_(torch.tensor([LIMIT * 2, 0, 0], device=device), torch.ones(3, device=device), (13, 4), rem,
                        backend=backend)
    # beta > 1 can push an in-range state out: the update is refused, not wrapped.
    state = fxp.to_fixed(torch.tensor([2.0e6, 1.0, 0.0])).to(device)
    with pytest.raises(ExactModeError, match=r"relax_fixed_: the update would take a state outside the range "
                                              r"\|x\| <= 2\^21 .* \(beta > 1 amplifies the state\)"):
        rk.relax_fixed_(state, torch.tensor([-2.0e6, 1.0, 0.0], device=device), (21, 4), rem, backend=backend)
    assert state[0] == fxp.to_fixed(torch.tensor([2.0e6])).to(device), "the element that would overflow is unchanged"


@pytest.mark.parametrize("target", params())
def test_status_defers_the_error_without_a_sync(target):
    device = target.device
    status, rem = fxp.new_status(device), torch.zeros(1, 1, dtype=torch.int32, device=device)
    state = fxp.to_fixed(torch.ones(3)).to(device)
    rk.relax_fixed_(state, torch.tensor([1.0, float("nan"), 2.0], device=device), (1, 1), rem, status=status,
                    backend=target.backend)
    rk.relax_fixed_(state, torch.tensor([1.0, 1.0, 1e7], device=device), (1, 1), rem, status=status,
                    backend=target.backend)
    assert status.item() == FixedStatus.F_NOT_FINITE | FixedStatus.F_OUT_OF_RANGE
    with pytest.raises(ExactModeError, match=r"exact mode: f_val held NaN or Inf, which fixed point cannot "
                                              r"represent; f_val held values outside the range \|x\| <= 2\^21"):
        fxp.check_status(status)
    fxp.check_status(fxp.new_status())  # all clear: no error


@pytest.mark.parametrize("target", params())
def test_inverse_with_a_different_f_is_flagged(target):
    # f that does not reproduce its forward bits: with 2^m - p = 3 (beta 13/16) the inverse leaves the
    # range, which the forward never does, and is flagged; with 2^m - p = 1 (beta 1/2) every result is
    # in range, so only comparing the reconstructed start with the true one can tell (documented).
    g = torch.Generator().manual_seed(8)
    n, device = 256, target.device
    start, f = random_state(n, g).to(device), random_f(n, torch.float64, g).clamp(-100, 100).to(device)
    wrong = f + 2.0 ** -F  # q + 1 exactly
    for beta, detected in ((DyadicBeta(13, 4), True), (DyadicBeta(1, 1), False)):
        state = start.clone()
        rem = torch.zeros(fxp.remainder_shape(n, beta.m), dtype=torch.int32, device=device)
        rk.relax_fixed_(state, f, beta, rem, backend=target.backend)
        if detected:
            with pytest.raises(ExactModeError, match=r"unrelax_fixed_: the inverse produced states outside the "
                                                      r"range .* \(f must be deterministic\)"):
                rk.unrelax_fixed_(state, wrong, beta, rem, backend=target.backend)
        else:
            rk.unrelax_fixed_(state, wrong, beta, rem, backend=target.backend)
            assert not torch.equal(state, start)


@pytest.mark.parametrize("target", params())
def test_empty_tensors_are_a_no_op(target):
    device = target.device
    state = torch.empty(0, 3, dtype=torch.int64, device=device)
    rem = torch.empty(4, 0, dtype=torch.int32, device=device)
    f = torch.empty(0, 3, device=device)
    assert rk.relax_fixed_(state, f, (13, 4), rem, backend=target.backend) is state
    assert rk.unrelax_fixed_(state, f, (13, 4), rem, backend=target.backend) is state
    if target.op_prefix is not None:  # and straight through the registered ops
        status = fxp.new_status(device)
        getattr(torch.ops.revdeq, f"{target.op_prefix}relax_fixed_")(state, f.bfloat16(), rem, status, 13, 4, 32)
        getattr(torch.ops.revdeq, f"{target.op_prefix}unrelax_fixed_")(state, f, rem, status, 13, 4, 32)
        assert status.item() == 0


@pytest.mark.parametrize("f_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("target", params(WITH_OPS))
def test_opcheck(target, f_dtype):
    opcheck_fixed_ops(target.op_prefix, f_dtype, target.device)


@pytest.mark.parametrize("target", params())
def test_torch_compile_fullgraph_with_status(target):
    check_compiled_half_steps(target.backend, "aot_eager", target.device, n=4097 if target.backend == "cuda" else 257)


@pytest.mark.gpu
@pytest.mark.parametrize("target", params(("triton", "cuda")))
def test_gpu_torch_compile_fullgraph_inductor(target):
    check_compiled_half_steps(target.backend, "inductor", target.device, n=4097)


def test_backend_without_exact_kernels_raises_by_name_and_is_skipped_by_auto(monkeypatch):
    # A backend that declares the float ops only: asked for by name it raises; auto passes over it.
    cpp = backends.REGISTRY["cpp"]
    monkeypatch.setitem(backends.REGISTRY, "cpp", dataclasses.replace(cpp, families=("float", "multi")))
    monkeypatch.setattr(ops, "_resolved", {})
    state, rem = fxp.to_fixed(torch.ones(5)), torch.zeros(4, 1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"relax_fixed_: backend 'cpp' is not available for cpu tensors: it has "
                                           r"no fixed-point \(exact mode\) kernels"):
        rk.relax_fixed_(state, torch.ones(5), (13, 4), rem, backend="cpp")
    rk.relax_fixed_(state, torch.ones(5), (13, 4), rem)  # auto falls through to the reference
    assert ops._resolved[("cpu", "auto", "exact")] == "reference"


# ---------------------------------------------------------------------------------------------
# Bad arguments to the public ops.

i64 = fxp.to_fixed(torch.ones(40))
f32 = torch.ones(40)
rem4 = torch.zeros(4, 2, dtype=torch.int32)
shared = torch.zeros(100, dtype=torch.int64)

BAD_INPUTS = [
    ("float state", lambda: rk.relax_fixed_(f32.clone(), f32, (13, 4), rem4), TypeError,
     r"relax_fixed_: state must have dtype torch.int64 \(fixed point; convert with .*to_fixed\), got torch.float32"),
    ("int f", lambda: rk.relax_fixed_(i64.clone(), i64, (13, 4), rem4), TypeError,
     r"relax_fixed_: f_val must have dtype float64, float32, float16 or bfloat16, got torch.int64"),
    ("list state", lambda: rk.unrelax_fixed_([1], f32, (13, 4), rem4), TypeError,
     r"unrelax_fixed_: state must be a torch.Tensor, got list"),
    ("shape", lambda: rk.relax_fixed_(i64.clone(), f32[:39], (13, 4), rem4), ValueError,
     r"relax_fixed_: f_val has shape \(39,\) but state has shape \(40,\)"),
    ("device", lambda: rk.relax_fixed_(i64.clone(), f32.to("meta"), (13, 4), rem4), ValueError,
     r"relax_fixed_: f_val is on meta but state is on cpu"),
    ("float beta", lambda: rk.relax_fixed_(i64.clone(), f32, 0.8, rem4), TypeError,
     r"relax_fixed_: beta must be a \(p, m\) pair meaning p / 2\^m, got the float 0.8; round a float once with "
     r"revdeq_kernels.exact.dyadic_beta\(0.8\)"),
    ("beta triple", lambda: rk.relax_fixed_(i64.clone(), f32, (13, 4, 1), rem4), TypeError,
     r"beta must be a \(p, m\) pair of integers meaning p / 2\^m, got \(13, 4, 1\)"),
    ("even p", lambda: rk.relax_fixed_(i64.clone(), f32, (12, 4), rem4), ValueError,
     r"relax_fixed_: beta = p / 2\^m needs p odd in \(0, 2\^\(m\+1\)\) = \(0, 32\) .* got p=12, m=4"),
    ("p too big", lambda: rk.relax_fixed_(i64.clone(), f32, (33, 4), rem4), ValueError, r"got p=33, m=4"),
    ("m 9", lambda: rk.relax_fixed_(i64.clone(), f32, (13, 9), rem4), ValueError,
     r"relax_fixed_: beta = p / 2\^m needs m in \[1, 8\], got m=9"),
    ("m 0", lambda: rk.relax_fixed_(i64.clone(), f32, (1, 0), rem4), ValueError, r"needs m in \[1, 8\], got m=0"),
    ("frac_bits", lambda: rk.relax_fixed_(i64.clone(), f32, (13, 4), rem4, frac_bits=60), ValueError,
     r"relax_fixed_: frac_bits must be an integer in \[0, 52\], got 60"),
    ("frac_bits float", lambda: rk.relax_fixed_(i64.clone(), f32, (13, 4), rem4, frac_bits=32.0), ValueError,
     r"frac_bits must be an integer in \[0, 52\], got 32.0"),
    ("remainder shape", lambda: rk.relax_fixed_(i64.clone(), f32, (13, 4), rem4[:3]), ValueError,
     r"relax_fixed_: remainder must be an int32 tensor of shape \(4, 2\) \(m, ceil\(numel / 32\)\) on cpu, got "
     r"torch.int32 of shape \(3, 2\) on cpu"),
    ("remainder dtype", lambda: rk.unrelax_fixed_(i64.clone(), f32, (13, 4), rem4.long()), ValueError,
     r"unrelax_fixed_: remainder must be an int32 tensor .* got torch.int64 of shape \(4, 2\)"),
    ("remainder strided", lambda: rk.relax_fixed_(i64.clone(), f32, (13, 4),
                                                  torch.zeros(4, 4, dtype=torch.int32)[:, ::2]), ValueError,
     r"relax_fixed_: remainder must be contiguous, got strides \(4, 2\)"),
    ("remainder list", lambda: rk.relax_fixed_(i64.clone(), f32, (13, 4), [0]), TypeError,
     r"relax_fixed_: remainder must be a torch.Tensor, got list"),
    ("status dtype", lambda: rk.relax_fixed_(i64.clone(), f32, (13, 4), rem4, status=torch.zeros(1)), ValueError,
     r"relax_fixed_: status must be an int32 tensor of shape \(1,\) on cpu .* got torch.float32 of shape \(1,\)"),
    ("status shape", lambda: rk.relax_fixed_(i64.clone(), f32, (13, 4), rem4,
                                             status=torch.zeros(2, dtype=torch.int32)), ValueError,
     r"status must be an int32 tensor of shape \(1,\) .* got torch.int32 of shape \(2,\)"),
    ("f requires grad", lambda: rk.relax_fixed_(i64.clone(), torch.ones(40, requires_grad=True), (13, 4), rem4),
     RuntimeError, r"relax_fixed_: f_val requires grad and grad mode is on"),
    ("expanded state", lambda: rk.relax_fixed_(i64[:1].expand(40), f32, (13, 4), rem4), ValueError,
     r"relax_fixed_: state has internal overlap"),
    ("status aliases remainder", lambda: rk.relax_fixed_(i64.clone(), f32, (13, 4), rem4, status=rem4[0, :1]),
     ValueError, r"relax_fixed_: status shares memory with remainder"),
    ("remainder aliases state", lambda: rk.relax_fixed_(
        shared[:40], f32, (13, 4), shared[36:40].view(torch.int32).view(4, 2)), ValueError,
     r"relax_fixed_: remainder shares memory with state"),
    ("unknown backend", lambda: rk.relax_fixed_(i64.clone(), f32, (13, 4), rem4, backend="nope"), ValueError,
     r"relax_fixed_: unknown backend 'nope'"),
    ("cuda backend on cpu", lambda: rk.unrelax_fixed_(i64.clone(), f32, (13, 4), rem4, backend="cuda"),
     RuntimeError, r"unrelax_fixed_: backend 'cuda' is not available for cpu tensors: it serves cuda tensors only"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(case):
    _, call, exc, pattern = case
    before = i64.clone()
    with pytest.raises(exc, match=pattern):
        call()
    assert torch.equal(i64, before)



# ---------------------------------------------------------------------------------------------
# The point of it all: the RevDEQ recursion, run forward in fixed point and then backward, gives
# back its start bit for bit, where float states do not.

def _tanh_mlp(width, hidden, g):
    w1 = torch.randn(width, hidden, generator=g) / math.sqrt(width)
    w2 = torch.randn(hidden, width, generator=g) * (0.9 / math.sqrt(hidden))
    x = torch.randn(4, width, generator=g)
    return lambda z: torch.tanh(torch.tanh((z + x) @ w1) @ w2), (4, width)


def _prenorm_block(width, g, heads=4):
    """f(z) = LayerNorm(block(z + x)) for a pre-norm transformer block (multi-head self-attention, GELU
    MLP); the output norm keeps the states bounded."""
    def weight(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(shape[0])
    w_qkv, w_out, w_up, w_down = weight(width, 3 * width), weight(width, width), weight(width, 2 * width), weight(
        2 * width, width)
    x = torch.randn(2, 8, width, generator=g)
    norm = torch.nn.functional.layer_norm

    def block(z):
        h = z + x
        b, s, _ = h.shape
        q, k, v = (norm(h, (width,)) @ w_qkv).view(b, s, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1) @ v
        h = h + att.transpose(1, 2).reshape(b, s, width) @ w_out
        h = h + torch.nn.functional.gelu(norm(h, (width,)) @ w_up) @ w_down
        return norm(h, (width,))
    return block, (2, 8, width)


def _revdeq_fixed(f, z0, beta, steps, backend):
    """Forward RevDEQ recursion in fixed point, then the reverse sweep.

    Returns (end states, reconstructed start states, the largest distance of a forward half-step
    from the float64 relaxation of the same state and f value)."""
    status, n = fxp.new_status(), z0.numel()
    rem = fxp.remainder_buffer(n, beta.m, 2 * steps)
    y, z = z0.clone(), z0.clone()
    worst = 0.0

    def forward_half_step(state, f_val, remainder):
        nonlocal worst
        want = (1 - beta.value) * fxp.from_fixed(state, dtype=torch.float64) + beta.value * f_val.double()
        rk.relax_fixed_(state, f_val, beta, remainder, status=status, backend=backend)
        worst = max(worst, (fxp.from_fixed(state, dtype=torch.float64) - want).abs().max().item())

    fz = f(fxp.from_fixed(z))
    for k in range(steps):
        forward_half_step(y, fz, rem[2 * k])
        forward_half_step(z, f(fxp.from_fixed(y)), rem[2 * k + 1])
        fz = f(fxp.from_fixed(z))
    fxp.check_status(status, op="forward")
    end = (y.clone(), z.clone())
    for k in reversed(range(steps)):
        rk.unrelax_fixed_(z, f(fxp.from_fixed(y)), beta, rem[2 * k + 1], status=status, backend=backend)
        rk.unrelax_fixed_(y, f(fxp.from_fixed(z)), beta, rem[2 * k], status=status, backend=backend)
    fxp.check_status(status, op="reverse")
    return end, (y, z), worst


def _revdeq_float(f, z0, beta, steps, dtype):
    """The same recursion with float states (relax_ / unrelax_); returns (end z, max start error)."""
    y, z = z0.to(dtype), z0.to(dtype)
    for _ in range(steps):
        rk.relax_(y, f(z.float()).to(dtype), beta)
        rk.relax_(z, f(y.float()).to(dtype), beta)
    end = z.clone()
    for _ in range(steps):
        rk.unrelax_(z, f(y.float()).to(dtype), beta)
        rk.unrelax_(y, f(z.float()).to(dtype), beta)
    return end, torch.maximum((y - z0.to(dtype)).abs().max(), (z - z0.to(dtype)).abs().max()).item()


@pytest.fixture
def one_thread():
    # f here is tiny: one thread runs it several times faster than two fighting over a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model", ["tanh_mlp", "prenorm_transformer"])
@pytest.mark.parametrize("beta", [DyadicBeta(13, 4), DyadicBeta(1, 1)], ids=beta_id)
@pytest.mark.parametrize("steps", [64, 256])
def test_revdeq_recursion_reverses_bit_exactly(model, beta, steps, one_thread):
    g = torch.Generator().manual_seed(steps + beta.p)
    f, shape = _tanh_mlp(32, 64, g) if model == "tanh_mlp" else _prenorm_block(32, g)
    z0 = fxp.to_fixed(torch.randn(shape, generator=g, dtype=torch.float64))
    backend = "cpp" if extension.loaded() else "reference"
    what = f"{model} beta={beta} {steps} steps"
    with torch.no_grad():
        (_, z_end), (y_back, z_back), worst = _revdeq_fixed(f, z0, beta, steps, backend)
        assert_equal(y_back, z0, f"{what}: y")
        assert_equal(z_back, z0, f"{what}: z")
        # It computed the right recursion: every half-step is the float64 relaxation of its inputs up to
        # the fixed-point rounding (floor < 2^-32, plus beta * 2^-33 from quantising f).
        assert worst < 2.0 ** -31, f"{what}: a half-step is {worst:.3e} from the float64 relaxation"
        if model == "tanh_mlp":
            # A contraction forgets rounding, so the whole trajectory matches float64 states too (the
            # transformer block is not one: its trajectories separate from any perturbation).
            z64, _ = _revdeq_float(f, fxp.from_fixed(z0, dtype=torch.float64), beta.value, steps, torch.float64)
            gap = (fxp.from_fixed(z_end, dtype=torch.float64) - z64).abs().max().item()
            assert gap <= 1e-6, f"{what}: fixed-point forward ends {gap:.2e} from the float64-state forward"
        if beta == DyadicBeta(13, 4) and steps == 64:
            # Float states amplify rounding by 1/|1 - beta| = 16/3 per half-step: reversal is lost.
            _, drift32 = _revdeq_float(f, fxp.from_fixed(z0, dtype=torch.float64), beta.value, steps, torch.float32)
            assert not drift32 <= 1e-2, f"{what}: float32 states reversed to within {drift32:.2e}"
