"""Implicit against explicit depth: a RevDEQ of one block at N steps against 2N untied copies of it.

The DEQ literature's comparison (Bai, Kolter & Koltun 2019 and after): the same block
``f(z, x) = tanh(W z + b + x)`` either solved as a RevDEQ for exactly ``N`` steps (``tol=None``: ``2N``
evaluations of ``f`` after the first, weights tied) or stacked ``2N`` times with untied weights (the
explicit network with the same number of block evaluations), each between the same encoder and
linear head (``benchmarks/classify.py``), trained on the same data from the same seed with the same
optimiser and batch order. For each ``N`` and model it reports:

- memory: bytes that autograd keeps for the backward of one training step, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (each storage once, parameters excluded: what grows
  with depth), on every device; on CUDA also ``torch.cuda.max_memory_allocated`` during a training
  step (forward and backward) above what was allocated before it;
- time per training step (forward, backward, Adam step): median and 20/80 percentiles over every step
  after the first epoch's first two;
- test accuracy after training, and the parameter count.

Writes ``benchmarks/results/depth-<device>.json`` and prints a Markdown table.

Run: ``python -m benchmarks depth [--quick] [--device cuda] [--steps 2,4,8] [--epochs 8]``.
"""

import argparse
import time
import warnings

import torch

from . import classify, common

