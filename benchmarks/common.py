"""Helpers every benchmark shares: timing, cache-defeating rotation, copy bandwidth, the environment
stamp, JSON files and a progress bar.

Timing protocol (both devices): the work is spread over ``n_sets`` buffer sets whose total size is
several times the last-level cache, so each timed call finds its inputs in DRAM/HBM, not in cache.
One *sample* runs the call once on every set and is divided by ``n_sets``; before each sample an
optional ``restore`` puts fresh values back (untimed), so an in-place op never runs on values it
has already blown up (unrelax_ multiplies by 1/(1-beta) per call). Reported: the median sample and
the 20th/80th percentiles.

Implementations that are compared (and the copy ceiling) are sampled in turn, not one after the
other, so a burst of load from elsewhere shifts them together (``time_jobs``).

- CPU: each sample is ``torch.utils.benchmark.Timer.timeit(n_sets)`` (it also warms up, disables
  the garbage collector and pins the thread count).
- CUDA: each sample is a CUDA-event pair around the ``n_sets`` calls, queued behind a short
  ``torch.cuda._sleep`` so the host finishes launching before the GPU starts: the time is device
  time, not Python launch overhead (as with ``triton.testing.do_bench``).
"""

import datetime
import functools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FALLBACK_CACHE_BYTES = 64 << 20
# Rotate over buffers totalling at least this many times the last-level cache: by the time a set
# comes round again, everything touched since has evicted it.
CACHE_MULTIPLE = 3
# ...but never more sets than this: below ~2^14 elements per set a call costs mostly Python dispatch,
# and thousands of sets would only make the run slow (results record how many bytes rotated).
MAX_SETS = 512


# ---------------------------------------------------------------------------------------------
# sizes and names


def parse_sizes(text: str) -> list:
    """Element counts from ``"65536,2^20,1<<22"`` or a power-of-two range ``"2^16:2^24"``.

    Example:
        >>> parse_sizes("2^16:2^18,1000")
        [65536, 131072, 262144, 1000]
    """
    sizes = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if ":" in item:
            lo, hi = (_parse_size(x) for x in item.split(":", 1))
            if lo & (lo - 1) or hi & (hi - 1) or lo > hi:
                raise ValueError(f"--sizes: a range must run between powers of two, low to high; got {item!r}")
            sizes += [1 << k for k in range(lo.bit_length() - 1, hi.bit_length())]
        else:
            sizes.append(_parse_size(item))
    if not sizes:
        raise ValueError(f"--sizes: expected a comma-separated list of element counts, got {text!r}")
    return sizes


def _parse_size(item: str) -> int:
    m = re.fullmatch(r"(\d+)\s*(?:(\^|\*\*|<<)\s*(\d+))?", item.strip())
    if not m:
        raise ValueError(f"--sizes: {item!r} is not an element count (examples: 65536, 2^16, 1<<16)")
    base, op, exp = m.groups()
    value = int(base) if op is None else (int(base) << int(exp) if op == "<<" else int(base) ** int(exp))
    if value < 1:
        raise ValueError(f"--sizes: element counts must be positive, got {item!r}")
    return value


def size_label(n: int) -> str:
    """``2^20`` for powers of two, the plain count otherwise."""
    return f"2^{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else str(n)


def slug(text: str) -> str:
    """A file-name-safe, lower-case version of a device name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def warn_if_busy() -> None:
    """Timings on a machine that other work keeps busy are noise; say so up front (and the JSON
    records the load average at start and end)."""
    if not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        say(f"WARNING: this machine is busy (1-minute load average {load:.1f} on {cores} cores): CPU timings "
            "will be noisy, and GPU launch overheads may be too")


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads: expected a positive thread count, got {threads}")
        torch.set_num_threads(threads)


def resolve_device(requested: str | None) -> torch.device:
    """``cuda`` when a GPU is visible and nothing was asked for, else what was asked for (checked)."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda, got {requested!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {requested!r} was asked for but torch sees no CUDA device "
                         f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    return device


