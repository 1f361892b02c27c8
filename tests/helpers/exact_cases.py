"""Shared cases for testing an exact-mode backend (relax_fixed_ / unrelax_fixed_) on any device.

tests/ops/test_exact.py runs these on every backend's device. Integers leave
no room for tolerances: state, remainder and status must equal the reference backend's (the oracle,
itself checked against a big-integer model in tests/ops/test_exact.py) with torch.equal, computed from the
very same inputs on the same device. Inputs come from the generators below: fresh random values of
both signs over 16 decades, with exact rounding ties.
"""

import math

import pytest
import torch

import revdeq_kernels as rk
from revdeq_kernels import exact as fxp
from revdeq_kernels.exact import LIMIT, DyadicBeta, ExactModeError, FixedStatus

# 13/16 and 1/2 are the betas; 3/8 a small one; 255/256 needs all 8 bits and has 2^m - p = 1;
# 21/16 and 511/256 are over-relaxations (negative 2^m - p); 1/256 is the smallest beta there is.
BETAS = [DyadicBeta(13, 4), DyadicBeta(1, 1), DyadicBeta(3, 3), DyadicBeta(255, 8), DyadicBeta(21, 4),
         DyadicBeta(511, 8), DyadicBeta(1, 8)]
F_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
F = fxp.DEFAULT_FRAC_BITS


def beta_id(beta):
    return f"{beta.p}_{1 << beta.m}"


def random_f(n, dtype, g, frac_bits=F):
    """n values of both signs spread over magnitudes 1e-12 .. 1e4 (1e2 for float16), with exact
    rounding ties (k + 1/2) * 2^-F where the dtype can hold them."""
    top = 2 if dtype == torch.float16 else 4
    mag = 10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * (top + 12) - 12)
    f = torch.randn(n, generator=g, dtype=torch.float64).sign() * mag
    ties = (torch.randint(-100, 100, (n,), generator=g).double() + 0.5) * math.ldexp(1.0, -frac_bits)
    f = torch.where(torch.rand(n, generator=g) < 0.1, ties, f)
    return f.to(dtype)


def random_state(n, g, frac_bits=F):
    x = torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-3, 4, (n,), generator=g)
    return fxp.to_fixed(x, frac_bits)


def assert_equal(got, want, what):
    if not torch.equal(got, want):
        bad = (got != want).reshape(-1)
        first = int(bad.nonzero()[0]) if bad.any() else -1
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; first at {first}: "
                             f"got {got.reshape(-1)[first].item()}, want {want.reshape(-1)[first].item()}")


OUTPUTS = ("state", "remainder", "status")


def run(op, backend, state, f, beta, remainder, frac_bits=F):
    """Apply op to copies with a caller-owned status on the state's device: (state, remainder, status)."""
    state, remainder, status = state.clone(), remainder.clone(), fxp.new_status(state.device)
    out = getattr(rk, op)(state, f, beta, remainder, frac_bits=frac_bits, status=status, backend=backend)
    assert out is state, f"{backend} {op}: must return its state argument"
    return state, remainder, status


def assert_same(got, want, what):
    for a, b, name in zip(got, want, OUTPUTS):
        assert_equal(a.cpu(), b.cpu(), f"{what} {name}")


