"""Shared pieces for the solver tests: a small DEQ cell, the unrolled-loop oracle, error measures.

The oracle is plain autograd through the same iteration the solver runs (same beta, same number of
steps, same casts between state and f), so the reversible gradient must match it to rounding.
"""

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(autouse=True)
def single_threaded():
    """The solver tests use tiny tensors, where intra-op threads only add contention (on a busy
    2-core machine a 32x16 matmul goes from microseconds to milliseconds). Import this fixture into a
    test module to run its tests on one thread; the previous setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TanhCell(torch.nn.Module):
    """f(z, x) = tanh(z W^T + b + x U^T) (+ optional dropout), a contraction for small W."""

    def __init__(self, dim=6, x_dim=None, dtype=torch.float64, dropout=0.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        x_dim = dim if x_dim is None else x_dim
        self.W = torch.nn.Parameter(0.4 * torch.randn(dim, dim, generator=g, dtype=torch.float64).to(dtype)
                                    / dim ** 0.5)
        self.U = torch.nn.Parameter(torch.randn(dim, x_dim, generator=g, dtype=torch.float64).to(dtype)
                                    / x_dim ** 0.5)
        self.b = torch.nn.Parameter(0.1 * torch.randn(dim, generator=g, dtype=torch.float64).to(dtype))
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()

    def forward(self, z, x):
        # F.linear keeps the bias inside the matmul, so under autocast f returns the autocast dtype.
        return self.dropout(torch.tanh(F.linear(z, self.W, self.b) + F.linear(x, self.U)))


def unrolled(f, x, z0, beta, steps, state_dtype=None):
    """z[steps] of the RevDEQ iteration with autograd through every step (the oracle).

    With ``state_dtype`` the states are held in that dtype and f sees a cast to z0's dtype, exactly
    as the solver does.
    """
    compute = z0.dtype
    state = state_dtype or compute
    y = z = z0.to(state)
    for _ in range(steps):
        y = (1 - beta) * y + beta * f(z.to(compute), x).to(state)
        z = (1 - beta) * z + beta * f(y.to(compute), x).to(state)
    return z.to(compute)


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (NaN counts as infinitely wrong)."""
    got, want = got.double(), want.double()
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()
    return err if err == err else float("inf")


def assert_grads_close(got, want, rtol, names):
    for g, w, name in zip(got, want, names):
        assert g is not None, f"{name}: no gradient"
        err = rel_err(g, w)
        print(f"{name}: relative error {err:.3e}")
        assert err <= rtol, f"{name}: relative gradient error {err:.3e} > {rtol:.0e}"


def randn(*shape, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
