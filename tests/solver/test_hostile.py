"""Hostile but realistic use: each case here once gave a silently wrong answer or an unhelpful error.

Numbered as in the reliability issue: (1) hidden tensors in a Module f, (2) gradient penalties through
create_graph=True, (3) f that mutates its input, (4) aliasing through separate storages, (5) overflow
near the top of the range, (6) drift and f-change checks, (7) bfloat16 rounding, (8) a non-differentiable
start. Then the errors that used to come from deep inside torch. Gradients are checked against autograd
through the unrolled iteration in float64.
"""

import math
import warnings

import numpy as np
import pytest
import torch

import revdeq_kernels as rk
from helpers import backends as targets
from helpers.solver_cases import (
    TanhCell,
    assert_grads_close,
    randn,
    single_threaded,  # noqa: F401 (an autouse fixture)
    unrolled,
)
from revdeq_kernels import DriftError
from revdeq_kernels.ops.arithmetic import affine_coefficients
from revdeq_kernels.solver import info as solver_info
from revdeq_kernels.solver import step_rows

rfp = rk.reversible_fixed_point
CPU_TARGETS = targets.params(("reference", "cpp", "triton"))


# (1) Hidden tensors in a Module f --------------------------------------------------------------------


class ContextCell(torch.nn.Module):
    """f(z, x) = tanh(W z + x + ctx) with ctx a tensor attribute set from outside, as an encoder's output
    stored on the cell."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6, dtype=torch.float64)
        self.ctx = None

    def forward(self, z, x):
        return torch.tanh(0.5 * self.lin(z) + x + self.ctx)


def test_a_module_using_an_encoder_output_it_does_not_own_is_refused_not_silently_ungraded():
    encoder = torch.nn.Linear(6, 6, dtype=torch.float64)
    cell = ContextCell()
    cell.ctx = encoder(randn(3, 6, seed=1))
    with pytest.raises(ValueError, match=r"RevDEQ: f \(an nn.Module\) uses 2 tensor\(s\) that require grad but are "
                                         r"neither its parameters nor in x .*Register them on f as nn.Parameter"):
        rk.RevDEQ(cell)(randn(3, 6, seed=2)).sum().backward()
    assert encoder.weight.grad is None


def test_a_module_with_an_unregistered_tensor_attribute_that_requires_grad_is_refused():
    cell = ContextCell()
    cell.ctx = randn(6, seed=3, requires_grad=True)  # a plain attribute, not an nn.Parameter
    with pytest.raises(ValueError, match=r"f \(an nn.Module\) uses 1 tensor\(s\) .*shapes \(6,\)"):
        rfp(cell, randn(3, 6, seed=2), tol=None, max_steps=3)


def test_the_same_context_passed_in_x_gets_the_unrolled_gradient():
    # The supported form of the case above: the encoder's output is part of x.
    encoder = torch.nn.Linear(6, 6, dtype=torch.float64)
    lin = torch.nn.Linear(6, 6, dtype=torch.float64)
    inp, x = randn(3, 6, seed=1), randn(3, 6, seed=2)

    def f(z, xs):
        x, ctx = xs
        return torch.tanh(0.5 * lin(z) + x + ctx)

    params = [*lin.parameters(), *encoder.parameters()]
    z, _ = rfp(f, (x, encoder(inp)), beta=0.5, max_steps=8, tol=None, params=list(lin.parameters()))
    got = torch.autograd.grad(z.square().sum(), params)
    want = torch.autograd.grad(unrolled(f, (x, encoder(inp)), torch.zeros(3, 6, dtype=torch.float64), 0.5,
                                        8).square().sum(), params)
    assert_grads_close(got, want, 1e-9, ["lin.weight", "lin.bias", "encoder.weight", "encoder.bias"])


# (2) Gradient penalties -------------------------------------------------------------------------------


def test_a_gradient_penalty_through_revdeq_raises_at_the_create_graph_call():
    deq = rk.RevDEQ(TanhCell(), max_steps=4, tol=None)
    x = randn(3, 6, seed=1, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"RevDEQ: create_graph=True .*not supported through the reversible "
                                           r"solve.*jacobian_penalty"):
        torch.autograd.grad(deq(x).sum(), x, create_graph=True)


# (3) f that mutates its input -------------------------------------------------------------------------

MUTATING = [
    ("relu_", lambda lin, z, x: 0.3 * lin(torch.relu_(z)) + x, r"its input z"),
    ("ReLU(inplace=True)", lambda lin, z, x: 0.3 * lin(torch.nn.ReLU(inplace=True)(z)) + x, r"its input z"),
    ("z +=", lambda lin, z, x: (z.__iadd__(x), 0.3 * lin(z))[1], r"its input z"),
    ("x.mul_", lambda lin, z, x: 0.3 * lin(z) + x.mul_(1.0), r"its input x"),
]


@pytest.mark.parametrize("compute", [torch.float64, torch.float32], ids=["float64-f", "float32-f"])
@pytest.mark.parametrize("name, body, what", MUTATING, ids=[m[0] for m in MUTATING])
def test_f_that_modifies_its_input_in_place_is_refused_naming_the_step(name, body, what, compute):
    # With float64 compute f received the state buffer itself: relu_ corrupted the iteration silently
    # (40 steps to a residual of 0.66). With float32 compute it gets a cast copy, refused alike.
    lin = torch.nn.Linear(6, 6, dtype=compute)
    x = randn(3, 6, seed=1, dtype=compute)
    with pytest.raises(RuntimeError, match=rf"reversible_fixed_point: f \(forward pass, evaluating f\(z0\)\) modified "
                                           rf"{what} in place .*make that operation out of place, or clone"):
        with torch.no_grad():
            rfp(lambda z, x: body(lin, z, x), x.clone(), tol=1e-8, max_steps=40)


def test_f_that_mutates_only_in_the_backward_gets_a_clear_error_not_autograds_leaf_message():
    lin = torch.nn.Linear(6, 6, dtype=torch.float64)

    def f(z, x):
        if torch.is_grad_enabled() and z.requires_grad:  # only the backward's evaluations
            z.relu_()
        return torch.tanh(0.3 * lin(z) + x)

    z, _ = rfp(f, randn(3, 6, seed=1), tol=None, max_steps=3, params=list(lin.parameters()))
    with pytest.raises(RuntimeError, match=r"f \(backward pass, step 3\) modified its input z in place"):
        z.sum().backward()


def test_out_of_place_f_is_unaffected():
    lin = torch.nn.Linear(6, 6, dtype=torch.float64)
    z, info = rfp(lambda z, x: 0.3 * lin(torch.relu(z)) + x, randn(3, 6, seed=1), tol=1e-8, max_steps=60,
                  params=list(lin.parameters()))
    assert info["residual"] <= 1e-8


# (4) Aliasing through separate storages ---------------------------------------------------------------


@pytest.mark.parametrize("target", CPU_TARGETS)
@pytest.mark.parametrize("op", ["relax_", "unrelax_"])
def test_overlapping_numpy_slices_are_refused_by_every_op_and_backend(target, op):
    # Two torch tensors over the same memory through separate storages: the old storage-pointer check
    # let them through and relax_ gave 2498 of 5000 wrong values.
    a = np.random.default_rng(0).random(5002).astype(np.float32)
    state, f = torch.from_numpy(a[2:]), torch.from_numpy(a[:-2])
    assert state.untyped_storage().data_ptr() != f.untyped_storage().data_ptr()
    before = a.copy()
    fn = getattr(rk, op)
    with pytest.raises(ValueError, match=rf"{op}: f_val shares memory with state"):
        fn(state, f, 0.5, backend=target.backend)
    with pytest.raises(ValueError, match=rf"{op}: f_val\[0\] shares memory with state\[0\]"):
        fn([state], [f], 0.5, backend=target.backend)
    assert np.array_equal(a, before), "nothing may be written before the error"
    disjoint = torch.from_numpy(a[2502:].copy())
    fn(torch.from_numpy(a[:2500]), disjoint, 0.5, backend=target.backend)  # adjacent, not overlapping: fine


# (5) Overflow near the top of the range ---------------------------------------------------------------

TOP = {torch.float32: 0.9 * torch.finfo(torch.float32).max, torch.float64: 0.9 * torch.finfo(torch.float64).max,
       torch.bfloat16: 0.9 * torch.finfo(torch.bfloat16).max}


@pytest.mark.parametrize("target", CPU_TARGETS)
@pytest.mark.parametrize("dtype", list(TOP), ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("beta", [0.5, 0.8, 1.3, 1.7])
def test_a_finite_exact_result_stays_finite_at_the_top_of_the_range(target, dtype, beta):
    # state = f = v gives exactly v for relax_ and unrelax_ at any beta; unrelax_(3e38, 3e38, 0.5) gave inf.
    values = torch.tensor([TOP[dtype], -TOP[dtype], TOP[dtype] / 3], dtype=torch.float64).to(dtype)
    for op in (rk.relax_, rk.unrelax_):
        for multi in (False, True):
            state = values.clone().to(target.device)
            f = values.clone().to(target.device)
            op([state] if multi else state, [f] if multi else f, beta, backend=target.backend)
            got = state.double().cpu()
            assert torch.isfinite(got).all(), f"{op.__name__} beta={beta} multi={multi}: {got}"
            rel = ((got - values.double()).abs() / values.double().abs()).max().item()
            assert rel <= 8 * torch.finfo(dtype).eps, f"{op.__name__} beta={beta} multi={multi}: {rel:.3e}"


# (6) Drift and f-change checks ------------------------------------------------------------------------


def test_f_that_reads_global_state_changed_before_backward_warns_by_name(monkeypatch):
    # The gradient is that of a different f; the drift (2.5e-2 in the case) stayed below its bound.
    monkeypatch.setitem(solver_info._occurrences, "f_changed", 0)
    lin = torch.nn.Linear(6, 6, dtype=torch.float64)
    scale = {"s": 1.0}

    def f(z, x):
        return torch.tanh(scale["s"] * 0.5 * lin(z) + x)

    x = randn(3, 6, seed=1, requires_grad=True)
    for change, warns in [(0.0, False), (1e-6, True)]:
        scale["s"] = 1.0
        z, info = rfp(f, x, beta=0.5, max_steps=6, tol=None, params=list(lin.parameters()))
        scale["s"] = 1.0 + change
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            z.sum().backward()
            info["drift"]
        found = [str(w.message) for w in caught if "f returned a different value in the backward" in str(w.message)]
        assert bool(found) == warns, (change, found)
        assert (info["f_mismatch"] > 1e-9) == warns
        assert info["drift"] < solver_info.DRIFT_WARN_BOUND


def test_drift_and_f_mismatch_are_available_on_the_device_without_a_sync():
    x = randn(3, 6, seed=1, requires_grad=True)
    z, info = rfp(TanhCell(), x, beta=0.5, max_steps=6, tol=None)
    assert info.drift_tensor() is None and info.f_mismatch_tensor() is None
    z.sum().backward()
    drift, mismatch = info.drift_tensor(), info.f_mismatch_tensor()
    assert drift.shape == () and drift.dtype == torch.float64 and drift.device == x.device
    assert drift.item() == info["drift"] and mismatch.item() == info["f_mismatch"]
    assert info["f_mismatch"] < 1e-12  # a deterministic, unchanged f


# (7) bfloat16 rounding --------------------------------------------------------------------------------


@pytest.mark.parametrize("target", CPU_TARGETS)
@pytest.mark.parametrize("op", ["relax_", "unrelax_"])
def test_bfloat16_states_round_to_nearest_even_on_every_backend(target, op):
    # Triton's interpreter truncated (1962 of 4096 elements 1 ulp off) and widened subnormals to 0.
    g = torch.Generator().manual_seed(7)
    state = torch.randn(4096, generator=g).to(torch.bfloat16)
    f = torch.randn(4096, generator=g).to(torch.bfloat16)
    state[:4] = torch.tensor([1e-40, -3e-39, float("nan"), float("inf")], dtype=torch.bfloat16)
    # The kernels' float32 arithmetic (ops/arithmetic.py), rounded once by torch's own round-to-nearest-even.
    a, b, c = affine_coefficients(0.8, inverse=op == "unrelax_")
    want = (c * (a * state.float() + b * f.float())).to(torch.bfloat16)
    got = state.clone().to(target.device)
    getattr(rk, op)(got, f.to(target.device), 0.8, backend=target.backend)
    got = got.cpu()
    same = (got == want) | (got.isnan() & want.isnan())
    assert int((~same).sum()) == 0, f"{int((~same).sum())} of 4096 differ from round-to-nearest-even"


# (8) A non-differentiable start -----------------------------------------------------------------------


class GroupNormBlock(torch.nn.Module):
    """An MDEQ-style residual block: conv, GroupNorm, ReLU twice, zero conv biases (as at initialisation)."""

    def __init__(self, channels, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, dtype=torch.float64)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, dtype=torch.float64)
        self.gn1 = torch.nn.GroupNorm(2, channels, dtype=torch.float64)
        self.gn2 = torch.nn.GroupNorm(2, channels, dtype=torch.float64)
        for conv in (self.conv1, self.conv2):
            torch.nn.init.zeros_(conv.bias)

    def forward(self, z, injection):
        return torch.relu(self.gn2(self.conv2(torch.relu(self.gn1(self.conv1(z)))) + injection))


class TwoScale(torch.nn.Module):
    def __init__(self, channels=4):
        super().__init__()
        self.fine, self.coarse = GroupNormBlock(channels, 1), GroupNormBlock(channels, 2)
        self.down = torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False, dtype=torch.float64)
        self.up = torch.nn.Conv2d(channels, channels, 1, bias=False, dtype=torch.float64)

    def forward(self, z, x):
        up = torch.nn.functional.interpolate(self.up(z[1]), scale_factor=2)
        return self.fine(z[0], x[0] + up), self.coarse(z[1], x[1] + self.down(z[0]))


def test_a_multiscale_groupnorm_relu_model_from_zeros_gets_the_unrolled_gradient():
    # z0 = 0 and zero biases put every ReLU of the first evaluation on its kink; differentiating f at the
    # reconstructed start (1e-9 away) flipped those derivatives: float64 gradients 20x off at drift 1e-8.
    f = TwoScale()
    x = (randn(2, 4, 8, 8, seed=3) * 0.5, randn(2, 4, 4, 4, seed=4) * 0.5)
    z0 = (torch.zeros(2, 4, 8, 8, dtype=torch.float64), torch.zeros(2, 4, 4, 4, dtype=torch.float64))
    params = list(f.parameters())
    z, info = rfp(f, x, z0=z0, beta=0.5, max_steps=8, tol=None, params=params)
    got = torch.autograd.grad(z[0].square().sum() + z[1].sum(), params)
    y = zz = z0
    for _ in range(8):
        y = tuple(0.5 * a + 0.5 * b for a, b in zip(y, f(zz, x)))
        zz = tuple(0.5 * a + 0.5 * b for a, b in zip(zz, f(y, x)))
    want = torch.autograd.grad(zz[0].square().sum() + zz[1].sum(), params)
    assert_grads_close(got, want, 1e-6, [n for n, _ in f.named_parameters()])
    assert info["drift"] < 1e-8


# Errors that used to come from inside torch -----------------------------------------------------------


def test_meta_tensors_run_for_shape_inference():
    m = torch.empty(4, 8, device="meta")
    rk.relax_(m, torch.empty(4, 8, device="meta"), 0.5)
    assert rk.residual(m, torch.empty(4, 8, device="meta")).shape == (2,)
    cell = TanhCell(dim=8).to("meta")
    z = rk.RevDEQ(cell)(torch.empty(4, 8, device="meta", dtype=torch.float64))
    assert z.shape == (4, 8) and z.device.type == "meta"

    def two(z, x):
        return torch.tanh(z[0] + x), torch.tanh(z[1])

    with torch.autocast("cpu"):
        (a, b), info = rfp(two, torch.empty(2, 4, device="meta"), z0=(torch.empty(2, 4, device="meta"),
                                                                       torch.empty(3, device="meta")))
    assert a.shape == (2, 4) and b.shape == (3,) and info["residual"] is None and info["steps"] == 1


SPARSE = [
    ("coo", lambda: torch.randn(4, 4).to_sparse(), r"got layout torch.sparse_coo; convert it with state.to_dense\(\)"),
    ("csr", lambda: torch.randn(4, 4).to_sparse_csr(), r"got layout torch.sparse_csr"),
    ("nested", lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]), r"got a nested tensor"),
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's beta/prototype notices for sparse CSR and nested
@pytest.mark.parametrize("name, make, says", SPARSE, ids=[s[0] for s in SPARSE])
def test_sparse_and_nested_tensors_get_a_clear_error(name, make, says):
    with pytest.raises(TypeError, match=rf"relax_: state must be a dense \(strided\) tensor, {says}"):
        rk.relax_(make(), torch.randn(4, 4), 0.5)
    with pytest.raises(TypeError, match=r"multi_relax_: states\[0\] must be a dense|relax_: state\[0\] must be a "
                                        r"dense"):
        rk.relax_([make()], [torch.randn(4, 4)], 0.5)
    with pytest.raises(TypeError, match=r"reversible_fixed_point: z0 must be a dense \(strided\) tensor"):
        rfp(lambda z, x: torch.tanh(z + x), torch.randn(4, 4), z0=make(), tol=None, max_steps=2)


def test_an_absurd_max_steps_is_refused_by_name():
    with pytest.raises(ValueError, match=r"reversible_fixed_point: max_steps must be at most 2\*\*31 - 1 = "
                                         r"2147483647, got 1180591620717411303424"):
        rfp(TanhCell(), randn(3, 6), max_steps=2 ** 70)


@pytest.mark.parametrize("exact", [False, True], ids=["float", "exact"])
def test_a_huge_max_steps_with_a_tolerance_allocates_for_the_steps_taken(exact):
    # max_steps=10**9 with a tol used to allocate a 16 GB residual history (and 4 GB of exact status) up front.
    z, info = rfp(TanhCell(), randn(3, 6, seed=1), max_steps=10 ** 9, tol=1e-6, exact=exact, beta=0.5)
    assert 1 <= info["steps"] < 100 and info["residual"] <= 1e-6
    assert len(info._history) <= 2 * step_rows.FIRST_ROWS
    if exact:
        assert len(info._status) <= 2 * step_rows.FIRST_ROWS


def test_history_rows_grow_past_their_first_allocation_and_keep_every_step():
    # A slowly converging solve runs past FIRST_ROWS steps: the trace must be complete and consistent.
    steps = step_rows.FIRST_ROWS + 40
    z, info = rfp(TanhCell(), randn(3, 6, seed=1), max_steps=steps, tol=0.0, beta=0.05)
    trace = info["residual_trace"]
    assert info["steps"] == steps and len(trace) == steps + 1 and all(math.isfinite(r) for r in trace)
    assert trace[-1] == info["residual"] and trace[-1] < trace[0]


def test_max_drift_without_a_tolerance_raises_inside_backward():
    c32 = TanhCell(dtype=torch.float32)
    x32 = randn(3, 6, dtype=torch.float32, requires_grad=True)
    z, _ = rfp(c32, x32, beta=0.8, max_steps=12, tol=None, state_dtype=torch.float32, max_drift=1e-4)
    with pytest.raises(DriftError):
        z.sum().backward()


def test_jacobian_penalty_on_meta_says_to_pass_no_generator():
    z = torch.empty(3, 6, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match=r"jacobian_penalty: generator is on cpu but z is on the meta device, for "
                                         r"which torch makes no generator; pass generator=None"):
        rk.jacobian_penalty(lambda z, x: torch.tanh(z + x), z, torch.empty(3, 6, device="meta"),
                            generator=torch.Generator())


def test_stop_mode_is_checked_by_name():
    with pytest.raises(ValueError, match=r"reversible_fixed_point: stop_mode must be 'rel' or 'abs', got 'max'"):
        rfp(TanhCell(), randn(3, 6), stop_mode="max")
    z, info = rfp(TanhCell(), 10.0 * randn(3, 6, seed=1), stop_mode="abs", tol=1e-6, max_steps=200, beta=0.5)
    fz = TanhCell()(z, 10.0 * randn(3, 6, seed=1))
    assert (z - fz).norm().item() <= 1e-6 * 1.01
