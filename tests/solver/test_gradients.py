"""The reversible gradient equals autograd through the unrolled loop, in every way it can be asked for."""

import pytest
import torch
from torch.nn.utils import parametrize

import revdeq_kernels as rk
from helpers.solver_cases import (
    TanhCell,
    assert_grads_close,
    gradient_case,
    randn,
    rel_err,
    single_threaded,  # noqa: F401 (an autouse fixture)
    unrolled,
)

CPU_BACKENDS = rk.available_backends()["cpu"]
GRAD_NAMES = ["x", "z0", "W", "U", "b"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("beta", [0.5, 0.8, 1.3])
def test_gradient_equals_unrolled_autograd_in_float64(beta, steps, backend):
    case = gradient_case(beta, steps)
    z, info = rk.reversible_fixed_point(case.cell, case.x, z0=case.z0, beta=beta, max_steps=steps, tol=None,
                                        backend=backend)
    assert rel_err(z, case.want_z) < 1e-13
    got = torch.autograd.grad((z * case.weight).sum(), case.inputs)
    assert_grads_close(got, case.want, 1e-10, GRAD_NAMES)
    assert info["steps"] == steps and info["drift"] < 1e-9


def test_loss_backward_and_autograd_grad_give_the_same_gradients():
    cell = TanhCell()
    x = randn(3, 6, seed=1, requires_grad=True)
    params = [x, *cell.parameters()]
    z, _ = rk.reversible_fixed_point(cell, x, beta=0.8, max_steps=5, tol=None)
    via_grad = torch.autograd.grad(z.sin().sum(), params)
    z, _ = rk.reversible_fixed_point(cell, x, beta=0.8, max_steps=5, tol=None)
    z.sin().sum().backward()
    for name, g, p in zip(["x", "W", "U", "b"], via_grad, params):
        assert torch.equal(p.grad, g), f"{name}: .backward() and autograd.grad differ"


def test_tolerance_stops_early_and_the_gradient_matches_the_steps_taken():
    cell = TanhCell()
    x = randn(3, 6, seed=1, requires_grad=True)
    z, info = rk.reversible_fixed_point(cell, x, beta=0.5, max_steps=50, tol=1e-4)
    steps = info["steps"]
    assert 1 < steps < 50 and info["residual"] <= 1e-4
    inputs = [x, *cell.parameters()]
    want = torch.autograd.grad(unrolled(cell, x, torch.zeros_like(x), 0.5, steps).sum(), inputs)
    got = torch.autograd.grad(z.sum(), inputs)
    assert_grads_close(got, want, 1e-10, ["x", "W", "U", "b"])
    # The residual the solver reports is the one at the returned z.
    fz = cell(z, x)
    assert abs((z - fz).norm() / fz.norm() - info["residual"]) < 1e-12


class _Symmetric(torch.nn.Module):
    def forward(self, w):
        return 0.5 * (w + w.T)


def test_parametrized_non_leaf_weight_gets_exact_gradients():
    cell = TanhCell()
    parametrize.register_parametrization(cell, "W", _Symmetric())  # cell.W is now computed, not a leaf
    x = randn(3, 6, seed=1, requires_grad=True)
    inputs = list(cell.parameters())  # parametrizations.W.original, U, b
    want = torch.autograd.grad(unrolled(cell, x, torch.zeros_like(x), 0.8, 4).square().sum(), inputs)
    z, _ = rk.reversible_fixed_point(cell, x, beta=0.8, max_steps=4, tol=None)
    got = torch.autograd.grad(z.square().sum(), inputs)
    assert_grads_close(got, want, 1e-10, ["W.original", "U", "b"])


def test_explicit_non_leaf_params_of_a_closure():
    base = randn(6, 6, seed=4, requires_grad=True)
    x = randn(3, 6, seed=1, requires_grad=True)

    def run(solve):
        weight = 0.2 * (base + base.T)  # non-leaf, computed once outside f
        return solve(lambda z, x: torch.tanh(z @ weight + x), weight).sum()

    want = torch.autograd.grad(run(lambda f, w: unrolled(f, x, torch.zeros_like(x), 1.3, 3)), [base, x])
    got = torch.autograd.grad(run(lambda f, w: rk.reversible_fixed_point(f, x, beta=1.3, max_steps=3, tol=None,
                                                                         params=[w])[0]), [base, x])
    assert_grads_close(got, want, 1e-10, ["base", "x"])


def test_f_that_closes_over_x_instead_of_using_its_argument():
    encoder = torch.nn.Linear(4, 6, dtype=torch.float64)
    raw = randn(3, 4, seed=1, requires_grad=True)
    cell = TanhCell()
    inputs = [raw, cell.W, *encoder.parameters()]

    def run(solve):
        injected = encoder(raw)  # non-leaf: the gradient must reach raw and the encoder through it

        def f(z, _x):
            return torch.tanh(z @ cell.W.T + injected)

        return solve(f, injected).sum()

    want = torch.autograd.grad(run(lambda f, x: unrolled(f, x, torch.zeros_like(x), 0.5, 5)), inputs)
    got = torch.autograd.grad(run(lambda f, x: rk.reversible_fixed_point(f, x, beta=0.5, max_steps=5, tol=None,
                                                                         params=[cell.W])[0]), inputs)
    assert_grads_close(got, want, 1e-10, ["raw", "W", "encoder.weight", "encoder.bias"])


def test_two_solves_in_one_graph():
    # The second solve's x depends on the same parameters through the first solve: the backward must
    # take partial derivatives, never run the first solve's backward from inside the second's.
    cell = TanhCell()
    x = randn(3, 6, seed=1, requires_grad=True)
    inputs = [x, *cell.parameters()]

    def model(solve):
        z1 = solve(x)
        z2 = solve(0.5 * z1 + x)
        return (z1 * z2).sum() + z2.sum()

    want = torch.autograd.grad(model(lambda v: unrolled(cell, v, torch.zeros_like(v), 0.8, 3)), inputs)
    got = torch.autograd.grad(model(lambda v: rk.reversible_fixed_point(cell, v, beta=0.8, max_steps=3,
                                                                        tol=None)[0]), inputs)
    assert_grads_close(got, want, 1e-10, ["x", "W", "U", "b"])
    for p in inputs:
        p.grad = None
    model(lambda v: rk.reversible_fixed_point(cell, v, beta=0.8, max_steps=3, tol=None)[0]).backward()
    assert_grads_close([p.grad for p in inputs], want, 1e-10, ["x", "W", "U", "b"])


def test_closure_over_an_earlier_solve_with_the_same_params_is_refused():
    cell = TanhCell()
    x = randn(3, 6, seed=1, requires_grad=True)
    z1, _ = rk.reversible_fixed_point(cell, x, beta=0.8, max_steps=3, tol=None)
    z2, _ = rk.reversible_fixed_point(lambda z, _: cell(z, z1), z1, beta=0.8, max_steps=3, tol=None,
                                      params=list(cell.parameters()))
    with pytest.raises(ValueError, match=r"reversible_fixed_point: f uses a tensor it closes over .* history depends"):
        z2.sum().backward()


def test_tuple_x_is_passed_as_given_and_every_tensor_gets_its_gradient():
    cell = TanhCell()
    a = randn(3, 6, seed=1, requires_grad=True)
    gate = randn(3, 6, seed=2, requires_grad=True)
    ids = torch.arange(3)  # an integer tensor in x needs no gradient

    def f(z, xs):
        a, gate, ids = xs
        assert isinstance(xs, tuple)
        return cell(z, a) * torch.sigmoid(gate) + ids[:, None]

    params = list(cell.parameters())
    want = torch.autograd.grad(unrolled(f, (a, gate, ids), torch.zeros_like(a), 0.5, 3).sum(), [a, gate, *params])
    z, _ = rk.reversible_fixed_point(f, (a, gate, ids), beta=0.5, max_steps=3, tol=None, params=params)
    got = torch.autograd.grad(z.sum(), [a, gate, *params])
    assert_grads_close(got, want, 1e-10, ["a", "gate", "W", "U", "b"])


def test_float32_f_on_float64_states_matches_the_same_casts_unrolled():
    cell = TanhCell(dtype=torch.float32)
    x = randn(3, 6, dtype=torch.float32, seed=1, requires_grad=True)
    inputs = [x, *cell.parameters()]
    want = torch.autograd.grad(
        unrolled(cell, x, torch.zeros_like(x), 0.8, 8, state_dtype=torch.float64).sum(), inputs)
    z, info = rk.reversible_fixed_point(cell, x, beta=0.8, max_steps=8, tol=None)
    assert z.dtype == torch.float32
    got = torch.autograd.grad(z.sum(), inputs)
    # f runs in float32: each vjp rounds to ~6e-8, summed over 16 evaluations.
    assert_grads_close(got, want, 1e-5, ["x", "W", "U", "b"])
    assert info["drift"] < 1e-6


def test_float32_states_are_exact_for_few_steps():
    cell = TanhCell(dtype=torch.float32)
    x = randn(3, 6, dtype=torch.float32, seed=1, requires_grad=True)
    inputs = [x, *cell.parameters()]
    want = torch.autograd.grad(unrolled(cell, x, torch.zeros_like(x), 0.5, 3).sum(), inputs)
    z, info = rk.reversible_fixed_point(cell, x, beta=0.5, max_steps=3, tol=None, state_dtype=torch.float32)
    got = torch.autograd.grad(z.sum(), inputs)
    assert_grads_close(got, want, 1e-5, ["x", "W", "U", "b"])
    assert 0 < info["drift"] < 1e-5


def test_autocast_f_returns_bfloat16_while_states_stay_float64():
    cell = TanhCell(dtype=torch.float32)
    x = randn(4, 6, dtype=torch.float32, seed=1, requires_grad=True)
    seen = []

    def f(z, x):
        out = cell(z, x)
        seen.append((z.dtype, out.dtype))
        return out

    inputs = [x, *cell.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.autograd.grad(
            unrolled(f, x, torch.zeros_like(x), 0.5, 4, state_dtype=torch.float64).float().sum(), inputs)
        seen.clear()
        z, info = rk.reversible_fixed_point(f, x, beta=0.5, max_steps=4, tol=None, params=list(cell.parameters()))
        loss = z.float().sum()
    got = torch.autograd.grad(loss, inputs)
    assert z.dtype == torch.float32
    assert set(seen) == {(torch.float32, torch.bfloat16)}, "the backward must re-evaluate f under autocast too"
    assert len(seen) == 2 * 4 + 1 + 2 * 4
    # f(y) in the backward equals f(y) in the forward bit for bit, so the reconstruction stays exact
    # even though bfloat16 f is far less precise than the float64 states.
    assert info["drift"] < 1e-12
    assert_grads_close(got, want, 1e-2, ["x", "W", "U", "b"])


def test_z0_sets_the_compute_dtype_and_x_may_be_integer():
    emb = torch.nn.Embedding(10, 6, dtype=torch.float64)
    cell = TanhCell()
    ids = torch.tensor([1, 4, 7])

    def f(z, ids):
        return cell(z, emb(ids))

    z0 = torch.zeros(3, 6, dtype=torch.float64)
    z, _ = rk.reversible_fixed_point(f, ids, z0=z0, params=[*cell.parameters(), *emb.parameters()], tol=None,
                                     max_steps=3)
    assert z.dtype == torch.float64 and z.shape == (3, 6)
    z.sum().backward()
    assert emb.weight.grad[[1, 4, 7]].abs().sum() > 0 and emb.weight.grad[0].abs().sum() == 0


def test_inference_without_grad_returns_the_same_z():
    cell = TanhCell()
    x = randn(3, 6, seed=1, requires_grad=True)
    z, _ = rk.reversible_fixed_point(cell, x, max_steps=6, tol=None)
    with torch.no_grad():
        z_nograd, info = rk.reversible_fixed_point(cell, x, max_steps=6, tol=None)
    assert z.requires_grad and not z_nograd.requires_grad
    assert torch.equal(z.detach(), z_nograd) and info["drift"] is None and info["steps"] == 6
