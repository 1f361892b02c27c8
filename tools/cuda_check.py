#!/usr/bin/env python3
"""Compile every csrc/cuda/kernels/*.cu with nvcc alone and fail on any spill to local memory.

    python tools/cuda_check.py [--archs "8.0;9.0"] [--nvcc PATH]

The kernels are plain CUDA, so this needs nvcc and nothing else: no torch, no GPU. Each file is
compiled for every arch with `-Xptxas -v` and the flags the extension build uses; the table lists
registers, stack frame and spill bytes per kernel and arch. Exit status: 0 when every kernel
compiled without touching local memory, 1 on a compile error, a spill or a stack frame, 2 when nvcc
cannot be found.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda", "kernels")
DEFAULT_ARCHS = "8.0;9.0"

# setup.py's flags and the defines torch's CUDAExtension adds (no implicit half conversions), at the
# older C++ standard and without --expt-relaxed-constexpr: code that compiles here compiles there.
NVCC_FLAGS = [
    "-std=c++17", "-O3", "-lineinfo", "-DREVDEQ_WITH_CUDA",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]


@dataclass
class KernelStats:
    source: str  # file name, e.g. "pointwise.cu"
    arch: str  # e.g. "sm_90"
    mangled: str
    name: str  # demangled, without namespaces and parameters: "residual_kernel<float, __half>"
    registers: int = -1
    stack_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0

    @property
    def uses_local_memory(self) -> bool:
        return self.stack_bytes > 0 or self.spill_stores > 0 or self.spill_loads > 0


@dataclass
class Report:
    kernels: list
    errors: list  # (source, compiler output) for every file that failed to compile

    @property
    def ok(self) -> bool:
        return not self.errors and bool(self.kernels) and not any(k.uses_local_memory for k in self.kernels)


def find_nvcc(explicit: str | None = None) -> str | None:
    candidates = [explicit, os.environ.get("NVCC"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def parse_archs(archs: str) -> list:
    """'8.0;9.0' (or '80,90') -> ['80', '90']."""
    caps = [a.strip().replace(".", "") for a in re.split(r"[;, ]+", archs) if a.strip()]
    if not caps or not all(c.isdigit() for c in caps):
        raise ValueError(f"archs must list compute capabilities like '8.0;9.0', got {archs!r}")
    return caps


def nvcc_command(nvcc: str, source: str, caps: list, output: str) -> list:
    gencode = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in caps]
    return [nvcc, "-c", source, "-o", output, f"-I{os.path.join(ROOT, 'csrc')}", *NVCC_FLAGS, *gencode,
            "-Xptxas", "-v", f"--threads={len(caps)}"]


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def parse_ptxas(source: str, text: str) -> list:
    """KernelStats for every entry function in `ptxas -v` output (names still mangled)."""
    kernels, current, properties_of = [], None, None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = KernelStats(source, m.group(2), m.group(1), m.group(1))
            kernels.append(current)
        elif m := _PROPERTIES.search(line):
            properties_of = m.group(1)
        elif (m := _FRAME.search(line)) and current is not None and properties_of == current.mangled:
            current.stack_bytes, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif (m := _REGISTERS.search(line)) and current is not None:
            current.registers = int(m.group(1))
    return kernels


def short_name(demangled: str) -> str:
    """'void ns::(anonymous namespace)::k<float, __half>(float*, ...)' -> 'k<float, __half>'."""
    s = demangled.replace("(anonymous namespace)::", "").removeprefix("void ")
    depth = 0
    for i, ch in enumerate(s):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            s = s[:i]
            break
    base, sep, args = s.partition("<")
    return base.rsplit("::", 1)[-1] + sep + args


def demangle(kernels: list) -> None:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not kernels:
        return
    out = subprocess.run([cxxfilt], input="\n".join(k.mangled for k in kernels), capture_output=True, text=True)
    names = out.stdout.splitlines()
    if out.returncode == 0 and len(names) == len(kernels):
        for k, name in zip(kernels, names):
            k.name = short_name(name)


def compile_one(nvcc: str, source: str, caps: list, workdir: str) -> tuple:
    """(kernels, error text or None) for one .cu file."""
    name = os.path.basename(source)
    cmd = nvcc_command(nvcc, source, caps, os.path.join(workdir, name + ".o"))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return [], f"$ {' '.join(cmd)}\n{output}"
    return parse_ptxas(name, output), None


def check(archs: str = DEFAULT_ARCHS, nvcc: str | None = None, sources: list | None = None) -> Report:
    """Compile `sources` (default: every csrc/cuda/kernels/*.cu) for `archs`, in parallel."""
    nvcc = find_nvcc(nvcc)
    if nvcc is None:
        raise FileNotFoundError("nvcc not found: put it on PATH or set CUDA_HOME")
    caps = parse_archs(archs)
    if sources is None:
        sources = sorted(os.path.join(CUDA_DIR, f) for f in os.listdir(CUDA_DIR) if f.endswith(".cu"))
    kernels, errors = [], []
    with tempfile.TemporaryDirectory(prefix="revdeq_cuda_check_") as workdir:
        with ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
            for source, (found, error) in zip(sources, pool.map(lambda s: compile_one(nvcc, s, caps, workdir),
                                                                 sources)):
                kernels += found
                if error is not None:
                    errors.append((os.path.basename(source), error))
    demangle(kernels)
    return Report(kernels, errors)


def format_report(report: Report) -> str:
    lines = [f"{'file':<14} {'arch':<6} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8}  kernel"]
    for k in sorted(report.kernels, key=lambda k: (k.source, k.name, k.arch)):
        flag = "   <-- local memory" if k.uses_local_memory else ""
        lines.append(f"{k.source:<14} {k.arch:<6} {k.registers:>4} {k.stack_bytes:>5} {k.spill_stores:>8} "
                     f"{k.spill_loads:>8}  {k.name}{flag}")
    for source, error in report.errors:
        lines.append(f"\n{source}: compile error\n{error}")
    bad = [k for k in report.kernels if k.uses_local_memory]
    if report.ok:
        lines.append(f"OK: {len(report.kernels)} kernels, no spills, no stack frames")
    else:
        lines.append(f"FAILED: {len(report.errors)} files did not compile; {len(bad)} kernels use local memory"
                     + ("; no kernels found" if not report.kernels else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=DEFAULT_ARCHS, help=f"compute capabilities (default {DEFAULT_ARCHS})")
    parser.add_argument("--nvcc", default=None, help="nvcc to use (default: $NVCC, PATH, $CUDA_HOME/bin)")
    args = parser.parse_args(argv)
    try:
        report = check(args.archs, args.nvcc)
    except FileNotFoundError as exc:
        print(f"cuda_check: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        parser.error(str(exc))
    print(format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
