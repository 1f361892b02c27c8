"""Exact mode in the solver: int64 fixed-point states that the backward reconstructs bit for bit.

What is checked: the reconstructed start equals the forward's start (torch.equal) at any depth; the
gradients are those of the iteration the forward ran (float64 autograd through the unrolled loop at
the same dyadic beta), where float states give garbage; problems raise ExactModeError naming the
pass and the step; every backend with fixed-point kernels gives the same bits; what is kept for the
backward grows by exactly m bits per element per half-step.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import revdeq_kernels as rk
from helpers.solver_cases import (
    TanhCell,
    assert_grads_close,
    count_host_reads,
    gradient_case,
    randn,
    rel_err,
    saved_for_backward,
    single_threaded,  # noqa: F401 (an autouse fixture)
    unrolled,
)
from revdeq_kernels import DriftError, backends
from revdeq_kernels import exact as fxp
from revdeq_kernels.backends import compiled as extension
from revdeq_kernels.exact import DyadicBeta, ExactModeError
from revdeq_kernels.solver import info as solver_info
from revdeq_kernels.solver.exact_states import FixedStates, RemainderTape

rfp = rk.reversible_fixed_point


class PreNormBlock(torch.nn.Module):
    """f(z, x) = LayerNorm(block(z + x)): a pre-norm transformer block (multi-head self-attention and a
    GELU MLP, each behind a LayerNorm and a residual); the output norm keeps the states bounded."""

    def __init__(self, width=32, heads=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def weight(*shape):
            return torch.nn.Parameter(torch.randn(*shape, generator=g) / math.sqrt(shape[-1]))

        self.heads = heads
        self.qkv, self.out = weight(3 * width, width), weight(width, width)
        self.up, self.down = weight(2 * width, width), weight(width, 2 * width)
        self.norm1, self.norm2, self.norm_out = (torch.nn.LayerNorm(width) for _ in range(3))

    def forward(self, z, x):
        h = z + x
        b, s, w = h.shape
        q, k, v = F.linear(self.norm1(h), self.qkv).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(w // self.heads), dim=-1) @ v
        h = h + F.linear(att.transpose(1, 2).reshape(b, s, w), self.out)
        h = h + F.linear(F.gelu(F.linear(self.norm2(h), self.up)), self.down)
        return self.norm_out(h)


class TanhMLP(torch.nn.Module):
    """f(z, x) = tanh(tanh((z + x) W1) W2), a contraction (|W2| about 0.9)."""

    def __init__(self, width=32, hidden=64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(width, hidden, generator=g) / math.sqrt(width))
        self.w2 = torch.nn.Parameter(torch.randn(hidden, width, generator=g) * (0.9 / math.sqrt(hidden)))

    def forward(self, z, x):
        return torch.tanh(torch.tanh((z + x) @ self.w1) @ self.w2)


@pytest.fixture
def starts_and_ends(monkeypatch):
    """Records, for every exact solve, the forward's start states and the backward's reconstruction."""
    seen = {"start": [], "reconstructed": []}
    start, distance_to = FixedStates.start.__func__, FixedStates.distance_to

    def recording_start(cls, *args, **kwargs):
        states = start(cls, *args, **kwargs)
        seen["start"].append((states.y.clone(), states.z.clone()))
        return states

    def recording_distance_to(self, z0):
        seen["reconstructed"].append((self.y.clone(), self.z.clone()))
        return distance_to(self, z0)

    monkeypatch.setattr(FixedStates, "start", classmethod(recording_start))
    monkeypatch.setattr(FixedStates, "distance_to", recording_distance_to)
    return seen


def assert_bit_equal(got, want, what):
    if not torch.equal(got, want):
        bad = got != want
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ, by up to "
                             f"{(got - want).abs().max().item()} units of 2^-F")


# ---------------------------------------------------------------------------------------------
# Bit-exact reconstruction at depth.

@pytest.mark.parametrize("model", ["tanh_mlp", "prenorm_transformer"])
@pytest.mark.parametrize("beta", [0.8125, 0.5])
@pytest.mark.parametrize("steps", [64, 256])
def test_backward_reconstructs_the_start_bit_for_bit(model, beta, steps, starts_and_ends):
    if model == "tanh_mlp":
        f, x = TanhMLP(seed=steps), randn(4, 32, dtype=torch.float32, seed=1)
    else:
        f, x = PreNormBlock(seed=steps), randn(2, 8, 32, dtype=torch.float32, seed=1)
    x.requires_grad_()
    z0 = randn(*x.shape, dtype=torch.float32, seed=2)
    z, info = rfp(f, x, z0=z0, beta=beta, max_steps=steps, tol=None, exact=True)
    z.square().sum().backward()

    (y_start, z_start), = starts_and_ends["start"]
    (y_back, z_back), = starts_and_ends["reconstructed"]
    assert_bit_equal(y_start, fxp.to_fixed(z0), "forward start y vs to_fixed(z0)")
    assert_bit_equal(z_start, fxp.to_fixed(z0), "forward start z vs to_fixed(z0)")
    what = f"{model}, beta={info['dyadic_beta']}, {steps} steps"
    assert_bit_equal(y_back, y_start, f"{what}: reconstructed y[0]")
    assert_bit_equal(z_back, z_start, f"{what}: reconstructed z[0]")
    assert info["drift"] == 0.0 and info["steps"] == steps
    # The iteration went somewhere: the reconstruction undid a real trajectory.
    assert (z.detach() - z0).abs().max() > 0.5
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [x, *f.parameters()])


# ---------------------------------------------------------------------------------------------
# Gradients.

def test_deep_float32_gradient_is_exact_where_float_states_fail():
    """beta = 13/16, 64 steps, float32 f: exact mode matches float64 autograd through the unrolled loop
    (float64 f, same beta) to float32 precision; float32 states (float mode) give non-finite garbage."""
    beta, steps, dim = 0.8125, 64, 32
    cell64, cell32 = TanhCell(dim=dim, seed=3), TanhCell(dim=dim, seed=3, dtype=torch.float32)
    x64 = randn(8, dim, seed=1, requires_grad=True)
    x32 = x64.detach().float().requires_grad_()
    weight = randn(8, dim, seed=4)
    want = torch.autograd.grad((unrolled(cell64, x64, torch.zeros_like(x64), beta, steps) * weight).sum(),
                               [x64, *cell64.parameters()])
    inputs32 = [x32, *cell32.parameters()]

    z, info = rfp(cell32, x32, beta=beta, max_steps=steps, tol=None, exact=True)
    got = torch.autograd.grad((z.double() * weight).sum(), inputs32)
    assert_grads_close(got, want, 1e-4, ["x", "W", "U", "b"])
    assert info["drift"] == 0.0 and info["beta"] == beta

    z, info = rfp(cell32, x32, beta=beta, max_steps=steps, tol=None, state_dtype=torch.float32)
    got = torch.autograd.grad((z.double() * weight).sum(), inputs32)
    errors = [rel_err(g, w) for g, w in zip(got, want)]
    print("float32 states: relative gradient errors", errors)
    assert min(errors) > 1.0, f"float32 states were expected to give garbage here, got errors {errors}"
    with pytest.raises(FloatingPointError, match="non-finite values in the backward pass"):
        info["drift"]


def gradient_rtol(frac_bits: int, steps: int) -> float:
    """What quantization allows between exact mode and float64 autograd through the unrolled loop.

    Each exact half-step is the float64 relaxation of its inputs up to the shift's floor (< 2^-F) and
    the rounding of f to 2^-F (beta * 2^-(F+1) <= 2^-F), so < 2^(1-F); z0 is rounded by 2^-(F+1). For
    these contractions (Lipschitz constant about 0.4) the perturbations do not grow, so the trajectory
    stays within (2 * steps + 1) * 2^(1-F) of the float64 one, and gradients of tanh layers with O(1)
    arguments move relatively by a small multiple of that: we allow 8x.
    """
    return 8 * (2 * steps + 1) * 2.0 ** (1 - frac_bits)


@pytest.mark.parametrize("frac_bits", [32, 20])
@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("beta", [0.5, 0.8125, 1.3125])
def test_gradient_equals_unrolled_float64_autograd(beta, steps, frac_bits):
    case = gradient_case(beta, steps)
    z, info = rfp(case.cell, case.x, z0=case.z0, beta=beta, max_steps=steps, tol=None, exact=True,
                  frac_bits=frac_bits)
    rtol = gradient_rtol(frac_bits, steps)
    assert rel_err(z, case.want_z) <= rtol
    if frac_bits < 32:  # the format is really coarser: the 32-bit tolerance would catch this error
        assert rel_err(z, case.want_z) > gradient_rtol(32, steps)
    got = torch.autograd.grad((z * case.weight).sum(), case.inputs)
    assert_grads_close(got, case.want, rtol, ["x", "z0", "W", "U", "b"])
    assert info["drift"] == 0.0 and info["frac_bits"] == frac_bits and info["beta"] == beta


def test_early_stop_gradient_matches_the_steps_taken_across_remainder_chunks():
    # With a tolerance the remainders grow in chunks (16 steps, then doubling) and are trimmed to the
    # steps taken: the backward must pop them in order across the chunk boundaries.
    cell = TanhCell()
    x = randn(3, 6, seed=1, requires_grad=True)
    z, info = rfp(cell, x, beta=0.5, max_steps=200, tol=1e-9, exact=True)
    steps = info["steps"]
    assert 32 < steps < 64 and info["residual"] <= 1e-9  # chunks of 16, 16 and 32 steps, the last trimmed
    inputs = [x, *cell.parameters()]
    want = torch.autograd.grad(unrolled(cell, x, torch.zeros_like(x), 0.5, steps).sum(), inputs)
    got = torch.autograd.grad(z.sum(), inputs)
    assert_grads_close(got, want, gradient_rtol(32, steps), ["x", "W", "U", "b"])
    assert info["drift"] == 0.0


def test_revdeq_module_in_exact_mode():
    deq = rk.RevDEQ(TanhCell(dim=6, dtype=torch.float32), beta=0.8, max_steps=40, tol=None, exact=True)
    assert deq.options.dyadic_beta == DyadicBeta(205, 8) and deq.options.beta == 205 / 256
    assert "exact=True (beta=205/256), frac_bits=32" in repr(deq)
    x = randn(3, 6, dtype=torch.float32, seed=1, requires_grad=True)
    z = deq(x)
    z.sum().backward()
    info = deq.info
    assert info["drift"] == 0.0 and info["beta"] == 205 / 256 and info["dyadic_beta"] == (205, 8)
    assert x.grad is not None and all(p.grad is not None for p in deq.parameters())
    with torch.no_grad():
        assert torch.equal(deq(x), z.detach())  # no grad: the same states, nothing kept
    assert deq.info["remainder_bytes"] == 0


def test_dropout_is_replayed_and_autocast_f_is_quantized_bit_exactly(starts_and_ends):
    # Dropout masks are replayed, and under autocast f returns bfloat16, which relax_fixed_ quantizes
    # as it is: both reconstruct exactly.
    x = randn(3, 6, seed=1, requires_grad=True)
    z, info = rfp(TanhCell(dropout=0.3), x, beta=0.8125, max_steps=20, tol=None, exact=True)
    z.sum().backward()
    x32 = randn(3, 6, dtype=torch.float32, seed=1, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z32, info32 = rfp(TanhCell(dtype=torch.float32), x32, beta=0.8125, max_steps=20, tol=None, exact=True)
    z32.sum().backward()
    assert z32.dtype == torch.float32 and x32.grad.abs().sum() > 0
    assert info["drift"] == 0.0 and info32["drift"] == 0.0
    for (y_start, z_start), (y_back, z_back) in zip(starts_and_ends["start"], starts_and_ends["reconstructed"]):
        assert torch.equal(y_back, y_start) and torch.equal(z_back, z_start)


def test_exact_beta_may_be_given_as_p_m_and_info_lists_the_facts():
    x = randn(3, 6, seed=1, requires_grad=True)
    z, info = rfp(TanhCell(), x, beta=(21, 4), max_steps=5, tol=None, exact=True)
    assert info["dyadic_beta"] == DyadicBeta(21, 4) and info["beta"] == 1.3125
    assert set(info) == {"steps", "residual", "drift", "f_mismatch", "residual_trace", "beta", "dyadic_beta",
                         "frac_bits", "remainder_bytes", "stored_states_bytes"}
    assert info["stored_states_bytes"] == 2 * 5 * 18 * 8  # both states, every step, 8 bytes each
    assert info["remainder_bytes"] == fxp.remainder_bytes(18, 4, 10)
    # Float mode keeps its core keys.
    assert set(rfp(TanhCell(), x, beta=0.5, max_steps=2, tol=None)[1]) == {"steps", "residual", "drift",
                                                                          "f_mismatch", "residual_trace"}


# ---------------------------------------------------------------------------------------------
# Errors: what exact mode cannot represent, where it happened, and bad options.

class Faulty(torch.nn.Module):
    """TanhCell whose output is replaced by ``value`` at evaluation number ``at`` (0 is f(z0); step n
    evaluates 2n-1 and 2n), or, with ``at=None``, at every evaluation once ``armed``."""

    def __init__(self, value, at=None, perturb=False):
        super().__init__()
        self.cell, self.value, self.at, self.perturb = TanhCell(), value, at, perturb
        self.calls, self.armed = 0, False

    def forward(self, z, x):
        out = self.cell(z, x)
        hit = self.calls == self.at if self.at is not None else self.armed
        self.calls += 1
        if not hit:
            return out
        if self.perturb:
            return out + self.value  # a different f in the backward: not reproducible
        return torch.full_like(out, self.value).where(torch.arange(out.numel()).view(out.shape) == 4, out)


x_err = randn(3, 6, seed=1, requires_grad=True)


@pytest.mark.parametrize("value, what", [(math.nan, "f returned NaN or Inf"), (math.inf, "f returned NaN or Inf"),
                                         (1e7, r"f returned values outside the range \|x\| <= 2\^21")])
@pytest.mark.parametrize("at, step", [(5, 3), (6, 3), (0, 0)])
def test_forward_problems_raise_with_the_step_when_info_is_read(value, what, at, step):
    z, info = rfp(Faulty(value, at), x_err, beta=0.8125, max_steps=6, tol=None, exact=True)
    where = "forward pass, evaluating f\\(z0\\)" if step == 0 else f"forward pass at step {step} of 6"
    with pytest.raises(ExactModeError, match=f"reversible_fixed_point: exact mode, {where}: {what}"):
        info["residual"]
    # The integer states never saw the bad value: z is finite.
    assert torch.isfinite(z).all()


def test_forward_problems_raise_inside_the_solve_with_a_tolerance():
    with pytest.raises(ExactModeError, match=r"forward pass at step 2 of 6: f returned values outside the range "
                                              r"\|x\| <= 2\^21 = 2\.09715e\+06 that frac_bits=32 represents; pass a "
                                              r"smaller frac_bits to widen the range"):
        rfp(Faulty(1e7, at=3), x_err, beta=0.8125, max_steps=6, tol=1e-30, exact=True)
    # The advice works: 12 fractional bits fewer represent 1e7 (range 2^33).
    z, info = rfp(Faulty(1e7, at=3), x_err, beta=0.8125, max_steps=6, tol=1e-30, exact=True, frac_bits=20)
    assert info["steps"] == 6


def test_z0_out_of_range_raises():
    z0 = randn(3, 6, seed=2) * 1e7
    _, info = rfp(TanhCell(), x_err, z0=z0, beta=0.5, max_steps=2, tol=None, exact=True)
    with pytest.raises(ExactModeError, match=r"evaluating f\(z0\): z0 holds NaN, Inf or values outside the range"):
        info.check()


@pytest.mark.parametrize("tol", [None, 1e-30])
def test_backward_problems_raise_with_the_backward_step(tol):
    f = Faulty(math.nan)
    z, info = rfp(f, x_err, beta=0.8125, max_steps=5, tol=tol, exact=True)
    f.armed = True
    match = (r"exact mode, backward pass at step 5 \(the backward visits steps 5 down to 1\): f returned NaN or "
             "Inf")
    with pytest.raises(ExactModeError, match=match):
        z.sum().backward()
        info["drift"]


def test_a_different_f_in_the_backward_is_caught():
    # beta = 13/16: multiplying by the inverse of 2^m - p = 3 sends any mismatch out of range, flagged.
    f = Faulty(1e-6, perturb=True)
    z, info = rfp(f, x_err, beta=0.8125, max_steps=4, tol=None, exact=True)
    f.armed = True
    z.sum().backward()
    with pytest.raises(ExactModeError, match="backward pass at step 4 .*f did not return the bits it returned in the "
                                              "forward pass for the same state"):
        info["drift"]


def test_a_different_f_at_beta_one_half_shows_as_drift(monkeypatch):
    monkeypatch.setitem(solver_info._occurrences, "f_changed", 0)
    # beta = 1/2 (2^m - p = 1): every inverse is in range, so only the drift can tell, and any drift at
    # all is an error in exact mode when max_drift=0 (and a warning by default).
    f = Faulty(1e-6, perturb=True)
    z, info = rfp(f, x_err, beta=0.5, max_steps=4, tol=None, exact=True, max_drift=0.0)
    f.armed = True
    with pytest.raises(DriftError, match="exact mode with frac_bits=32.*make f deterministic"), \
            pytest.warns(RuntimeWarning, match="f returned a different value in the backward"):
        z.sum().backward()  # an explicit max_drift is checked inside the backward, even with tol=None
    with pytest.raises(DriftError):
        info["drift"]


def _relaxed(**kwargs):
    return lambda: rfp(TanhCell(), x_err, **kwargs)


BAD_OPTIONS = [
    ("frac_bits too big", _relaxed(exact=True, frac_bits=53), ValueError,
     r"reversible_fixed_point: frac_bits must be an integer in \[0, 52\], got 53"),
    ("frac_bits negative", _relaxed(exact=True, frac_bits=-1), ValueError, r"frac_bits must be .* got -1"),
    ("frac_bits float", _relaxed(exact=True, frac_bits=8.5), ValueError, r"frac_bits must be .* got 8.5"),
    ("frac_bits without exact", _relaxed(frac_bits=16), ValueError,
     r"reversible_fixed_point: frac_bits=16 sets the fixed-point format of exact mode, but exact=False"),
    ("exact not a bool", _relaxed(exact="yes"), TypeError, r"exact must be True or False, got str"),
    ("beta rounds to 1", _relaxed(exact=True, beta=0.999), ValueError,
     r"reversible_fixed_point: exact mode rounds beta to the nearest p / 2\^m with m <= 8, but beta=0.999 rounds "
     r"to 256/256"),
    ("beta below 1/512", _relaxed(exact=True, beta=0.001), ValueError, r"beta=0.001 rounds to 0/256"),
    ("beta out of (0, 2)", _relaxed(exact=True, beta=2.5), ValueError, r"beta must be a finite number in \(0, 2\)"),
    ("beta p even", _relaxed(exact=True, beta=(12, 4)), ValueError, r"needs p odd in \(0, 2\^\(m\+1\)\)"),
    ("beta m too big", _relaxed(exact=True, beta=(13, 9)), ValueError, r"needs m in \[1, 8\], got m=9"),
    ("beta pair without exact", _relaxed(beta=(13, 4)), TypeError, r"beta must be a real number, got tuple"),
    ("RevDEQ frac_bits", lambda: rk.RevDEQ(TanhCell(), exact=True, frac_bits=60), ValueError,
     r"RevDEQ: frac_bits must be an integer in \[0, 52\], got 60"),
]


@pytest.mark.parametrize("case", BAD_OPTIONS, ids=[c[0] for c in BAD_OPTIONS])
def test_bad_exact_options_get_clear_errors(case):
    _, call, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        call()


# ---------------------------------------------------------------------------------------------
# Backends: every one with fixed-point kernels gives the same bits.

def fixed_backends(device_type):
    return [name for name in backends.NAMES if backends.REGISTRY[name].unavailable_reason(device_type, "exact") is None]


def _short_solve_bits(backend, device, starts_and_ends):
    cell = TanhCell(dim=40).to(device)
    x = randn(5, 40, seed=1).to(device).requires_grad_()
    z, info = rfp(cell, x, beta=0.8125, max_steps=6, tol=None, exact=True, backend=backend)
    z.sum().backward()
    assert info["drift"] == 0.0
    return z.detach(), starts_and_ends["reconstructed"][-1]


def _assert_backends_agree(device, starts_and_ends):
    names = fixed_backends(torch.device(device).type)
    assert "reference" in names
    results = {name: _short_solve_bits(name, device, starts_and_ends) for name in names}
    print("fixed-point backends compared:", names)
    want_z, (want_y0, want_z0) = results["reference"]
    for name, (z, (y0, z0)) in results.items():
        # float64 f: z is the exact value of the int64 state, so equal z means equal states
        assert torch.equal(z, want_z), f"{name}: final state differs from the reference backend"
        assert torch.equal(y0, want_y0) and torch.equal(z0, want_z0), f"{name}: reconstruction differs"


def test_every_cpu_backend_with_fixed_kernels_gives_the_same_bits(starts_and_ends):
    _assert_backends_agree("cpu", starts_and_ends)
    if extension.loaded():
        assert "cpp" in fixed_backends("cpu"), "the compiled extension is loaded but serves no fixed-point ops"


@pytest.mark.gpu
def test_every_cuda_backend_with_fixed_kernels_gives_the_same_bits(starts_and_ends):
    _assert_backends_agree("cuda", starts_and_ends)


# ---------------------------------------------------------------------------------------------
# Memory and synchronisation.

def test_saved_bytes_grow_by_exactly_m_bits_per_element_per_half_step():
    cell = TanhCell(dim=32)
    x = randn(16, 32, seed=1, requires_grad=True)
    n = x.numel()
    params = sum(p.numel() * p.element_size() for p in cell.parameters())
    base = 2 * n * 8 + x.numel() * 8 + params  # the two int64 states, x and the parameters
    for beta, m in [(0.8125, 4), (0.5, 1), (0.8, 8)]:
        saved = {}
        for steps in (8, 64):
            (z, info), nbytes, _ = saved_for_backward(
                lambda s=steps, b=beta: rfp(cell, x, beta=b, max_steps=s, tol=None, exact=True))
            assert nbytes == base + info["remainder_bytes"]
            assert info["remainder_bytes"] == 2 * steps * m * n // 8  # n is a multiple of 32: no padding
            assert info["stored_states_bytes"] == 2 * steps * n * 8
            saved[steps] = nbytes
            z.sum().backward()
        print(f"beta {beta}: saved bytes {saved}")
        assert saved[64] - saved[8] == 2 * (64 - 8) * m * n // 8


def test_with_a_tolerance_only_the_steps_taken_are_kept():
    cell = TanhCell(dim=32)
    x = randn(16, 32, seed=1, requires_grad=True)
    (z, info), nbytes, _ = saved_for_backward(lambda: rfp(cell, x, beta=0.8125, max_steps=500, tol=1e-9,
                                                          exact=True))
    steps = info["steps"]
    assert 16 < steps < 500  # past the first remainder chunk, far from the maximum
    n = x.numel()
    params = sum(p.numel() * p.element_size() for p in cell.parameters())
    assert info["remainder_bytes"] == fxp.remainder_bytes(n, 4, 2 * steps)
    assert nbytes == 2 * n * 8 + x.numel() * 8 + params + info["remainder_bytes"]
    z.sum().backward()
    assert info["drift"] == 0.0


def test_remainder_tape_pushes_and_pops_across_chunks():
    tape = RemainderTape(100, 3, "cpu", first=2, limit=11)
    pushed = []
    for k in range(7):
        slot = tape.push()
        slot.fill_(k + 1)
        pushed.append(slot)
    assert tape.capacity == 8 and [len(c) for c in tape.chunks] == [2, 2, 4]
    tape.trim()
    assert tape.capacity == 7 and tape.held_bytes == fxp.remainder_bytes(100, 3, 7)
    for k in reversed(range(7)):
        assert (tape.pop() == k + 1).all()
    with pytest.raises(RuntimeError, match="no remainders left"):
        tape.pop()


def test_no_host_reads_without_a_tolerance(monkeypatch):
    cell = TanhCell()
    x = randn(3, 6, seed=1, requires_grad=True)
    z0 = randn(3, 6, seed=2)  # converted to fixed point on the device, without a check that syncs
    with count_host_reads(monkeypatch) as counts:
        z, info = rfp(cell, x, z0=z0, beta=0.8125, max_steps=9, tol=None, exact=True)
        z.sum().backward()
    assert counts == {}, f"exact mode with tol=None must not read device values back, but called {counts}"
    with count_host_reads(monkeypatch) as counts:
        assert info["drift"] == 0.0 and info["residual"] > 0
    assert counts == {"tolist": 2}  # the forward's rows and flags in one read, the backward's in another


def test_exact_drift_is_zero_where_float64_states_drift():
    # The same deep solve with float64 states: the reconstruction is visibly off.
    cell = TanhCell(dim=16, seed=3, dtype=torch.float32)
    x = randn(8, 16, dtype=torch.float32, seed=1, requires_grad=True)
    drifts = {}
    for exact in (True, False):
        z, info = rfp(cell, x, beta=0.8125, max_steps=64, tol=None, exact=exact)
        z.sum().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            drifts[exact] = info["drift"]
    print("drift, exact vs float64 states:", drifts)
    assert drifts[True] == 0.0 and drifts[False] > 1.0


@pytest.mark.gpu
def test_cuda_exact_mode_without_a_tolerance_never_synchronises():
    cell = TanhCell(dim=64, dtype=torch.float32).cuda()
    x = torch.randn(32, 64, device="cuda", requires_grad=True)
    z0 = torch.randn(32, 64, device="cuda")
    rfp(cell, x, z0=z0, max_steps=2, tol=None, exact=True)[0].sum().backward()  # warm up (lazy init syncs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        z, info = rfp(cell, x, z0=z0, beta=0.8125, max_steps=8, tol=None, exact=True)
        z.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert info["drift"] == 0.0


# frac_bits="auto": the fixed-point scale chosen from the data -------------------------------------------


def _small_graph_case(scale=1e-4):
    """An IGNN-style f whose states are about ``scale``: relu(A z W + x U), A a normalised adjacency."""
    g = torch.Generator().manual_seed(5)
    adjacency = (torch.rand(10, 10, generator=g) < 0.3).double() + torch.eye(10, dtype=torch.float64)
    adjacency = adjacency / adjacency.sum(1, keepdim=True)
    w = (0.5 * torch.randn(6, 6, generator=g, dtype=torch.float64) / 6 ** 0.5).requires_grad_()
    u = torch.randn(4, 6, generator=g, dtype=torch.float64).requires_grad_()
    x = (scale * torch.randn(10, 4, generator=g, dtype=torch.float64)).requires_grad_()

    def f(z, x):
        return torch.relu(adjacency @ z @ w + x @ u) + 0.1 * torch.tanh(adjacency @ z)

    return f, x, [w, u]


def _exact_vs_unrolled(frac_bits, steps=16):
    f, x, params = _small_graph_case()
    z, info = rfp(f, x, z0=torch.zeros(10, 6, dtype=torch.float64), beta=0.5, max_steps=steps, tol=None,
                  exact=True, frac_bits=frac_bits, params=params)
    got = torch.autograd.grad(z.square().sum(), [x, *params])
    y = zz = torch.zeros(10, 6, dtype=torch.float64)
    for _ in range(steps):
        y = 0.5 * y + 0.5 * f(zz, x)
        zz = 0.5 * zz + 0.5 * f(y, x)
    want = torch.autograd.grad(zz.square().sum(), [x, *params])
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)), info


def test_auto_frac_bits_fits_small_valued_states_where_the_fixed_scale_does_not():
    fixed_err, fixed_info = _exact_vs_unrolled(32)
    auto_err, info = _exact_vs_unrolled("auto")
    assert fixed_info["frac_bits"] == 32 and fixed_err > 1e-6  # 2^-32 is coarse for values of 1e-4
    assert info["frac_bits"] == 52 and 0 < info["exact_scale"] < 1e-2
    assert auto_err < 1e-9 and info["drift"] == 0.0  # and the reversal stays bit-exact


@pytest.mark.parametrize("scale, bits", [(0.0, 52), (1e-3, 52), (0.7, 47), (1.0, 46), (3.0, 45), (1e5, 30),
                                         (2.0 ** 60, 0)])
def test_choose_frac_bits_leaves_64x_headroom(scale, bits):
    from revdeq_kernels.solver.exact_states import choose_frac_bits

    assert choose_frac_bits(scale) == bits
    if 0 < scale < 2.0 ** 40:
        assert fxp.value_range(bits) >= 64 * scale  # the values may grow 64x and still be represented


def test_auto_frac_bits_leaves_the_rng_of_the_solve_alone():
    # The scale is measured with one extra evaluation of f under forked RNG states: a dropout f draws the
    # same masks as a solve at that F chosen by hand, so both give the same bits.
    cell = TanhCell(dropout=0.3)
    x = randn(3, 6, seed=1)
    torch.manual_seed(7)
    z_auto, info = rfp(cell, x, beta=0.5, max_steps=5, tol=None, exact=True, frac_bits="auto")
    torch.manual_seed(7)
    z_hand, _ = rfp(cell, x, beta=0.5, max_steps=5, tol=None, exact=True, frac_bits=info["frac_bits"])
    assert info["frac_bits"] != 32 and torch.equal(z_auto, z_hand)


def test_auto_frac_bits_is_refused_when_misspelt_and_works_from_the_torchdeq_core():
    with pytest.raises(ValueError, match=r"frac_bits must be an integer in \[0, 52\] or 'auto', got 'automatic'"):
        rfp(TanhCell(), randn(3, 6), exact=True, frac_bits="automatic")
    pytest.importorskip("torchdeq")
    from torchdeq import get_deq

    import revdeq_kernels.integrations.torchdeq  # noqa: F401 (registers core="revdeq")

    f, x, params = _small_graph_case()
    deq = get_deq(core="revdeq", f_max_iter=16, f_tol=None, exact=True, frac_bits="auto")
    z_out, info = deq(lambda z: f(z, x), torch.zeros(10, 6, dtype=torch.float64))
    z_out[-1].sum().backward()
    assert info.solver_info["frac_bits"] == 52 and info.solver_info["drift"] == 0.0


@pytest.mark.parametrize("frac_bits", [0, 8, 32, 47, 52])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_f_sees_from_fixed_bits_of_both_states(frac_bits, dtype):
    # show() converts y to float32 directly (int64 -> float32, then * 2^-F) and z through float64: both must
    # give f the bits from_fixed gives, over the whole range of fixed-point values, repeatedly (kept buffers).
    from revdeq_kernels.solver.layout import StateLayout

    g = torch.Generator().manual_seed(frac_bits)
    layout = StateLayout(torch.Tensor, [(3000,)], [dtype], "cpu")
    states = FixedStates.start(None, layout, DyadicBeta(13, 4), frac_bits, None, 4, 4)
    for _ in range(2):
        for which in ("y", "z"):
            ints = torch.cat([torch.randint(-(1 << 53), 1 << 53, (1000,), generator=g),
                              torch.randint(-(1 << 25), 1 << 25, (1000,), generator=g),
                              torch.randint(-300, 300, (1000,), generator=g)])
            getattr(states, which).copy_(ints)
            states._fresh.discard(which)  # what relax_/unrelax_ do after changing a state
            want = fxp.from_fixed(ints, frac_bits, dtype)
            got = states.show(which)
            bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float64: torch.int64}[dtype]
            assert got.dtype == dtype and torch.equal(got.view(bits), want.view(bits)), (which, frac_bits)
