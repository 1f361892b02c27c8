#!/usr/bin/env python3
"""Build the CUDA emulation: the project's own csrc/ .cu kernels compiled by the host C++ compiler.

    python tests/cuda_emulation/emu_build.py [--variant plain|asan|tsan] [--out DIR] [--kernels DIR]
                                             [--run [EMU_TESTS ARGUMENTS...]]

Copies every .cu/.cuh/.h under csrc/ (or --kernels) into DIR/<variant>/src with two mechanical
rewrites, so the sources nvcc compiles stay unchanged:

    K<<<grid, block, smem, stream>>>(args);   ->  revdeq_emu::launch("K", __FILE__, __LINE__,
                                                    revdeq_emu::LaunchConfig(grid, block, smem, stream), K, args);
    __shared__ T name[N];                     ->  a per-block instance of T[N] (emu.h, shared_variable)

Line numbers are kept and each copy starts with a #line naming the original file, so compiler errors
and the emulator's messages point into csrc/. Then it compiles the copies with emu.h force-included,
the emulator (runtime.cpp) and the drivers (drivers/*.cpp), and links DIR/<variant>/emu_tests.
Variants: plain (-O2), asan (AddressSanitizer + UndefinedBehaviorSanitizer, alignment checks on, any
finding fatal), tsan (ThreadSanitizer; one OS thread per CUDA thread). Objects are reused while their
inputs and flags are unchanged. Prints the binary's path, or with --run executes it with the given
arguments (e.g. --quick, --small, section names) and the variant's sanitizer options (RUN_ENV), exiting
with its status; exit status 1 on a compile error, 2 when no host compiler or CUDA headers are found.
"""

import argparse
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_OUT = os.path.join(ROOT, "build", "cuda-emu")