# ---------------------------------------------------------------------------------------------
# the machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def last_level_cache_bytes(device: torch.device) -> int:
    """The L2 of a GPU, the largest cache of CPU 0; a generous fallback when it cannot be read."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or FALLBACK_CACHE_BYTES
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    entries = os.listdir(base) if os.path.isdir(base) else []
    for entry in (e for e in entries if e.startswith("index")):
        try:
            with open(os.path.join(base, entry, "size")) as fh:
                text = fh.read().strip().upper()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", text)
        if m:
            sizes.append(int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)])
    return max(sizes) if sizes else FALLBACK_CACHE_BYTES


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """Everything a reader needs to judge a result file: code, versions, machine, load."""
    import revdeq_kernels as rk

    env = {
        "commit": _git("rev-parse", "HEAD") or "unknown",
        "commit_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "cuda_runtime": torch.version.cuda,
        "revdeq_kernels": rk.__version__,
        "device_type": device.type,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "last_level_cache_bytes": last_level_cache_bytes(device),
        "backends": rk.available_backends(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_bytes"] = int(props.total_memory)
        env["gpu_count"] = torch.cuda.device_count()
    if hasattr(os, "getloadavg"):
        env["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    return env


# ---------------------------------------------------------------------------------------------
# timing


def rotation_count(set_bytes: int, cache_bytes: int) -> int:
    """How many buffer sets of ``set_bytes`` to rotate through so none is still cached when reused."""
    return min(MAX_SETS, max(2, math.ceil(CACHE_MULTIPLE * cache_bytes / max(1, set_bytes))))


def summarize(samples: list) -> dict:
    """Median and 20/80 percentiles (seconds) of per-call times."""
    if len(samples) == 1:
        q20 = q80 = samples[0]
    else:
        cuts = statistics.quantiles(samples, n=10, method="inclusive")  # deciles: 20% is cuts[1]
        q20, q80 = cuts[1], cuts[7]
    return {"median_s": statistics.median(samples), "p20_s": q20, "p80_s": q80, "samples": len(samples)}


class Job:
    """One thing to time: ``call(i)`` runs the work once on buffer set ``i`` (0 <= i < n_sets);
    ``restore()``, if given, puts fresh inputs back before each sample (untimed)."""

    def __init__(self, call, n_sets: int, restore=None):
        self.call, self.n_sets, self.restore = call, n_sets, restore


def time_calls(call, n_sets: int, device: torch.device, *, restore=None, **timing) -> dict:
    """Per-call time of ``call(i)`` over buffer sets 0..n_sets-1: ``time_jobs`` for one job.

    Example:
        >>> xs = [torch.randn(1 << 20) for _ in range(4)]
        >>> time_calls(lambda i: xs[i].sum(), 4, torch.device("cpu"))["median_s"] > 0
        True
    """
    return time_jobs([Job(call, n_sets, restore)], device, **timing)[0]


def time_jobs(jobs: list, device: torch.device, *, min_time: float = 0.2, min_samples: int = 5,
              max_samples: int = 200) -> list:
    """Times several jobs with their samples interleaved (a sample of each in turn), so a burst of
    load from elsewhere hits all of them alike and their ratios stay meaningful on a busy machine.

    Args:
        jobs: ``Job`` list; one sample of a job is one call on each of its buffer sets, in order.
        min_time: sample a job until this much timed work (seconds) has accumulated...
        min_samples, max_samples: ...with at least / at most this many samples.

    Returns: for each job, ``summarize`` of its per-call samples plus ``calls_per_sample``.

    Example:
        >>> xs, ys = [torch.randn(1 << 20) for _ in range(2)], [torch.randn(1 << 20) for _ in range(2)]
        >>> a, b = time_jobs([Job(lambda i: xs[i].sum(), 2), Job(lambda i: ys[i].mul(2), 2)], torch.device("cpu"))
    """
    make = _CudaSampler if device.type == "cuda" else _CpuSampler
    samplers = [make(job, device) for job in jobs]
    samples = [[] for _ in jobs]

    def enough(i):
        done = samples[i]
        spent = sum(done) * jobs[i].n_sets
        return len(done) >= max_samples or (len(done) >= min_samples and spent >= min_time)

    while not all(enough(i) for i in range(len(jobs))):
        for i, sampler in enumerate(samplers):
            if not enough(i):
                samples[i].append(sampler.sample())
    return [{**summarize(done), "calls_per_sample": job.n_sets} for done, job in zip(samples, jobs)]


class _CpuSampler:
    """A sample is ``torch.utils.benchmark.Timer.timeit(n_sets)``: it warms up (two calls), pins the
    thread count and disables the garbage collector; sets are used in rotation throughout."""

    def __init__(self, job: Job, device: torch.device):
        from torch.utils import benchmark

        self.job, self.position = job, 0

        def rotate():
            job.call(self.position % job.n_sets)
            self.position += 1

        self.timer = benchmark.Timer(stmt="rotate()", globals={"rotate": rotate}, num_threads=torch.get_num_threads())

    def sample(self) -> float:
        if self.job.restore is not None:
            self.job.restore()
        return self.timer.timeit(number=self.job.n_sets).median


@functools.cache
def _sleep_cycles_per_second(device_index: int) -> float:
    """Calibrates torch.cuda._sleep, which spins for a number of GPU clock cycles."""
    cycles = 10_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)  # first call pays for loading the kernel
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)


class _CudaSampler:
    """A sample is a CUDA-event pair around one call on each set, queued behind a ``torch.cuda._sleep``
    that keeps the GPU busy while the host queues the calls: the time is device time, as with
    ``triton.testing.do_bench``, not Python launch overhead."""

    def __init__(self, job: Job, device: torch.device):
        self.job, self.device = job, device
        with torch.cuda.device(device):
            job.call(0)  # warm-up: compilation, autotuning, allocator growth
            torch.cuda.synchronize()
            host_start = time.perf_counter()
            for i in range(job.n_sets):
                job.call(i)
            launch_s = time.perf_counter() - host_start  # host time to queue one sample
            torch.cuda.synchronize()
            # Long enough to cover queueing one sample (with margin), no longer: it is dead time.
            sleep_s = 1.5 * launch_s + 50e-6
            self.sleep_cycles = 0
            if hasattr(torch.cuda, "_sleep"):
                self.sleep_cycles = int(sleep_s * _sleep_cycles_per_second(torch.cuda.current_device()))
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def sample(self) -> float:
        job = self.job
        with torch.cuda.device(self.device):
            if job.restore is not None:
                job.restore()
            if self.sleep_cycles:
                torch.cuda._sleep(self.sleep_cycles)
            self.start.record()
            for i in range(job.n_sets):
                job.call(i)
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3 / job.n_sets


class CopyCeiling:
    """Device-to-device ``dst.copy_(src)`` moving ``total_bytes`` (half read, half written, rounded down
    to whole float32 words): the bandwidth ceiling, timed alongside the ops it bounds.

    Example:
        >>> ceiling = CopyCeiling(12 << 20, torch.device("cpu"), cache_bytes=32 << 20)
        >>> stats = time_jobs([ceiling.job], torch.device("cpu"))[0]
        >>> gbps = ceiling.bytes / stats["median_s"] / 1e9
    """

    def __init__(self, total_bytes: int, device: torch.device, cache_bytes: int):
        words = max(1, total_bytes // 8)  # float32 words per buffer
        self.bytes = 8 * words
        n_sets = rotation_count(self.bytes, cache_bytes)
        self.src = [torch.randn(words, device=device) for _ in range(n_sets)]
        self.dst = [torch.randn(words, device=device) for _ in range(n_sets)]  # touched: no page faults when timed
        self.job = Job(lambda i: self.dst[i].copy_(self.src[i]), n_sets)


def copy_bandwidth(total_bytes: int, device: torch.device, cache_bytes: int, **timing) -> dict:
    """``CopyCeiling`` timed on its own: the ``time_jobs`` summary plus ``bytes`` and ``gbps``."""
    ceiling = CopyCeiling(total_bytes, device, cache_bytes)
    stats = time_jobs([ceiling.job], device, **timing)[0]
    return {**stats, "bytes": ceiling.bytes, "gbps": ceiling.bytes / stats["median_s"] / 1e9}


# ---------------------------------------------------------------------------------------------
# output


def clean(obj, digits: int = 7):
    """JSON-ready copy: floats rounded to ``digits`` significant digits (timings are not more precise
    than that) and NaN/inf turned into null, which JSON cannot hold."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v, digits) for v in obj]
    return obj


