"""Shared pieces for the solver tests: a small DEQ cell, the unrolled-loop oracle, error measures, the
bytes autograd saves, and a short training loop.

The oracle is plain autograd through the same iteration the solver runs (same beta, same number of
steps, same casts between state and f), so the reversible gradient must match it to rounding.
"""

import contextlib
from typing import NamedTuple

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


class GradientCase(NamedTuple):
    cell: TanhCell
    x: torch.Tensor
    z0: torch.Tensor
    weight: torch.Tensor
    inputs: list
    want_z: torch.Tensor
    want: tuple


def gradient_case(beta, steps) -> GradientCase:
    """The float64 gradient problem the solver is held to: a TanhCell, x and z0 of shape (3, 6) that require
    grad, a fixed weight of the same shape for the loss sum(z * weight), and the oracle, autograd through
    `steps` steps of the unrolled loop from z0 with this beta.

    want_z is the oracle's z[steps]; want holds the gradients of its loss with respect to inputs =
    [x, z0, *cell.parameters()] (names x, z0, W, U, b).

        case = gradient_case(0.8, 7)
        z, _ = rk.reversible_fixed_point(case.cell, case.x, z0=case.z0, beta=0.8, max_steps=7, tol=None)
        got = torch.autograd.grad((z * case.weight).sum(), case.inputs)
    """
    cell = TanhCell()
    x = randn(3, 6, seed=1, requires_grad=True)
    z0 = randn(3, 6, seed=2, requires_grad=True)
    weight = randn(3, 6, seed=3)
    inputs = [x, z0, *cell.parameters()]
    want_z = unrolled(cell, x, z0, beta, steps)
    want = torch.autograd.grad((want_z * weight).sum(), inputs)
    return GradientCase(cell, x, z0, weight, inputs, want_z, want)


def saved_for_backward(run) -> tuple:
    """(output of run(), bytes, count) of the tensors autograd saves for backward while run() builds its graph."""
    total = [0, 0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        total[1] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, total[0], total[1]


def train_with_adam(model, inp, labels, steps, lr=0.05) -> list:
    """`steps` Adam steps on cross_entropy(model(inp)[0], labels); returns the loss before each step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logits, _ = model(inp)
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# Every way Python code can pull a tensor's value to the host (each one a device sync on a GPU).
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


@contextlib.contextmanager
def count_host_reads(monkeypatch):
    """Count calls of the Tensor methods that copy values to the host while the block runs."""
    counts = {}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        yield counts
    finally:
        monkeypatch.undo()
