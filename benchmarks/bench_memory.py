"""Memory and time of one training step against the number of solver steps.

One training step is ``z = solve(f, x, z0); loss = (z * w).sum(); loss.backward()`` for a realistic
``f(z, x)`` (``benchmarks/blocks.py``: a pre-norm transformer block and a residual conv block, float32),
run for ``N`` steps of the RevDEQ iteration (revdeq_kernels/solver/loop.py) by each method:

- ``revdeq``: ``reversible_fixed_point(f, x, z0=z0, beta, max_steps=N, tol=None)``: float64 states, no
  host synchronisation; the backward rebuilds the states in place and keeps one graph of f at a time.
- ``revdeq_exact``: the same with ``exact=True``: int64 fixed-point states that the backward rebuilds
  bit for bit, at the cost of m bits per element per half-step (1 bit at beta = 1/2), which grows with N.
- ``unrolled``: plain autograd through the same recurrence in PyTorch (float32 states): every step's
  activations are kept for the backward.
- ``checkpoint``: the same recurrence with each step (and the first evaluation of f) under
  ``torch.utils.checkpoint(use_reentrant=False)``: each step's inputs ``(y, z, f(z))`` are kept and the
  step is recomputed in the backward.
- ``torchdeq`` (when torchdeq imports): torchdeq's own DEQ, ``get_deq()`` defaults (core ``sliced``,
  ``fixed_point_iter``, ``grad=1``, ``tau=1``) with ``f_max_iter=2N`` and ``f_tol=0`` so that it spends the
  same 2N evaluations of f: ``2N`` undamped iterations ``z <- f(z)`` without graph, then one ``f(z*)`` with
  graph. Its backward is that one evaluation's vector-Jacobian product (the 1-step phantom gradient,
  Jacobian-free backpropagation): an approximation of the implicit gradient, not the gradient of the
  unrolled loop, so its error below measures the approximation, not rounding.

Measured per (f, N, method):

- memory: on every device the bytes autograd saves for the backward during the method's forward, up to
  the returned ``z`` (``saved_tensors_hooks``, each storage once, f's parameters excluded); on CUDA also
  ``torch.cuda.max_memory_allocated`` over the whole step above the allocation before it (the
  gradients already exist from the first run), the headline there. The saved bytes do not show what a
  backward holds while it runs: RevDEQ's one graph of f at a time, checkpoint's one recomputed step
  (``f_graph_saved_bytes`` in the config is one evaluation's graph);
- calls of f in the forward and in the backward (counted with a forward pre-hook);
- time of the step: wall time between device synchronisations, median and 20/80 percentiles; the
  methods are sampled in turn (one repeat of each, then the next), so load from elsewhere hits them
  alike. Not ``common.time_jobs``: its CPU sampler (``torch.utils.benchmark``) runs two warm-up calls per
  sample, which would triple a benchmark of calls that take up to a second;
- the gradient's relative error: max over f's parameters of ``||g - g64|| / ||g64||``, where ``g64`` is
  the gradient of the unrolled loop with f and everything else in float64 (on the run's device; on CUDA
  it falls back to checkpointing each step when it runs out of memory, recorded);
- the relative residual ``||z - f(z)|| / ||f(z)||`` of the returned state, and RevDEQ's reconstruction
  drift.

Derived: memory at the most steps over memory at the fewest per (f, method) (the issue's target: RevDEQ
within 10% while unrolled autograd grows linearly), and each method's time over unrolled's at the same N.

Writes ``benchmarks/results/memory-<device>.json`` and PNGs of memory and time against N beside it.

Run: ``python -m benchmarks memory [--quick] [--device cuda] [--steps 4,8,16,32,64] [--kinds conv]``.
"""

import argparse
import contextlib
import copy
import gc
import importlib
import time
import warnings

import torch
from torch.utils.checkpoint import checkpoint

import revdeq_kernels as rk

from . import blocks, common

NAME = "memory"
SCHEMA = "revdeq-bench-memory/1"
METHODS = ("revdeq", "revdeq_exact", "unrolled", "checkpoint", "torchdeq")
REVERSIBLE = ("revdeq", "revdeq_exact")
STEPS = {False: "4,8,16,32,64", True: "4,8,16"}  # by --quick
REPEATS = {("cpu", False): 5, ("cpu", True): 1, ("cuda", False): 10, ("cuda", True): 2}
DEFAULT_BETA = 0.5  # reconstructs best (the inverse amplifies rounding by 1/|1-beta| per half-step)
TORCHDEQ_GRADIENT = ("1-step phantom gradient (Jacobian-free backprop): autograd through one f(z*) at torchdeq's "
                     "solution, an approximation of the implicit gradient, not the gradient of the unrolled loop")
