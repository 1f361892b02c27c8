#!/usr/bin/env python3
"""The mutation check: plant known kernel bugs one at a time and show the emulated suite fails on each.

    python tests/cuda_emulation/mutations.py [--only NAME ...] [--out DIR] [--list]

For each mutation: a copy of csrc/ with one textual change, built and run as the suite runs it, in
order of cost until one run fails: the plain build (`emu_tests --quick`), the AddressSanitizer +
UBSan build (`--quick`), the ThreadSanitizer build (`--small`). A mutation that every run passes is
a hole in the suite. Prints a table (mutation, what caught it, the first failing line) and exits 1 if
any mutation survived. Takes a few minutes per mutation on 2 cores; not part of CI. The last recorded
result is in tests/cuda_emulation/README.md.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import emu_build as build  # noqa: E402


@dataclass
class Mutation:
    name: str
    what: str
    path: str  # relative to csrc/
    old: str
    new: str


MUTATIONS = [
    Mutation("missing-barrier", "block_sum2 reads the warps' partials without waiting for them",
             "cuda/kernels/common.cuh", "    partial[1][warp] = b;\n  }\n  __syncthreads();",
             "    partial[1][warp] = b;\n  }"),
    Mutation("short-tail", "the scalar loop of relax_/unrelax_ stops one element early",
             "cuda/kernels/pointwise.cu", "  for (int64_t j = tid; j < scalars; j += G * stride) {",
             "  for (int64_t j = tid; j < scalars - 1; j += G * stride) {"),
    Mutation("wrong-alignment-test", "the vector path is taken when only the state is aligned",
             "cuda/kernels/common.cuh", "  const bool f_aligned = (f_addr + head * sizeof(F)) % (P * sizeof(F)) == 0;",
             "  const bool f_aligned = (f_addr + head * sizeof(F)) % sizeof(F) == 0;"),
    Mutation("grid-stride-step", "the grid-stride loop of relax_ advances one stride instead of kUnroll",
             "cuda/kernels/pointwise.cu", "  for (int64_t p = tid; p < span.packs; p += kUnroll * stride) {",
             "  for (int64_t p = tid; p < span.packs; p += stride) {"),
    Mutation("ticket-off-by-one", "the second-to-last block to finish sums the partials",
             "cuda/kernels/residual.cu", "last_block = atomicAdd(ticket, 1u) == gridDim.x - 1;",
             "last_block = atomicAdd(ticket, 1u) == gridDim.x - 2;"),
    Mutation("ticket-before-partial", "a block takes its ticket before it publishes its partial",
             "cuda/kernels/residual.cu",
             "    partials[blockIdx.x] = block_diff_sq;\n    partials[gridDim.x + blockIdx.x] = block_f_sq;\n"
             "    __threadfence();  // the partial is visible device-wide before the ticket says it is there\n"
             "    last_block = atomicAdd(ticket, 1u) == gridDim.x - 1;",
             "    last_block = atomicAdd(ticket, 1u) == gridDim.x - 1;\n"
             "    partials[blockIdx.x] = block_diff_sq;\n    partials[gridDim.x + blockIdx.x] = block_f_sq;\n"
             "    __threadfence();"),
    Mutation("undersized-workspace", "residual's workspace holds the diff partials only",
             "cuda/kernels/residual.cu",
             "*bytes = kTicketBytes + 2 * static_cast<size_t>(max_blocks) * sizeof(double);",
             "*bytes = kTicketBytes + static_cast<size_t>(max_blocks) * sizeof(double);"),
    Mutation("last-partial-skipped", "the last block sums all partials but the final one",
             "cuda/kernels/residual.cu", "  for (unsigned int blk = threadIdx.x; blk < gridDim.x; blk += kThreads) {",
             "  for (unsigned int blk = threadIdx.x; blk + 1 < gridDim.x; blk += kThreads) {"),
    Mutation("divergent-shuffle", "only lanes that saw a problem take part in the flags' warp reduction",
             "cuda/kernels/exact.cu",
             "  for (int offset = kLanes / 2; offset > 0; offset /= 2) "
             "flags |= __shfl_xor_sync(kFullMask, flags, offset);",
             "  if (flags != 0)\n    for (int offset = kLanes / 2; offset > 0; offset /= 2) "
             "flags |= __shfl_xor_sync(kFullMask, flags, offset);"),
    Mutation("warp-sum-short", "warp_sum starts at offset 8: lanes 16-31 never join the sum",
             "cuda/kernels/common.cuh", "  for (int offset = 16; offset > 0; offset /= 2)",
             "  for (int offset = 8; offset > 0; offset /= 2)"),
    Mutation("transpose-partner", "the bit transpose exchanges with the wrong partner lane",
             "cuda/kernels/exact_pack.cuh", "__shfl_xor_sync(kFullMask, row, kLanes / 2 >> step)",
             "__shfl_xor_sync(kFullMask, row, kLanes / 4 >> step)"),
    Mutation("extra-plane", "the forward writes a remainder word for plane m too",
             "cuda/kernels/exact.cu",
             "    if (plane < c.m && w < span.words_per_plane) words[plane * span.words_per_plane + w] = word;",
             "    if (plane <= c.m && w < span.words_per_plane) words[plane * span.words_per_plane + w] = word;"),
    Mutation("tail-load-race", "lanes past the end load element n - 1, which its lane stores (the race fixed in #13)",
             "cuda/kernels/exact.cu",
             "    const bool inside = i < n;\n    y[g] = inside ? state[i] : 0;\n"
             "    fv[g] = inside ? f[i] : narrow<F>(0.0f);",
             "    const int64_t j = i < n ? i : n - 1;\n    y[g] = state[j];\n    fv[g] = f[j];"),
    Mutation("member-search", "the multi-tensor kernels' binary search picks the member before the right one",
             "cuda/kernels/multi.cuh", "    if (chunk_end[mid] > c) {", "    if (chunk_end[mid] >= c) {"),
    Mutation("block-offset", "each multi_residual launch writes its partials over the previous launch's",
             "cuda/kernels/multi.cu", "    block_offset += static_cast<unsigned int>(grid);\n", ""),
    Mutation("address-ordered-residual", "residual's grid follows the alignment plan again (the bug fixed in #13)",
             "cuda/kernels/residual.cu", "const int grid = grid_for_indexed<Z>(n, max_blocks);",
             "const int grid = grid_for<Z>(plan_span(z_ptr, f_ptr, n), max_blocks);"),
]

RUNS = [("plain", ["--quick"]), ("asan", ["--quick"]), ("tsan", ["--small"])]  # (variant, arguments), cheapest first


def _first_failure(output):
    for line in output.splitlines():
        s = line.strip()
        if s.startswith("FAIL") or "runtime error" in s or "ERROR: AddressSanitizer" in s or \
                "WARNING: ThreadSanitizer" in s or "kernel error" in s:
            return s[:160]
    return (output.strip().splitlines() or ["(no output)"])[-1][:160]


def run_mutation(m, work):
    """(caught by, first failure line) for one mutation; caught by None when it survived."""
    kernels = os.path.join(work, "csrc")
    shutil.rmtree(kernels, ignore_errors=True)
    shutil.copytree(build.CSRC, kernels)
    path = os.path.join(kernels, m.path)
    with open(path) as fh:
        text = fh.read()
    if m.old not in text:
        return "stale", f"the text to mutate is no longer in csrc/{m.path}"
    with open(path, "w") as fh:
        fh.write(text.replace(m.old, m.new, 1))
    for variant, args in RUNS:
        try:
            binary = build.build(variant, os.path.join(work, "build"), kernels)
        except build.BuildError as exc:
            return f"{variant} build", _first_failure(str(exc))
        proc = subprocess.run([binary, *args], capture_output=True, text=True,
                              env={**os.environ, **build.RUN_ENV[variant]}, timeout=1800)
        if proc.returncode < 0:
            return variant, f"killed by {signal.Signals(-proc.returncode).name}"
        if proc.returncode != 0:
            return variant, _first_failure(proc.stdout + proc.stderr)
    return None, ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="mutation names to run (default: all)")
    parser.add_argument("--out", default=os.path.join(build.ROOT, "build", "cuda-emu-mutations"))
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:<26} {m.what}")
        return 0
    problem = build.missing_tools()
    if problem:
        print(f"mutations: cannot build the emulation: {problem}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    survived = 0
    print("| mutation | planted bug | caught by | first report |\n|---|---|---|---|", flush=True)
    for m in chosen:
        with tempfile.TemporaryDirectory(dir=args.out) as work:
            caught, line = run_mutation(m, work)
        survived += caught is None or caught == "stale"
        shown = "**survived**" if caught is None else caught
        print(f"| {m.name} | {m.what} | {shown} | `{line.replace('|', '/')}` |", flush=True)
    print(f"\n{len(chosen) - survived} of {len(chosen)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
