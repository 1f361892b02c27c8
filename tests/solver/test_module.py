"""RevDEQ, the nn.Module: drop-in use, its info, and f's buffers surviving the backward."""

import copy

import torch

import revdeq_kernels as rk
from helpers.solver_cases import (
    TanhCell,
    assert_grads_close,
    randn,
    single_threaded,  # noqa: F401 (an autouse fixture)
    unrolled,
)


def test_revdeq_matches_the_unrolled_loop_and_keeps_the_last_info():
    cell = TanhCell()
    deq = rk.RevDEQ(cell, beta=0.8, max_steps=5, tol=None)
    x = randn(3, 6, seed=1, requires_grad=True)
    inputs = [x, *deq.parameters()]
    want = torch.autograd.grad(unrolled(cell, x, torch.zeros_like(x), 0.8, 5).sum(), inputs)
    z = deq(x)
    assert deq.info["steps"] == 5 and deq.info["drift"] is None
    got = torch.autograd.grad(z.sum(), inputs)
    assert_grads_close(got, want, 1e-10, ["x", "W", "U", "b"])
    assert 0 < deq.info["drift"] < 1e-10
    assert "beta=0.8, max_steps=5, tol=None" in repr(deq)


def test_revdeq_with_z0_of_another_shape_and_tuple_x():
    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(4, 6, dtype=torch.float64)
            self.rec = torch.nn.Linear(6, 6, dtype=torch.float64)

        def forward(self, z, xs):
            a, scale = xs
            return torch.tanh(0.5 * self.rec(z) + self.inp(a) * scale)

    deq = rk.RevDEQ(Cell(), beta=0.5, max_steps=30, tol=1e-6)
    a, scale = randn(3, 4, seed=1, requires_grad=True), torch.tensor(2.0, dtype=torch.float64)
    z = deq((a, scale), z0=torch.zeros(3, 6, dtype=torch.float64))
    assert z.shape == (3, 6) and deq.info["residual"] <= 1e-6 and deq.info["steps"] < 30
    z.sum().backward()
    assert a.grad.abs().sum() > 0 and deq.f.rec.weight.grad.abs().sum() > 0


class _NormCell(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = TanhCell()
        self.norm = torch.nn.BatchNorm1d(6, dtype=torch.float64)
        self.calls = 0

    def forward(self, z, x):
        self.calls += 1
        return self.norm(self.cell(z, x))


def test_batchnorm_buffers_are_not_updated_by_the_backward():
    f = _NormCell().train()
    reference = copy.deepcopy(f)
    x = randn(8, 6, seed=1, requires_grad=True)
    deq = rk.RevDEQ(f, beta=0.5, max_steps=4, tol=None)
    z = deq(x)
    after_forward = {k: v.clone() for k, v in f.named_buffers()}
    assert after_forward["norm.num_batches_tracked"] == 2 * 4 + 1  # the forward's evaluations count
    calls = f.calls
    z.square().sum().backward()
    assert f.calls == calls + 2 * 4, "the backward re-evaluates f"
    for name, value in f.named_buffers():
        assert torch.equal(value, after_forward[name]), f"{name} changed during the backward"
    # Train-mode BatchNorm normalises with batch statistics, so the gradient is still exact.
    inputs = [x, *reference.parameters()]
    want = torch.autograd.grad(unrolled(reference, x, torch.zeros_like(x), 0.5, 4).square().sum(), inputs)
    assert_grads_close([x.grad, *(p.grad for p in f.parameters())], want, 1e-10,
                       ["x", "W", "U", "b", "norm.weight", "norm.bias"])


def test_swapping_revdeq_into_an_existing_model():
    # The README's example, kept honest.
    class Model(torch.nn.Module):
        def __init__(self, dim=16, classes=3):
            super().__init__()
            self.embed = torch.nn.Linear(8, dim)
            self.deq = rk.RevDEQ(Block(dim))  # was: nn.ModuleList([Block(dim) for _ in range(depth)])
            self.head = torch.nn.Linear(dim, classes)

        def forward(self, x):
            return self.head(self.deq(self.embed(x)))

    class Block(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.lin = torch.nn.Linear(dim, dim)
            self.norm = torch.nn.LayerNorm(dim)

        def forward(self, z, x):
            return self.norm(0.5 * torch.tanh(self.lin(z)) + x)

    torch.manual_seed(0)
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in model.parameters())
    info = model.deq.info
    print(info)
    assert info["residual"] <= 1e-3 and info["steps"] < 30 and info["drift"] < 1e-9