METHOD_DESCRIPTIONS = {
    "revdeq": "reversible_fixed_point(f, x, z0=z0, beta, max_steps=N, tol=None): float64 states, float32 f, "
              "reversible backward",
    "revdeq_exact": "the same with exact=True: int64 fixed-point states rebuilt bit for bit, keeping m bits per "
                    "element per half-step",
    "unrolled": "autograd through the same recurrence in PyTorch, float32 states",
    "checkpoint": "the same recurrence, each step and the first f(z0) under "
                  "torch.utils.checkpoint(use_reentrant=False)",
    "torchdeq": "torchdeq.get_deq(core='sliced', f_solver='fixed_point_iter', f_max_iter=2N, f_tol=0, grad=1, "
                "tau=1): 2N undamped iterations without graph, then one f(z*) with graph; backward: "
                + TORCHDEQ_GRADIENT,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", default=None, metavar="N,...",
                        help=f"solver steps N (default {STEPS[False]}; --quick {STEPS[True]})")
    parser.add_argument("--kinds", default=",".join(blocks.KINDS), metavar="KIND,...",
                        help=f"which f to train: {', '.join(blocks.KINDS)} (default: both)")
    parser.add_argument("--methods", default=",".join(METHODS), metavar="METHOD,...",
                        help=f"which methods to run, from {', '.join(METHODS)} (default: all)")
    parser.add_argument("--size", choices=tuple(blocks.SIZES), default=None,
                        help="model sizes (default: gpu on CUDA; on CPU cpu, or small with --quick; see "
                             "benchmarks/blocks.py)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed training steps per method after the first (default: CPU 5, CUDA 10; --quick 1, 2)")
    parser.add_argument("--beta", type=float, default=DEFAULT_BETA, help="relaxation of the iteration, every method")
    parser.add_argument("--seed", type=int, default=0)


def default_path(device: torch.device, quick: bool, out_dir: str | None) -> str:
    return common.result_path(NAME, device, quick, out_dir)


def parse_steps(text: str) -> list:
    return sorted(set(common.parse_positive_ints("--steps", text)))


def _names(option: str, noun: str, text: str, known: tuple) -> list:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in known]
    if unknown or not names:
        what = f"unknown {noun} {unknown[0]!r}" if unknown else f"nothing given ({text!r})"
        raise ValueError(f"{option}: {what}; expected a comma-separated list from {', '.join(known)}")
    return list(dict.fromkeys(names))


def import_torchdeq():
    """torchdeq's ``get_deq`` (a seam for tests: monkeypatch this to simulate a machine without torchdeq)."""
    return importlib.import_module("torchdeq").get_deq


# ---------------------------------------------------------------------------------------------
# the methods


def unrolled(f, x, z0, beta: float, steps: int, checkpointed: bool = False) -> torch.Tensor:
    """``z`` after ``steps`` steps of the RevDEQ iteration from ``y = z = z0`` with autograd through each:
    ``y = (1-beta) y + beta f(z); z = (1-beta) z + beta f(y)`` (2 * steps evaluations of f). With
    ``checkpointed`` each step, and the first ``f(z0)``, runs under ``torch.utils.checkpoint``.

    Example:
        >>> z = unrolled(f, x, torch.randn_like(x), 0.5, 8)   # f(z, x) -> shaped like z
    """

    def first(z):
        return f(z, x)

    def step(y, z, fz):
        y = (1 - beta) * y + beta * fz
        return y, (1 - beta) * z + beta * f(y, x)

    def step_and_next(y, z, fz):
        y, z = step(y, z, fz)
        return y, z, f(z, x)

    def run(fn, *args):
        return checkpoint(fn, *args, use_reentrant=False) if checkpointed else fn(*args)

    y = z = z0
    fz = run(first, z0)
    for n in range(steps):
        if n == steps - 1:  # the last f(z) would only feed a step that is not taken
            y, z = run(step, y, z, fz)
        else:
            y, z, fz = run(step_and_next, y, z, fz)
    return z


