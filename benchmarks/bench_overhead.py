"""What the solver adds around f: a training step's forward + backward against a minimal reversible loop.

For f = tanh(Linear(d) z + x) from tiny to wide, batch B, a fixed number of steps (``tol=None``), one
thread on CPU, it times forward + backward of:

- ``revdeq``: :func:`revdeq_kernels.reversible_fixed_point`, float64 states (the default);
- ``revdeq_f32``: the same with float32 states;
- ``revdeq_exact``: exact mode (int64 fixed-point states, bit-exact reversal);
- ``minimal``: the naive baseline the mission names, written plainly below: a reversible loop in plain
  PyTorch with float64 states, the backward inverting the steps and calling ``torch.autograd.grad`` once
  per evaluation, without any check, diagnostic or fused op;
- ``unrolled``: autograd through the unrolled loop (stores every activation).

The ratio ``revdeq / minimal`` is the library's own overhead (goal: <= 1.05 on tiny f; issue 18).

Writes ``benchmarks/results/overhead-<device>.json`` and a PNG. Run: ``python -m benchmarks overhead
[--quick] [--dims 16,128,512] [--steps 32]``.
"""

import argparse
import os

import torch

import revdeq_kernels as rk

from . import common

NAME = "overhead"
SCHEMA = "revdeq-bench-overhead/1"
DEFAULTS = {"dims": "16,64,256,1024", "steps": 32, "batch": 4}
QUICK = {"dims": "16,256", "steps": 16, "batch": 4}
METHODS = ("revdeq", "revdeq_f32", "revdeq_exact", "minimal", "unrolled")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dims", default=None, help=f"state widths d (default {DEFAULTS['dims']})")
    parser.add_argument("--steps", type=int, default=None, help=f"RevDEQ steps (default {DEFAULTS['steps']})")
    parser.add_argument("--batch", type=int, default=None, help=f"batch size (default {DEFAULTS['batch']})")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per method and width")


def minimal_reversible(f, x, params, steps: int, beta: float):
    """The plain reversible loop (float64 states, f in x's dtype): returns z with the exact gradient of the
    unrolled loop, by reconstructing the states backward. No checks, no diagnostics, no fused ops."""

    class Minimal(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, *params):
            y = z = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
            with torch.no_grad():
                for _ in range(steps):
                    y = (1 - beta) * y + beta * f(z.to(x.dtype), x).double()
                    z = (1 - beta) * z + beta * f(y.to(x.dtype), x).double()
            ctx.save_for_backward(y, z, x, *params)
            return z.to(x.dtype, copy=True)  # not z itself: z is saved and reconstructed in place of it

        @staticmethod
        def backward(ctx, grad_z):
            y, z, x, *ps = ctx.saved_tensors
            hz, hy = beta * grad_z.double(), torch.zeros_like(y)
            gx, gp = torch.zeros_like(x), [torch.zeros_like(p) for p in ps]
            with torch.enable_grad():
                for _ in range(steps):
                    yi = y.to(x.dtype).detach().requires_grad_()
                    fy = f(yi, x)
                    z = (z - beta * fy.detach().double()) / (1 - beta)
                    a, ax, *ap = torch.autograd.grad(fy, [yi, x, *ps], hz.to(fy.dtype))
                    hy = (1 - beta) * hy + beta * a.double()
                    zi = z.to(x.dtype).detach().requires_grad_()
                    fz = f(zi, x)
                    y = (y - beta * fz.detach().double()) / (1 - beta)
                    b, bx, *bp = torch.autograd.grad(fz, [zi, x, *ps], hy.to(fz.dtype))
                    hz = (1 - beta) * hz + beta * b.double()
                    gx += ax + bx
                    for g, u, v in zip(gp, ap, bp):
                        g += u + v
            return (gx, *gp)

    return Minimal.apply(x, *params)


def _cell(dim: int, device):
    torch.manual_seed(0)
    lin = torch.nn.Linear(dim, dim, device=device)
    with torch.no_grad():
        lin.weight.mul_(0.5)
    return lin, (lambda z, x: torch.tanh(lin(z) + x))


