"""BoundOps (what the solver calls per step) computes exactly what the public ops compute, and the solver
calls neither the public ops' checks nor their backend lookup once per step."""

import pytest
import torch

import revdeq_kernels as rk
from revdeq_kernels import exact, ops
from revdeq_kernels.ops.bound import BoundOps

BACKENDS = [b for b in rk.available_backends()["cpu"]]
EXACT_BACKENDS = [b for b in rk.available_backends()["exact"]["cpu"]]


def _pair(shape, state_dtype, f_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64).to(state_dtype),
            torch.randn(shape, generator=g, dtype=torch.float64).to(f_dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float32), (torch.float32, torch.float32),
                                    (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("op", ["relax_", "unrelax_"])
def test_updates_match_the_public_ops_bit_for_bit(backend, dtypes, op):
    bound = BoundOps(torch.device("cpu"), backend)
    state, f = _pair((5, 37), *dtypes, seed=1)
    want = getattr(rk, op)(state.clone(), f, 0.7, backend=backend)
    got = state.clone()
    getattr(bound, op)(got, f, 0.7)
    assert torch.equal(got, want)
    # Members: one multi-tensor call, each member as the public op leaves it.
    members, fs = [state.clone(), state[:3, :5].clone()], [f, f[:3, :5].clone()]
    want = getattr(rk, op)([m.clone() for m in members], fs, 0.7, backend=backend)
    getattr(bound, op)(members, fs, 0.7)
    for g, w in zip(members, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_matches_the_public_op_and_handles_empty_states(backend):
    bound = BoundOps(torch.device("cpu"), backend)
    z, fz = _pair((7, 11), torch.float64, torch.float32, seed=2)
    assert torch.equal(bound.residual(z, fz), rk.residual(z, fz, backend=backend))
    assert torch.equal(bound.residual([z, z[:2]], [fz, fz[:2]]),
                       rk.residual([z, z[:2]], [fz, fz[:2]], backend=backend))
    empty = torch.empty(0, 3, dtype=torch.float32)
    for got, want in ((bound.residual(empty, empty), rk.residual(empty, empty)),
                      (bound.residual([empty], [empty]), rk.residual([empty], [empty]))):
        assert torch.equal(got, want) and got.dtype == want.dtype
    state = torch.empty(0)
    bound.relax_(state, state.clone(), 0.5)  # nothing to do, and no kernel launched on nothing
    bound.relax_([state], [state.clone()], 0.5)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_fixed_updates_match_the_public_ops_and_flag_into_status(backend):
    bound = BoundOps(torch.device("cpu"), backend)
    beta = exact.dyadic_beta(0.8125)
    y = exact.to_fixed(torch.randn(300, dtype=torch.float64))
    fz = torch.randn(300)
    want, rem_want = y.clone(), exact.remainder_buffer(300, beta.m, 1)[0]
    rk.relax_fixed_(want, fz, beta, rem_want, backend=backend)
    got, rem, status = y.clone(), exact.remainder_buffer(300, beta.m, 1)[0], exact.new_status(y.device)
    bound.relax_fixed_(got, fz, beta, rem, exact.DEFAULT_FRAC_BITS, status)
    assert torch.equal(got, want) and torch.equal(rem, rem_want) and status.item() == 0
    bound.unrelax_fixed_(got, fz, beta, rem, exact.DEFAULT_FRAC_BITS, status)
    assert torch.equal(got, y) and status.item() == 0
    bad = fz.clone()
    bad[3] = float("nan")
    bound.relax_fixed_(got, bad, beta, rem, exact.DEFAULT_FRAC_BITS, status)
    assert status.item() != 0  # flagged on the device, as the public op with a status does


def test_the_solver_runs_no_public_op_checks_per_step(monkeypatch):
    # The public ops check every argument (~15 us of Python each); the solver's steps must not pay that.
    calls = {"n": 0}
    real = ops.check_pointwise

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "check_pointwise", counting)
    lin = torch.nn.Linear(8, 8, dtype=torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    z, _ = rk.reversible_fixed_point(lambda z, x: torch.tanh(lin(z) + x), x, params=list(lin.parameters()),
                                     max_steps=12, tol=None, beta=0.5)
    z.sum().backward()
    assert calls["n"] == 0
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_dtype", [torch.float64, torch.float32])
def test_residual_into_writes_the_residual_without_allocating_a_result(backend, state_dtype):
    bound = BoundOps(torch.device("cpu"), backend)
    z, fz = _pair((9, 13), state_dtype, torch.float32, seed=3)
    for out_dtype in {state_dtype, torch.float64}:  # a row of the solver's history, or of its float64 evidence
        for zs, fs in ((z, fz), ([z, z[:3]], [fz, fz[:3]])):
            out = torch.full((2,), float("nan"), dtype=out_dtype)
            bound.residual_into(zs, fs, out)
            assert torch.equal(out, bound.residual(zs, fs).to(out_dtype)), (backend, out_dtype)


def test_residual_out_op_checks_its_out_argument():
    pytest.importorskip("revdeq_kernels._C", reason="the C++ kernels are not built")
    from revdeq_kernels.backends import compiled

    assert compiled.has_kernel("residual_out_", "cpu") and compiled.has_kernel("multi_residual_out_", "cpu")
    z, fz = torch.randn(10, dtype=torch.float64), torch.randn(10)
    for bad in (torch.empty(3, dtype=torch.float64), torch.empty(2, dtype=torch.float16),
                torch.empty(4, dtype=torch.float64)[::2]):
        with pytest.raises(RuntimeError, match=r"residual_out_: out must be a contiguous CPU tensor of shape \(2,\)"):
            torch.ops.revdeq.residual_out_(z, fz, bad)
