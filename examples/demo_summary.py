"""The last step of `make demo`: what the run showed, in a few lines, read back from the files it wrote.

    python examples/demo_summary.py runs/demo

Reads ``grad_check.json`` (examples/grad_check.py --json), ``digits.json`` (examples/train_digits.py
--out-dir) and the quick benchmarks' ``ops-*.json`` and ``memory-*.json`` from that folder. Exits with
status 1 when a file is missing, so a demo whose step silently wrote nothing does not look complete.
"""

import glob
import json
import os
import sys


def _load(folder: str, pattern: str) -> dict:
    found = sorted(glob.glob(os.path.join(folder, pattern)))
    if not found:
        raise FileNotFoundError(f"demo_summary: no {pattern} in {folder}; did that step of the demo run?")
    with open(found[0]) as fh:
        return json.load(fh)


def _ops_lines(ops: dict) -> list:
    """Per op: the fastest library backend's speedup over naive PyTorch at the largest size measured."""
    rows = [r for r in ops["results"] if r.get("kind") == "backend" and r.get("speedup_vs_naive")]
    lines = []
    for op in sorted({r["op"] for r in rows}):
        largest = max(r["n"] for r in rows if r["op"] == op)
        best = max((r for r in rows if r["op"] == op and r["n"] == largest), key=lambda r: r["speedup_vs_naive"])
        lerp = f", {best['speedup_vs_lerp_']:.2f}x torch.lerp_" if best.get("speedup_vs_lerp_") else ""
        lines.append(f"  {op:9s} {best['impl']:9s} {best['dtype']:8s} n={largest:<9d} {best['speedup_vs_naive']:.2f}x "
                     f"naive PyTorch{lerp}")
    return lines


def _memory_lines(memory: dict) -> list:
    lines = []
    for s in memory["summary"]:
        if s["method"] in ("revdeq", "unrolled"):
            lines.append(f"  {s['f_kind']:12s} {s['method']:9s} saved for backward grows {s['memory_ratio']:.1f}x "
                         f"from {s['steps_lo']} to {s['steps_hi']} steps; step time {s['time_vs_unrolled_hi']:.2f}x "
                         "unrolled autograd")
    return lines


def main(folder: str) -> int:
    grad = _load(folder, "grad_check.json")
    digits = _load(folder, "digits.json")
    ops = _load(folder, "ops-*.json")
    memory = _load(folder, "memory-*.json")
    worst = max(r["relative_error"] for r in grad["rows"])
    print("\n=== revdeq_kernels demo: summary ===")
    print(f"gradient check: worst relative error {worst:.1e} against float64 autograd through the unrolled loop "
          f"({'OK' if worst <= grad['tolerance'] else 'FAILED'}, tolerance {grad['tolerance']:.0e})")
    print(f"digits: test accuracy {digits['test_accuracy']:.1%} after {digits['config']['epochs']} epochs "
          f"({digits['seconds']:.0f} s)")
    print("fused ops (quick benchmark, this machine):")
    print("\n".join(_ops_lines(ops)))
    print("memory against depth (quick benchmark):")
    print("\n".join(_memory_lines(memory)))
    return 0 if worst <= grad["tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else os.path.join("runs", "demo")))
