"""Tuple states: z0 and f's output as tuples of tensors (multiscale DEQs), through the whole solver.

What is checked: the same exact-gradient tests as single tensors (float64, against autograd through
the unrolled loop, for x, every z0 member and the parameters), with a multiscale-like f whose two
members have different shapes and feed each other; both ways of asking for gradients; O(1) saved
memory; dropout replay; drift over all members; RevDEQ; exact mode; one fused op call per update (all
members at once); and clear errors that name the member.
"""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import revdeq_kernels as rk
from helpers.solver_cases import (
    TanhCell,
    assert_grads_close,
    count_host_reads,
    randn,
    rel_err,
    saved_for_backward,
    single_threaded,  # noqa: F401 (an autouse fixture)
)
from revdeq_kernels import DriftError
from revdeq_kernels.backends import compiled as extension
from revdeq_kernels.backends import triton_backend
from revdeq_kernels.exact import ExactModeError
from revdeq_kernels.solver import info as solver_info

rfp = rk.reversible_fixed_point
CPU_BACKENDS = rk.available_backends()["cpu"]
B, FINE, COARSE = 3, (6, 4), (3, 5)  # batch; (positions, channels) of the fine and the coarse member


class TwoScaleCell(torch.nn.Module):
    """A multiscale f on a fine state (B, 6, 4) and a coarse one (B, 3, 5), each driven by the other.

    fine'   = tanh(fine Wf + upsample(coarse) Mcf + x U + bf)
    coarse' = tanh(coarse Wc + pool(fine) Mfc + bc)         (+ optional dropout on both)

    The weights are small, so f is a contraction and the unrolled loop is well conditioned.
    """

    def __init__(self, dtypes=(torch.float64, torch.float64), dropout=0.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        fc, cc = FINE[1], COARSE[1]
        fine_dtype, coarse_dtype = dtypes

        def weight(rows, cols, dtype, scale=0.2):
            w = scale * torch.randn(rows, cols, generator=g, dtype=torch.float64) / rows ** 0.5
            return torch.nn.Parameter(w.to(dtype))

        self.Wf, self.U, self.Mcf = weight(fc, fc, fine_dtype), weight(fc, fc, fine_dtype, 1.0), weight(cc, fc,
                                                                                                      fine_dtype)
        self.bf = torch.nn.Parameter((0.1 * torch.randn(fc, generator=g, dtype=torch.float64)).to(fine_dtype))
        self.Wc, self.Mfc = weight(cc, cc, coarse_dtype), weight(fc, cc, coarse_dtype)
        self.bc = torch.nn.Parameter((0.1 * torch.randn(cc, generator=g, dtype=torch.float64)).to(coarse_dtype))
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        self.dtypes = dtypes

    def forward(self, z, x):
        fine, coarse = z
        up = coarse.repeat_interleave(FINE[0] // COARSE[0], dim=1).to(self.dtypes[0])
        pool = fine.view(fine.shape[0], COARSE[0], -1, FINE[1]).mean(2).to(self.dtypes[1])
        new_fine = torch.tanh(fine @ self.Wf + up @ self.Mcf + x.to(self.dtypes[0]) @ self.U + self.bf)
        new_coarse = torch.tanh(coarse @ self.Wc + pool @ self.Mfc + self.bc)
        return self.dropout(new_fine), self.dropout(new_coarse)


def unrolled_tuple(f, x, z0, beta, steps, state_dtype=torch.float64):
    """z[steps] of the iteration on tuple states with autograd through every step (the oracle): states in
    ``state_dtype``, f seeing each member cast to its z0 member's dtype, as the solver does."""
    compute = [t.dtype for t in z0]

    def show(state):
        return type(z0)(t.to(c) for t, c in zip(state, compute))

    def relax(state, f_val):
        return tuple((1 - beta) * s + beta * v.to(state_dtype) for s, v in zip(state, f_val))

    y = z = tuple(t.to(state_dtype) for t in z0)
    for _ in range(steps):
        y = relax(y, f(show(z), x))
        z = relax(z, f(show(y), x))
    return show(z)


def case(dtypes=(torch.float64, torch.float64), requires_grad=(True, True), **cell_kwargs):
    """(cell, x, z0, loss weights) for a two-member solve."""
    cell = TwoScaleCell(dtypes, **cell_kwargs)
    x = randn(B, *FINE, seed=1, requires_grad=True)
    z0 = (randn(B, *FINE, dtype=dtypes[0], seed=2, requires_grad=requires_grad[0]),
          randn(B, *COARSE, dtype=dtypes[1], seed=3, requires_grad=requires_grad[1]))
    weights = (randn(B, *FINE, dtype=dtypes[0], seed=4), randn(B, *COARSE, dtype=dtypes[1], seed=5))
    return cell, x, z0, weights


def loss_of(z, weights):
    return sum((m * w).sum() for m, w in zip(z, weights))


NAMES = ["x", "z0[0]", "z0[1]", "Wf", "U", "Mcf", "bf", "Wc", "Mfc", "bc"]


# ---------------------------------------------------------------------------------------------
# Exact gradients, exactly as for single tensors.

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("beta", [0.5, 0.8, 1.3])
def test_gradient_equals_unrolled_autograd_in_float64(beta, steps, backend):
    cell, x, z0, weights = case()
    inputs = [x, *z0, *cell.parameters()]
    want_z = unrolled_tuple(cell, x, z0, beta, steps)
    want = torch.autograd.grad(loss_of(want_z, weights), inputs)

    z, info = rfp(cell, x, z0=z0, beta=beta, max_steps=steps, tol=None, backend=backend)
    assert type(z) is tuple and len(z) == 2
    for got_member, want_member in zip(z, want_z):
        assert got_member.shape == want_member.shape and rel_err(got_member, want_member) < 1e-13
    got = torch.autograd.grad(loss_of(z, weights), inputs)
    assert_grads_close(got, want, 1e-10, NAMES)
    assert info["steps"] == steps and info["drift"] < 1e-9


def test_loss_backward_and_autograd_grad_give_the_same_gradients():
    cell, x, z0, weights = case()
    inputs = [x, *z0, *cell.parameters()]
    z, _ = rfp(cell, x, z0=z0, beta=0.8, max_steps=5, tol=None)
    via_grad = torch.autograd.grad(loss_of(z, weights), inputs)
    z, _ = rfp(cell, x, z0=z0, beta=0.8, max_steps=5, tol=None)
    loss_of(z, weights).backward()
    for name, g, t in zip(NAMES, via_grad, inputs):
        assert torch.equal(t.grad, g), f"{name}: .backward() and autograd.grad differ"


def test_a_loss_on_one_member_and_z0_members_without_grad():
    # Only z[1] is used (z[0] gets a zero gradient) and only z0[1] requires grad: the gradient still
    # reaches z[0]'s history through the coupling, and z0[0] gets none.
    cell, x, z0, weights = case(requires_grad=(False, True))
    inputs = [x, z0[1], *cell.parameters()]
    want = torch.autograd.grad((unrolled_tuple(cell, x, z0, 0.8, 4)[1] * weights[1]).sum(), inputs)
    z, _ = rfp(cell, x, z0=z0, beta=0.8, max_steps=4, tol=None)
    (z[1] * weights[1]).sum().backward()
    assert_grads_close([t.grad for t in inputs], want, 1e-10, ["x", "z0[1]", *NAMES[3:]])
    assert z0[0].grad is None


def test_mixed_member_dtypes_list_container_and_a_tolerance():
    # A float32 fine member and a float64 coarse one in float64 states; z0 a list, so f receives lists
    # and the result is a list. The tolerance stops early and the gradient is that of the steps taken.
    dtypes = (torch.float32, torch.float64)
    cell, x, z0, weights = case(dtypes=dtypes)
    seen = []

    def f(z, x):
        seen.append((type(z), z[0].dtype, z[1].dtype))
        return list(cell(z, x))

    z0 = list(z0)
    z, info = rfp(f, x, z0=z0, beta=0.5, max_steps=50, tol=1e-5, params=list(cell.parameters()))
    steps = info["steps"]
    assert type(z) is list and [m.dtype for m in z] == list(dtypes) and 1 < steps < 50
    assert set(seen) == {(list, *dtypes)}
    inputs = [x, *z0, *cell.parameters()]
    want = torch.autograd.grad(loss_of(unrolled_tuple(cell, x, z0, 0.5, steps), weights), inputs)
    got = torch.autograd.grad(loss_of(z, weights), inputs)
    # Gradients of float32 members carry float32 rounding of f's evaluations (the oracle rounds alike
    # but sums in another order).
    assert_grads_close(got, want, 1e-5, NAMES)
    # The reported residual is over both members together, at the returned z.
    with torch.no_grad():
        fz = cell(z, x)
        d2 = sum((m.double() - v.double()).square().sum() for m, v in zip(z, fz))
        f2 = sum(v.double().square().sum() for v in fz)
    assert abs((d2 / f2).sqrt().item() - info["residual"]) < 1e-6 and info["residual"] <= 1e-5


def test_a_one_member_tuple_gives_the_single_tensor_result():
    cell = TanhCell()
    x = randn(3, 6, seed=1, requires_grad=True)
    z0 = randn(3, 6, seed=2, requires_grad=True)
    inputs = [x, z0, *cell.parameters()]
    z, _ = rfp(cell, x, z0=z0, beta=0.8, max_steps=6, tol=None)
    want = torch.autograd.grad(z.sin().sum(), inputs)
    (z_tuple,), _ = rfp(lambda z, x: (cell(z[0], x),), x, z0=(z0,), beta=0.8, max_steps=6, tol=None,
                        params=list(cell.parameters()))
    assert rel_err(z_tuple, z) < 1e-15
    got = torch.autograd.grad(z_tuple.sin().sum(), inputs)
    assert_grads_close(got, want, 1e-14, ["x", "z0", "W", "U", "b"])


def test_inference_without_grad_returns_the_same_z_and_outputs_are_separate_tensors():
    cell, x, z0, _ = case()
    z, _ = rfp(cell, x, z0=z0, max_steps=4, tol=None)
    with torch.no_grad():
        z_nograd, info = rfp(cell, x, z0=z0, max_steps=4, tol=None)
    assert all(m.requires_grad for m in z) and not any(m.requires_grad for m in z_nograd)
    assert all(torch.equal(a.detach(), b) for a, b in zip(z, z_nograd)) and info["drift"] is None
    # Each member owns its memory: the caller may modify one without touching the other.
    assert z[0].untyped_storage().data_ptr() != z[1].untyped_storage().data_ptr()


def test_a_closure_hiding_a_tensor_in_one_member_is_refused():
    cell, x, z0, _ = case()
    hidden = torch.zeros(COARSE[1], dtype=torch.float64, requires_grad=True)

    def f(z, x):
        fine, coarse = cell(z, x)
        return fine, coarse + hidden

    with pytest.raises(ValueError, match=r"f depends on 1 tensor\(s\) that require grad but were passed neither"):
        rfp(f, x, z0=z0, params=list(cell.parameters()))


# ---------------------------------------------------------------------------------------------
# Memory, randomness, drift, host reads.

def test_saved_bytes_do_not_depend_on_max_steps():
    cell, x, z0, weights = case()
    saved = {}
    for steps in (8, 64):
        z, saved[steps], _ = saved_for_backward(lambda s=steps: rfp(cell, x, z0=z0, beta=0.5, max_steps=s,
                                                                    tol=None)[0])
        loss_of(z, weights).backward()  # what was saved is enough to run the backward
    state = (B * FINE[0] * FINE[1] + B * COARSE[0] * COARSE[1]) * 8
    params = sum(p.numel() * p.element_size() for p in cell.parameters())
    # The two float64 states (one buffer each), z0's members, x and the parameters; nothing per step.
    assert saved[8] == saved[64] == 2 * state + state + x.numel() * 8 + params, saved


def test_dropout_masks_are_replayed_in_the_backward():
    cell, x, z0, weights = case(dropout=0.3)
    inputs = [x, *z0, *cell.parameters()]
    torch.manual_seed(123)  # the solver evaluates f in the unrolled loop's order: the same masks
    want = torch.autograd.grad(loss_of(unrolled_tuple(cell, x, z0, 0.5, 5), weights), inputs)
    torch.manual_seed(123)
    z, info = rfp(cell, x, z0=z0, beta=0.5, max_steps=5, tol=None)
    assert z[0].grad_fn.tape.stochastic
    got = torch.autograd.grad(loss_of(z, weights), inputs)
    assert_grads_close(got, want, 1e-10, NAMES)
    assert info["drift"] < 1e-12  # without replay the reconstruction would drift by O(1)


class _NoisyCoarse(torch.nn.Module):
    """The cell, but every call adds a different offset to the coarse output only, and the fine output
    ignores the coarse state: only the coarse member can be reconstructed wrongly."""

    def __init__(self):
        super().__init__()
        self.cell, self.calls = TwoScaleCell(), 0

    def forward(self, z, x):
        self.calls += 1
        fine = torch.tanh(z[0] @ self.cell.Wf + x @ self.cell.U)
        return fine, self.cell(z, x)[1] + 1e-3 * self.calls


def test_drift_covers_every_member_and_max_drift_raises(monkeypatch):
    monkeypatch.setitem(solver_info._occurrences, "f_changed", 0)
    _, x, z0, weights = case()
    z, info = rfp(_NoisyCoarse(), x, z0=z0, beta=0.5, max_steps=3, tol=None, max_drift=1e-6)
    with pytest.raises(DriftError, match=r"relative drift .* > max_drift=1e-06"), \
            pytest.warns(RuntimeWarning, match="f returned a different value in the backward"):
        loss_of(z, weights).backward()
    # A deterministic f on the same problem reconstructs both members.
    z, info = rfp(TwoScaleCell(), x, z0=z0, beta=0.5, max_steps=3, tol=None, max_drift=1e-12)
    loss_of(z, weights).backward()
    assert info["drift"] < 1e-12


def test_no_host_reads_without_a_tolerance(monkeypatch):
    cell, x, z0, weights = case()
    with count_host_reads(monkeypatch) as reads:
        z, info = rfp(cell, x, z0=z0, beta=0.5, max_steps=4, tol=None)
        loss_of(z, weights).backward()
    assert reads == {}, reads
    assert info["drift"] < 1e-12


# ---------------------------------------------------------------------------------------------
# RevDEQ and exact mode.

def test_revdeq_module_with_a_tuple_state():
    cell, x, z0, weights = case()
    deq = rk.RevDEQ(cell, beta=0.8, max_steps=5, tol=None)
    inputs = [x, *z0, *deq.parameters()]
    want = torch.autograd.grad(loss_of(unrolled_tuple(cell, x, z0, 0.8, 5), weights), inputs)
    z = deq(x, z0=z0)
    assert type(z) is tuple and deq.info["steps"] == 5
    got = torch.autograd.grad(loss_of(z, weights), inputs)
    assert_grads_close(got, want, 1e-10, NAMES)
    assert deq.info["drift"] < 1e-10


@pytest.mark.parametrize("option", ["jac_reg", "spectral_radius"])
def test_revdeq_jacobian_diagnostics_refuse_a_tuple_state(option):
    deq = rk.RevDEQ(TwoScaleCell(), **{option: True})
    with pytest.raises(TypeError, match=r"RevDEQ: jac_reg and spectral_radius measure df/dz of a single-tensor "
                                        r"state, but z0 is a tuple of 2 tensors"):
        deq(randn(B, *FINE), z0=_z0)


class _Flat(torch.nn.Module):
    """The two-member cell on one flat state: the members concatenated (the reference for exact mode)."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, z, x):
        n = FINE[0] * FINE[1]
        fine, coarse = self.cell((z[:, :n].view(B, *FINE), z[:, n:].view(B, *COARSE)), x)
        return torch.cat([fine.reshape(B, -1), coarse.reshape(B, -1)], dim=1)


@pytest.mark.parametrize("beta", [0.5, 0.8125])
def test_exact_mode_with_a_tuple_state_equals_the_flat_single_tensor_solve(beta):
    """Exact mode keeps a tuple state as one flat int64 buffer: the same bits as the same problem
    written on one concatenated tensor, drift exactly 0, and the same gradients."""
    dtypes = (torch.float32, torch.float32)
    cell, x, z0, weights = case(dtypes=dtypes)
    x = x.detach().float().requires_grad_()
    z, info = rfp(cell, x, z0=z0, beta=beta, max_steps=12, tol=None, exact=True)
    inputs = [x, *z0, *cell.parameters()]
    got = torch.autograd.grad(loss_of(z, weights), inputs)
    assert info["drift"] == 0.0 and info["remainder_bytes"] > 0

    flat0 = torch.cat([m.detach().reshape(B, -1) for m in z0], dim=1).requires_grad_()
    flat, _ = rfp(_Flat(cell), x, z0=flat0, beta=beta, max_steps=12, tol=None, exact=True)
    assert torch.equal(torch.cat([m.reshape(B, -1) for m in z], dim=1), flat), "the states differ"
    flat_weights = torch.cat([w.reshape(B, -1) for w in weights], dim=1)
    want_x, want_z0, *want_params = torch.autograd.grad((flat * flat_weights).sum(), [x, flat0, *cell.parameters()])
    n = FINE[0] * FINE[1]
    want = [want_x, want_z0[:, :n].reshape(B, *FINE), want_z0[:, n:].reshape(B, *COARSE), *want_params]
    assert_grads_close(got, want, 1e-6, NAMES)  # float32 gradients, summed in another order


def test_exact_mode_gradient_equals_unrolled_float64_autograd():
    cell, x, z0, weights = case()
    inputs = [x, *z0, *cell.parameters()]
    steps = 7
    want = torch.autograd.grad(loss_of(unrolled_tuple(cell, x, z0, 0.8125, steps), weights), inputs)
    z, info = rfp(cell, x, z0=z0, beta=0.8125, max_steps=steps, tol=None, exact=True)
    got = torch.autograd.grad(loss_of(z, weights), inputs)
    # Quantization to 2^-32 per half-step; the bound of test_solver_exact.gradient_rtol.
    assert_grads_close(got, want, 8 * (2 * steps + 1) * 2.0 ** -31, NAMES)
    assert info["drift"] == 0.0


def test_exact_mode_flags_a_member_out_of_range_at_its_step():
    def f(z, x):
        fine, coarse = _cell(z, x)
        return fine, coarse * 1e7 if z[0].abs().sum() > 0 else coarse  # beyond 2^21 from step 1 on

    with pytest.raises(ExactModeError, match=r"exact mode, forward pass at step 1 of 3: f returned values outside"):
        _solve(f, max_steps=3, tol=1e-12, exact=True)


# ---------------------------------------------------------------------------------------------
# One fused op call per update, for all members together.

class _RevdeqOpLog(TorchDispatchMode):
    """Counts the torch.ops.revdeq.* calls that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "revdeq":
            self.calls[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_REASON = triton_backend.unavailable_reason(TRITON_DEVICE, "multi")
LAUNCH_CASES = [
    pytest.param("cpp", "cpu", "", marks=pytest.mark.skipif(not extension.loaded(), reason="_C is not built")),
    pytest.param("triton", TRITON_DEVICE, "triton_",
                 marks=pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton unavailable: {TRITON_REASON}")),
    pytest.param("cuda", "cuda", "", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize(("backend", "device", "prefix"), LAUNCH_CASES)
def test_every_state_update_is_one_multi_tensor_op_call(backend, device, prefix):
    cell, x, z0, weights = case()
    cell, x = cell.to(device), x.detach().to(device).requires_grad_()
    z0 = tuple(m.detach().to(device).requires_grad_() for m in z0)
    steps = 3
    with _RevdeqOpLog() as log:
        z, _ = rfp(cell, x, z0=z0, beta=0.8, max_steps=steps, tol=None, backend=backend)
        loss_of(z, [w.to(device) for w in weights]).backward()
    # Forward: f(z0)'s residual, then per step relax y, relax z, residual. Backward per step: unrelax
    # z and y, relax hy and hz, the states' and the adjoints' residuals; at step 1 one more relax, which
    # recomputes y[1] from z0. Nothing per member. (The C++ CPU kernels write the residuals into the solver's
    # rows: multi_residual_out_.)
    residual = f"{prefix}multi_residual" + ("_out_" if backend == "cpp" else "")
    assert log.calls == {f"{prefix}multi_relax_": 2 * steps + 2 * steps + 1, f"{prefix}multi_unrelax_": 2 * steps,
                         residual: 1 + steps + 2 * steps}, log.calls


@pytest.mark.skipif(not extension.loaded(), reason="_C is not built")
def test_exact_mode_updates_the_flat_buffer_with_one_fixed_op_call():
    dtypes = (torch.float32, torch.float32)
    cell, x, z0, weights = case(dtypes=dtypes)
    steps = 3
    with _RevdeqOpLog() as log:
        z, _ = rfp(cell, x.detach().float(), z0=z0, beta=0.8125, max_steps=steps, tol=None, exact=True,
                   backend="cpp")
        loss_of(z, weights).backward()
    # The int64 states are one flat buffer (single-tensor fixed ops, f's outputs gathered); residuals
    # and the float adjoints go member by member (multi-tensor ops), the residuals into the solver's rows.
    assert log.calls == {"relax_fixed_": 2 * steps, "unrelax_fixed_": 2 * steps, "multi_relax_": 2 * steps,
                         "multi_residual_out_": 1 + steps + 2 * steps}, log.calls


# ---------------------------------------------------------------------------------------------
# Bad input: each error names the member.

def _solve(f=None, z0=None, **kwargs):
    """A solve of ``f`` (default: the cell) from zeros (default), declaring the cell's parameters."""
    return rfp(f or _cell, randn(B, *FINE, seed=1), z0=_z0 if z0 is None else z0, params=list(_cell.parameters()),
               **kwargs)


class _Pair(torch.nn.Module):
    def forward(self, z, x):
        return torch.tanh(z[0] + x), torch.tanh(z[0] - x)


_cell = TwoScaleCell()
_z0 = (torch.zeros(B, *FINE, dtype=torch.float64), torch.zeros(B, *COARSE, dtype=torch.float64))
BAD = [
    ("f returns 3 tensors", lambda: _solve(lambda z, x: (*_cell(z, x), z[0])), ValueError,
     r"reversible_fixed_point: f \(forward pass, evaluating f\(z0\)\) returned 3 tensors but z0 has 2"),
    ("f returns a tensor", lambda: _solve(lambda z, x: _cell(z, x)[0]), TypeError,
     r"f \(forward pass, evaluating f\(z0\)\) must return a tuple \(or list\) of 2 tensors like z0, got Tensor"),
    ("f returns a non-tensor member", lambda: _solve(lambda z, x: (_cell(z, x)[0], 1.0)), TypeError,
     r"f \(forward pass, evaluating f\(z0\)\) returned a float as output \[1\]; every output must be a torch.Tensor"),
    ("member shape", lambda: _solve(lambda z, x: (_cell(z, x)[0], _cell(z, x)[1][:, :2])), ValueError,
     r"returned shape \(3, 2, 5\) as output \[1\] but z0\[1\] has shape \(3, 3, 5\)\.$"),
    ("member dtype", lambda: _solve(lambda z, x: (_cell(z, x)[0], _cell(z, x)[1].float())), TypeError,
     r"returned dtype torch.float32 as output \[1\] but z0\[1\] is computed in torch.float64 \(z0\[1\]'s dtype\)"),
    ("member device", lambda: _solve(lambda z, x: (torch.empty_like(z[0], device="meta"), _cell(z, x)[1])),
     ValueError, r"returned a tensor on meta as output \[0\] but z0\[0\] is on cpu"),
    ("member shape later", lambda: _solve(lambda z, x: (_cell(z, x)[0], _cell(z, x)[1][:, :2] if z[1].abs().sum() > 0
                                                        else _cell(z, x)[1])), ValueError,
     r"f \(forward pass, step 1\) returned shape \(3, 2, 5\) as output \[1\]"),
    ("tuple f, no z0", lambda: rfp(lambda z, x: (z, x), randn(B, *FINE)), TypeError,
     r"f \(forward pass, evaluating f\(z0\)\) must return a torch.Tensor, got tuple; a tuple state needs z0 passed as "
     r"a tuple of tensors shaped like f's outputs \(z0=None starts a single-tensor state\)"),
    ("z0 empty", lambda: _solve(z0=()), ValueError,
     r"reversible_fixed_point: z0 is an empty tuple; a tuple state needs at least one tensor"),
    ("z0 nested", lambda: _solve(z0=(_z0[0], (_z0[1],))), TypeError,
     r"z0\[1\] must be a torch.Tensor, got tuple; nested structures are not supported: pass one flat tuple"),
    ("z0 member integer", lambda: _solve(z0=(_z0[0], _z0[1].long())), TypeError,
     r"z0\[1\] must have dtype float64, float32, float16 or bfloat16, got torch.int64"),
    ("z0 members on two devices", lambda: _solve(z0=(_z0[0], _z0[1].to("meta"))), ValueError,
     r"z0\[1\] is on meta but z0\[0\] is on cpu; all members of a tuple state must be on one device"),
    ("state_dtype too narrow", lambda: _solve(z0=(_z0[0].float(), _z0[1]), state_dtype=torch.float32), TypeError,
     r"state_dtype torch.float32 cannot hold f's dtype torch.float64 \(a dtype of z0's members\)"),
    ("RevDEQ f returns 2 tensors", lambda: rk.RevDEQ(_Pair())(randn(B, *FINE), z0=(_z0[0],)), ValueError,
     r"RevDEQ: f \(forward pass, evaluating f\(z0\)\) returned 2 tensors but z0 has 1"),
]


@pytest.mark.parametrize("case_", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_a_clear_error_naming_the_member(case_):
    _, call, exc, pattern = case_
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.skipif(not hasattr(BaseException, "add_note"), reason="exception notes need Python 3.11")
def test_an_error_in_f_notes_the_tuple_state_shapes():
    def f(z, x):
        raise RuntimeError("inside f")

    with pytest.raises(RuntimeError, match="inside f") as info:
        _solve(f)
    assert "raised by f on its first call, with a tuple state of shapes (3, 6, 4), (3, 3, 5) (z0's shapes)" in (
        info.value.__notes__[0])
