"""Training with and without Jacobian regularisation: how many solver steps the forward needs, and why.

A small DEQ classifier (``benchmarks/classify.py``: encoder, ``RevDEQ(tanh(W z + b + x))``, linear
head) is trained on the same data, from the same initialisation and batch order, once per penalty
weight ``gamma`` (``0`` is no regularisation), with

    loss = cross_entropy + gamma * deq.info["jac_penalty"]      (RevDEQ(..., jac_reg=True))

After each epoch (and before the first) the test set is solved once and measured with the library's
own diagnostics: the forward steps to reach ``tol`` and the residual after every step
(``info["residual_trace"]``), ``||df/dz||_F^2 / dim`` at the equilibrium (``jacobian_penalty`` with 32
probes) and the spectral radius of ``df/dz`` there (``spectral_radius``), and the test accuracy. During
training it records the mean and largest forward steps per batch, the reconstruction drift the
backward reports, and the wall time per epoch.

Writes ``benchmarks/results/jacobian-<device>.json`` and a PNG of six panels drawn from it.

Run: ``python -m benchmarks jacobian [--quick] [--data digits] [--gammas 0,1,4] [--epochs 15]``.
"""

import argparse
import os
import time
import warnings

import torch

import revdeq_kernels as rk

from . import classify, common

NAME = "jacobian"
SCHEMA = "revdeq-bench-jacobian/1"
EVAL_PROBES = 32  # Hutchinson probes for the test-set measurement of ||df/dz||_F^2 / dim
DEFAULTS = {"epochs": 15, "gammas": "0,1,4"}
QUICK = {"epochs": 2, "gammas": "0,4"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=classify.DATASETS, default="auto",
                        help="digits (needs scikit-learn), synthetic, or auto: digits when available")
    parser.add_argument("--gammas", default=None,
                        help=f"comma-separated penalty weights, 0 = none (default {DEFAULTS['gammas']}; "
                             f"--quick {QUICK['gammas']})")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs per gamma (default {DEFAULTS['epochs']}; --quick {QUICK['epochs']})")
    parser.add_argument("--width", type=int, default=64, help="state size of the DEQ cell")
    parser.add_argument("--batch", type=int, default=64, help="training batch size")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--beta", type=float, default=0.5, help="RevDEQ relaxation")
    parser.add_argument("--max-steps", type=int, default=50, help="RevDEQ max_steps")
    parser.add_argument("--tol", type=float, default=1e-3, help="RevDEQ relative residual tolerance")
    parser.add_argument("--jac-samples", type=int, default=1, help="Hutchinson probes per training step")
    parser.add_argument("--radius-iters", type=int, default=60,
                        help="Arnoldi steps for the spectral radius of the test set's (block-diagonal) Jacobian")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=None, help="use only this many training examples")


def default_path(device: torch.device, quick: bool, out_dir: str | None) -> str:
    return common.result_path(NAME, device, quick, out_dir)


def _gammas(text: str) -> list:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--gammas: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (v >= 0) for v in values):
        raise ValueError(f"--gammas: expected one or more numbers >= 0, got {text!r}")
    return values


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"--{name}: expected a positive integer, got {value}")
    return value


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_test(model: classify.DEQNet, data: classify.Data, radius_iters: int, seed: int) -> dict:
    """Solve the whole test set once (eval mode) and measure the equilibrium with the diagnostics."""
    model.eval()
    gen = torch.Generator(device=data.x_test.device).manual_seed(seed)
    with torch.no_grad():
        x = model.encoder(data.x_test)
        z = model.deq(x)
        info = model.deq.info
        acc = (model.head(z).argmax(1) == data.y_test).float().mean().item()
        frob = rk.jacobian_penalty(model.deq.f, z, x, EVAL_PROBES, generator=gen).item()
    radius = rk.spectral_radius(model.deq.f, z, x, radius_iters, generator=gen)
    model.train()
    return {"test_acc": acc, "test_steps": info["steps"], "test_residual": info["residual"],
            "test_jac_frob2_per_dim": frob, "test_spectral_radius": radius, "residual_trace": info["residual_trace"]}