def random_inputs(n, f_dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return random_state(n, g).to(device), random_f(n, f_dtype, g).to(device), g


def check_against_reference(backend, n, beta, f_dtype, device, seed=0):
    """Forward, the inverse of that forward, and the inverse on random remainders (modular garbage,
    mostly flagged, on which both backends must still agree), each equal to the reference; and the
    round trip gives back the start."""
    state, f, g = random_inputs(n, f_dtype, device, seed + n + beta.p)
    f_before = f.clone()
    remainder = torch.full(fxp.remainder_shape(n, beta.m), -1, dtype=torch.int32, device=device)  # poisoned
    what = f"{backend} n={n} beta={beta} f={f_dtype}"
    fwd_ref = run("relax_fixed_", "reference", state, f, beta, remainder)
    fwd = run("relax_fixed_", backend, state, f, beta, remainder)
    assert_same(fwd, fwd_ref, f"{what} relax_fixed_")
    assert fwd[2].item() == 0, f"{what}: in-range inputs flagged {FixedStatus(fwd[2].item())!r}"
    garbage = torch.randint(-(1 << 31), 1 << 31, remainder.shape, generator=g, dtype=torch.int64)
    for start, rem in ((fwd[0], fwd[1]), (state, garbage.to(device=device, dtype=torch.int32))):
        inv_ref = run("unrelax_fixed_", "reference", start, f, beta, rem)
        inv = run("unrelax_fixed_", backend, start, f, beta, rem)
        assert_same(inv, inv_ref, f"{what} unrelax_fixed_")
    assert_equal(run("unrelax_fixed_", backend, fwd[0], f, beta, fwd[1])[0].cpu(), state.cpu(), f"{what} round trip")
    assert torch.equal(f, f_before), f"{what}: f_val was modified"


def check_bad_elements(backend, beta, device, n=4099):
    """NaN/Inf/huge f and out-of-range states among good elements: the same elements left unchanged, the
    same remainders and the same flags as the reference, in the forward and the inverse."""
    state, f, g = random_inputs(n, torch.float32, "cpu", 5)
    idx = torch.randperm(n, generator=g)[:40]
    f[idx[:10]] = float("nan")
    f[idx[10:20]] = torch.tensor([float("inf"), -float("inf")]).repeat(5)
    f[idx[20:30]] = 3e6
    state[idx[30:]] = LIMIT + 5
    if beta.p > (1 << beta.m):  # in range, but the over-relaxed update would leave it
        state[idx[35:]], f[idx[35:]] = -LIMIT, 1.5e6
    else:
        state[idx[35:]] = -(1 << 63)
    state, f = state.to(device), f.to(device)
    remainder = torch.zeros(fxp.remainder_shape(n, beta.m), dtype=torch.int32, device=device)
    what = f"{backend} beta={beta} bad elements"
    ref = run("relax_fixed_", "reference", state, f, beta, remainder)
    got = run("relax_fixed_", backend, state, f, beta, remainder)
    assert_same(got, ref, f"{what} relax_fixed_")
    want = FixedStatus.F_NOT_FINITE | FixedStatus.F_OUT_OF_RANGE | FixedStatus.STATE_OUT_OF_RANGE
    assert got[2].item() == want, f"{what}: status {FixedStatus(got[2].item())!r}"
    assert torch.equal(got[0][idx.to(device)], state[idx.to(device)]), f"{what}: bad elements must be left unchanged"
    inv_ref = run("unrelax_fixed_", "reference", got[0], f, beta, got[1])
    inv = run("unrelax_fixed_", backend, got[0], f, beta, got[1])
    assert_same(inv, inv_ref, f"{what} unrelax_fixed_")
    good = torch.ones(n, dtype=torch.bool)
    good[idx] = False
    assert torch.equal(inv[0].cpu()[good], state.cpu()[good]), f"{what}: good elements did not reverse"


LAYOUTS = ("transposed", "strided", "f_transposed", "offset", "f_offset")


def make_view(layout, n_rows, n_cols, f_dtype, device, seed=11):
    """(state, f, state_base) of shape (n_rows, n_cols) laid out as `layout` says; state is a view into
    state_base, which has elements around it that must stay untouched."""
    g = torch.Generator().manual_seed(seed)
    n = n_rows * n_cols
    base = random_state(2 * n + 3, g).to(device)
    f_base = random_f(2 * n + 3, f_dtype, g).to(device)
    if layout == "transposed":  # dense, not row-major
        return base[:n].view(n_cols, n_rows).t(), f_base[:n].view(n_rows, n_cols), base
    if layout == "strided":  # gaps in both
        return base[1::2][:n].view(n_rows, n_cols), f_base[::2][:n].view(n_rows, n_cols), base
    if layout == "f_transposed":
        return base[1:1 + n].view(n_rows, n_cols), f_base[:n].view(n_cols, n_rows).t(), base
    if layout == "offset":  # contiguous views starting one and three elements in
        return base[1:1 + n].view(n_rows, n_cols), f_base[3:3 + n].view(n_rows, n_cols), base
    if layout == "f_offset":
        return base[:n].view(n_rows, n_cols), f_base[1:1 + n].view(n_rows, n_cols), base
    raise ValueError(f"unknown layout {layout!r}")


def check_layout(backend, layout, device, f_dtype=torch.float32, shape=(37, 41)):
    """Any view gives the result of its row-major contiguous copy (remainder bits belong to row-major
    element indices), writes nothing outside the view, and reverses bit for bit (beta = 13/16)."""
    beta = DyadicBeta(13, 4)
    state, f, base = make_view(layout, *shape, f_dtype, device)
    n = state.numel()
    remainder = torch.zeros(fxp.remainder_shape(n, beta.m), dtype=torch.int32, device=device)
    want = run("relax_fixed_", "reference", state.contiguous(), f.contiguous(), beta, remainder)
    before = base.clone()
    rem, status = remainder.clone(), fxp.new_status(device)
    rk.relax_fixed_(state, f, beta, rem, status=status, backend=backend)
    what = f"{backend} {layout}"
    assert_same((state, rem, status), want, what)
    rk.unrelax_fixed_(state, f, beta, rem, status=status, backend=backend)
    assert status.item() == 0, f"{what}: status {FixedStatus(status.item())!r}"
    assert_equal(base.cpu(), before.cpu(), f"{what}: round trip (and nothing outside the view written)")


def check_round_trip(backend, beta, device, n=1000, half_steps=64):
    """Many half-steps forward with one shared status, then all of them back: the start, bit for bit."""
    g = torch.Generator().manual_seed(beta.p)
    start = random_state(n, g).to(device)
    fs = [random_f(n, torch.float32, g).clamp(-50, 50).to(device) for _ in range(half_steps)]  # keeps beta > 1 in range
    rem, status = fxp.remainder_buffer(n, beta.m, half_steps, device=device), fxp.new_status(device)
    state = start.clone()
    for k in range(half_steps):
        rk.relax_fixed_(state, fs[k], beta, rem[k], status=status, backend=backend)
    fxp.check_status(status)
    assert not torch.equal(state, start)
    for k in reversed(range(half_steps)):
        rk.unrelax_fixed_(state, fs[k], beta, rem[k], status=status, backend=backend)
    fxp.check_status(status)
    assert_equal(state.cpu(), start.cpu(), f"{backend} beta={beta} after {half_steps} half-steps and back")


def check_errors_raise_or_set_the_status(backend, device):
    """Without a status, a non-finite f raises ExactModeError naming its first element; with one, nothing
    raises and each call ORs its flags into what the status already holds.

    Returns the (state, f, remainder) it used: state int64 (8,), f float32 (8,) with a NaN at index 3,
    remainder int32 (4, 1), all on `device`, for the caller's own further checks."""
    state = fxp.to_fixed(torch.linspace(-1, 1, 8)).to(device)
    f = torch.linspace(0.5, 1.5, 8, device=device)
    f[3] = float("nan")
    rem = torch.zeros(4, 1, dtype=torch.int32, device=device)
    with pytest.raises(ExactModeError, match=r"relax_fixed_: f_val has 1 non-finite elements \(first at index "
                                              r"\(3,\): nan\)"):
        rk.relax_fixed_(state.clone(), f, (13, 4), rem, backend=backend)
    status = torch.tensor([FixedStatus.INVERSE_MISMATCH], dtype=torch.int32, device=device)
    rk.relax_fixed_(state.clone(), f, (13, 4), rem, status=status, backend=backend)
    rk.relax_fixed_(state.clone(), torch.full_like(f, 1e7), (13, 4), rem, status=status, backend=backend)
    assert status.item() == FixedStatus.INVERSE_MISMATCH | FixedStatus.F_NOT_FINITE | FixedStatus.F_OUT_OF_RANGE
    return state, f, rem


def opcheck_fixed_ops(prefix, f_dtype, device):
    """torch.library.opcheck on torch.ops.revdeq.<prefix>relax_fixed_ and <prefix>unrelax_fixed_ (prefix ""
    for the compiled extension's ops, "triton_" for Triton's): an int64 (37, 5) state, an f of f_dtype,
    and for the inverse a random remainder."""
    g = torch.Generator().manual_seed(3)
    state = random_state(37 * 5, g).view(37, 5).to(device)
    f = random_f(37 * 5, f_dtype, g).view(37, 5).to(device)
    rem = torch.zeros(4, 6, dtype=torch.int32, device=device)
    torch.library.opcheck(getattr(torch.ops.revdeq, f"{prefix}relax_fixed_").default,
                          (state.clone(), f, rem.clone(), fxp.new_status(device), 13, 4, 32))
    torch.library.opcheck(getattr(torch.ops.revdeq, f"{prefix}unrelax_fixed_").default,
                          (state.clone(), f, rem.random_(), fxp.new_status(device), 13, 4, 32))


def check_compiled_half_steps(backend, compile_backend, device, n):
    """Two forward half-steps and one inverse under torch.compile(fullgraph=True, backend=compile_backend),
    sharing one status: state and first remainder equal one reference half-step, and the status stays 0."""
    torch._dynamo.reset()
    beta = DyadicBeta(13, 4)

    @torch.compile(fullgraph=True, backend=compile_backend)
    def half_steps(y, fz, rem, status):
        rk.relax_fixed_(y, fz, beta, rem[0], status=status, backend=backend)
        rk.relax_fixed_(y, fz, beta, rem[1], status=status, backend=backend)
        rk.unrelax_fixed_(y, fz, beta, rem[1], status=status, backend=backend)

    g = torch.Generator().manual_seed(4)
    y, fz = random_state(n, g).to(device), random_f(n, torch.float32, g).to(device)
    remainder = torch.zeros(fxp.remainder_shape(n, beta.m), dtype=torch.int32, device=device)
    want = run("relax_fixed_", "reference", y, fz, beta, remainder)
    rem, status = fxp.remainder_buffer(n, beta.m, 2, device=device), fxp.new_status(device)
    half_steps(y, fz, rem, status)
    assert_equal(y.cpu(), want[0].cpu(), f"compiled ({compile_backend})")
    assert_equal(rem[0].cpu(), want[1].cpu(), f"compiled ({compile_backend}) remainder")
    assert status.item() == 0
