"""Benchmark of relax_, unrelax_ and residual: every backend against what a user would write instead.

For each op, dtype configuration and size, it times:

- each revdeq_kernels backend that can run on the device (``cuda``, ``triton``, ``cpp``, ``reference``);
- ``naive``: the plain PyTorch expression, ``(1-b)*y + b*f``, ``(z - b*f)/(1-b)``, or the two norm
  calls ``(z - f).norm(), f.norm()``, which allocate their result and temporaries each call (on CPU,
  buffers over 32 MB come fresh from the OS each time, so large sizes also pay page faults);
- ``inplace`` (relax_, unrelax_): the same math in two in-place PyTorch passes without allocation,
  ``y.mul_(1-b).add_(f, alpha=b)`` and ``z.sub_(f, alpha=b).div_(1-b)``;
- ``lerp_`` (relax_ only): ``y.lerp_(f, b)``, the in-place PyTorch op that computes the same thing
  (with mixed dtypes, f is converted to the state's dtype first, as lerp_ requires);
- ``compile``: ``torch.compile`` of the naive expression (dynamic shapes, compiled once per dtype);
- ``copy``: a device-to-device copy of the same number of bytes, the bandwidth ceiling.

Bytes moved count each input read once and each output written once (``relax_`` on n float32
elements: 4n + 4n read, 4n written), the same for every implementation, so GB/s is the effective
bandwidth of the op. On CPU, in-place ops can beat a copy of the same bytes: a copy's stores first
read the destination line into cache (write-allocate), in-place stores do not. Every implementation's
result is checked against float64 math before it is timed; the normalized error is recorded as
``max_error``.

Run: ``python -m benchmarks ops [--quick] [--sizes 2^16:2^24] [--device cuda]``.
"""

import argparse
import statistics
import time

import torch

import revdeq_kernels as rk

from . import common

NAME = "ops"
SCHEMA = "revdeq-bench-ops/1"
OPS = ("relax_", "unrelax_", "residual")
BETA = 0.8  # a typical RevDEQ relaxation; unrelax_ then amplifies by 1/(1-BETA) = 5 per call
# label -> (state/z dtype, f_val/fz dtype). "mixed" is the RevDEQ case of a float32 state updated with
# the output of a bfloat16 layer.
DTYPES = {
    "float32": (torch.float32, torch.float32),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "mixed": (torch.float32, torch.bfloat16),
}
FULL_SIZES = {"cpu": "2^16:2^24", "cuda": "2^16:2^28"}
QUICK_SIZES = {"cpu": "2^16,2^19,2^22", "cuda": "2^20,2^24,2^26"}
# Timing budget per measurement: (min_time seconds, min_samples).
TIMING = {("cpu", False): (0.4, 7), ("cpu", True): (0.03, 3), ("cuda", False): (0.03, 10), ("cuda", True): (0.01, 5)}
# Each torch.compile costs seconds on CPU (the first one tens of seconds), so --quick compiles one dtype.
QUICK_COMPILE_DTYPES = ("float32",)
BASELINES = ("naive", "inplace", "lerp_", "compile")
MUTATING = ("backend", "inplace", "lerp_")  # kinds that update the state in place (restored between samples)
# Why Triton is not timed on CPU tensors.
TRITON_ON_CPU = ("Triton runs on CPU only under TRITON_INTERPRET=1, a Python interpreter for tests that is "
                 "orders of magnitude slower than any kernel; timing it would say nothing")


# ---------------------------------------------------------------------------------------------
# what is timed


def naive_relax(y, f):
    return (1 - BETA) * y + BETA * f


def naive_unrelax(z, f):
    return (z - BETA * f) / (1 - BETA)


def naive_residual(z, f):
    return (z - f).norm(), f.norm()


NAIVE = {"relax_": naive_relax, "unrelax_": naive_unrelax, "residual": naive_residual}


def inplace_relax(y, f):
    return y.mul_(1 - BETA).add_(f, alpha=BETA)


def inplace_unrelax(z, f):
    return z.sub_(f, alpha=BETA).div_(1 - BETA)