def train_one(gamma: float, data: classify.Data, args, device: torch.device, progress) -> list:
    """Train from the seed's initialisation with penalty weight ``gamma``; one record per epoch."""
    torch.manual_seed(args.seed)
    model = classify.DEQNet(data.n_features, args.width, data.n_classes, beta=args.beta,
                            max_steps=args.max_steps, tol=args.tol,
                            jac_reg=args.jac_samples if gamma > 0 else False).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(args.seed)
    rows = [{"gamma": gamma, "epoch": 0, **measure_test(model, data, args.radius_iters, args.seed)}]
    for epoch in range(1, args.epochs + 1):
        steps, drifts, losses, penalties = [], [], [], []
        _sync(device)
        start = time.perf_counter()
        for idx in classify.batches(len(data.y_train), args.batch, order):
            loss = classify.task_loss(model(data.x_train[idx]), data.y_train[idx])
            total = loss
            if gamma > 0:
                penalty = model.deq.info["jac_penalty"]
                total = loss + gamma * penalty
                penalties.append(penalty.detach())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            losses.append(loss.detach())
            steps.append(model.deq.info["steps"])
            drifts.append(model.deq.info["drift"])
        _sync(device)
        seconds = time.perf_counter() - start
        rows.append({
            "gamma": gamma, "epoch": epoch, "train_seconds": seconds,
            "train_steps_mean": sum(steps) / len(steps), "train_steps_max": max(steps),
            "train_at_max_steps": sum(s == args.max_steps for s in steps) / len(steps),
            "train_drift_max": max(drifts), "train_loss": torch.stack(losses).mean().item(),
            "train_penalty": torch.stack(penalties).mean().item() if penalties else None,
            **measure_test(model, data, args.radius_iters, args.seed),
        })
        progress.step(f"gamma {gamma:g} epoch {epoch}")
    return rows


def run(args) -> str:
    """Runs the benchmark described by parsed ``args``; writes the JSON (and the PNG); returns its path."""
    device = common.resolve_device(args.device)
    # The matrices are tiny: on CPU, more than one thread only adds synchronisation (and on a busy
    # machine, waiting for a core), so one thread unless asked otherwise.
    common.set_threads(args.threads if args.threads is not None else 1 if device.type == "cpu" else None)
    defaults = QUICK if args.quick else DEFAULTS
    epochs = _positive("epochs", args.epochs if args.epochs is not None else defaults["epochs"])
    gammas = _gammas(args.gammas or defaults["gammas"])
    args.epochs = epochs
    for name in ("width", "batch", "max_steps", "jac_samples", "radius_iters"):
        _positive(name.replace("_", "-"), getattr(args, name))
    data = classify.load_data(args.data, device, seed=args.seed, train_limit=args.train_limit)
    env = common.environment(device)
    common.say(f"jacobian benchmark on {env['device_name']} ({device.type}), data {data.name}, gammas "
               f"{', '.join(f'{g:g}' for g in gammas)}, {epochs} epochs")
    common.warn_if_busy()

    results = []
    progress = common.Progress(len(gammas) * epochs, NAME)
    try:
        with warnings.catch_warnings():
            # Long solves drift (recorded per epoch as train_drift_max); the one-time warning would only
            # repeat that.
            warnings.filterwarnings("ignore", message=".*reconstructed the start state", category=RuntimeWarning)
            for gamma in gammas:
                results += train_one(gamma, data, args, device, progress)
    finally:
        progress.close()

    payload = common.payload(SCHEMA, NAME, env, args.quick, {
            "data": data.summary(), "gammas": gammas, "epochs": epochs,
            "width": args.width, "batch": args.batch, "optimizer": f"Adam(lr={args.lr:g})", "beta": args.beta,
            "max_steps": args.max_steps, "tol": args.tol, "state_dtype": "float64", "f_dtype": "float32",
            "jac_samples": args.jac_samples, "radius_iters": args.radius_iters, "eval_probes": EVAL_PROBES,
            "seed": args.seed,
            "model": "Linear(features, width) -> RevDEQ(tanh(Linear(z) + x)) -> Linear(width, classes)",
            "loss": "cross_entropy + gamma * info['jac_penalty'] (Hutchinson estimate of ||df/dz||_F^2 / dim)",
            "epoch_0": "the initial model, before training",
    }, results=results)
    path = args.output or default_path(device, args.quick, args.out)
    return common.publish(payload, path, format_table(payload), None if args.no_plots else lambda p, f: [plot(p, f)])


