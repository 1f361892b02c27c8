"""Bad input, non-finite values, drift and unsupported uses: each gets a clear error naming what and where."""

import sys
import warnings

import pytest
import torch

import revdeq_kernels as rk
from helpers.solver_cases import (
    TanhCell,
    randn,
    single_threaded,  # noqa: F401 (an autouse fixture)
)
from revdeq_kernels import DriftError
from revdeq_kernels.solver import info as solver_info

rfp = rk.reversible_fixed_point
needs_notes = pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes (add_note) need Python 3.11")
cell = TanhCell()
x = randn(3, 6, seed=1)


def _identity_shape(z, x):
    return torch.tanh(z + x)


# (id, call, exception type, regex of the message)
BAD_INPUTS = [
    ("f not callable", lambda: rfp("f", x), TypeError,
     r"reversible_fixed_point: f must be callable as f\(z, x\), got str"),
    ("f wrong shape", lambda: rfp(lambda z, x: z[:, :3], x), ValueError,
     r"reversible_fixed_point: f \(forward pass, evaluating f\(z0\)\) returned shape \(3, 3\) but the state \(z0\) "
     r"has shape \(3, 6\)\. z0 defaults to zeros shaped like x's first tensor; pass z0="),
    ("f wrong dtype", lambda: rfp(lambda z, x: (z + x).float(), x), TypeError,
     r"f \(forward pass, evaluating f\(z0\)\) returned dtype torch.float32 but the state is computed in torch.float64"),
    ("f wrong device", lambda: rfp(lambda z, x: torch.empty_like(z, device="meta"), x), ValueError,
     r"f \(forward pass, evaluating f\(z0\)\) returned a tensor on meta but the state \(z0\) is on cpu"),
    ("f returns a tuple", lambda: rfp(lambda z, x: (z, x), x), TypeError,
     r"f \(forward pass, evaluating f\(z0\)\) must return a torch.Tensor, got tuple"),
    ("f changes shape later", lambda: rfp(lambda z, x: z[:2] if z.abs().sum() > 0 else z + x, x), ValueError,
     r"f \(forward pass, step 1\) returned shape \(2, 6\)"),
    ("x a float", lambda: rfp(_identity_shape, 3.0), TypeError,
     r"reversible_fixed_point: x must be a tensor or a tuple of tensors, got float"),
    ("x holds a non-tensor", lambda: rfp(_identity_shape, (x, 2)), TypeError,
     r"x must be a tensor or a tuple of tensors, but x\[1\] is a int"),
    ("x empty and no z0", lambda: rfp(lambda z, x: z, ()), ValueError,
     r"z0 is None and x holds no tensor to take the state's shape from; pass z0"),
    ("max_steps 0", lambda: rfp(_identity_shape, x, max_steps=0), ValueError,
     r"reversible_fixed_point: max_steps must be at least 1, got 0"),
    ("max_steps float", lambda: rfp(_identity_shape, x, max_steps=2.5), TypeError,
     r"reversible_fixed_point: max_steps must be an int, got float"),
    ("beta 1", lambda: rfp(_identity_shape, x, beta=1.0), ValueError,
     r"reversible_fixed_point: beta must be a finite number in \(0, 2\) other than 1, got 1.0"),
    ("beta 0", lambda: rfp(_identity_shape, x, beta=0), ValueError, r"beta must be .* got 0.0"),
    ("beta 2", lambda: rfp(_identity_shape, x, beta=2.0), ValueError, r"beta must be .* got 2.0"),
    ("beta negative", lambda: rfp(_identity_shape, x, beta=-0.5), ValueError, r"beta must be .* got -0.5"),
    ("beta nan", lambda: rfp(_identity_shape, x, beta=float("nan")), ValueError, r"beta must be .* got nan"),
    ("beta tensor", lambda: rfp(_identity_shape, x, beta=torch.tensor(0.5)), TypeError,
     r"reversible_fixed_point: beta must be a real number, got Tensor"),
    ("z0 wrong shape, f fails", lambda: rfp(_identity_shape, x, z0=torch.zeros(3, 5, dtype=torch.float64)),
     RuntimeError, r"reversible_fixed_point: raised by f on its first call, with a state of shape \(3, 5\) \(z0's "
     r"shape\)"),
    ("z0 wrong shape, f broadcasts", lambda: rfp(_identity_shape, x, z0=torch.zeros(1, 6, dtype=torch.float64)),
     ValueError, r"f \(forward pass, evaluating f\(z0\)\) returned shape \(3, 6\) but the state \(z0\) has shape "
     r"\(1, 6\)\.$"),
    ("z0 a list of floats", lambda: rfp(_identity_shape, x, z0=[0.0] * 6), TypeError,
     r"reversible_fixed_point: z0\[0\] must be a torch.Tensor, got float"),
    ("z0 a dict", lambda: rfp(_identity_shape, x, z0={"z": x}), TypeError,
     r"reversible_fixed_point: z0 must be a torch.Tensor, a tuple or list of tensors \(a tuple state\) or None, "
     r"got dict"),
    ("z0 integer", lambda: rfp(_identity_shape, x, z0=torch.zeros(3, 6, dtype=torch.int64)), TypeError,
     r"z0 must have dtype float64, float32, float16 or bfloat16, got torch.int64"),
    ("state_dtype half", lambda: rfp(_identity_shape, x, state_dtype=torch.float16), TypeError,
     r"state_dtype must be torch.float64 or torch.float32, got torch.float16"),
    ("state_dtype too narrow", lambda: rfp(_identity_shape, x, state_dtype=torch.float32), TypeError,
     r"state_dtype torch.float32 cannot hold f's dtype torch.float64 \(z0's dtype, else x's\)"),
    ("params a tensor", lambda: rfp(_identity_shape, x, params=cell.W), TypeError,
     r"params must be an iterable of tensors \(e.g. a list\), got a single Tensor"),
    ("params holds a module", lambda: rfp(_identity_shape, x, params=[cell]), TypeError,
     r"params must hold tensors, but element 0 is a TanhCell"),
    ("check_every 0", lambda: rfp(_identity_shape, x, check_every=0), ValueError, r"check_every must be at least 1"),
    ("tol negative", lambda: rfp(_identity_shape, x, tol=-1e-3), ValueError,
     r"tol must be a finite number >= 0 or None, got -0.001"),
    ("tol nan", lambda: rfp(_identity_shape, x, tol=float("nan")), ValueError, r"tol must be .* got nan"),
    ("max_drift string", lambda: rfp(_identity_shape, x, max_drift="1e-3"), TypeError,
     r"max_drift must be a real number or None, got str"),
    ("unknown backend", lambda: rfp(_identity_shape, x, backend="cudnn"), ValueError,
     r"reversible_fixed_point: unknown backend 'cudnn'; expected None, 'auto' or one of cuda, triton, cpp, reference"),
    ("RevDEQ of a function", lambda: rk.RevDEQ(_identity_shape), TypeError,
     r"RevDEQ: f must be an nn.Module called as f\(z, x\), got function; for a plain function use "
     r"reversible_fixed_point"),
    ("RevDEQ beta", lambda: rk.RevDEQ(cell, beta=1), ValueError, r"RevDEQ: beta must be .* got 1.0"),
    ("RevDEQ z0 shape", lambda: rk.RevDEQ(cell)(x, torch.zeros(2, 6, dtype=torch.float64)), RuntimeError,
     r"RevDEQ: raised by f on its first call, with a state of shape \(2, 6\)"),
]