def dumps(payload: dict) -> str:
    """Indented JSON, except that lists of records get one record per line: a full GPU run has
    hundreds of results, and one line each keeps the file readable and its diffs small."""
    parts = []
    for key, value in payload.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            body = ",\n".join("  " + json.dumps(v, allow_nan=False) for v in value)
            text = "[\n" + body + "\n ]"
        else:
            text = json.dumps(value, indent=1, allow_nan=False).replace("\n", "\n ")
        parts.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_json(payload: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if hasattr(os, "getloadavg") and "env" in payload:
        payload["env"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    text = dumps(clean(payload))
    with open(path, "w") as fh:
        fh.write(text)
    return path


def parse_positive_ints(option: str, text: str) -> list:
    """``"4,8,16"`` -> ``[4, 8, 16]`` (order kept); anything else is a ValueError naming ``option``.

    Example:
        >>> parse_positive_ints("--steps", "4, 8,16")
        [4, 8, 16]
    """
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{option}: expected comma-separated positive integers, got {text!r}")
    return values


def result_path(benchmark: str, device: torch.device, quick: bool, out_dir: str | None) -> str:
    """Where a run's JSON goes by default: ``<out_dir>/<benchmark>-<device>[-quick].json``.

    Example:
        >>> result_path("ops", torch.device("cpu"), True, "/tmp/b")  # '/tmp/b/ops-cpu-amd-epyc-quick.json'
    """
    name = f"cpu-{slug(cpu_model())}" if device.type == "cpu" else slug(device_name(device))
    return os.path.join(out_dir or RESULTS_DIR, f"{benchmark}-{name}{'-quick' if quick else ''}.json")


def payload(schema: int, benchmark: str, env: dict, quick: bool, config: dict, **sections) -> dict:
    """A run's JSON document: schema, benchmark name, environment, the config (``quick`` first), then the
    benchmark's own sections (``results`` and whatever else it records), in that order."""
    return {"schema": schema, "benchmark": benchmark, "env": env, "config": {"quick": bool(quick), **config},
            **sections}


def publish(payload: dict, path: str, table: str, plot=None) -> str:
    """The end of every benchmark run: write the JSON, print the table, draw the plots; returns the path.

    ``plot(payload, path)`` returns the PNG paths it wrote; None draws nothing (``--no-plots``).
    """
    write_json(payload, path)
    print(table)
    say(f"wrote {path}")
    for png in plot(payload, path) if plot is not None else ():
        say(f"wrote {png}")
    return path


def read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """A tqdm bar on a terminal; elsewhere (CI logs, captured output) a line every ~10%, so a long run
    shows it is alive without flooding the log. Works without tqdm installed."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        self._next_line = 0
        self._bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        self._start = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
        elif self.done >= self._next_line or self.done == self.total:
            self._next_line = self.done + max(1, self.total // 10)
            say(f"{self.desc}: {self.done}/{self.total} ({time.perf_counter() - self._start:.0f} s) {label}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
