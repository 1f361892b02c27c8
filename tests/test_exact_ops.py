"""Exact mode: the fixed-point format helpers and relax_fixed_ / unrelax_fixed_ on every backend.

Integers leave no room for tolerances: the reference is checked against a big-integer model of
the spec, every other backend against the reference with torch.equal (state, remainder, status),
and forward-then-inverse must give back the start bit for bit.
"""

import math
import os
import types
from fractions import Fraction

import pytest
import torch

import revdeq_kernels as rk
from exact_cases import BETAS, F_DTYPES, F, assert_equal, beta_id, check_round_trip, random_f, random_state
from revdeq_kernels import backends, ops
from revdeq_kernels import fixed_point as fxp
from revdeq_kernels.backends import extension
from revdeq_kernels.fixed_point import LIMIT, DyadicBeta, FixedPointError, FixedStatus

SIZES = [1, 7, 100, 1023, (1 << 20) + 3]

needs_cpp = pytest.mark.skipif(os.environ.get("REVDEQ_SKIP_BUILD") == "1",
                               reason="REVDEQ_SKIP_BUILD=1: installed without the C++ extension")
COMPILED = [pytest.param("cpp", marks=needs_cpp)]


def run(op, backend, state, f, beta, remainder, frac_bits=F):
    """Apply op to copies with a caller-owned status; returns (state, remainder, status)."""
    state, remainder, status = state.clone(), remainder.clone(), fxp.new_status()
    getattr(rk, op)(state, f, beta, remainder, frac_bits=frac_bits, status=status, backend=backend)
    return state, remainder, status


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
    with pytest.raises(FixedPointError, match=r"to_fixed: x has 2 non-finite elements \(first at index \(1, 0\): "
                                              r"nan\); exact mode cannot represent NaN or Inf"):
        fxp.to_fixed(torch.tensor([[1.0], [float("nan")], [float("inf")]]))
    with pytest.raises(FixedPointError, match=r"to_fixed: x holds values up to 3e\+06 in magnitude, outside the "
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
# The reference against a big-integer model of the spec (fixed_point.py's docstring, line by line).

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
# Compiled backends against the reference, bit for bit.

# Every beta at the small sizes; at 2^20 + 3 (seconds each), one of each kind: m = 4, m = 8, beta > 1.
SIZE_BETA = [(n, beta) for n in SIZES[:-1] for beta in BETAS] + [
    (SIZES[-1], beta) for beta in (DyadicBeta(13, 4), DyadicBeta(255, 8), DyadicBeta(21, 4))]


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("n, beta", SIZE_BETA, ids=[f"{n}-{beta_id(b)}" for n, b in SIZE_BETA])
def test_backend_matches_reference(backend, n, beta):
    dtypes = [torch.float32] if n > 100_000 else F_DTYPES
    for dtype in dtypes:
        g = torch.Generator().manual_seed(n + beta.p)
        state, f = random_state(n, g), random_f(n, dtype, g)
        remainder = torch.full(fxp.remainder_shape(n, beta.m), -1, dtype=torch.int32)  # poisoned
        what = f"{backend} n={n} beta={beta} f={dtype}"
        fwd_ref = run("relax_fixed_", "reference", state, f, beta, remainder)
        fwd = run("relax_fixed_", backend, state, f, beta, remainder)
        for got, want, name in zip(fwd, fwd_ref, ("state", "remainder", "status")):
            assert_equal(got, want, f"{what} relax_fixed_ {name}")
        assert fwd[2].item() == 0, f"{what}: in-range inputs flagged {FixedStatus(fwd[2].item())!r}"
        # The inverse on the forward's output, and on random remainders (the modular arithmetic
        # then produces garbage, mostly flagged; both backends must agree on it).
        for start, rem in ((fwd[0], fwd[1]), (state, remainder.random_(generator=g))):
            inv_ref = run("unrelax_fixed_", "reference", start, f, beta, rem)
            inv = run("unrelax_fixed_", backend, start, f, beta, rem)
            for got, want, name in zip(inv, inv_ref, ("state", "remainder", "status")):
                assert_equal(got, want, f"{what} unrelax_fixed_ {name}")
        assert_equal(run("unrelax_fixed_", backend, *fwd[:1], f, beta, fwd[1])[0], state, f"{what} round trip")


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("beta", [DyadicBeta(13, 4), DyadicBeta(21, 4)], ids=beta_id)
def test_backend_matches_reference_on_bad_elements(backend, beta):
    # NaN/Inf/huge f and out-of-range states scattered among good elements: both backends leave the
    # same elements unchanged, write the same remainders and raise the same flags.
    g = torch.Generator().manual_seed(5)
    n = 4099
    state, f = random_state(n, g), random_f(n, torch.float32, g)
    idx = torch.randperm(n, generator=g)[:40]
    f[idx[:10]] = float("nan")
    f[idx[10:20]] = torch.tensor([float("inf"), -float("inf")]).repeat(5)
    f[idx[20:30]] = 3e6
    state[idx[30:]] = LIMIT + 5
    if beta.p > (1 << beta.m):  # in range, but the over-relaxed update would leave it: -5/16 y + 21/16 f
        state[idx[35:]], f[idx[35:]] = -LIMIT, 1.5e6
    else:
        state[idx[35:]] = -(1 << 63)
    remainder = torch.zeros(fxp.remainder_shape(n, beta.m), dtype=torch.int32)
    ref = run("relax_fixed_", "reference", state, f, beta, remainder)
    got = run("relax_fixed_", backend, state, f, beta, remainder)
    for a, b, name in zip(got, ref, ("state", "remainder", "status")):
        assert_equal(a, b, f"{backend} beta={beta} {name}")
    want = FixedStatus.F_NOT_FINITE | FixedStatus.F_OUT_OF_RANGE | FixedStatus.STATE_OUT_OF_RANGE
    assert got[2].item() == want
    assert torch.equal(got[0][idx], state[idx]), "bad elements must be left unchanged"


@pytest.mark.parametrize("backend", ["reference"] + COMPILED)
def test_layouts_follow_row_major_element_order(backend):
    # Transposed, strided and offset views give the same result as their contiguous copies: the
    # remainder bits belong to row-major element indices, whatever the memory layout.
    g = torch.Generator().manual_seed(11)
    beta = DyadicBeta(13, 4)
    base = random_state(2 * 37 * 41 + 1, g)
    f_base = random_f(2 * 37 * 41 + 1, torch.float32, g)
    views = {
        "transposed": (base[:37 * 41].view(41, 37).t(), f_base[:37 * 41].view(37, 41)),
        "strided": (base[1::2].view(37, 41), f_base[::2][:37 * 41].view(37, 41)),
        "f_transposed": (base[1:1 + 37 * 41].view(37, 41), f_base[:37 * 41].view(41, 37).t()),
    }
    for name, (state, f) in views.items():
        remainder = torch.zeros(fxp.remainder_shape(state.numel(), beta.m), dtype=torch.int32)
        want = run("relax_fixed_", "reference", state.contiguous(), f.contiguous(), beta, remainder)
        outside, rem = base.clone(), remainder.clone()
        rk.relax_fixed_(state, f, beta, rem, backend=backend)
        assert_equal(state, want[0], f"{backend} {name} state")
        assert_equal(rem, want[1], f"{backend} {name} remainder")
        rk.unrelax_fixed_(state, f, beta, rem, backend=backend)
        assert_equal(base, outside, f"{backend} {name} round trip (and nothing outside the view written)")


@pytest.mark.parametrize("backend", ["reference"] + COMPILED)
@pytest.mark.parametrize("beta", [DyadicBeta(13, 4), DyadicBeta(1, 1), DyadicBeta(21, 4), DyadicBeta(255, 8)],
                         ids=beta_id)
def test_256_half_steps_reverse_bit_exactly(backend, beta):
    check_round_trip(backend, beta, "cpu", n=1000, half_steps=256)


@needs_cpp
def test_cpp_result_does_not_depend_on_thread_count():
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


# ---------------------------------------------------------------------------------------------
# Errors: values exact mode cannot hold, and bad arguments.

@pytest.mark.parametrize("backend", ["reference"] + COMPILED)
def test_non_finite_f_raises_and_leaves_those_elements(backend):
    state = fxp.to_fixed(torch.linspace(-1, 1, 8))
    f = torch.linspace(0.5, 1.5, 8)
    f[3], f[6] = float("nan"), float("inf")
    remainder, before = torch.zeros(4, 1, dtype=torch.int32), state.clone()
    with pytest.raises(FixedPointError, match=r"relax_fixed_: f_val has 2 non-finite elements \(first at index "
                                              r"\(3,\): nan\); exact mode cannot represent NaN or Inf"):
        rk.relax_fixed_(state, f, (13, 4), remainder, backend=backend)
    assert state[3] == before[3] and state[6] == before[6]
    ok = torch.tensor([i not in (3, 6) for i in range(8)])
    assert (state[ok] != before[ok]).all(), "the representable elements are still updated"
    words = remainder.to(torch.int64) & 0xFFFFFFFF
    assert int(((words >> 3) & 1).sum() + ((words >> 6) & 1).sum()) == 0, "rejected elements store zero bits"


@pytest.mark.parametrize("backend", ["reference"] + COMPILED)
def test_out_of_range_values_raise_with_the_range_and_the_fix(backend):
    rem = torch.zeros(4, 1, dtype=torch.int32)
    with pytest.raises(FixedPointError, match=r"relax_fixed_: f_val holds values up to 5e\+06 in magnitude, outside "
                                              r"the range \|x\| <= 2\^21 = 2.09715e\+06 that frac_bits=32 "
                                              r"represents; .*pass a smaller frac_bits to widen the range"):
        rk.relax_fixed_(fxp.to_fixed(torch.ones(3)), torch.tensor([1.0, -5e6, 2.0]), (13, 4), rem, backend=backend)
    with pytest.raises(FixedPointError, match=r"unrelax_fixed_: f_val holds values up to 70000 .* 2\^5 = 32 that "
                                              r"frac_bits=48"):
        rk.unrelax_fixed_(fxp.to_fixed(torch.ones(3), 48), torch.tensor([7e4, 1, 1]), (13, 4), rem, frac_bits=48,
                          backend=backend)
    with pytest.raises(FixedPointError, match=r"relax_fixed_: state holds values up to 4.1943e\+06 in magnitude"):
        rk.relax_fixed_(torch.tensor([LIMIT * 2, 0, 0]), torch.ones(3), (13, 4), rem, backend=backend)
    # beta > 1 can push an in-range state out: the update is refused, not wrapped.
    state = fxp.to_fixed(torch.tensor([2.0e6, 1.0, 0.0]))
    with pytest.raises(FixedPointError, match=r"relax_fixed_: the update would take a state outside the range "
                                              r"\|x\| <= 2\^21 .* \(beta > 1 amplifies the state\)"):
        rk.relax_fixed_(state, torch.tensor([-2.0e6, 1.0, 0.0]), (21, 4), rem, backend=backend)
    assert state[0] == fxp.to_fixed(torch.tensor([2.0e6])), "the element that would overflow is left unchanged"


@pytest.mark.parametrize("backend", ["reference"] + COMPILED)
def test_status_defers_the_error_without_a_sync(backend):
    status, rem = fxp.new_status(), torch.zeros(1, 1, dtype=torch.int32)
    state = fxp.to_fixed(torch.ones(3))
    rk.relax_fixed_(state, torch.tensor([1.0, float("nan"), 2.0]), (1, 1), rem, status=status, backend=backend)
    rk.relax_fixed_(state, torch.tensor([1.0, 1.0, 1e7]), (1, 1), rem, status=status, backend=backend)
    assert status.item() == FixedStatus.F_NOT_FINITE | FixedStatus.F_OUT_OF_RANGE
    with pytest.raises(FixedPointError, match=r"exact mode: f_val held NaN or Inf, which fixed point cannot "
                                              r"represent; f_val held values outside the range \|x\| <= 2\^21"):
        fxp.check_status(status)
    fxp.check_status(fxp.new_status())  # all clear: no error


@pytest.mark.parametrize("backend", ["reference"] + COMPILED)
def test_inverse_with_a_different_f_is_flagged(backend):
    # f that does not reproduce its forward bits: with 2^m - p = 3 (beta 13/16) the inverse leaves the
    # range, which the forward never does, and is flagged; with 2^m - p = 1 (beta 1/2) every result is
    # in range, so only comparing the reconstructed start with the true one can tell (documented).
    g = torch.Generator().manual_seed(8)
    n = 256
    start, f = random_state(n, g), random_f(n, torch.float64, g).clamp(-100, 100)
    wrong = f + 2.0 ** -F  # q + 1 exactly
    for beta, detected in ((DyadicBeta(13, 4), True), (DyadicBeta(1, 1), False)):
        state, rem = start.clone(), torch.zeros(fxp.remainder_shape(n, beta.m), dtype=torch.int32)
        rk.relax_fixed_(state, f, beta, rem, backend=backend)
        if detected:
            with pytest.raises(FixedPointError, match=r"unrelax_fixed_: the inverse produced states outside the "
                                                      r"range .* \(f must be deterministic\)"):
                rk.unrelax_fixed_(state, wrong, beta, rem, backend=backend)
        else:
            rk.unrelax_fixed_(state, wrong, beta, rem, backend=backend)
            assert not torch.equal(state, start)


@needs_cpp
def test_status_is_ored_not_overwritten():
    status = torch.tensor([FixedStatus.INVERSE_MISMATCH], dtype=torch.int32)
    rk.relax_fixed_(fxp.to_fixed(torch.ones(2)), torch.ones(2), (1, 1), torch.zeros(1, 1, dtype=torch.int32),
                    status=status, backend="cpp")
    assert status.item() == FixedStatus.INVERSE_MISMATCH


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
     r"revdeq_kernels.fixed_point.dyadic_beta\(0.8\)"),
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