class Methods:
    """The forward of each method for one case and N: ``forward(method) -> (z, report)`` where ``report()``
    (called after the backward) gives what the method itself measured (drift, residual) or {}."""

    def __init__(self, case: blocks.Case, steps: int, beta: float, get_deq=None):
        self.case, self.steps, self.beta = case, steps, beta
        self.deq = None
        if get_deq is not None:
            self.deq = get_deq(core="sliced", f_solver="fixed_point_iter", f_max_iter=2 * steps, f_tol=0.0,
                               grad=1, tau=1.0, ift=False)

    def forward(self, method: str):
        case, steps, beta = self.case, self.steps, self.beta
        if method in REVERSIBLE:
            z, info = rk.reversible_fixed_point(case.f, case.x, z0=case.z0, beta=beta, max_steps=steps, tol=None,
                                                exact=method == "revdeq_exact")
            return z, lambda: {"drift": info["drift"], "solver_residual": info["residual"]}
        if method in ("unrolled", "checkpoint"):
            return unrolled(case.f, case.x, case.z0, beta, steps, checkpointed=method == "checkpoint"), dict
        if method == "torchdeq":
            x, f = case.x, case.f
            z_out, info = self.deq(lambda z: f(z, x), case.z0)
            return z_out[-1], lambda: {"solver_residual": info["rel_lowest"].mean().item()}
        raise ValueError(f"bench_memory: unknown method {method!r}")

    def train_step(self, method: str):
        z, report = self.forward(method)
        (z * self.case.w).sum().backward()
        return z, report


# ---------------------------------------------------------------------------------------------
# measurements


class SavedBytes:
    """Counts the storages autograd saves for backward while active (each once; ``exclude``: tensors whose
    storages are not counted, e.g. parameters, which exist whatever the depth)."""

    def __init__(self, exclude=()):
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.excluded and storage.nbytes():
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


@contextlib.contextmanager
def count_calls(module: torch.nn.Module):
    """Counts calls of ``module`` while active: ``with count_calls(f) as calls: ...; calls[0]``."""
    calls = [0]
    handle = module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def relative_residual(f, z, x) -> float:
    with torch.no_grad():
        fz = f(z, x)
        return ((z - fz).norm() / fz.norm()).item()


def grad_error(params: list, names: list, reference: list) -> tuple:
    """(max over parameters of ||g - g64|| / ||g64||, the parameter where it is largest)."""
    worst, where = -1.0, None
    for p, name, want in zip(params, names, reference):
        got = torch.zeros_like(want) if p.grad is None else p.grad.double()
        scale = want.norm().item()
        err = (got - want).norm().item() / (scale if scale > 0 else 1.0)
        if not err == err:  # NaN: infinitely wrong
            err = float("inf")
        if err > worst:
            worst, where = err, name
    return worst, where


