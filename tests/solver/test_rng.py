"""Stochastic f (dropout): the backward replays each evaluation's RNG state, as torch.utils.checkpoint does."""

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


def _dropout_case(device):
    cell = TanhCell(dim=8, dropout=0.3).to(device)
    x = randn(5, 8, seed=1).to(device).requires_grad_()
    return cell, x, [x, *cell.parameters()]


def _check_replayed_gradient(device):
    cell, x, inputs = _dropout_case(device)
    weight = randn(5, 8, seed=2).to(device)
    # The solver evaluates f in the unrolled loop's order (f(z0), f(y1), f(z1), ...), so with the same
    # seed both see the same dropout masks.
    torch.manual_seed(123)
    want = torch.autograd.grad((unrolled(cell, x, torch.zeros_like(x), 0.5, 6) * weight).sum(), inputs)
    torch.manual_seed(123)
    z, info = rk.reversible_fixed_point(cell, x, beta=0.5, max_steps=6, tol=None)
    assert z.grad_fn.tape.stochastic, "dropout draws random numbers: the tape must keep the states"
    got = torch.autograd.grad((z * weight).sum(), inputs)
    assert_grads_close(got, want, 1e-10, ["x", "W", "U", "b"])
    # Without replay the backward would rebuild the states with other masks and drift by O(1).
    assert info["drift"] < 1e-12


def test_dropout_masks_are_replayed_in_the_backward_cpu():
    _check_replayed_gradient("cpu")


@pytest.mark.gpu
def test_dropout_masks_are_replayed_in_the_backward_cuda():
    _check_replayed_gradient("cuda")


def test_backward_leaves_the_callers_rng_stream_where_the_forward_left_it():
    cell, x, _ = _dropout_case("cpu")
    torch.manual_seed(5)
    z, _ = rk.reversible_fixed_point(cell, x, beta=0.5, max_steps=4, tol=None)
    after_forward = torch.get_rng_state()
    z.sum().backward()
    assert torch.equal(torch.get_rng_state(), after_forward)


def test_deterministic_f_keeps_no_rng_states():
    cell, x, _ = _dropout_case("cpu")
    cell.eval()  # dropout off: no random numbers drawn
    z, _ = rk.reversible_fixed_point(cell, x, beta=0.5, max_steps=4, tol=None)
    assert not z.grad_fn.tape.stochastic
    z.sum().backward()
