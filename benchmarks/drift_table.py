"""Gradient error and reconstruction drift of the reversible solver: float32 vs float64 states.

For a tanh layer f(z, x) = tanh(z W^T + x U^T + b) evaluated in float32 (the usual training
precision), across beta and the number of steps, it measures against float64 autograd through the
unrolled loop (the exact gradient of the same iteration):

    drift        max |reconstructed start - z0| / state scale, as the solver reports it
    reversible   relative gradient error of reversible_fixed_point (float32 f, given state dtype)
    stored       the same error for ordinary backprop through the unrolled loop with stored
                 activations at the same precision: the floor that precision allows

Gradient error is ||g - g_ref|| / ||g_ref|| over all of (x, W, U, b), the worst of a few seeds.
Runs on CPU in seconds (or on a GPU with --device cuda). Writes JSON stamped with device, versions
and commit, and prints a Markdown table:

    python benchmarks/drift_table.py [--device cpu] [--threads N] [--out benchmarks/results/drift_table.json]
"""

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import warnings

import torch

import revdeq_kernels as rk

BETAS = (0.5, 0.8)
STEPS = (4, 8, 16, 32, 64)
STATE_DTYPES = (torch.float64, torch.float32)
DIM, BATCH, SEEDS = 128, 64, (0, 1, 2)


def make_problem(seed, device):
    """float64 master copies of the weights, x and the loss weights for one seed."""
    g = torch.Generator().manual_seed(seed)
    W = 0.9 * torch.randn(DIM, DIM, generator=g, dtype=torch.float64) / DIM ** 0.5
    U = torch.randn(DIM, DIM, generator=g, dtype=torch.float64) / DIM ** 0.5
    b = 0.1 * torch.randn(DIM, generator=g, dtype=torch.float64)
    x = torch.randn(BATCH, DIM, generator=g, dtype=torch.float64)
    w = torch.randn(BATCH, DIM, generator=g, dtype=torch.float64)
    return [t.to(device) for t in (x, W, U, b)], w.to(device)


def layer(z, x, W, U, b):
    return torch.tanh(z @ W.T + x @ U.T + b)


def unrolled_grad(inputs, w, beta, steps, compute, state):
    """Gradient of sum(w * z[steps]) by autograd through the unrolled loop (stored activations)."""
    x, W, U, b = leaves = [t.to(compute).requires_grad_() for t in inputs]
    y = z = torch.zeros_like(x, dtype=state)
    for _ in range(steps):
        y = (1 - beta) * y + beta * layer(z.to(compute), x, W, U, b).to(state)
        z = (1 - beta) * z + beta * layer(y.to(compute), x, W, U, b).to(state)
    return torch.autograd.grad((z * w.to(state)).sum(), leaves)


def reversible_grad(inputs, w, beta, steps, state):
    x, W, U, b = leaves = [t.float().requires_grad_() for t in inputs]
    z, info = rk.reversible_fixed_point(lambda z, x: layer(z, x, W, U, b), x, beta=beta, max_steps=steps,
                                        tol=None, params=[W, U, b], state_dtype=state)
    grads = torch.autograd.grad((z.double() * w).sum(), leaves)
    try:
        return grads, info["drift"]
    except FloatingPointError:  # the reconstruction overflowed: the solver names the step
        return grads, math.inf


def relative_error(got, want) -> float:
    """Relative error; inf where got holds non-finite values."""
    num = math.sqrt(sum((g.double() - r).square().sum().item() for g, r in zip(got, want)))
    den = math.sqrt(sum(r.square().sum().item() for r in want))
    return num / den


def finite_or_none(v: float):
    return v if math.isfinite(v) else None


def measure(device):
    rows = []
    for beta in BETAS:
        for steps in STEPS:
            for state in STATE_DTYPES:
                drift, rev, stored = [], [], []
                for seed in SEEDS:
                    inputs, w = make_problem(seed, device)
                    exact = unrolled_grad(inputs, w, beta, steps, torch.float64, torch.float64)
                    grads, d = reversible_grad(inputs, w, beta, steps, state)
                    drift.append(d)
                    rev.append(relative_error(grads, exact))
                    stored.append(relative_error(unrolled_grad(inputs, w, beta, steps, torch.float32, state), exact))
                rows.append({"beta": beta, "steps": steps, "state_dtype": str(state).replace("torch.", ""),
                             "f_dtype": "float32", "drift": finite_or_none(max(drift)),
                             "grad_error_reversible": finite_or_none(max(rev)),
                             "grad_error_stored": finite_or_none(max(stored))})
    return rows


def _fmt(v):
    return "diverged" if v is None else f"{v:.1e}"


def markdown(rows) -> str:
    lines = ["| beta | steps | states | drift | grad error, reversible | grad error, stored activations |",
             "|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['beta']} | {r['steps']} | {r['state_dtype']} | {_fmt(r['drift'])} | "
                     f"{_fmt(r['grad_error_reversible'])} | {_fmt(r['grad_error_stored'])} |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            models = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        return f"{models[0]} ({os.cpu_count()} cores)"
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


def stamp(device) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": f"{device.type}: {name}", "torch": torch.__version__, "python": sys.version.split()[0],
            "revdeq_kernels": rk.__version__, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "drift_table.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the drift warning is what this script measures
        rows = measure(device)
    result = {"meta": stamp(device),
              "setup": {"f": "tanh(z W^T + x U^T + b), W ~ 0.9 N(0, 1/dim), float32", "dim": DIM, "batch": BATCH,
                        "seeds": list(SEEDS), "loss": "sum(w * z), w ~ N(0, 1)",
                        "reference": "float64 autograd through the unrolled loop, same beta and steps",
                        "grad_error": "||g - g_ref|| / ||g_ref|| over (x, W, U, b), worst seed",
                        "drift": "info['drift'] after backward, worst seed; null where it overflowed"},
              "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(markdown(rows))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