@pytest.mark.parametrize("case", [pytest.param(c, marks=needs_notes) if "first call" in c[3] else c
                                  for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(case):
    _, call, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        call()


@needs_notes
def test_f_that_fails_on_the_default_z0_is_told_to_pass_z0():
    lin = torch.nn.Linear(6, 6, dtype=torch.float64)
    x4 = randn(3, 4)
    # The exception keeps its type; a note says what the state was and what to do.
    with pytest.raises(RuntimeError, match=r"reversible_fixed_point: raised by f on its first call, with a state of "
                                           r"shape \(3, 4\) \(the default z0: zeros shaped like x's first tensor; if "
                                           r"f's state has another shape, pass z0=\)"):
        rfp(lambda z, x: torch.tanh(lin(z)), x4, params=list(lin.parameters()))


def test_a_closure_hiding_a_tensor_that_requires_grad_is_refused():
    lin = torch.nn.Linear(6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"reversible_fixed_point: f depends on 2 tensor\(s\) that require grad but "
                                         r"were passed neither as x nor in params \(shapes \(6, 6\), \(6,\)\)"):
        rfp(lambda z, x: torch.tanh(lin(z) + x), x)
    # Declaring them, or detaching them, is accepted.
    rfp(lambda z, x: torch.tanh(lin(z) + x), x, params=list(lin.parameters()))
    with torch.no_grad():
        rfp(lambda z, x: torch.tanh(lin(z) + x), x)


class _PoisonAt:
    """f that returns NaN (or inf) at one chosen evaluation of a pass."""

    def __init__(self, forward_at=None, backward_at=None, value=float("nan")):
        self.forward_at, self.backward_at, self.value = forward_at, backward_at, value
        self.calls = {"forward": 0, "backward": 0}
        self.phase = "forward"

    def __call__(self, z, x):
        out = cell(z, x)
        at = self.forward_at if self.phase == "forward" else self.backward_at
        self.calls[self.phase] += 1
        if at is not None and self.calls[self.phase] - 1 == at:
            out = out + self.value
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_f_in_the_forward_raises_naming_the_step(value):
    # Evaluation 5 is f(y[3]): z[3] is the first non-finite state.
    f = _PoisonAt(forward_at=5, value=value)
    with pytest.raises(FloatingPointError, match=r"reversible_fixed_point: non-finite values in the forward pass at "
                                                 r"step 3 of 10: f returned inf or NaN"):
        rfp(f, x, params=list(cell.parameters()), max_steps=10, tol=1e-14)
    assert f.calls["forward"] == 2 * 3 + 1, "with check_every=1 the error comes right after the bad step"


def test_non_finite_first_evaluation_is_named():
    f = _PoisonAt(forward_at=0)
    with pytest.raises(FloatingPointError, match=r"non-finite values in the forward pass evaluating f\(z0\)"):
        rfp(f, x, params=list(cell.parameters()), max_steps=10, tol=1e-14)


def test_non_finite_with_check_every_is_reported_at_the_next_check_with_its_step():
    f = _PoisonAt(forward_at=5)
    with pytest.raises(FloatingPointError, match=r"forward pass at step 3 of 10"):
        rfp(f, x, params=list(cell.parameters()), max_steps=10, tol=1e-14, check_every=4)
    assert f.calls["forward"] == 2 * 4 + 1


def test_non_finite_without_tol_is_reported_when_info_is_read():
    f = _PoisonAt(forward_at=5)
    z, info = rfp(f, x, params=list(cell.parameters()), max_steps=10, tol=None)  # no sync: no error yet
    assert info["steps"] == 10 and torch.isnan(z).all()
    with pytest.raises(FloatingPointError, match=r"forward pass at step 3 of 10"):
        info["residual"]
    with pytest.raises(FloatingPointError, match=r"forward pass at step 3 of 10"):
        info.check()


@pytest.mark.parametrize("tol", [1e-30, None])
def test_non_finite_f_in_the_backward_raises_naming_the_step(tol):
    # Backward evaluations: f(y[5]), f(z[4]), f(y[4]) <- poisoned, so z[3] (checked at step 4) is NaN.
    f = _PoisonAt(backward_at=2)
    xg = x.clone().requires_grad_()
    z, info = rfp(f, xg, params=list(cell.parameters()), max_steps=5, tol=tol)
    f.phase = "backward"
    pattern = r"reversible_fixed_point: non-finite values in the backward pass at step 4 \(the backward visits steps 5"
    if tol is not None:
        with pytest.raises(FloatingPointError, match=pattern):
            z.sum().backward()
    else:
        z.sum().backward()
        assert torch.isnan(xg.grad).any()
        with pytest.raises(FloatingPointError, match=pattern):
            info["drift"]


def test_drift_above_max_drift_raises_in_backward_with_a_tolerance():
    c32 = TanhCell(dtype=torch.float32)
    x32 = randn(3, 6, dtype=torch.float32, requires_grad=True)
    z, info = rfp(c32, x32, beta=0.8, max_steps=12, tol=1e-30, state_dtype=torch.float32, max_drift=1e-4)
    with pytest.raises(DriftError, match=r"reversible_fixed_point: the backward pass reconstructed the start state "
                                         r"with relative drift .* > max_drift=0.0001 \(beta=0.8, 12 steps, float32 "
                                         r"states; the inverse amplifies rounding by 1/\|1-beta\| = 5 per half-step\)"):
        z.sum().backward()


def test_drift_above_max_drift_raises_again_whenever_info_is_read():
    c32 = TanhCell(dtype=torch.float32)
    x32 = randn(3, 6, dtype=torch.float32, requires_grad=True)
    z, info = rfp(c32, x32, beta=0.8, max_steps=12, tol=None, state_dtype=torch.float32, max_drift=1e-4)
    with pytest.raises(DriftError):
        z.sum().backward()
    for _ in range(2):
        with pytest.raises(DriftError, match=r"relative drift .* > max_drift=0.0001"):
            info["drift"]
    assert "DriftError" not in repr(info) and "max_drift" in repr(info)  # printing works and says why


def test_large_drift_warns_on_occurrences_1_2_4_8(monkeypatch):
    # Rate-limited, not once per process: a later catastrophic drift in the same run is still shown.
    monkeypatch.setitem(solver_info._occurrences, "drift", 0)
    c32 = TanhCell(dtype=torch.float32)
    x32 = randn(3, 6, dtype=torch.float32, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(9):
            z, info = rfp(c32, x32, beta=0.8, max_steps=12, tol=None, state_dtype=torch.float32)
            z.sum().backward()
            assert info["drift"] > solver_info.DRIFT_WARN_BOUND
            info["drift"]  # a second read of the same solve does not count again
    drift_warnings = [str(w.message) for w in caught if "relative drift" in str(w.message)]
    assert len(drift_warnings) == 4 and all(w.category is RuntimeWarning for w in caught)
    assert "Pass max_drift= to turn this into an error" in drift_warnings[0]
    assert [("occurrence 2 " in w, "occurrence 4 " in w, "occurrence 8 " in w) for w in drift_warnings[1:]] == [
        (True, False, False), (False, True, False), (False, False, True)]


def test_explicit_max_drift_is_enforced_by_the_backward_without_a_tolerance():
    # tol=None never syncs, but asking for max_drift is asking for one check: backward() itself raises,
    # without anybody reading info (before, a drift of 1e37 went unnoticed).
    c32 = TanhCell(dtype=torch.float32)
    x32 = randn(3, 6, dtype=torch.float32, requires_grad=True)
    z, info = rfp(c32, x32, beta=0.8, max_steps=12, tol=None, state_dtype=torch.float32, max_drift=1e-4)
    with pytest.raises(DriftError, match=r"relative drift .* > max_drift=0.0001"):
        z.sum().backward()


def test_small_drift_is_silent(monkeypatch):
    monkeypatch.setitem(solver_info._occurrences, "drift", 0)
    xg = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, info = rfp(cell, xg, beta=0.5, max_steps=6, tol=1e-30, max_drift=1e-12)
        z.sum().backward()
    assert 0 < info["drift"] < 1e-12


def test_double_backward_is_refused_at_the_create_graph_call():
    xg = x.clone().requires_grad_()
    z, _ = rfp(cell, xg, max_steps=3, tol=None)
    with pytest.raises(RuntimeError, match=r"reversible_fixed_point: create_graph=True \(double backward, e.g. a "
                                           r"gradient penalty .*jacobian_penalty"):
        torch.autograd.grad(z.square().sum(), xg, create_graph=True)


def test_a_second_backward_over_the_same_solve_is_refused():
    xg = x.clone().requires_grad_()
    z, _ = rfp(cell, xg, max_steps=3, tol=None)
    loss = z.square().sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"reversible_fixed_point: backward already ran through this solve; it "
                                           r"reconstructs the states in place"):
        loss.backward()
