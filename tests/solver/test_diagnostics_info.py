"""The diagnostics in SolverInfo (residual trace, spectral radius, Jacobian penalty) and RevDEQ's
jac_reg / spectral_radius options."""

import copy

import pytest
import torch

import revdeq_kernels as rk
from helpers.solver_cases import (
    TanhCell,
    assert_grads_close,
    randn,
    single_threaded,  # noqa: F401 (an autouse fixture)
    unrolled,
)


def residuals_by_hand(f, x, beta, steps):
    """||z[n] - f(z[n])|| / ||f(z[n])|| for n = 0..steps of the RevDEQ iteration from zeros."""
    y = z = torch.zeros_like(x)
    out = []
    for n in range(steps + 1):
        if n:
            y = (1 - beta) * y + beta * f(z, x)
            z = (1 - beta) * z + beta * f(y, x)
        fz = f(z, x)
        out.append(((z - fz).norm() / fz.norm()).item())
    return out


def test_residual_trace_matches_the_iteration_by_hand():
    cell = TanhCell(dim=6)
    x = randn(3, 6, seed=1)
    want = residuals_by_hand(cell, x, 0.8, 7)
    z, info = rk.reversible_fixed_point(cell, x, beta=0.8, max_steps=7, tol=None)
    got = info["residual_trace"]
    print("by hand", want, "\ninfo   ", got)
    assert len(got) == 8 and got[0] == 1.0  # z0 = 0: ||0 - f|| / ||f||
    assert got[-1] == info["residual"]
    assert max(abs(a - b) / b for a, b in zip(got, want)) <= 1e-12


@pytest.mark.parametrize("check_every", [1, 3])
def test_residual_trace_with_a_tolerance_stops_where_the_solve_stopped(check_every):
    cell = TanhCell(dim=6)
    x = randn(3, 6, seed=1)
    z, info = rk.reversible_fixed_point(cell, x, beta=0.5, max_steps=40, tol=1e-4, check_every=check_every)
    trace = info["residual_trace"]
    want = residuals_by_hand(cell, x, 0.5, info["steps"])
    assert len(trace) == info["steps"] + 1 and trace[-1] == info["residual"] <= 1e-4
    assert max(abs(a - b) / b for a, b in zip(trace, want)) <= 1e-12
    if check_every == 1:
        assert trace[-2] > 1e-4, "the solve stops at the first step that meets the tolerance"


def test_residual_trace_raises_on_non_finite_like_residual():
    x = randn(2, 4, seed=1)
    z, info = rk.reversible_fixed_point(lambda z, x: z * float("nan") + x, x, max_steps=3, tol=None)
    with pytest.raises(FloatingPointError, match="non-finite values in the forward pass"):
        info["residual_trace"]


def test_diagnostic_keys_are_present_only_when_asked_for():
    x = randn(3, 6, seed=1, requires_grad=True)
    deq = rk.RevDEQ(TanhCell(), beta=0.5, max_steps=4, tol=None)
    deq(x)
    assert list(deq.info) == ["steps", "residual", "drift", "f_mismatch", "residual_trace"] and len(deq.info) == 5
    with pytest.raises(KeyError):
        deq.info["jac_penalty"]
    deq = rk.RevDEQ(TanhCell(), beta=0.5, max_steps=4, tol=None, jac_reg=True, spectral_radius=True)
    deq(x)
    assert set(deq.info) == {"steps", "residual", "drift", "f_mismatch", "residual_trace", "jac_penalty",
                             "spectral_radius"}
    assert "'jac_penalty': tensor(" in repr(deq.info) and isinstance(deq.info["spectral_radius"], float)
    deq.eval()
    deq(x)
    assert deq.info["jac_penalty"] is None and "jac_penalty" in deq.info


def test_revdeq_jac_reg_penalty_and_its_gradient():
    gamma, samples = 0.7, 3
    cell = TanhCell(dim=6)
    deq = rk.RevDEQ(cell, beta=0.8, max_steps=6, tol=None, jac_reg=samples)
    x = randn(3, 6, seed=1, requires_grad=True)
    inputs = [x, *cell.parameters()]

    torch.manual_seed(5)  # the solve draws nothing (no dropout); the penalty's probes come next
    z = deq(x)
    penalty = deq.info["jac_penalty"]
    torch.manual_seed(5)
    want_penalty = rk.jacobian_penalty(cell, z.detach(), x, samples)
    assert penalty.requires_grad and penalty.item() == want_penalty.item()
    got = torch.autograd.grad(z.square().sum() + gamma * penalty, inputs)

    # The same loss with the unrolled loop for z and the penalty at the same (fixed) equilibrium.
    task = torch.autograd.grad(unrolled(cell, x, torch.zeros_like(x), 0.8, 6).square().sum(), inputs)
    reg = torch.autograd.grad(want_penalty, inputs)
    assert all(r.abs().sum() > 0 for r in reg), "the penalty reaches x and every parameter"
    assert_grads_close(got, [t + gamma * r for t, r in zip(task, reg)], 1e-10, ["x", "W", "U", "b"])
    assert deq.info["drift"] < 1e-10