INPLACE = {"relax_": inplace_relax, "unrelax_": inplace_unrelax}


def _backend_impl(op, backend):
    fn = getattr(rk, op)
    if op == "residual":
        return lambda z, f: fn(z, f, backend=backend)
    return lambda s, f: fn(s, f, BETA, backend=backend)


def _lerp(state, f):
    return state.lerp_(f if f.dtype == state.dtype else f.to(state.dtype), BETA)


def bytes_moved(op: str, n: int, state_dtype: torch.dtype, f_dtype: torch.dtype) -> int:
    """Each input read once, each output written once.

    Example:
        >>> bytes_moved("relax_", 1024, torch.float32, torch.bfloat16)  # read 4+2, write 4 per element
        10240
    """
    s, f = state_dtype.itemsize, f_dtype.itemsize
    if op == "residual":
        out = 8 if state_dtype == torch.float64 else 4
        return n * (s + f) + 2 * out
    return n * (2 * s + f)


def expected(op, state, f):
    """float64 truth for one call on (state, f)."""
    s, fv = state.double(), f.double()
    if op == "relax_":
        return (1 - BETA) * s + BETA * fv
    if op == "unrelax_":
        return (s - BETA * fv) / (1 - BETA)
    d = s - fv
    return torch.stack([(d * d).sum(), (fv * fv).sum()])


def normalized_error(op, got, want) -> float:
    """max |got - want| / max |want|: a scale-free error that is ~eps for a correct op."""
    if isinstance(got, tuple):  # the naive residual returns the two norms
        got = torch.stack([got[0].double() ** 2, got[1].double() ** 2])
    got = got.double()
    return ((got - want).abs().max() / want.abs().max()).item()


def error_bound(op, kind, state_dtype, f_dtype) -> float:
    """What a correct implementation of this kind stays below, in units of normalized_error.

    Our backends compute in float32 (float64 for float64 states) and round once to the state's dtype,
    so a few units of the state's rounding. The PyTorch baselines round intermediates to the least
    precise input dtype (``b * f`` with f bfloat16 is bfloat16), so a few units of f's rounding.
    unrelax_ amplifies everything by 1/(1-BETA). PyTorch's norm accumulates float32 without
    compensation, so its error grows with n (about 1e-3 at 2^24): its bound is a flat 1e-2.
    """
    if kind != "backend" and op == "residual":
        return 1e-2
    dtype = state_dtype if kind == "backend" else f_dtype
    amplification = 1 / abs(1 - BETA) if op == "unrelax_" else 1.0
    return 16 * torch.finfo(dtype).eps * amplification


class Case:
    """The buffers for one (op, dtype, size): ``n_sets`` rotating copies of one random (state, f) pair."""

    def __init__(self, op, dtype_label, n, device, cache_bytes, seed=0):
        self.op, self.dtype_label, self.n, self.device = op, dtype_label, n, device
        self.state_dtype, self.f_dtype = DTYPES[dtype_label]
        self.bytes = bytes_moved(op, n, self.state_dtype, self.f_dtype)
        g = torch.Generator(device=device).manual_seed(seed)
        # N(0, 1) values, never zeros: drawn once, then copied into every set.
        self.state0 = torch.randn(n, generator=g, device=device).to(self.state_dtype)
        self.f0 = torch.randn(n, generator=g, device=device).to(self.f_dtype)
        self.set_bytes = n * (self.state_dtype.itemsize + self.f_dtype.itemsize)
        self.n_sets = common.rotation_count(self.set_bytes, cache_bytes)
        self.states = [self.state0.clone() for _ in range(self.n_sets)]
        self.fs = [self.f0.clone() for _ in range(self.n_sets)]
        self.want = expected(op, self.state0, self.f0)

    def restore(self):
        for s in self.states:
            s.copy_(self.state0)

    def check(self, fn) -> float:
        """Runs fn once on a fresh copy and returns its normalized error against float64 math."""
        state = self.state0.clone()
        got = fn(state, self.f0.clone())
        return normalized_error(self.op, got, self.want)

    def free(self):
        self.states = self.fs = self.state0 = self.f0 = self.want = None


