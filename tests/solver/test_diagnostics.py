"""jacobian_penalty and spectral_radius against the exact Jacobian of small layers, in float64."""

import math

import pytest
import torch

import revdeq_kernels as rk
from helpers.solver_cases import (
    TanhCell,
    randn,
    single_threaded,  # noqa: F401 (an autouse fixture)
)


def exact_jacobian(f, z, x) -> torch.Tensor:
    """df/dz as a (numel, numel) matrix, from torch.autograd.functional.jacobian."""
    return torch.autograd.functional.jacobian(lambda v: f(v, x), z).reshape(z.numel(), z.numel())


def tanh_layer(dim, radius, seed):
    """f(z, x) = tanh(z W^T + x) with W scaled so that its spectral radius is ``radius``."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    W *= radius / torch.linalg.eigvals(W).abs().max()
    return lambda z, x: torch.tanh(z @ W.T + x)


def equilibrium(f, x):
    z, info = rk.reversible_fixed_point(f, x, beta=0.5, max_steps=200, tol=1e-10)
    assert info["residual"] <= 1e-10
    return z


def exact_and_estimated_radius(dim, batch, radius, iters):
    """(exact spectral radius of df/dz, spectral_radius's estimate from `iters` products) at the fixed
    point of tanh_layer(dim, radius) for a (batch, dim) x."""
    f = tanh_layer(dim, radius, seed=int(10 * radius))
    x = randn(batch, dim, seed=1)
    z = equilibrium(f, x)
    exact = torch.linalg.eigvals(exact_jacobian(f, z, x)).abs().max().item()
    return exact, rk.spectral_radius(f, z, x, iters=iters, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# jacobian_penalty


def test_penalty_converges_to_the_frobenius_norm():
    cell = TanhCell(dim=6)
    x, z = randn(2, 6, seed=1), randn(2, 6, seed=2)
    J = exact_jacobian(cell, z, x)
    exact = J.square().sum().item() / z.numel()
    # One sample is v^T A v with A = J J^T and v ~ N(0, I): mean tr(A) = ||J||_F^2, variance
    # 2 ||A||_F^2 (a Gaussian quadratic form). The mean of n samples has sigma_n = sqrt(2 ||A||_F^2 / n)
    # (divided by numel like the estimate). Chebyshev bounds a miss by more than 4 sigma_n at 1/16 for
    # any seed; the average of n >= 16 chi-square-like terms is near Gaussian, where 4 sigma is 6e-5.
    # The seed is fixed, so the test is deterministic; sigma_4096 is asserted small so it means something.
    sigma_1 = math.sqrt(2 * (J @ J.T).square().sum().item()) / z.numel()
    assert 4 * sigma_1 / math.sqrt(4096) < 0.05 * exact
    for n in (16, 256, 4096):
        est = rk.jacobian_penalty(cell, z, x, n, generator=torch.Generator().manual_seed(n)).item()
        bound = 4 * sigma_1 / math.sqrt(n)
        print(f"n={n}: estimate {est:.6f}, exact {exact:.6f}, |error| {abs(est - exact):.2e} <= {bound:.2e}")
        assert abs(est - exact) <= bound


def test_penalty_gradient_matches_finite_differences():
    # With a freshly seeded generator the probes are fixed, so the penalty is a smooth deterministic
    # function of the parameters and of x; gradcheck compares its double-backward gradient with
    # central differences in float64.
    W0, U0, b0 = randn(4, 4, seed=1) * 0.5, randn(4, 3, seed=2), randn(4, seed=3) * 0.1
    x0, z = randn(2, 3, seed=4), randn(2, 4, seed=5)

    def penalty(W, U, b, x):
        f = lambda z, x: torch.tanh(z @ W.T + x @ U.T + b)  # noqa: E731
        return rk.jacobian_penalty(f, z, x, 3, generator=torch.Generator().manual_seed(0))

    inputs = [t.clone().requires_grad_() for t in (W0, U0, b0, x0)]
    assert torch.autograd.gradcheck(penalty, inputs, eps=1e-6, atol=1e-9, rtol=1e-6)
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(penalty(*inputs), inputs))


def test_penalty_differentiates_through_a_z_that_requires_grad():
    cell = TanhCell(dim=4)
    x = randn(2, 4, seed=1)

    def penalty(z):
        return rk.jacobian_penalty(cell, z, x, 2, generator=torch.Generator().manual_seed(0))

    assert torch.autograd.gradcheck(penalty, [randn(2, 4, seed=2, requires_grad=True)], eps=1e-6, atol=1e-9)


def test_penalty_without_grad_mode_is_the_same_value_without_a_graph():
    cell = TanhCell(dim=5)
    x, z = randn(3, 5, seed=1), randn(3, 5, seed=2)
    with_graph = rk.jacobian_penalty(cell, z, x, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        plain = rk.jacobian_penalty(cell, z, x, 4, generator=torch.Generator().manual_seed(7))
    assert with_graph.requires_grad and not plain.requires_grad
    assert with_graph.dtype == plain.dtype == torch.float64 and with_graph.shape == ()
    assert with_graph.item() == plain.item()


def test_float32_and_half_f_accumulate_in_float32():
    cell = TanhCell(dim=5, dtype=torch.float32)
    x, z = randn(3, 5, seed=1, dtype=torch.float32), randn(3, 5, seed=2, dtype=torch.float32)
    assert rk.jacobian_penalty(cell, z, x).dtype == torch.float32
    half = lambda z, x: cell(z, x).to(torch.bfloat16)  # noqa: E731 (what f returns under autocast)
    assert rk.jacobian_penalty(half, z, x).dtype == torch.float32


def test_f_that_ignores_z_has_zero_penalty_and_radius():
    W = randn(4, 4, seed=1, requires_grad=True)
    f = lambda z, x: torch.tanh(x @ W.T)  # noqa: E731
    x, z = randn(2, 4, seed=2), randn(2, 4, seed=3)
    assert rk.jacobian_penalty(f, z, x).item() == 0.0
    assert rk.spectral_radius(f, z, x) == 0.0


@pytest.mark.parametrize("call, error, match", [
    (lambda f, z, x: rk.jacobian_penalty(f, z, x, 0), ValueError, "jacobian_penalty: n_samples must be at least 1"),
    (lambda f, z, x: rk.jacobian_penalty(f, z, x, 2.0), TypeError, "n_samples must be an int, got float"),
    (lambda f, z, x: rk.jacobian_penalty(f, z.numpy(), x), TypeError, "z must be a torch.Tensor, got ndarray"),
    (lambda f, z, x: rk.jacobian_penalty(f, z.long(), x), TypeError, "z must have dtype .* got torch.int64"),
    (lambda f, z, x: rk.jacobian_penalty(lambda z, x: z[:, :3], z, x), ValueError,
     r"returned shape \(2, 3\) but z has shape \(2, 4\)"),
    (lambda f, z, x: rk.jacobian_penalty(lambda z, x: 1.0, z, x), TypeError, "must return a torch.Tensor, got float"),
    (lambda f, z, x: rk.jacobian_penalty(f, z, x, generator=3), TypeError, "generator must be a torch.Generator"),
    (lambda f, z, x: rk.jacobian_penalty(lambda z, x: 2 * z, z.to("meta"), x, generator=torch.Generator()),
     ValueError, "generator is on cpu but z is on the meta device, for which torch makes no generator"),
    (lambda f, z, x: rk.jacobian_penalty("f", z, x), TypeError, "f must be callable"),
    (lambda f, z, x: rk.spectral_radius(f, z, x, iters=0), ValueError, "spectral_radius: iters must be at least 1"),
    (lambda f, z, x: rk.spectral_radius(f, z, x, iters=True), TypeError, "iters must be an int, got bool"),
])
def test_bad_input_is_named(call, error, match):
    cell = TanhCell(dim=4)
    with pytest.raises(error, match=match):
        call(cell, randn(2, 4, seed=1), randn(2, 4, seed=2))


# ---------------------------------------------------------------------------------------------
# spectral_radius


@pytest.mark.parametrize("radius", [0.5, 0.9, 1.5])
def test_radius_is_exact_when_the_krylov_space_is_everything(radius):
    # iters >= numel: Arnoldi's subspace is the whole space, so its Ritz values are the eigenvalues.
    exact, got = exact_and_estimated_radius(8, 1, radius, iters=8)
    print(f"W radius {radius}: df/dz radius {exact:.12f}, estimate {got:.12f}")
    assert abs(got - exact) <= 1e-10 * exact


@pytest.mark.parametrize("radius", [0.5, 0.9, 1.5])
def test_radius_estimate_of_a_larger_batched_layer(radius):
    # 64 units, a batch of 2 (a 128 x 128 block-diagonal Jacobian), 30 products: the estimate is a
    # Ritz value, so the comparison needs a tolerance: 3%, where the errors measured are below 0.5%
    # (plain power iteration with the same 30 products misses by 1-6% on these three layers: their
    # eigenvalues fill a disc, with no gap below the largest).
    exact, got = exact_and_estimated_radius(64, 2, radius, iters=30)
    print(f"W radius {radius}: df/dz radius {exact:.5f}, estimate {got:.5f}, error {abs(got / exact - 1):.2e}")
    assert abs(got - exact) <= 0.03 * exact


def test_radius_of_a_linear_map_with_complex_dominant_eigenvalues():
    # A rotation by 90 degrees scaled by 0.9 in every 2x2 block: all eigenvalues are +-0.9i, the case
    # where power iteration's ratio never settles. Arnoldi gets it from the first two products.
    blocks = torch.block_diag(*[0.9 * torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)] * 16)
    f = lambda z, x: z @ blocks.T + x  # noqa: E731
    z, x = randn(32, seed=1), randn(32, seed=2)
    assert abs(rk.spectral_radius(f, z, x, iters=4) - 0.9) <= 1e-12
