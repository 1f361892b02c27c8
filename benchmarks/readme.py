"""The README's "Performance" section, generated from committed result files so it is never hand-copied:
``python -m benchmarks readme benchmarks/results/ops-cpu-....json [more.json ...]`` prints markdown.
"""

import os

from . import common
from .bench_memory import format_bytes
from .bench_ops import distinct_copies, format_seconds


def _link(path: str) -> str:
    """The path as the README should show it: relative to the repository root when inside it."""
    full = os.path.abspath(path)
    root = common.REPO_ROOT + os.sep
    return full[len(root):] if full.startswith(root) else os.path.basename(full)


def _machine(env: dict) -> str:
    if env["device_type"] == "cuda":
        return f"{env['device_name']} (CUDA {env['cuda_runtime']})"
    return f"{env['device_name']} CPU, {env['torch_threads']} threads"


def _ratio(row: dict, base: str) -> str:
    value = row.get(f"speedup_vs_{base}")
    return "-" if value is None else f"{value:.2f}x"


def ops_markdown(payload: dict, json_path: str) -> str:
    """Headline table of an ops result file: our compiled backends at the largest size measured.

    Example:
        >>> print(ops_markdown(common.read_json(p), p))  # p = "benchmarks/results/ops-cpu-amd-epyc.json"
    """
    env, results = payload["env"], payload["results"]
    ours = [r for r in results if r["kind"] == "backend" and r["impl"] != "reference"]
    if not ours:  # a pure-Python install: the reference backend is all there is
        ours = [r for r in results if r["kind"] == "backend"]
    n = max(r["n"] for r in ours)
    rows = [r for r in ours if r["n"] == n]
    stem = os.path.splitext(_link(json_path))[0]
    copy = distinct_copies(payload["copy"])[-1]  # the most bytes; the median over the cases that moved them
    lines = [
        f"Measured on {_machine(env)}; torch {env['torch']}"
        + (f", Triton {env['triton']}" if env["device_type"] == "cuda" and env.get("triton") else "")
        + f"; commit `{env['commit'][:10]}`{' (uncommitted changes)' if env.get('commit_dirty') else ''}; "
        f"{env['date_utc'][:10]}. Source: [`{_link(json_path)}`]({_link(json_path)}), regenerate with "
        f"`python -m benchmarks readme {_link(json_path)}`.",
        "",
        f"{common.size_label(n)} elements, median time; bytes moved count each input read once and each output "
        "written once; *% of copy* compares with a device-to-device copy of the same bytes in the same run; "
        "*vs X* is X's time divided by ours (naive: `(1-b)*y + b*f`, `(z - b*f)/(1-b)`, `(z - f).norm()` and "
        "`f.norm()`; in-place: `y.mul_(1-b).add_(f, alpha=b)`, `z.sub_(f, alpha=b).div_(1-b)`). The copy ran at "
        f"{copy['gbps']:.1f} GB/s on {copy['bytes'] / 1e6:.3g} MB.",
        "",
        "| op | dtypes (state, f) | backend | time | GB/s | % of copy | vs naive | vs in-place | vs `lerp_` "
        "| vs `torch.compile` |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        flag = "" if r["correct"] else " (incorrect!)"
        lines.append(
            f"| `{r['op']}` | {r['dtype']} ({r['state_dtype']}, {r['f_dtype']}) | {r['impl']}{flag} | "
            f"{format_seconds(r['median_s'])} | {r['gbps']:.1f} | {r['pct_of_copy']:.0f}% | {_ratio(r, 'naive')} | "
            f"{_ratio(r, 'inplace')} | {_ratio(r, 'lerp_')} | {_ratio(r, 'compile')} |")
    ops = list(dict.fromkeys(r["op"] for r in results))
    lines += ["", "GB/s against size, every implementation: "
              + ", ".join(f"[`{op}`]({stem}-{op.rstrip('_')}.png)" for op in ops) + "."]
    skipped = {(s["impl"], s["reason"]) for s in payload["skipped"]}
    if skipped:
        lines += ["", "Not measured: " + "; ".join(f"{impl}: {reason}" for impl, reason in sorted(skipped)) + "."]
    return "\n".join(lines)


def _source(env: dict, json_path: str) -> str:
    return (f"Measured on {_machine(env)}; torch {env['torch']}; commit `{env['commit'][:10]}`"
            f"{' (uncommitted changes)' if env.get('commit_dirty') else ''}; {env['date_utc'][:10]}. Source: "
            f"[`{_link(json_path)}`]({_link(json_path)}), regenerate with "
            f"`python -m benchmarks readme {_link(json_path)}`.")


def memory_markdown(payload: dict, json_path: str) -> str:
    """Memory and time of a training step at the fewest and the most solver steps, per f and method.

    Example:
        >>> print(memory_markdown(common.read_json(p), p))  # p = "benchmarks/results/memory-cpu-amd-epyc.json"
    """
    env, cfg = payload["env"], payload["config"]
    cuda = cfg["memory_headline"] == "cuda_peak_bytes"
    metric = ("peak CUDA memory of the step above what was allocated before it (`max_memory_allocated`)" if cuda
              else "bytes autograd saves for the backward during the method's forward (`saved_tensors_hooks`; a "
                   "CPU has no allocator statistics), f's parameters and the loss's excluded")
    sizes = "; ".join(f"{i['f_kind']}: state {tuple(i['state_shape'])}, {i['parameters']:,} parameters"
                      for i in cfg["f"])
    summary = payload["summary"]
    lo, hi = summary[0]["steps_lo"], summary[0]["steps_hi"]
    stem = os.path.splitext(_link(json_path))[0]
    lines = [
        _source(env, json_path),
        "",
        f"One training step (forward, loss, backward) of f for N solver steps (2N evaluations of f; beta "
        f"{cfg['beta']}); {sizes}. Memory is the {metric}. *vs unrolled* is the step's time over autograd "
        "through the unrolled loop at the same N; the gradient error is the largest relative error over f's "
        "parameters against the float64 gradient of the unrolled loop.",
        "",
        f"| f | method | memory, N={lo} | memory, N={hi} | ratio | time/step, N={hi} | vs unrolled "
        f"| grad error, N={hi} |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        ratio = "-" if s["memory_ratio"] is None else f"{s['memory_ratio']:.2f}x"
        vs = "-" if s["time_vs_unrolled_hi"] is None else f"{s['time_vs_unrolled_hi']:.2f}x"
        err = "-" if s["grad_rel_error_hi"] is None else f"{s['grad_rel_error_hi']:.1e}"
        lines.append(f"| {s['f_kind']} | {s['method']} | {format_bytes(s['memory_lo'])} | "
                     f"{format_bytes(s['memory_hi'])} | {ratio} | {format_seconds(s['time_hi_s'])} | {vs} | {err} |")
    notes = ["*revdeq*: float64 states, reversible backward; *revdeq_exact*: `exact=True`, bit-exact reconstruction "
             "for m bits per element per half-step; *checkpoint*: `torch.utils.checkpoint` per step."]
    drifts = [r["drift"] for r in payload["results"] if r["method"] == "revdeq" and r["steps"] == hi and r["drift"]]
    if drifts and max(drifts) > 1e-3:
        notes.append(f"At N={hi} RevDEQ's float64 states reconstruct the start with a relative drift up to "
                     f"{max(drifts):.0e} (`info['drift']`): the early steps it garbles weigh little in the gradient "
                     "of a contracting f, but the gradient error shows it; exact mode has no drift.")
    if "torchdeq" in cfg["methods"]:
        notes.append(f"*torchdeq*: `get_deq()` defaults at the same 2N evaluations; its gradient is the "
                     f"{cfg['torchdeq_gradient']}.")
    lines += ["", " ".join(notes), "",
              f"Against N, every method: [memory]({stem}-memory.png), [time]({stem}-time.png)."]
    if payload["skipped"]:
        lines += ["", "Not measured: " + "; ".join(_skipped(s) for s in payload["skipped"]) + "."]
    return "\n".join(lines)


def _skipped(s: dict) -> str:
    where = "" if s["f_kind"] is None else f" ({s['f_kind']}, N={s['steps']})"
    return f"{s['method']}{where}: {s['reason']}"


SECTIONS = {"ops": ops_markdown, "memory": memory_markdown}


def markdown(paths: list) -> str:
    parts = ["## Performance", ""]
    for path in paths:
        payload = common.read_json(path)
        kind = payload.get("benchmark")
        if kind not in SECTIONS:
            raise ValueError(f"readme: {path} holds a {kind!r} benchmark; expected one of {', '.join(SECTIONS)}")
        parts += [SECTIONS[kind](payload, path), ""]
    return "\n".join(parts).rstrip() + "\n"