def implementations(op, device, args):
    """[(name, kind, fn or None, reason if skipped)] for this op on this device."""
    found = []
    report = rk.available_backends()
    for backend in ("cuda", "triton", "cpp", "reference"):
        if backend == "triton" and device.type == "cpu":
            found.append((backend, "backend", None, TRITON_ON_CPU))
        elif backend in report[device.type]:
            found.append((backend, "backend", _backend_impl(op, backend), None))
        else:
            reason = report["unavailable"].get(f"{backend} ({device.type})")
            if reason is not None:  # None: the backend never serves this device type; nothing to say
                found.append((backend, "backend", None, reason))
    found.append(("naive", "naive", NAIVE[op], None))
    if op in INPLACE:
        found.append(("inplace", "inplace", INPLACE[op], None))
    if op == "relax_":
        found.append(("lerp_", "lerp_", _lerp, None))
    if args.no_compile:
        found.append(("compile", "compile", None, "--no-compile was given"))
    else:
        found.append(("compile", "compile", "compile", None))  # compiled lazily, once per dtype
    return [entry for entry in found if args.impls is None or entry[0] in args.impls]


# ---------------------------------------------------------------------------------------------
# the run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=common.parse_sizes, default=None,
                        help="element counts, e.g. '2^16:2^24' or '65536,2^20' (default: 2^16..2^24 on CPU, "
                             "2^16..2^28 on GPU; --quick: three sizes)")
    parser.add_argument("--ops", type=_choices("--ops", OPS), default=list(OPS),
                        help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--dtypes", type=_choices("--dtypes", DTYPES), default=list(DTYPES),
                        help=f"comma-separated subset of {','.join(DTYPES)}")
    parser.add_argument("--impls", type=_choices("--impls", ("cuda", "triton", "cpp", "reference", *BASELINES)),
                        default=None, help="only these implementations (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend for the compile baseline (default: inductor)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds of timed work per measurement (default: 0.4 CPU, 0.03 GPU; less with --quick)")


def _choices(flag, allowed):
    def parse(text):
        chosen = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in chosen if x not in allowed]
        if bad or not chosen:
            raise argparse.ArgumentTypeError(f"{flag}: expected a comma-separated subset of {', '.join(allowed)}; "
                                             f"got {text!r}")
        return chosen

    return parse


def default_path(device: torch.device, quick: bool, out_dir: str | None) -> str:
    return common.result_path(NAME, device, quick, out_dir)


def run(args) -> str:
    """Runs the benchmark described by parsed ``args``; writes the JSON (and plots); returns its path."""
    device = common.resolve_device(args.device)
    common.set_threads(args.threads)
    sizes = args.sizes or common.parse_sizes((QUICK_SIZES if args.quick else FULL_SIZES)[device.type])
    min_time, min_samples = TIMING[(device.type, bool(args.quick))]
    timing = {"min_time": args.min_time if args.min_time is not None else min_time, "min_samples": min_samples}
    cache_bytes = common.last_level_cache_bytes(device)
    env = common.environment(device)
    common.say(f"ops benchmark on {env['device_name']} ({device.type}, {env['torch_threads']} threads), "
               f"sizes {', '.join(common.size_label(n) for n in sizes)}")
    common.warn_if_busy()

    plans = {op: implementations(op, device, args) for op in args.ops}
    skipped = [{"op": op, "impl": name, "kind": kind, "reason": reason}
               for op in args.ops for name, kind, fn, reason in plans[op] if fn is None]
    compiler = NaiveCompiler(None if args.no_compile else args.compile_backend,
                             QUICK_COMPILE_DTYPES if args.quick else tuple(DTYPES))
    results, copies = [], []
    progress = common.Progress(len(sizes) * len(args.ops) * len(args.dtypes), "ops")
    try:
        for n in sizes:
            for op in args.ops:
                for dtype_label in args.dtypes:
                    progress.step(f"{op} {dtype_label} {common.size_label(n)}")
                    case = Case(op, dtype_label, n, device, cache_bytes)
                    impls = []
                    for name, kind, fn, _ in plans[op]:
                        if kind == "compile" and fn is not None:
                            fn = compiler.get(case)
                        if fn is not None:
                            impls.append((name, kind, fn))
                    rows, copy = measure_case(case, impls, cache_bytes, timing)
                    results += rows
                    copies.append({"op": op, "dtype": dtype_label, "n": n, **copy})
                    case.free()
    finally:
        progress.close()

    payload = common.payload(SCHEMA, NAME, env, args.quick, {
            "sizes": sizes, "ops": args.ops,
            "dtypes": {k: [str(DTYPES[k][0])[6:], str(DTYPES[k][1])[6:]] for k in args.dtypes},
            "beta": BETA, "compile_backend": compiler.backend, "cache_multiple": common.CACHE_MULTIPLE,
            "max_sets": common.MAX_SETS, **timing, "bytes_rule": "each input read once, each output written once",
    }, copy=copies, results=results, skipped=skipped + compiler.failures, compile_times=compiler.times)
    path = args.output or default_path(device, args.quick, args.out)
    from . import plots

    return common.publish(payload, path, format_table(payload), None if args.no_plots else plots.plot)