@pytest.mark.parametrize("backend", ["reference"] + COMPILED)
def test_empty_tensors_are_a_no_op(backend):
    state, rem = torch.empty(0, 3, dtype=torch.int64), torch.empty(4, 0, dtype=torch.int32)
    assert rk.relax_fixed_(state, torch.empty(0, 3), (13, 4), rem, backend=backend) is state
    assert rk.unrelax_fixed_(state, torch.empty(0, 3), (13, 4), rem, backend=backend) is state


def test_backend_without_fixed_kernels_raises_by_name_and_is_skipped_by_auto(monkeypatch):
    # A backend module that implements only the float ops.
    float_only = types.SimpleNamespace(unavailable_reason=lambda device_type: None)
    real_load = backends.load
    monkeypatch.setattr(backends, "load", lambda name: float_only if name == "cpp" else real_load(name))
    monkeypatch.setattr(ops, "_resolved", {})
    state, rem = fxp.to_fixed(torch.ones(5)), torch.zeros(4, 1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"relax_fixed_: backend 'cpp' is not available for cpu tensors: it has "
                                           r"no fixed-point \(exact mode\) kernels yet"):
        rk.relax_fixed_(state, torch.ones(5), (13, 4), rem, backend="cpp")
    rk.relax_fixed_(state, torch.ones(5), (13, 4), rem)  # auto falls through to the reference
    assert ops._resolved[("cpu", "auto", "fixed")] == "reference"


