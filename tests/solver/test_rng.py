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


def test_deterministic_f_costs_no_rng_snapshot_per_step(monkeypatch):
    # A snapshot copies the CPU generator (5 KB); once the first evaluation drew nothing, no more are taken.
    from revdeq_kernels.solver import rng

    taken = {"n": 0}
    real = rng.RngTape._snapshot

    def counting(self):
        taken["n"] += 1
        return real(self)

    monkeypatch.setattr(rng.RngTape, "_snapshot", counting)
    cell, x, _ = _dropout_case("cpu")
    cell.eval()
    z, _ = rk.reversible_fixed_point(cell, x, beta=0.5, max_steps=20, tol=None)
    assert taken["n"] <= 3, f"{taken['n']} RNG snapshots for 41 evaluations of a deterministic f"
    z.sum().backward()
    assert x.grad is not None


def test_f_that_starts_drawing_after_its_first_call_is_refused_in_the_forward():
    # Its later randomness was not recorded, so the backward could not replay it: an error, not a wrong gradient.
    cell, x, _ = _dropout_case("cpu")
    calls = {"n": 0}

    def f(z, x):
        calls["n"] += 1
        out = cell(z, x)
        return torch.nn.functional.dropout(out, 0.3) if calls["n"] > 1 else out

    cell.eval()
    with pytest.raises(RuntimeError, match=r"drew random numbers in a later evaluation but not in its first"):
        rk.reversible_fixed_point(f, x, params=list(cell.parameters()), beta=0.5, max_steps=4, tol=None)
    # Without a backward to follow there is nothing to replay: the same f runs.
    with torch.no_grad():
        rk.reversible_fixed_point(f, x, params=list(cell.parameters()), beta=0.5, max_steps=4, tol=None)