class NaiveCompiler:
    """``torch.compile`` of the naive expressions, compiled on first use for each (op, dtype).

    ``dynamic=True``: one compilation serves every size, so the three dtypes of one op stay well
    under dynamo's recompile limit. A failure (no C++ compiler, a backend that does not exist, ...)
    is recorded once in ``failures`` and that (op, dtype) is skipped from then on.
    """

    def __init__(self, backend: str | None, dtypes: tuple):
        self.backend, self.dtypes = backend, dtypes
        self.failures, self.times = [], []
        self._done = {}  # (op, dtype label) -> compiled fn, or None when it failed or was not wanted

    def get(self, case):
        key = (case.op, case.dtype_label)
        if key not in self._done:
            if case.dtype_label in self.dtypes:
                self._done[key] = self._compile(case)
            else:
                self._done[key] = None
                self.failures.append({"op": case.op, "impl": "compile", "kind": "compile", "dtype": case.dtype_label,
                                      "reason": f"--quick compiles {', '.join(self.dtypes)} only (each compilation "
                                                "takes seconds); the full run compiles every dtype"})
        return self._done[key]

    def _compile(self, case):
        start = time.perf_counter()
        try:
            fn = torch.compile(NAIVE[case.op], dynamic=True, backend=self.backend)
            fn(case.state0.clone(), case.f0.clone())  # compiles
        except Exception as exc:  # whatever went wrong, report it and keep benchmarking the rest
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            self.failures.append({"op": case.op, "impl": "compile", "kind": "compile", "dtype": case.dtype_label,
                                  "reason": f"torch.compile(backend={self.backend!r}) failed: "
                                            f"{type(exc).__name__}: {first_line}"})
            return None
        seconds = time.perf_counter() - start
        self.times.append({"op": case.op, "dtype": case.dtype_label, "seconds": seconds})
        common.say(f"compiled naive {case.op} for {case.dtype_label} in {seconds:.1f} s")
        return fn