@needs_cpp
def test_cpp_is_the_default_and_reports_fixed_kernels():
    assert extension.fixed_unavailable_reason("cpu") is None
    assert backends.unavailable_reason("cpp", "cpu", "fixed") is None
    if not extension.built_with_cuda():
        assert "built without CUDA" in extension.fixed_unavailable_reason("cuda")


# ---------------------------------------------------------------------------------------------
# The registered C++ ops: opcheck, direct calls, torch.compile.

@needs_cpp
@pytest.mark.parametrize("f_dtype", [torch.float32, torch.bfloat16])
def test_opcheck(f_dtype):
    g = torch.Generator().manual_seed(3)
    state = random_state(37 * 5, g).view(37, 5)
    f = random_f(37 * 5, f_dtype, g).view(37, 5)
    rem = torch.zeros(4, 6, dtype=torch.int32)
    torch.library.opcheck(torch.ops.revdeq.relax_fixed_.default, (state.clone(), f, rem.clone(), fxp.new_status(),
                                                                   13, 4, 32))
    torch.library.opcheck(torch.ops.revdeq.unrelax_fixed_.default, (state.clone(), f, rem.random_(generator=g),
                                                                     fxp.new_status(), 13, 4, 32))


@needs_cpp
def test_direct_op_call_checks_arguments():
    state, f, rem, status = i64.clone(), f32, rem4.clone(), fxp.new_status()
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