def reference_gradient(case: blocks.Case, f64: torch.nn.Module, steps: int, beta: float) -> dict:
    """The float64 gradient of the unrolled loop (``grads``) with how it was computed, or a reason."""
    x, z0, w = (t.double() for t in (case.x, case.z0, case.w))
    params = list(f64.parameters())
    reason = None
    for how, checkpointed in (("unrolled, float64", False), ("unrolled, float64, checkpoint per step", True)):
        try:
            z = unrolled(f64, x, z0, beta, steps, checkpointed=checkpointed)
            grads = torch.autograd.grad((z * w).sum(), params)
            return {"how": how, "device": str(x.device), "grads": [g.detach() for g in grads],
                    "residual": relative_residual(f64, z.detach(), x)}
        except torch.cuda.OutOfMemoryError as exc:
            reason = f"out of memory: {str(exc).splitlines()[0]}"
        _free(x.device)  # here, not in the except block: its traceback still holds the graph there
    return {"how": None, "reason": reason, "grads": None, "residual": None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    """Returns cached CUDA blocks after a large graph (a no-op on CPU: a full gc.collect costs ~0.2 s here)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def first_run(methods: Methods, method: str, reference: dict, device: torch.device) -> dict:
    """The first training step of ``method`` (also its warm-up): saved bytes, calls of f, gradient error,
    residual, and on CUDA a second step for the peak memory."""
    case = methods.case
    f = case.f
    params = list(f.parameters())
    f.zero_grad(set_to_none=True)
    with count_calls(f) as calls:
        with SavedBytes(exclude=params) as saved:  # the solve's own, not the loss's (the same for every method)
            z, report = methods.forward(method)
        loss = (z * case.w).sum()
        calls_forward = calls[0]
        loss.backward()
        calls_backward = calls[0] - calls_forward
    row = {"f_calls_forward": calls_forward, "f_calls_backward": calls_backward, "saved_bytes": saved.bytes,
           "saved_tensors": len(saved.storages), "drift": None, "solver_residual": None, **report(),
           "residual": relative_residual(f, z.detach(), case.x)}
    del z, loss, saved
    if reference["grads"] is not None:
        names = [name for name, _ in f.named_parameters()]
        row["grad_rel_error"], row["grad_worst_parameter"] = grad_error(params, names, reference["grads"])
    else:
        row["grad_rel_error"] = row["grad_worst_parameter"] = None
    row["cuda_peak_bytes"] = cuda_peak_bytes(methods, method, device) if device.type == "cuda" else None
    return row


def cuda_peak_bytes(methods: Methods, method: str, device: torch.device) -> int:
    """Peak CUDA memory of one training step above what was allocated before it (gradients included)."""
    _free(device)
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    methods.train_step(method)
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def time_steps(methods: Methods, names: list, repeats: int, device: torch.device) -> dict:
    """Seconds per training step of each method, sampled in turn, ``repeats`` samples each."""
    samples = {m: [] for m in names}
    f = methods.case.f
    for _ in range(repeats):
        for m in names:
            f.zero_grad(set_to_none=True)
            gc.disable()  # no collection pause inside a timed step (autograd graphs are freed by refcount)
            try:
                _sync(device)
                start = time.perf_counter()
                methods.train_step(m)
                _sync(device)
                samples[m].append(time.perf_counter() - start)
            finally:
                gc.enable()
    return {m: common.summarize(s) for m, s in samples.items()}


def f_graph_saved_bytes(case: blocks.Case) -> int:
    """Bytes autograd saves for one evaluation of f with graph (what a reversible backward holds at a time)."""
    with SavedBytes(exclude=list(case.f.parameters())) as saved:
        out = case.f(case.z0, case.x)
    del out
    return saved.bytes


# ---------------------------------------------------------------------------------------------
# the run


def run(args) -> str:
    """Runs the benchmark described by parsed ``args``; writes the JSON (and plots); returns its path."""
    device = common.resolve_device(args.device)
    # Small matrices on CPU: one thread avoids synchronisation overhead (as the depth benchmark).
    common.set_threads(args.threads if args.threads is not None else 1 if device.type == "cpu" else None)
    steps_list = parse_steps(args.steps or STEPS[bool(args.quick)])
    kinds = _names("--kinds", "f kind", args.kinds, blocks.KINDS)
    wanted = _names("--methods", "method", args.methods, METHODS)
    size = args.size or ("gpu" if device.type == "cuda" else "small" if args.quick else "cpu")
    repeats = args.repeats if args.repeats is not None else REPEATS[(device.type, bool(args.quick))]
    if repeats < 1:
        raise ValueError(f"--repeats: expected a positive number of timed steps, got {repeats}")
    if not (0 < args.beta < 1):
        raise ValueError(f"--beta: expected a relaxation in (0, 1), got {args.beta}")

    skipped, get_deq = [], None
    if "torchdeq" in wanted:
        try:
            get_deq = import_torchdeq()
        except ImportError as exc:
            skipped.append({"method": "torchdeq", "f_kind": None, "steps": None,
                            "reason": f"torchdeq is not importable ({exc}); pip install torchdeq"})
    names = [m for m in wanted if m != "torchdeq" or get_deq is not None]

    env = common.environment(device)
    common.say(f"memory benchmark on {env['device_name']} ({device.type}, {env['torch_threads']} threads), f: "
               f"{', '.join(kinds)} ({size} sizes), N = {', '.join(map(str, steps_list))}, methods: {', '.join(names)}")
    common.warn_if_busy()

    results, references, kind_info = [], [], []
    progress = common.Progress(len(kinds) * len(steps_list), NAME)
    try:
        with warnings.catch_warnings():
            # RevDEQ's float64 states drift at tens of steps; the drift is recorded in each row instead.
            warnings.filterwarnings("ignore", message=".*reconstructed the start state", category=RuntimeWarning)
            for kind in kinds:
                case = blocks.make_case(kind, size, device, seed=args.seed)
                f64 = copy.deepcopy(case.f).double()
                kind_info.append({**case.describe(), "f_graph_saved_bytes": f_graph_saved_bytes(case)})
                for steps in steps_list:
                    rows, ref = measure(case, f64, steps, args.beta, names, repeats, device, skipped, get_deq)
                    results += rows
                    references.append({"f_kind": kind, "steps": steps,
                                       **{k: v for k, v in ref.items() if k != "grads"}})
                    progress.step(f"{kind} N={steps}")
                del case, f64
                _free(device)
    finally:
        progress.close()

    headline = "cuda_peak_bytes" if device.type == "cuda" else "saved_bytes"
    payload = common.payload(SCHEMA, NAME, env, args.quick, {
            "size": size, "steps": steps_list, "beta": args.beta, "seed": args.seed,
            "repeats": repeats, "methods": {m: METHOD_DESCRIPTIONS[m] for m in names}, "f": kind_info,
            "block_definitions": {"transformer": "h = x + MultiheadAttention(LN1(z)); f = h + MLP(LN2(h)), "
                                                 "MLP = Linear(d, 4d), GELU, Linear(4d, d)",
                                  "conv": "f = x + conv2(relu(GroupNorm(conv1(z)))), 3x3 convolutions"},
            "loss": "(z * w).sum(), w ~ N(0, 1) / sqrt(numel), fixed; x, z0 ~ N(0, 1), fixed",
            "memory_headline": headline,
            "memory": "saved_bytes: storages autograd saves for backward during the method's forward up to z "
                      "(saved_tensors_hooks; the loss's are not counted), each once, f's parameters excluded; "
                      "cuda_peak_bytes: torch.cuda.max_memory_allocated over "
                      "forward + loss + backward above the allocation before it (CUDA only)",
            "time": "wall time of forward + loss + backward between device synchronisations (Python and launch "
                    "overhead included, as in training), after one warm-up step; methods sampled in turn",
            "grad_rel_error": "max over f's parameters of ||g - g64|| / ||g64||, g64: the float64 gradient of the "
                              "unrolled loop (see references)",
            "torchdeq_gradient": TORCHDEQ_GRADIENT,
            "tf32": _tf32_flags() if device.type == "cuda" else None,
    }, results=results, references=references, summary=summarize(results, headline), skipped=skipped)
    path = args.output or default_path(device, args.quick, args.out)
    from . import plots

    return common.publish(payload, path, format_table(payload), None if args.no_plots else plots.plot)


def _tf32_flags() -> dict:
    """Whether float32 matmuls and convolutions may round to TF32 on this GPU (it sets the float32 methods'
    gradient error; PyTorch's defaults: matmul no, cuDNN convolutions yes)."""
    return {"float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32)}


def measure(case, f64, steps, beta, names, repeats, device, skipped, get_deq) -> tuple:
    """Rows for every method in ``names`` at ``steps``, and the reference gradient's record; a method that
    runs out of CUDA memory, or exact mode on an f that is not bitwise deterministic, goes to ``skipped``
    with the reason."""
    reference = reference_gradient(case, f64, steps, beta)
    methods = Methods(case, steps, beta, get_deq if "torchdeq" in names else None)
    rows, ran = [], []
    for method in names:
        row = None
        try:
            row = first_run(methods, method, reference, device)
        except torch.cuda.OutOfMemoryError as exc:
            skipped.append({"method": method, "f_kind": case.kind, "steps": steps,
                            "reason": f"out of memory: {str(exc).splitlines()[0]}"})
        except rk.ExactModeError as exc:  # exact mode on an f whose kernels are not deterministic
            skipped.append({"method": method, "f_kind": case.kind, "steps": steps, "reason": str(exc)})
        if row is None:
            _free(device)  # outside the except block, whose traceback holds the failed step's graph
            continue
        rows.append({"f_kind": case.kind, "steps": steps, "method": method, **row})
        ran.append(method)
    reference.pop("grads")
    _free(device)
    times = time_steps(methods, ran, repeats, device)
    base = times.get("unrolled")
    for row in rows:
        t = times[row["method"]]
        row["time"] = t
        row["time_vs_unrolled"] = t["median_s"] / base["median_s"] if base else None
        row["memory_bytes"] = row["cuda_peak_bytes"] if device.type == "cuda" else row["saved_bytes"]
    return rows, reference


def summarize(results: list, headline: str) -> list:
    """Per (f, method): memory at the most steps over the fewest, and time and error at the most steps."""
    out = []
    for kind in dict.fromkeys(r["f_kind"] for r in results):
        for method in dict.fromkeys(r["method"] for r in results if r["f_kind"] == kind):
            rows = sorted((r for r in results if r["f_kind"] == kind and r["method"] == method),
                          key=lambda r: r["steps"])
            lo, hi = rows[0], rows[-1]
            out.append({"f_kind": kind, "method": method, "steps_lo": lo["steps"], "steps_hi": hi["steps"],
                        "memory_lo": lo[headline], "memory_hi": hi[headline],
                        "memory_ratio": hi[headline] / lo[headline] if lo[headline] else None,
                        "time_hi_s": hi["time"]["median_s"], "time_vs_unrolled_hi": hi["time_vs_unrolled"],
                        "grad_rel_error_hi": hi["grad_rel_error"]})
    return out


# ---------------------------------------------------------------------------------------------
# the console table


def format_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _seconds(s: float) -> str:
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _error(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def format_table(payload: dict) -> str:
    """Markdown: one row per (f, N, method), then the ratios per (f, method) and what was skipped.

    Example:
        >>> print(format_table(common.read_json("benchmarks/results/memory-cpu-....json")))
    """
    cfg, env = payload["config"], payload["env"]
    cuda = env["device_type"] == "cuda"
    lines = [f"One training step (forward, loss, backward) against solver steps N, beta {cfg['beta']}, "
             f"{cfg['size']} sizes; {env['device_name']} ({env['device_type']}, {env['torch_threads']} threads), "
             f"torch {env['torch']}, commit {env['commit'][:10]}{' (dirty)' if env.get('commit_dirty') else ''}:",
             "", "| f | N | method | f calls fwd + bwd | saved for backward | "
             + ("peak CUDA memory | " if cuda else "")
             + "time/step, median [p20, p80] | vs unrolled | grad rel. error | residual | drift |",
             "|---|---:|---|---:|---:|" + ("---:|" if cuda else "") + "---:|---:|---:|---:|---:|"]
    for r in payload["results"]:
        t = r["time"]
        peak = f"{format_bytes(r['cuda_peak_bytes'])} | " if cuda else ""
        drift = _error(r["drift"])
        lines.append(f"| {r['f_kind']} | {r['steps']} | {r['method']} | {r['f_calls_forward']} + "
                     f"{r['f_calls_backward']} | {format_bytes(r['saved_bytes'])} | {peak}{_seconds(t['median_s'])} "
                     f"[{_seconds(t['p20_s'])}, {_seconds(t['p80_s'])}] | {_ratio(r['time_vs_unrolled'])} | "
                     f"{_error(r['grad_rel_error'])} | {_error(r['residual'])} | {drift} |")
    metric = "peak CUDA memory" if cuda else "saved for backward"
    lines += ["", f"| f | method | {metric}, fewest N | most N | ratio | time vs unrolled, most N | "
              "grad rel. error, most N |", "|---|---|---:|---:|---:|---:|---:|"]
    for s in payload["summary"]:
        lines.append(f"| {s['f_kind']} | {s['method']} | {format_bytes(s['memory_lo'])} (N={s['steps_lo']}) | "
                     f"{format_bytes(s['memory_hi'])} (N={s['steps_hi']}) | {_ratio(s['memory_ratio'])} | "
                     f"{_ratio(s['time_vs_unrolled_hi'])} | {_error(s['grad_rel_error_hi'])} |")
    if "torchdeq" in cfg["methods"]:
        lines += ["", f"torchdeq's gradient: {cfg['torchdeq_gradient']}."]
    for ref in payload["references"]:
        if ref["how"] is None:
            lines.append(f"no float64 reference for {ref['f_kind']} N={ref['steps']}: {ref['reason']}")
    for s in payload["skipped"]:
        where = "" if s["f_kind"] is None else f" ({s['f_kind']}, N={s['steps']})"
        lines.append(f"skipped {s['method']}{where}: {s['reason']}")
    return "\n".join(lines)

