"""O(1) memory: what the solver keeps for backward does not depend on the number of steps."""

import pytest
import torch

import revdeq_kernels as rk
from helpers.solver_cases import (
    TanhCell,
    randn,
    saved_for_backward,
    single_threaded,  # noqa: F401 (an autouse fixture)
    unrolled,
)


def test_saved_bytes_do_not_depend_on_max_steps():
    cell = TanhCell(dim=32)
    x = randn(16, 32, seed=1, requires_grad=True)
    results = {}
    for steps in (8, 64):
        z, nbytes, count = saved_for_backward(lambda s=steps: rk.reversible_fixed_point(cell, x, beta=0.5, max_steps=s,
                                                                                 tol=None)[0])
        results[steps] = (nbytes, count)
        z.sum().backward()  # the saved states are usable: the backward runs
    print("reversible: bytes, tensors saved:", results)
    assert results[8] == results[64]
    # What is saved: the two float64 states, x and the three parameters, nothing per step.
    state = 16 * 32 * 8
    params = sum(p.numel() * p.element_size() for p in cell.parameters())
    assert results[8][0] == 2 * state + x.numel() * 8 + params


def test_the_unrolled_loop_saves_bytes_in_proportion_to_steps():
    # The same counter sees autograd's own growth, so the test above would notice a leak.
    cell = TanhCell(dim=32)
    x = randn(16, 32, seed=1, requires_grad=True)
    counts = {s: saved_for_backward(lambda s=s: unrolled(cell, x, torch.zeros_like(x), 0.5, s))[1] for s in (8, 64)}
    print("unrolled: bytes saved:", counts)
    assert counts[64] > 7 * counts[8]


def _training_step_peak(step, device, steps):
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step(steps)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


@pytest.mark.gpu
def test_gpu_peak_memory_of_a_training_step_is_flat_in_steps():
    device = torch.device("cuda")
    torch.manual_seed(0)
    dim, batch = 1024, 512
    cell = TanhCell(dim=dim, dtype=torch.float32).to(device)
    x = torch.randn(batch, dim, device=device, requires_grad=True)

    def reversible(steps):
        z, _ = rk.reversible_fixed_point(cell, x, beta=0.5, max_steps=steps, tol=None)
        z.square().mean().backward()

    def stored(steps):
        unrolled(cell, x, torch.zeros_like(x), 0.5, steps).square().mean().backward()

    for step in (reversible, stored):  # warm up allocator and kernels
        step(2)
    peaks = {(name, s): _training_step_peak(step, device, s)
             for name, step in (("reversible", reversible), ("unrolled", stored)) for s in (4, 32)}
    print({k: f"{v / 2**20:.1f} MiB" for k, v in peaks.items()})
    assert peaks["reversible", 32] <= 1.10 * peaks["reversible", 4]
    assert peaks["unrolled", 32] > 3 * peaks["unrolled", 4]
