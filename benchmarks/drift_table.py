"""Gradient error and reconstruction drift of the reversible solver: float32, float64 and exact states.

For a tanh layer f(z, x) = tanh(z W^T + x U^T + b) evaluated in float32 (the usual training
precision), across beta and the number of steps, it measures against float64 autograd through the
unrolled loop (the exact gradient of the same iteration, at the same effective beta):

    drift        max |reconstructed start - z0| / state scale, as the solver reports it
    reversible   relative gradient error of reversible_fixed_point (float32 f; states float32,
                 float64, or exact mode's int64 fixed point)
    stored       the same error for ordinary backprop through the unrolled loop with stored
                 activations at the same precision (exact rows: float64 states): the floor that
                 precision allows

Exact mode rounds beta to p / 2^m (0.5 = 1/2 and 0.8125 = 13/16 are exact; 0.8 becomes 205/256), and
its rows also record the remainder memory it held against what storing every state would take.
Gradient error is ||g - g_ref|| / ||g_ref|| over all of (x, W, U, b), the worst of a few seeds.
Runs on CPU in a few minutes (or on a GPU with --device cuda). Writes JSON stamped with device,
versions and commit, and prints a Markdown table with the three modes side by side:

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

BETAS = (0.5, 0.8, 0.8125)
STEPS = (4, 8, 16, 32, 64, 128, 256)
MODES = ("float32", "float64", "exact")  # the state representation
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


def reversible_grad(inputs, w, beta, steps, mode):
    """(gradients, drift, info) of reversible_fixed_point with float32 f and the given state mode."""
    x, W, U, b = leaves = [t.float().requires_grad_() for t in inputs]
    kwargs = {"exact": True} if mode == "exact" else {"state_dtype": getattr(torch, mode)}
    z, info = rk.reversible_fixed_point(lambda z, x: layer(z, x, W, U, b), x, beta=beta, max_steps=steps,
                                        tol=None, params=[W, U, b], **kwargs)
    grads = torch.autograd.grad((z.double() * w).sum(), leaves)
    try:
        return grads, info["drift"], info
    except FloatingPointError:  # the reconstruction overflowed: the solver names the step
        return grads, math.inf, info


def relative_error(got, want) -> float:
    """Relative error; inf where got holds non-finite values."""
    num = math.sqrt(sum((g.double() - r).square().sum().item() for g, r in zip(got, want)))
    den = math.sqrt(sum(r.square().sum().item() for r in want))
    return num / den


def finite_or_none(v: float):
    return v if math.isfinite(v) else None


def effective_beta(beta, mode) -> float:
    return rk.exact.dyadic_beta(beta).value if mode == "exact" else beta


def measure(device):
    rows = []
    reference = {}  # (beta, steps, seed, compute, state) -> gradient by autograd through the unrolled loop

    def unrolled_cached(inputs, w, seed, beta, steps, compute, state):
        key = (beta, steps, seed, compute, state)
        if key not in reference:
            reference[key] = unrolled_grad(inputs, w, beta, steps, compute, state)
        return reference[key]

    for beta in BETAS:
        for steps in STEPS:
            for mode in MODES:
                beta_eff = effective_beta(beta, mode)
                stored_state = torch.float32 if mode == "float32" else torch.float64
                drift, rev, stored, info = [], [], [], None
                for seed in SEEDS:
                    inputs, w = make_problem(seed, device)
                    exact = unrolled_cached(inputs, w, seed, beta_eff, steps, torch.float64, torch.float64)
                    grads, d, info = reversible_grad(inputs, w, beta, steps, mode)
                    drift.append(d)
                    rev.append(relative_error(grads, exact))
                    stored.append(relative_error(
                        unrolled_cached(inputs, w, seed, beta_eff, steps, torch.float32, stored_state), exact))
                row = {"beta": beta, "beta_effective": beta_eff, "steps": steps, "mode": mode,
                       "state_dtype": "int64" if mode == "exact" else mode, "f_dtype": "float32",
                       "drift": finite_or_none(max(drift)), "grad_error_reversible": finite_or_none(max(rev)),
                       "grad_error_stored": finite_or_none(max(stored))}
                if mode == "exact":
                    row.update(frac_bits=info["frac_bits"], remainder_bits=info["dyadic_beta"].m,
                               remainder_bytes=info["remainder_bytes"],
                               stored_states_bytes=info["stored_states_bytes"])
                rows.append(row)
                print(f"beta {beta} steps {steps} {mode}: drift {_fmt(row['drift'])}, grad error "
                      f"{_fmt(row['grad_error_reversible'])}", file=sys.stderr, flush=True)
    return rows


def _fmt(v):
    return "diverged" if v is None else ("0" if v == 0 else f"{v:.1e}")


def markdown(rows) -> str:
    """One line per (beta, steps), the three modes side by side."""
    by_key = {(r["beta"], r["steps"], r["mode"]): r for r in rows}
    lines = ["| beta | steps | drift, float32 | drift, float64 | drift, exact | grad error, float32 | "
             "grad error, float64 | grad error, exact | floor (stored activations, float32 f) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for beta in dict.fromkeys(r["beta"] for r in rows):
        for steps in dict.fromkeys(r["steps"] for r in rows):
            cells = {m: by_key.get((beta, steps, m)) for m in MODES}
            if any(c is None for c in cells.values()):
                continue
            exact = cells["exact"]
            label = f"{beta}" if exact["beta_effective"] == beta else f"{beta} (exact: {exact['beta_effective']})"
            lines.append(f"| {label} | {steps} | " + " | ".join(_fmt(cells[m]["drift"]) for m in MODES) + " | "
                         + " | ".join(_fmt(cells[m]["grad_error_reversible"]) for m in MODES)
                         + f" | {_fmt(cells['float64']['grad_error_stored'])} |")
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
                        "reference": "float64 autograd through the unrolled loop, same effective beta and steps",
                        "grad_error": "||g - g_ref|| / ||g_ref|| over (x, W, U, b), worst seed",
                        "drift": "info['drift'] after backward, worst seed; null where it overflowed",
                        "modes": "float32 / float64: state_dtype; exact: exact=True (int64 fixed point, "
                                 "frac_bits 32, beta rounded to p / 2^m: beta_effective)",
                        "grad_error_stored": "stored-activation backprop with float32 f and the row's float "
                                             "states (float64 states for exact rows)",
                        "exact_memory": "remainder_bytes: what exact mode held for the backward (m = "
                                        "remainder_bits per element per half-step); stored_states_bytes: "
                                        "both states after every step, 8 bytes each"},
              "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(markdown(rows))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