NAME = "depth"
SCHEMA = "revdeq-bench-depth/1"
MODELS = ("revdeq", "explicit")
# (N list, epochs, width, batch): the CPU run takes under a minute on two busy cores at a width where
# compute, not Python overhead, sets the step time; the GPU run is wider and batched larger so memory
# differences are not lost in allocator granularity.
DEFAULTS = {"cpu": ("2,4,8,16", 8, 256, 128), "cuda": ("4,8,16", 20, 1024, 512)}
QUICK = {"cpu": ("2,4", 1, 64, 64), "cuda": ("4,8", 4, 1024, 512)}
WARMUP_STEPS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=classify.DATASETS, default="auto",
                        help="digits (needs scikit-learn), synthetic, or auto: digits when available")
    parser.add_argument("--steps", default=None, metavar="N,...",
                        help="RevDEQ steps N; the explicit network gets 2N blocks (default: CPU 2,4,8,16; CUDA 4,8,16)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per model (default: CPU 8; CUDA 20)")
    parser.add_argument("--width", type=int, default=None, help="state size (default: CPU 256; CUDA 1024)")
    parser.add_argument("--batch", type=int, default=None, help="training batch size (default: CPU 128; CUDA 512)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--beta", type=float, default=0.5, help="RevDEQ relaxation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=None, help="use only this many training examples")


def default_path(device: torch.device, quick: bool, out_dir: str | None) -> str:
    return common.result_path(NAME, device, quick, out_dir)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(kind: str, steps: int, data: classify.Data, width: int, beta: float) -> torch.nn.Module:
    if kind == "revdeq":
        return classify.DEQNet(data.n_features, width, data.n_classes, beta=beta, max_steps=steps, tol=None)
    return classify.StackNet(data.n_features, width, data.n_classes, depth=2 * steps)


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple:
    """(bytes, tensors) autograd saves for the backward of ``task_loss(model(x), y)``: each storage
    counted once, parameters' storages not counted (they exist whatever the depth)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes():
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = classify.task_loss(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values()), len(storages)


def cuda_peak_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Peak CUDA memory of one forward and backward above what was allocated before it (the gradients
    already exist from a warm-up step, so this is activations and temporaries)."""
    device = x.device
    classify.task_loss(model(x), y).backward()  # warm-up: allocates .grad and the allocator's blocks
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    classify.task_loss(model(x), y).backward()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    model.zero_grad(set_to_none=True)
    return peak


def train_and_measure(kind: str, steps: int, data: classify.Data, cfg: dict, device: torch.device) -> dict:
    torch.manual_seed(cfg["seed"])
    model = make_model(kind, steps, data, cfg["width"], cfg["beta"]).to(device)
    order = torch.Generator().manual_seed(cfg["seed"])
    first = classify.batches(len(data.y_train), cfg["batch"], torch.Generator().manual_seed(cfg["seed"]))[0]
    xb, yb = data.x_train[first], data.y_train[first]
    saved, n_saved = saved_activation_bytes(model, xb, yb)
    peak = cuda_peak_bytes(model, xb, yb) if device.type == "cuda" else None

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    times, drifts = [], []
    for _ in range(cfg["epochs"]):
        losses = []
        for idx in classify.batches(len(data.y_train), cfg["batch"], order):
            _sync(device)
            start = time.perf_counter()
            loss = classify.task_loss(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _sync(device)
            times.append(time.perf_counter() - start)
            losses.append(loss.detach())
            if kind == "revdeq":
                drifts.append(model.deq.info["drift"])
    timed = times[WARMUP_STEPS:] or times
    return {
        "model": kind, "steps": steps, "blocks": 1 if kind == "revdeq" else 2 * steps,
        "f_evaluations_forward": 2 * steps + 1 if kind == "revdeq" else 2 * steps,
        "parameters": classify.n_parameters(model), "saved_bytes": saved, "saved_tensors": n_saved,
        "cuda_peak_bytes": peak, "step_time": common.summarize(timed),
        "train_loss_last_epoch": torch.stack(losses).mean().item(),
        "drift_max": max(drifts) if drifts else None,
        "test_acc": classify.accuracy(model, data.x_test, data.y_test),
    }


def run(args) -> str:
    """Runs the benchmark described by parsed ``args``; writes the JSON; returns its path."""
    device = common.resolve_device(args.device)
    # Small matrices: on CPU one thread avoids synchronisation overhead (see bench_jacobian).
    common.set_threads(args.threads if args.threads is not None else 1 if device.type == "cpu" else None)
    steps_text, epochs, width, batch = (QUICK if args.quick else DEFAULTS)[device.type]
    steps_list = common.parse_positive_ints("--steps", args.steps or steps_text)
    cfg = {"epochs": args.epochs if args.epochs is not None else epochs,
           "width": args.width if args.width is not None else width,
           "batch": args.batch if args.batch is not None else batch,
           "lr": args.lr, "beta": args.beta, "seed": args.seed}
    for name in ("epochs", "width", "batch"):
        if cfg[name] < 1:
            raise ValueError(f"--{name}: expected a positive integer, got {cfg[name]}")
    data = classify.load_data(args.data, device, seed=args.seed, train_limit=args.train_limit)
    env = common.environment(device)
    common.say(f"depth benchmark on {env['device_name']} ({device.type}), data {data.name}, N = "
               f"{', '.join(map(str, steps_list))}, {cfg['epochs']} epochs, width {cfg['width']}")
    common.warn_if_busy()

    results = []
    progress = common.Progress(len(steps_list) * len(MODELS), NAME)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*reconstructed the start state", category=RuntimeWarning)
            for steps in steps_list:
                for kind in MODELS:
                    results.append(train_and_measure(kind, steps, data, cfg, device))
                    progress.step(f"{kind} N={steps}")
    finally:
        progress.close()

    payload = common.payload(SCHEMA, NAME, env, args.quick, {
            "data": data.summary(), "steps": steps_list, **cfg,
            "optimizer": f"Adam(lr={args.lr:g})", "block": "tanh(Linear(width, width)(z) + x)",
            "revdeq": "RevDEQ(block, beta, max_steps=N, tol=None): float64 states, float32 f",
            "explicit": "2N untied copies of the block from z = 0, each given the same injection x",
            "memory": "saved_bytes: storages autograd saves for backward in one training step's forward, each "
                      "once, parameters excluded (saved_tensors_hooks); cuda_peak_bytes: max_memory_allocated "
                      "over a forward+backward above the allocation before it (CUDA only)",
            "step_time": f"forward + backward + Adam step, every step after the first {WARMUP_STEPS}",
            "drift_max": "RevDEQ only: the largest info['drift'] (reconstruction drift of the backward) in training",
    }, results=results)
    path = args.output or default_path(device, args.quick, args.out)
    return common.publish(payload, path, format_table(payload))


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def format_table(payload: dict) -> str:
    """Markdown: one row per (N, model).

    Example:
        >>> print(format_table(common.read_json("benchmarks/results/depth-cpu-....json")))
    """
    cfg, env = payload["config"], payload["env"]
    cuda = env["device_type"] == "cuda"
    head = ("| N | model | blocks (params) | f evals, forward | saved for backward | "
            + ("peak CUDA memory, step | " if cuda else "") + "time/step, median [p20, p80] | test acc | max drift |")
    lines = [f"Explicit vs implicit depth on {cfg['data']['name']}, width {cfg['width']}, batch {cfg['batch']}, "
             f"{cfg['epochs']} epochs; {env['device_name']} ({env['device_type']}, {env['torch_threads']} threads):",
             "", head, "|---:|---|---:|---:|---:|" + ("---:|" if cuda else "") + "---:|---:|---:|"]
    for r in payload["results"]:
        t = r["step_time"]
        name = f"RevDEQ, {r['steps']} steps" if r["model"] == "revdeq" else f"explicit, {r['blocks']} blocks"
        peak = f"{_bytes(r['cuda_peak_bytes'])} | " if cuda else ""
        drift = "-" if r["drift_max"] is None else f"{r['drift_max']:.1e}"
        lines.append(f"| {r['steps']} | {name} | {r['blocks']} ({r['parameters']:,}) | {r['f_evaluations_forward']} | "
                     f"{_bytes(r['saved_bytes'])} | {peak}{t['median_s'] * 1e3:.2f} ms [{t['p20_s'] * 1e3:.2f}, "
                     f"{t['p80_s'] * 1e3:.2f}] | {r['test_acc']:.3f} | {drift} |")
    return "\n".join(lines)