def _step(method: str, f, lin, x, steps: int, beta: float):
    params = list(lin.parameters())
    if method == "minimal":
        z = minimal_reversible(f, x, params, steps, beta)
    elif method == "unrolled":
        y = z = torch.zeros_like(x)
        for _ in range(steps):
            y = (1 - beta) * y + beta * f(z, x)
            z = (1 - beta) * z + beta * f(y, x)
    else:
        kwargs = {"revdeq_f32": dict(state_dtype=torch.float32), "revdeq_exact": dict(exact=True)}.get(method, {})
        z, _ = rk.reversible_fixed_point(f, x, params=params, beta=beta, max_steps=steps, tol=None, **kwargs)
    return torch.autograd.grad(z.square().sum(), [x, *params])


def run(args) -> str:
    device = common.resolve_device(args.device)
    common.set_threads(args.threads if args.threads is not None else 1 if device.type == "cpu" else None)
    defaults = QUICK if args.quick else DEFAULTS
    dims = common.parse_positive_ints("--dims", args.dims or defaults["dims"])
    steps = args.steps or defaults["steps"]
    batch = args.batch or defaults["batch"]
    beta = 0.5 if args.beta is None else args.beta
    env = common.environment(device)
    common.say(f"overhead benchmark on {env['device_name']} ({device.type}): d = {dims}, {steps} steps, batch {batch}")
    common.warn_if_busy()
    results, check = [], {}
    for dim in dims:
        lin, f = _cell(dim, device)
        x = torch.randn(batch, dim, device=device, requires_grad=True)
        # The minimal loop computes the same gradient as the library (float64 states, beta 1/2).
        got, want = _step("revdeq", f, lin, x, steps, beta), _step("minimal", f, lin, x, steps, beta)
        check[dim] = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(got, want))
        # Sampled in turn (one sample of each method, then the next round): load from elsewhere hits all
        # methods alike, so their ratios hold on a busy machine.
        jobs = [common.Job(lambda i, m=method, f=f, lin=lin, x=x: _step(m, f, lin, x, steps, beta), 1)
                for method in METHODS]
        timed = common.time_jobs(jobs, device, min_time=args.min_time, min_samples=15)
        times = dict(zip(METHODS, timed))
        for method, t in times.items():
            results.append({"dim": dim, "method": method, "steps": steps, "batch": batch, **t,
                            "per_step_us": t["median_s"] / steps * 1e6})
        for r in results[-len(METHODS):]:
            r["vs_minimal"] = r["median_s"] / times["minimal"]["median_s"]
            r["vs_unrolled"] = r["median_s"] / times["unrolled"]["median_s"]
    payload = common.payload(SCHEMA, NAME, env, args.quick, {
        "dims": dims, "steps": steps, "batch": batch, "beta": beta, "f": "tanh(Linear(d, d) z + x), float32",
        "timed": "forward + backward (torch.autograd.grad of z.square().sum() w.r.t. x and f's parameters)",
        "minimal": "benchmarks/bench_overhead.py minimal_reversible: plain PyTorch, float64 states, no checks",
    }, results=results, gradient_check={str(k): v for k, v in check.items()})
    path = args.output or common.result_path(NAME, device, args.quick, args.out)
    return common.publish(payload, path, format_table(payload), None if args.no_plots else lambda p, fp: [plot(p, fp)])


def format_table(payload: dict) -> str:
    cfg = payload["config"]
    lines = [f"Solver overhead on {payload['env']['device_name']}: f = {cfg['f']}, batch {cfg['batch']}, "
             f"{cfg['steps']} steps, forward + backward (median; x the minimal reversible loop / x unrolled):", "",
             "| d | " + " | ".join(METHODS) + " |", "|---:|" + "---:|" * len(METHODS)]
    for dim in cfg["dims"]:
        rows = {r["method"]: r for r in payload["results"] if r["dim"] == dim}
        cells = [f"{rows[m]['median_s'] * 1e3:.2f} ms ({rows[m]['vs_minimal']:.2f}x / {rows[m]['vs_unrolled']:.2f}x)"
                 for m in METHODS]
        lines.append(f"| {dim} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(payload: dict, json_path: str) -> str:
    from .plots import _pyplot

    plt = _pyplot()
    cfg = payload["config"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in METHODS:
        rows = [r for r in payload["results"] if r["method"] == method]
        ax.plot([r["dim"] for r in rows], [r["vs_minimal"] for r in rows], "o-", label=method)
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("state width d")
    ax.set_ylabel("time / minimal reversible loop")
    ax.set_title(f"forward + backward, {cfg['steps']} steps, batch {cfg['batch']} ({payload['env']['device_name']})",
                 fontsize=9)
    ax.legend(fontsize=8)
    png = os.path.splitext(json_path)[0] + ".png"
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
