"""Fixed-step mode (tol=None) allocates nothing per step beyond what f itself allocates (C++ CPU backend).

Counted with torch.profiler's memory events: the ops that allocated, per step, from the difference between a
solve of 2N steps and one of N (so start-up and the step-1 recompute cancel out), against f's own allocations:
per forward step two evaluations without grad, per backward step two with grad and their vector-Jacobian
products. This is what capturing the loop in a CUDA graph needs (on GPUs the residual's workspace still
allocates: README, Performance).
"""

from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import revdeq_kernels as rk
from helpers.solver_cases import single_threaded  # noqa: F401 (an autouse fixture)
from revdeq_kernels.backends import compiled

pytestmark = pytest.mark.skipif(not compiled.loaded(), reason="the C++ kernels are not built")

N = 6


def _allocating_ops(run) -> Counter:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return Counter(e.name for e in prof.events() if e.self_cpu_memory_usage > 0)


def _cell(dim=16):
    torch.manual_seed(0)
    lin = torch.nn.Linear(dim, dim)
    x = torch.randn(4, dim, requires_grad=True)
    return lin, (lambda z, x: torch.tanh(lin(z) + x)), x


@pytest.mark.parametrize(("state_dtype", "exact"), [(torch.float64, False), (torch.float32, False),
                                                     (torch.float64, True), (torch.float32, True)],
                         ids=["float64", "float32", "exact", "exact-float32-adjoints"])
def test_steps_allocate_only_what_f_allocates(state_dtype, exact):
    lin, f, x = _cell()
    params = list(lin.parameters())

    def solve(steps):
        z, _ = rk.reversible_fixed_point(f, x, params=params, beta=0.5, max_steps=steps, tol=None, backend="cpp",
                                         state_dtype=state_dtype, exact=exact)
        z.sum().backward()

    solve(2)  # warm-up: lazy initialisation anywhere is not a per-step cost
    per_step = _allocating_ops(lambda: solve(2 * N)) - _allocating_ops(lambda: solve(N))
    per_step = Counter({op: count / N for op, count in per_step.items()})

    z = torch.randn(4, 16)

    def f_alone():
        with torch.no_grad():
            f(z, x)
            f(z, x)
        for _ in range(2):
            zl = z.clone().requires_grad_()
            out = f(zl, x.detach().requires_grad_())
            torch.autograd.grad(out, [zl, *params], torch.ones_like(out))

    zl_clone = Counter({"aten::clone": 2, "aten::ones_like": 2, "aten::empty_like": 2})  # f_alone's own set-up
    own = _allocating_ops(f_alone) - zl_clone
    extra = {op: n for op, n in per_step.items() if n > own.get(op, 0)}
    assert not extra, f"allocations per step beyond f's own: {extra} (f: {dict(own)})"