def measure_case(case, impls, cache_bytes, timing):
    """Checks each implementation against float64 math, then times them all, interleaved with a copy
    of the same bytes. ``impls`` lists (name, kind, fn); returns (result rows, copy summary)."""
    checked = []
    for name, kind, fn in impls:
        error = case.check(fn)
        bound = error_bound(case.op, kind, case.state_dtype, case.f_dtype)
        if not error <= bound:
            common.say(f"WARNING: {name} {case.op} {case.dtype_label} n={case.n} is off by {error:.2e} "
                       f"(bound {bound:.1e}); timing it anyway, flagged incorrect")
        checked.append((name, kind, fn, error, bound))
    ceiling = common.CopyCeiling(case.bytes, case.device, cache_bytes)
    states, fs = case.states, case.fs
    jobs = [ceiling.job] + [
        common.Job(lambda i, fn=fn: fn(states[i], fs[i]), case.n_sets,
                   case.restore if kind in MUTATING and case.op != "residual" else None)
        for _, kind, fn, _, _ in checked]
    copy_stats, *stats = common.time_jobs(jobs, case.device, **timing)
    copy = {**copy_stats, "bytes": ceiling.bytes, "gbps": ceiling.bytes / copy_stats["median_s"] / 1e9}
    rows = []
    for (name, kind, _, error, bound), st in zip(checked, stats):
        gbps = case.bytes / st["median_s"] / 1e9
        rows.append({
            "op": case.op, "dtype": case.dtype_label, "state_dtype": str(case.state_dtype)[6:],
            "f_dtype": str(case.f_dtype)[6:], "n": case.n, "impl": name, "kind": kind, "bytes": case.bytes, **st,
            "gbps": gbps, "copy_gbps": copy["gbps"], "pct_of_copy": 100.0 * gbps / copy["gbps"],
            "max_error": error, "error_bound": bound, "correct": bool(error <= bound),
            "n_sets": case.n_sets, "rotated_bytes": case.n_sets * case.set_bytes,
        })
    _add_ratios(rows)
    return rows, copy


def _add_ratios(rows):
    """speedup_vs_X = time of X / time of this row, for every baseline measured alongside."""
    times = {r["impl"]: r["median_s"] for r in rows}
    for row in rows:
        for base in BASELINES:
            if base in times:
                row[f"speedup_vs_{base}"] = times[base] / row["median_s"]


# ---------------------------------------------------------------------------------------------
# the console table


def format_table(payload: dict) -> str:
    """A fixed-width table of every result, grouped by op, dtype and size."""
    env = payload["env"]
    lines = [f"ops on {env['device_name']} ({env['device_type']}, {env['torch_threads']} threads), torch "
             f"{env['torch']}, commit {env['commit'][:10]}{' (dirty)' if env.get('commit_dirty') else ''}"]
    header = (f"{'op':<9}{'dtype':<9}{'n':>6}  {'impl':<10}{'median':>11}{'p20-p80':>19}{'MB':>9}{'GB/s':>8}"
              f"{'%copy':>7}{'x naive':>9}{'error':>9}  note")
    lines += [header, "-" * len(header)]
    previous = None
    for r in payload["results"]:
        group = (r["op"], r["dtype"], r["n"])
        if previous is not None and group != previous:
            lines.append("")
        previous = group
        vs = r.get("speedup_vs_naive")
        note = "" if r["correct"] else f"INCORRECT (bound {r['error_bound']:.0e})"
        lines.append(
            f"{r['op']:<9}{r['dtype']:<9}{common.size_label(r['n']):>6}  {r['impl']:<10}"
            f"{format_seconds(r['median_s']):>11}{format_seconds(r['p20_s']) + '-' + format_seconds(r['p80_s']):>19}"
            f"{r['bytes'] / 1e6:>9.2f}{r['gbps']:>8.1f}{r['pct_of_copy']:>6.0f}%"
            f"{(f'{vs:.2f}x' if vs is not None else '-'):>9}{r['max_error']:>9.0e}  {note}".rstrip())
    if payload["copy"]:
        lines.append("")
        lines.append("copy ceiling (same bytes, same run): " + ", ".join(
            f"{c['bytes'] / 1e6:.3g} MB {c['gbps']:.1f} GB/s" for c in distinct_copies(payload["copy"])))
    where = {}  # (impl, reason) -> the ops (and dtypes) it was skipped for
    for s in payload["skipped"]:
        where.setdefault((s["impl"], s["reason"]), []).append(f"{s['op']} {s.get('dtype', '')}".strip())
    for (impl, reason), cases in where.items():
        lines.append(f"skipped {impl} ({', '.join(cases)}): {reason}")
    return "\n".join(lines)


def distinct_copies(copies):
    """The copy ceiling per distinct byte count (the median over the cases that moved that many)."""
    by_bytes = {}
    for c in copies:
        by_bytes.setdefault(c["bytes"], []).append(c["gbps"])
    return [{"bytes": b, "gbps": statistics.median(g)} for b, g in sorted(by_bytes.items())]


def format_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"