def format_table(payload: dict) -> str:
    """Markdown: per gamma, the last epoch's numbers and the mean training steps over the run.

    Example:
        >>> print(format_table(common.read_json("benchmarks/results/jacobian-cpu-....json")))
    """
    cfg = payload["config"]
    lines = [f"Jacobian regularisation on {cfg['data']['name']}, {payload['env']['device_name']} "
             f"({payload['env']['device_type']}); RevDEQ beta={cfg['beta']}, tol={cfg['tol']:g}, "
             f"max_steps={cfg['max_steps']}, after {cfg['epochs']} epochs:", "",
             "| gamma | train steps/batch (mean over run) | train steps, last epoch | test steps | "
             "||df/dz||_F^2/dim | spectral radius | max drift, last epoch | test acc | s/epoch |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for gamma in cfg["gammas"]:
        rows = [r for r in payload["results"] if r["gamma"] == gamma and r["epoch"] > 0]
        last = rows[-1]
        mean_steps = sum(r["train_steps_mean"] for r in rows) / len(rows)
        seconds = sum(r["train_seconds"] for r in rows) / len(rows)
        lines.append(f"| {gamma:g} | {mean_steps:.1f} | {last['train_steps_mean']:.1f} | {last['test_steps']} | "
                     f"{last['test_jac_frob2_per_dim']:.3g} | {last['test_spectral_radius']:.3f} | "
                     f"{last['train_drift_max']:.1e} | {last['test_acc']:.3f} | {seconds:.2f} |")
    return "\n".join(lines)


def plot(payload: dict, json_path: str) -> str:
    """Six panels per gamma, drawn from the JSON: steps to tol, residual curves, ||df/dz||_F^2/dim,
    spectral radius, test accuracy, reconstruction drift. Writes ``<json stem>.png``; returns its path.
    """
    from .plots import _pyplot

    plt = _pyplot()
    cfg, env, results = payload["config"], payload["env"], payload["results"]
    gammas = cfg["gammas"]
    colors = {g: plt.cm.viridis(i / max(1, len(gammas) - 1) * 0.85) for i, g in enumerate(gammas)}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.4))
    (ax_steps, ax_trace, ax_frob), (ax_radius, ax_acc, ax_drift) = axes

    for gamma in gammas:
        rows = [r for r in results if r["gamma"] == gamma]
        trained = [r for r in rows if r["epoch"] > 0]
        label = "no penalty" if gamma == 0 else f"gamma = {gamma:g}"
        c = colors[gamma]
        epochs = [r["epoch"] for r in trained]
        ax_steps.plot(epochs, [r["train_steps_mean"] for r in trained], "o-", color=c, ms=3, label=label)
        ax_steps.fill_between(epochs, [r["train_steps_mean"] for r in trained], [r["train_steps_max"] for r in trained],
                              color=c, alpha=0.12)
        last = rows[-1]["residual_trace"]
        ax_trace.semilogy(range(len(last)), last, "-", color=c, label=f"{label}, epoch {rows[-1]['epoch']}")
        all_epochs = [r["epoch"] for r in rows]
        ax_frob.semilogy(all_epochs, [r["test_jac_frob2_per_dim"] for r in rows], "o-", color=c, ms=3, label=label)
        ax_radius.plot(all_epochs, [r["test_spectral_radius"] for r in rows], "o-", color=c, ms=3, label=label)
        ax_acc.plot(all_epochs, [r["test_acc"] for r in rows], "o-", color=c, ms=3, label=label)
        ax_drift.semilogy(epochs, [max(r["train_drift_max"], 1e-17) for r in trained], "o-", color=c, ms=3, label=label)

    first = [r for r in results if r["gamma"] == gammas[0]][0]["residual_trace"]  # the same for every gamma
    ax_trace.semilogy(range(len(first)), first, ":", color="gray", label="at initialisation")
    ax_steps.axhline(cfg["max_steps"], color="k", ls="--", lw=0.8)
    ax_steps.set(title=f"forward steps to tol={cfg['tol']:g} per training batch\n(line: mean, band: up to max)",
                 xlabel="epoch", ylabel="RevDEQ steps (2 evaluations of f each)")
    ax_trace.axhline(cfg["tol"], color="k", ls="--", lw=0.8)
    ax_trace.set(title="test-set residual after each solver step",
                 xlabel="solver step", ylabel="||z - f(z)|| / ||f(z)||")
    ax_frob.set(title=f"||df/dz||_F^2 / dim at the test equilibrium\n(Hutchinson, {cfg['eval_probes']} probes)",
                xlabel="epoch (0 = initialisation)")
    ax_radius.axhline(1.0, color="k", ls="--", lw=0.8)
    ax_radius.set(title=f"spectral radius of df/dz at the test equilibrium\n(Arnoldi, {cfg['radius_iters']} VJPs)",
                  xlabel="epoch (0 = initialisation)")
    ax_acc.set(title="test accuracy", xlabel="epoch (0 = initialisation)")
    ax_drift.set(title="largest reconstruction drift in the epoch\n(info['drift']; 0 drawn at 1e-17)",
                 xlabel="epoch")
    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_steps.legend(fontsize=8)
    ax_trace.legend(fontsize=8)
    fig.suptitle(f"RevDEQ with and without jac_reg: {cfg['data']['name']} ({cfg['data']['train']} train / "
                 f"{cfg['data']['test']} test), width {cfg['width']}, beta {cfg['beta']}, {env['device_name']} "
                 f"({env['device_type']}), torch {env['torch']}, commit {env['commit'][:10]}", fontsize=10)
    fig.tight_layout()
    path = f"{os.path.splitext(json_path)[0]}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
