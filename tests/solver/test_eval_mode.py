"""RevDEQ in eval() mode with grad mode on: a differentiable output (input gradients, forces), O(1) memory."""

import torch

import revdeq_kernels as rk
from helpers.solver_cases import (
    TanhCell,
    assert_grads_close,
    randn,
    saved_for_backward,
    single_threaded,  # noqa: F401 (an autouse fixture)
    unrolled,
)


def test_eval_mode_input_gradient_equals_unrolled_autograd_with_frozen_parameters():
    cell = TanhCell(dropout=0.5)  # dropout is off in eval, as in the oracle below
    deq = rk.RevDEQ(cell, beta=0.5, max_steps=6, tol=None).eval().requires_grad_(False)
    x = randn(3, 6, seed=1, requires_grad=True)
    z = deq(x)
    assert z.requires_grad
    got = torch.autograd.grad(z.sin().sum(), x)
    want = torch.autograd.grad(unrolled(cell, x, torch.zeros_like(x), 0.5, 6).sin().sum(), x)
    assert_grads_close(got, want, 1e-10, ["x"])
    assert deq.info["drift"] < 1e-9


def test_eval_mode_saves_the_same_bytes_for_8_and_64_steps():
    cell = TanhCell(dim=16)
    x = randn(4, 16, seed=1, requires_grad=True)
    saved = {}
    for steps in (8, 64):
        deq = rk.RevDEQ(cell, beta=0.5, max_steps=steps, tol=None).eval()
        z, saved[steps], _ = saved_for_backward(lambda d=deq: d(x))
        got = torch.autograd.grad(z.sum(), x)
        want = torch.autograd.grad(unrolled(cell, x, torch.zeros_like(x), 0.5, steps).sum(), x)
        assert_grads_close(got, want, 1e-9, [f"x ({steps} steps)"])
    params = sum(p.numel() * p.element_size() for p in cell.parameters())
    assert saved[8] == saved[64] == 2 * x.numel() * 8 + x.numel() * 8 + params  # y, z, x and the parameters


def test_eval_mode_under_no_grad_returns_a_plain_tensor():
    deq = rk.RevDEQ(TanhCell(), beta=0.5, max_steps=4, tol=None).eval()
    with torch.no_grad():
        z = deq(randn(3, 6, seed=1, requires_grad=True))
    assert not z.requires_grad and z.grad_fn is None