@pytest.mark.parametrize("backend", ["reference"] + COMPILED)
def test_torch_compile_fullgraph_with_status(backend):
    torch._dynamo.reset()
    beta = DyadicBeta(13, 4)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def half_steps(y, fz, rem, status):
        rk.relax_fixed_(y, fz, beta, rem[0], status=status, backend=backend)
        rk.relax_fixed_(y, fz, beta, rem[1], status=status, backend=backend)
        rk.unrelax_fixed_(y, fz, beta, rem[1], status=status, backend=backend)

    g = torch.Generator().manual_seed(4)
    y, fz = random_state(257, g), random_f(257, torch.float32, g)
    want = run("relax_fixed_", "reference", y, fz, beta, torch.zeros(4, 9, dtype=torch.int32))[0]
    rem, status = fxp.remainder_buffer(257, 4, 2), fxp.new_status()
    half_steps(y, fz, rem, status)
    assert_equal(y, want, f"{backend} compiled")
    assert status.item() == 0


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


# ---------------------------------------------------------------------------------------------
# csrc/fixed_point.h is shared with the CUDA kernels, which nvcc compiles without torch headers.

NVCC_KERNEL = r"""
#include "fixed_point.h"
using namespace revdeq::fixed;
// One thread per element; a warp packs each bit plane of its 32 remainders with one ballot.
__global__ void relax_fixed(int64_t* y, const float* f, unsigned* words, long long n, Coefficients c, int* status) {
  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  int32_t flags = 0;
  const uint32_t r = i < n ? relax_element(y + i, f[i], c, &flags) : 0u;
  for (int b = 0; b < c.m; ++b) {
    const unsigned word = __ballot_sync(0xffffffffu, (r >> b) & 1u);
    if ((threadIdx.x & 31) == 0 && i < n) words[b * ((n + 31) / 32) + i / 32] = word;
  }
  if (flags) atomicOr(status, flags);
}
__global__ void unrelax_fixed(int64_t* y, const float* f, const unsigned* words, long long n, Coefficients c,
                              int* status) {
  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  uint32_t r = 0;
  for (int b = 0; b < c.m; ++b) r |= ((words[b * ((n + 31) / 32) + i / 32] >> (i % 32)) & 1u) << b;
  int32_t flags = 0;
  unrelax_element(y + i, f[i], r, c, &flags);
  if (flags) atomicOr(status, flags);
}
__global__ void inverse(int64_t* out, int64_t a) { *out = inverse_mod_2_64(a); }
"""


def test_fixed_point_header_compiles_with_nvcc_alone(tmp_path):
    import shutil
    import subprocess
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        pytest.skip("nvcc is not installed: this check compiles csrc/fixed_point.h for sm_90 (no GPU needed)")
    source = tmp_path / "fixed_kernels.cu"
    source.write_text(NVCC_KERNEL)
    csrc = os.path.join(os.path.dirname(__file__), "..", "csrc")
    out = subprocess.run([nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_90,code=sm_90", "-I", csrc, "-c",
                          str(source), "-o", str(tmp_path / "fixed_kernels.o")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
