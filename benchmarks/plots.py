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
    raise ValueError(f"plot: {json_path} holds a {kind!r} benchmark, which has no plot (expected 'ops')")


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


def main(paths: list) -> None:
    for path in paths:
        for png in plot(common.read_json(path), path):
            common.say(f"wrote {png}")
