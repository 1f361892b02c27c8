"""PNG plots drawn from a benchmark's JSON file, so committed results can be redrawn at any time:
``python -m benchmarks plot benchmarks/results/ops-cpu-....json``.

Each benchmark kind has one drawing function; the file's ``benchmark`` field picks it.
"""

import os

from . import common

# One colour and marker per implementation, stable across plots.
STYLE = {
    "cuda": ("tab:red", "o"),
    "triton": ("tab:purple", "s"),
    "cpp": ("tab:red", "o"),
    "reference": ("tab:brown", "v"),
    "naive": ("tab:blue", "^"),
    "inplace": ("tab:cyan", "x"),
    "lerp_": ("tab:green", "D"),
    "compile": ("tab:orange", "P"),
    # memory benchmark methods
    "revdeq": ("tab:red", "o"),
    "revdeq_exact": ("tab:purple", "s"),
    "unrolled": ("tab:blue", "^"),
    "checkpoint": ("tab:orange", "P"),
    "torchdeq": ("tab:green", "D"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot(payload: dict, json_path: str) -> list:
    """Writes the PNGs for ``payload`` beside ``json_path``; returns their paths."""
    kind = payload.get("benchmark")
    if kind == "ops":
        return plot_ops(payload, json_path)
    if kind == "memory":
        return plot_memory(payload, json_path)
    raise ValueError(f"plot: {json_path} holds a {kind!r} benchmark, which has no plot (expected 'ops' or 'memory')")


def plot_ops(payload: dict, json_path: str) -> list:
    """One PNG per op: effective GB/s against size, a panel per dtype, the copy ceiling dashed.

    Example:
        >>> plot_ops(common.read_json("benchmarks/results/ops-cpu-amd-epyc.json"),
        ...          "benchmarks/results/ops-cpu-amd-epyc.json")  # writes ops-cpu-amd-epyc-relax.png, ...
    """
    plt = _pyplot()
    env = payload["env"]
    stem = os.path.splitext(json_path)[0]
    written = []
    results = payload["results"]
    for op in dict.fromkeys(r["op"] for r in results):
        rows = [r for r in results if r["op"] == op]
        dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
        fig, axes = plt.subplots(1, len(dtypes), figsize=(5.2 * len(dtypes), 4.2), squeeze=False, sharey=True)
        for ax, dtype in zip(axes[0], dtypes):
            here = [r for r in rows if r["dtype"] == dtype]
            ceiling = sorted({r["n"]: r["copy_gbps"] for r in here}.items())
            ax.plot([n for n, _ in ceiling], [g for _, g in ceiling], "k--", lw=1.2, label="copy (same bytes)")
            for impl in dict.fromkeys(r["impl"] for r in here):
                pts = sorted((r["n"], r["gbps"]) for r in here if r["impl"] == impl)
                color, marker = STYLE.get(impl, (None, "x"))
                ax.plot([n for n, _ in pts], [g for _, g in pts], marker=marker, color=color, ms=4, lw=1.4,
                        label=impl)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op}  {dtype}  ({here[0]['state_dtype']} state, {here[0]['f_dtype']} f)", fontsize=10)
            ax.set_xlabel("elements")
            ax.grid(True, which="major", alpha=0.3)
        axes[0][0].set_ylabel("effective GB/s (bytes moved / median time)")
        axes[0][-1].legend(fontsize=8, loc="best")
        fig.suptitle(f"{op} on {env['device_name']} ({env['device_type']}, {env['torch_threads']} threads), "
                     f"torch {env['torch']}, commit {env['commit'][:10]}", fontsize=10)
        fig.tight_layout()
        path = f"{stem}-{op.rstrip('_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_memory(payload: dict, json_path: str) -> list:
    """Two PNGs beside the JSON: ``-memory.png`` (the headline memory of a training step against solver steps N)
    and ``-time.png`` (median time per training step, 20-80% band), a panel per f, a line per method, log axes.

    Example:
        >>> plot_memory(common.read_json("benchmarks/results/memory-cpu-amd-epyc.json"),
        ...             "benchmarks/results/memory-cpu-amd-epyc.json")  # memory-cpu-amd-epyc-memory.png, -time.png
    """
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 200, not 2 x 10^2
    # Between decades label only 2x and 5x: every minor tick labelled runs the labels together.
    sparse = FuncFormatter(lambda v, _: f"{v:g}" if v > 0 and f"{v:.0e}"[0] in "25" else "")
    env, cfg, results = payload["env"], payload["config"], payload["results"]
    stem = os.path.splitext(json_path)[0]
    kinds = list(dict.fromkeys(r["f_kind"] for r in results))
    headline = cfg["memory_headline"]
    what = {"cuda_peak_bytes": "peak CUDA memory of a training step (MiB)",
            "saved_bytes": "bytes saved for backward (MiB)"}[headline]
    panels = {
        "memory": (what, lambda r: r[headline] / 2**20, None),
        "time": ("time per training step (ms), median and 20-80%",
                 lambda r: r["time"]["median_s"] * 1e3, lambda r: (r["time"]["p20_s"] * 1e3, r["time"]["p80_s"] * 1e3)),
    }
    written = []
    for name, (ylabel, value, band) in panels.items():
        fig, axes = plt.subplots(1, len(kinds), figsize=(5.6 * len(kinds), 4.3), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            here = [r for r in results if r["f_kind"] == kind]
            for method in dict.fromkeys(r["method"] for r in here):
                rows = sorted((r for r in here if r["method"] == method), key=lambda r: r["steps"])
                color, marker = STYLE.get(method, (None, "x"))
                steps = [r["steps"] for r in rows]
                ax.plot(steps, [value(r) for r in rows], marker=marker, color=color, ms=4, lw=1.4, label=method)
                if band is not None:
                    lo, hi = zip(*(band(r) for r in rows))
                    ax.fill_between(steps, lo, hi, color=color, alpha=0.15, lw=0)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(sparse)
            ax.set_xticks(sorted({r["steps"] for r in here}), [str(n) for n in sorted({r["steps"] for r in here})])
            info = next(i for i in cfg["f"] if i["f_kind"] == kind)
            ax.set_title(f"{kind} block, state {tuple(info['state_shape'])}", fontsize=10)
            ax.set_xlabel("solver steps N (2N evaluations of f)")
            ax.grid(True, which="major", alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=8, loc="best")
        fig.suptitle(f"One training step against depth on {env['device_name']} ({env['device_type']}, "
                     f"{env['torch_threads']} threads), torch {env['torch']}, commit {env['commit'][:10]}", fontsize=10)
        fig.tight_layout()
        path = f"{stem}-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(paths: list) -> None:
    for path in paths:
        for png in plot(common.read_json(path), path):
            common.say(f"wrote {png}")
