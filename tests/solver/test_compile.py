"""torch.compile and RevDEQ: one graph break at the solver by design, no recompilation, f compiled on request.

The solver is host-controlled (its loop, checks and error messages depend on values), so dynamo does not
trace into it: a compiled model graph-breaks once at the solve and compiles the rest once. To compile f
itself, pass torch.compile(f). Counted with dynamo's CompileCounter backend (no code generation, so CI
stays fast); gradients must equal the eager ones exactly.
"""

import pytest
import torch

import revdeq_kernels as rk
from helpers.solver_cases import TanhCell, randn

CompileCounter = pytest.importorskip("torch._dynamo.testing").CompileCounter


def _model(cell):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6, dtype=torch.float64),
                               rk.RevDEQ(cell, beta=0.5, max_steps=6, tol=1e-8),
                               torch.nn.Linear(6, 2, dtype=torch.float64))


def _grads(model, x):
    return torch.autograd.grad(model(x).square().sum(), list(model.parameters()))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_a_compiled_model_with_a_revdeq_compiles_once_and_matches_eager():
    model = _model(TanhCell())
    x = randn(3, 4, seed=1)
    want = _grads(model, x)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    got = _grads(compiled, x)
    frames = counter.frame_count
    for _ in range(3):
        got = _grads(compiled, x)
    assert counter.frame_count == frames <= 3, counter.frame_count  # no recompilation after the first call
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("steps", [3, 12])
def test_revdeq_of_a_compiled_f_runs_f_compiled_without_recompiling_per_step(steps):
    cell = TanhCell()
    counter = CompileCounter()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6, dtype=torch.float64),
                                rk.RevDEQ(torch.compile(cell, backend=counter), beta=0.5, max_steps=steps, tol=None),
                                torch.nn.Linear(6, 2, dtype=torch.float64))
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(4, 6, dtype=torch.float64),
                                rk.RevDEQ(TanhCell(), beta=0.5, max_steps=steps, tol=None),
                                torch.nn.Linear(6, 2, dtype=torch.float64))
    x = randn(3, 4, seed=1)
    for _ in range(3):
        got = _grads(model, x)
    # One compilation per way the solver calls f (the forward's, the first call's graph check, the
    # backward's with inputs that require grad), whatever the depth: never once per step.
    assert 1 <= counter.frame_count <= 3, counter.frame_count
    assert counter.op_count > 0
    for g, w in zip(got, _grads(eager, x)):
        assert torch.allclose(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_around_a_block_with_a_revdeq_gives_the_same_gradients(use_reentrant):
    # The checkpointed block re-runs its forward (the whole solve) in the backward; dropout in f is
    # replayed by both checkpoint's RNG handling and the solver's tape.
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(4, 6, dtype=torch.float64),
                                rk.RevDEQ(TanhCell(dropout=0.2), beta=0.5, max_steps=6, tol=1e-8))
    head = torch.nn.Linear(6, 2, dtype=torch.float64)
    params = [*block.parameters(), *head.parameters()]
    x = randn(3, 4, seed=1, requires_grad=True)  # the reentrant variant needs an input that requires grad
    torch.manual_seed(5)
    head(block(x)).square().sum().backward()
    want = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    torch.manual_seed(5)
    head(checkpoint(block, x, use_reentrant=use_reentrant)).square().sum().backward()
    for p, w in zip(params, want):
        assert torch.equal(p.grad, w)
