"""Host synchronisation: none at all with tol=None; with a tolerance, one read every check_every steps."""

import math

import pytest
import torch

import revdeq_kernels as rk
from helpers.solver_cases import (
    TanhCell,
    count_host_reads,
    randn,
    single_threaded,  # noqa: F401 (an autouse fixture)
)


def _solve_and_backward(**kwargs):
    cell = TanhCell()
    x = randn(3, 6, seed=1, requires_grad=True)
    z, info = rk.reversible_fixed_point(cell, x, **kwargs)
    z.sum().backward()
    return info


def test_no_host_reads_at_all_without_a_tolerance(monkeypatch):
    with count_host_reads(monkeypatch) as counts:
        info = _solve_and_backward(beta=0.5, max_steps=9, tol=None)
    assert counts == {}, f"tol=None must not read device values back, but called {counts}"
    # Reading the info is what reads the evidence back: once for each pass.
    with count_host_reads(monkeypatch) as counts:
        assert info["steps"] == 9 and info["residual"] > 0 and info["drift"] < 1e-12
        info.check()
    assert counts == {"tolist": 2}


@pytest.mark.parametrize("check_every", [1, 3, 4])
def test_with_a_tolerance_the_residual_is_read_every_check_every_steps(monkeypatch, check_every):
    max_steps = 10
    with count_host_reads(monkeypatch) as counts:
        info = _solve_and_backward(beta=0.5, max_steps=max_steps, tol=1e-30, check_every=check_every)
    forward_reads = math.ceil(max_steps / check_every)  # at each multiple of check_every, and at max_steps
    assert counts == {"tolist": forward_reads + 1}, counts  # + 1: the backward's evidence, read once at its end
    with count_host_reads(monkeypatch) as counts:
        info.check()  # everything was read already
    assert counts == {}


def test_convergence_is_noticed_at_the_next_check():
    cell = TanhCell()
    x = randn(3, 6, seed=1)
    _, every = rk.reversible_fixed_point(cell, x, beta=0.5, max_steps=50, tol=1e-6)
    _, sparse = rk.reversible_fixed_point(cell, x, beta=0.5, max_steps=50, tol=1e-6, check_every=4)
    assert every["residual"] <= 1e-6 and sparse["residual"] <= 1e-6
    assert sparse["steps"] % 4 == 0 and every["steps"] <= sparse["steps"] < every["steps"] + 4


@pytest.mark.gpu
def test_cuda_forward_and_backward_without_a_tolerance_never_synchronise():
    cell = TanhCell(dim=64, dtype=torch.float32).cuda()
    x = torch.randn(32, 64, device="cuda", requires_grad=True)
    rk.reversible_fixed_point(cell, x, max_steps=2, tol=None)[0].sum().backward()  # warm up (lazy init syncs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        z, info = rk.reversible_fixed_point(cell, x, beta=0.5, max_steps=8, tol=None)
        z.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert info["drift"] < 1e-9
