"""Check the reversible gradient against autograd through the unrolled loop, in float64.

For each beta and number of steps, solve ``z = tanh(W z + U x + b)`` with the reversible solver (which
stores no activations), differentiate a loss with respect to x, z0 and the parameters, and compare with
plain autograd through the same iteration unrolled step by step. With torchdeq installed the torchdeq core
(``core="revdeq"``) is checked the same way. Exits with status 1 if any relative error exceeds 1e-9.

    python examples/grad_check.py                       # the table
    python examples/grad_check.py --json results.json   # and the rows as JSON
"""

import argparse
import json
import sys

import torch

import revdeq_kernels as rk

TOLERANCE = 1e-9


class Cell(torch.nn.Module):
    def __init__(self, dim: int, generator: torch.Generator):
        super().__init__()
        self.W = torch.nn.Parameter(0.5 * torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim ** 0.5)
        self.U = torch.nn.Parameter(torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim ** 0.5)
        self.b = torch.nn.Parameter(0.1 * torch.randn(dim, generator=generator, dtype=torch.float64))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def unrolled(f, x, z0, beta, steps):
    """z after ``steps`` RevDEQ steps with autograd through every one: the reference."""
    y = z = z0
    for _ in range(steps):
        y = (1 - beta) * y + beta * f(z, x)
        z = (1 - beta) * z + beta * f(y, x)
    return z


def relative_error(got, want) -> float:
    return max(((g - w).abs().max() / w.abs().max().clamp_min(1e-300)).item() for g, w in zip(got, want))


def check_solver(beta: float, steps: int, dim: int = 16, batch: int = 8) -> tuple:
    """(max relative gradient error, drift) of reversible_fixed_point against the unrolled loop."""
    g = torch.Generator().manual_seed(steps * 100 + int(beta * 10))
    cell = Cell(dim, g)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64, requires_grad=True)
    z0 = torch.randn(batch, dim, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    wrt = [x, z0, *cell.parameters()]
    z, info = rk.reversible_fixed_point(cell, x, z0=z0, beta=beta, max_steps=steps, tol=None)
    got = torch.autograd.grad((z * weight).sum(), wrt)
    want = torch.autograd.grad((unrolled(cell, x, z0, beta, steps) * weight).sum(), wrt)
    return relative_error(got, want), info["drift"]


def check_torchdeq_core(beta: float, steps: int, dim: int = 16, batch: int = 8):
    """The same through ``get_deq(core="revdeq")`` with a torchdeq-style closure; None without torchdeq."""
    try:
        from torchdeq import get_deq

        import revdeq_kernels.integrations.torchdeq  # noqa: F401 (registers core="revdeq")
    except ImportError:
        return None
    g = torch.Generator().manual_seed(7)
    cell = Cell(dim, g)
    encoder = torch.nn.Linear(dim, dim, dtype=torch.float64)
    inp = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    wrt = [*cell.parameters(), *encoder.parameters()]
    deq = get_deq(core="revdeq", f_max_iter=2 * steps, f_tol=None, beta=beta)
    x = encoder(inp)
    z_out, info = deq(lambda z: cell(z, x), torch.zeros_like(x))
    got = torch.autograd.grad(z_out[-1].square().sum(), wrt)
    x = encoder(inp)
    want = torch.autograd.grad(unrolled(cell, x, torch.zeros_like(x), beta, steps).square().sum(), wrt)
    return relative_error(got, want), info.solver_info["drift"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("Reversible gradient vs autograd through the unrolled loop (float64; relative error = max |diff| / max |ref|"
          " over x, z0 and the parameters)")
    print(f"{'solver':22s} {'beta':>5s} {'steps':>5s} {'rel. error':>11s} {'drift':>10s}")
    worst = 0.0
    # Rounding grows by 1/|1-beta| per half-step in the reconstruction: beta 0.8 stays exact to ~8 steps in
    # float64, beta 0.5 to ~20 (benchmarks/drift_table.py measures where gradients stop being exact).
    rows = [("reversible_fixed_point", beta, steps, *check_solver(beta, steps))
            for beta, steps in ((0.5, 4), (0.5, 16), (0.8, 4), (0.8, 8))]
    core = check_torchdeq_core(0.5, 8)
    if core is not None:
        rows.append(('torchdeq core="revdeq"', 0.5, 8, *core))
    for name, beta, steps, err, drift in rows:
        worst = max(worst, err)
        print(f"{name:22s} {beta:5.1f} {steps:5d} {err:11.2e} {drift:10.1e}")
    if core is None:
        print("(torchdeq is not installed: the torchdeq core was not checked)")
    if args.json:
        keys = ("solver", "beta", "steps", "relative_error", "drift")
        with open(args.json, "w") as f:
            json.dump({"tolerance": TOLERANCE, "torch": torch.__version__, "dtype": "float64",
                       "rows": [dict(zip(keys, row)) for row in rows]}, f, indent=1)
    verdict = "OK" if worst <= TOLERANCE else "FAILED"
    print(f"gradient check {verdict}: worst relative error {worst:.2e} (tolerance {TOLERANCE:.0e})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