# The defines torch's CUDA extensions build with (no implicit half conversions), as tools/cuda_check.py.
COMMON_FLAGS = [
    "-std=c++17", "-g", "-fno-strict-aliasing", "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
VARIANT_FLAGS = {
    "plain": ["-O2"],
    "asan": ["-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "tsan": ["-O1", "-fsanitize=thread", "-DREVDEQ_EMU_OS_THREADS"],
}
LINK_FLAGS = {"plain": [], "asan": ["-fsanitize=address,undefined"], "tsan": ["-fsanitize=thread", "-pthread"]}
# How each variant's binary is run (tests, make cuda-emu, mutations.py): any sanitizer finding fails it.
RUN_ENV = {
    "plain": {},
    "asan": {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"},
    "tsan": {"TSAN_OPTIONS": "halt_on_error=1:exitcode=66"},
}


class BuildError(RuntimeError):
    pass


def find_cxx():
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def find_cuda_include():
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None, "/usr/local/cuda"]
    for home in filter(None, homes):
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    return None


def missing_tools():
    """A sentence saying what this machine lacks to build the emulation, or None."""
    if find_cxx() is None:
        return "no host C++ compiler (g++ or $CXX)"
    if find_cuda_include() is None:
        return "no CUDA toolkit headers (cuda_runtime.h under $CUDA_HOME/include or next to nvcc)"
    return None


# ------------------------------------------------------------------------------------------------
# The rewrites.

_SHARED = re.compile(r"__shared__\s+([^;{}()]*?)\s*\b(\w+)\s*((?:\[[^\]]*\]\s*)*);")


def _matching_paren(text, open_index):
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise BuildError(f"unbalanced parentheses after position {open_index}")


def rewrite_launches(text, name="<source>"):
    """Every `K<<<cfg>>>(args)` statement becomes a call of revdeq_emu::launch, on the same lines."""
    out, pos = [], 0
    while (start := text.find("<<<", pos)) >= 0:
        stmt = max(text.rfind(c, 0, start) for c in ";{}") + 1
        kernel = text[stmt:start]
        lead = kernel[:len(kernel) - len(kernel.lstrip())]
        kernel = kernel.strip()
        close = text.find(">>>", start)
        if close < 0 or not kernel:
            raise BuildError(f"{name}: cannot parse the launch at position {start}")
        config = text[start + 3:close]
        paren = close + 3
        while paren < len(text) and text[paren].isspace():
            paren += 1
        if paren >= len(text) or text[paren] != "(":
            raise BuildError(f"{name}: a launch without an argument list at position {start}")
        end = _matching_paren(text, paren)
        args = text[paren + 1:end]
        quoted = kernel.replace("\\", "\\\\").replace('"', '\\"')
        call = (f'::revdeq_emu::launch("{quoted}", __FILE__, __LINE__, ::revdeq_emu::LaunchConfig({config}), '
                f"{kernel}{', ' if args.strip() else ''}{args})")
        out.append(text[pos:stmt] + lead + call)
        pos = end + 1
    out.append(text[pos:])
    return "".join(out)


def rewrite_shared(text):
    """`__shared__ T name[N];` -> a reference to this block's instance of T[N] (emu.h)."""
    def one(m):
        type_, name, extents = m.group(1), m.group(2), m.group(3).replace(" ", "")
        return (f"static char revdeq_emu_key_{name}; auto& {name} = "
                f"::revdeq_emu::shared_variable<{type_}{extents}>(&revdeq_emu_key_{name});")
    return _SHARED.sub(one, text)


def rewrite(text, name="<source>"):
    return rewrite_shared(rewrite_launches(text, name))


def copy_sources(kernels_dir, src_dir):
    """Rewritten copies of every .cu/.cuh/.h under kernels_dir; returns the .cu copies."""
    if os.path.isdir(src_dir):
        shutil.rmtree(src_dir)
    units = []
    for path in sorted(glob.glob(os.path.join(kernels_dir, "**", "*"), recursive=True)):
        if not path.endswith((".cu", ".cuh", ".h")):
            continue
        rel = os.path.relpath(path, kernels_dir)
        dest = os.path.join(src_dir, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(path) as fh:
            text = fh.read()
        with open(dest, "w") as fh:
            fh.write(f'#line 1 "{path}"\n' + rewrite(text, rel))
        if path.endswith(".cu"):
            units.append(dest)
    if not units:
        raise BuildError(f"no .cu files under {kernels_dir}")
    return units


# ------------------------------------------------------------------------------------------------
# Compiling.


def _digest(paths, flags):
    h = hashlib.sha256(" ".join(flags).encode())
    for p in sorted(paths):
        h.update(p.encode())
        with open(p, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]


def _compile(cxx, source, obj, flags, inputs):
    stamp = obj + ".key"
    key = _digest([source, *inputs], flags)
    if os.path.exists(obj) and os.path.exists(stamp) and open(stamp).read() == key:
        return None
    cmd = [cxx, *flags, "-c", "-x", "c++", source, "-o", obj]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
    with open(stamp, "w") as fh:
        fh.write(key)
    return None


def build(variant="plain", out=DEFAULT_OUT, kernels_dir=CSRC, jobs=None, extra_flags=()):
    """Build DIR/<variant>/emu_tests and return its path; raises BuildError with the compiler output."""
    problem = missing_tools()
    if problem:
        raise BuildError(problem)
    if variant not in VARIANT_FLAGS:
        raise BuildError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANT_FLAGS)}")
    cxx, cuda_include = find_cxx(), find_cuda_include()
    work = os.path.join(out, variant)
    src_dir = os.path.join(work, "src")
    os.makedirs(work, exist_ok=True)
    units = copy_sources(kernels_dir, src_dir)
    headers = [p for p in glob.glob(os.path.join(src_dir, "**", "*"), recursive=True) if p.endswith((".cuh", ".h"))]
    emu_inputs = sorted(glob.glob(os.path.join(HERE, "*.h")) + glob.glob(os.path.join(HERE, "drivers", "*.h")))
    flags = [*COMMON_FLAGS, *VARIANT_FLAGS[variant], *extra_flags, f"-I{src_dir}", f"-I{HERE}",
             f"-I{os.path.join(HERE, 'drivers')}", "-isystem", cuda_include]
    kernel_flags = [*flags, "-include", os.path.join(HERE, "emu.h")]
    jobs_list = [(u, os.path.join(work, "kernel_" + os.path.relpath(u, src_dir).replace(os.sep, "_") + ".o"),
                  kernel_flags, headers + emu_inputs) for u in units]
    others = [os.path.join(HERE, "runtime.cpp"), *sorted(glob.glob(os.path.join(HERE, "drivers", "*.cpp")))]
    jobs_list += [(s, os.path.join(work, os.path.basename(s) + ".o"), flags, headers + emu_inputs) for s in others]
    workers = jobs or int(os.environ.get("MAX_JOBS", "0") or 0) or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        errors = [e for e in pool.map(lambda j: _compile(cxx, *j), jobs_list) if e]
    if errors:
        raise BuildError("\n\n".join(errors))
    binary = os.path.join(work, "emu_tests")
    cmd = [cxx, *[o for _, o, _, _ in jobs_list], "-o", binary, *LINK_FLAGS[variant]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return binary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="plain", choices=sorted(VARIANT_FLAGS))
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"build directory (default {DEFAULT_OUT})")
    parser.add_argument("--kernels", default=CSRC, help="the tree of .cu sources to emulate (default csrc/)")
    parser.add_argument("--run", nargs=argparse.REMAINDER, default=None,
                        help="then run the binary with these arguments (everything after --run)")
    args = parser.parse_args(argv)
    problem = missing_tools()
    if problem:
        print(f"cuda emulation: cannot build: {problem}", file=sys.stderr)
        return 2
    try:
        binary = build(args.variant, args.out, args.kernels)
    except BuildError as exc:
        print(f"cuda emulation: build failed:\n{exc}", file=sys.stderr)
        return 1
    if args.run is None:
        print(binary)
        return 0
    sys.stdout.flush()
    os.execve(binary, [binary, *args.run], {**os.environ, **RUN_ENV[args.variant]})


if __name__ == "__main__":
    sys.exit(main())