def test_revdeq_jac_reg_is_training_only_and_works_under_no_grad():
    deq = rk.RevDEQ(TanhCell(), beta=0.5, max_steps=4, tol=None, jac_reg=True)
    x = randn(3, 6, seed=1)
    with torch.no_grad():
        deq(x)
    assert deq.info["jac_penalty"] is not None and not deq.info["jac_penalty"].requires_grad
    deq.eval()
    deq(x)
    assert deq.info["jac_penalty"] is None


def test_revdeq_spectral_radius_matches_the_function_and_the_exact_value():
    cell = TanhCell(dim=6)
    deq = rk.RevDEQ(cell, beta=0.5, max_steps=50, tol=1e-8, spectral_radius=12).eval()
    x = randn(2, 6, seed=1)
    with torch.no_grad():  # a diagnostic in evaluation: needs no graph from the caller
        z = deq(x)
    J = torch.autograd.functional.jacobian(lambda v: cell(v, x), z).reshape(12, 12)
    exact = torch.linalg.eigvals(J).abs().max().item()
    assert abs(deq.info["spectral_radius"] - exact) <= 1e-10 * exact  # 12 products span all 12 dimensions
    assert 0 < exact < 1


def test_the_diagnostic_evaluation_leaves_buffers_alone():
    class NormCell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell, self.norm = TanhCell(), torch.nn.BatchNorm1d(6, dtype=torch.float64)

        def forward(self, z, x):
            return self.norm(self.cell(z, x))

    f = NormCell()
    plain = rk.RevDEQ(copy.deepcopy(f), beta=0.5, max_steps=3, tol=None)
    deq = rk.RevDEQ(f, beta=0.5, max_steps=3, tol=None, jac_reg=True, spectral_radius=True)
    x = randn(8, 6, seed=1, requires_grad=True)
    plain(x)
    z = deq(x)
    assert f.norm.num_batches_tracked == 2 * 3 + 1, "only the solve's evaluations update BatchNorm"
    for (name, got), want in zip(f.named_buffers(), plain.f.buffers()):
        assert torch.equal(got, want), name
    # BatchNorm saved its running statistics for the penalty's double backward; they must be intact.
    (z.square().sum() + deq.info["jac_penalty"]).backward()
    assert f.norm.weight.grad.abs().sum() > 0 and deq.info["spectral_radius"] > 0


@pytest.mark.parametrize("option, value, error, match", [
    ("jac_reg", -1, ValueError, "RevDEQ: jac_reg must be False, True or a count >= 1, got -1"),
    ("jac_reg", 0.5, TypeError, "RevDEQ: jac_reg must be a bool or a number of products"),
    ("spectral_radius", "yes", TypeError, "RevDEQ: spectral_radius must be a bool or a number of products"),
])
def test_revdeq_rejects_bad_options(option, value, error, match):
    with pytest.raises(error, match=match):
        rk.RevDEQ(TanhCell(), **{option: value})


def test_repr_names_the_options():
    text = repr(rk.RevDEQ(TanhCell(), jac_reg=2, spectral_radius=True))
    assert "jac_reg=2, spectral_radius=40" in text


@pytest.mark.gpu
def test_diagnostics_on_cuda_match_the_exact_values():
    device = torch.device("cuda")
    cell = TanhCell(dim=6).to(device)
    deq = rk.RevDEQ(cell, beta=0.5, max_steps=60, tol=1e-6, jac_reg=256, spectral_radius=12)
    x = randn(2, 6, seed=1).to(device).requires_grad_()
    z = deq(x)
    J = torch.autograd.functional.jacobian(lambda v: cell(v, x.detach()), z.detach()).reshape(12, 12)
    radius = torch.linalg.eigvals(J.cpu()).abs().max().item()
    assert abs(deq.info["spectral_radius"] - radius) <= 1e-10 * radius
    exact = J.square().sum().item() / 12
    sigma = (2 * (J @ J.T).square().sum().item()) ** 0.5 / 12 / 256 ** 0.5  # as in test_diagnostics.py
    assert abs(deq.info["jac_penalty"].item() - exact) <= 5 * sigma
    (z.square().sum() + deq.info["jac_penalty"]).backward()
    assert x.grad.abs().sum() > 0 and deq.info["drift"] < 1e-3
