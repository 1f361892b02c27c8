"""Build revdeq_kernels._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

Install with the torch you will run against already present:

    pip install --no-build-isolation -e .

CUDA is built when the installed torch has CUDA (torch.version.cuda) and nvcc is found
(CUDA_HOME or PATH); a visible GPU is not needed. Environment switches:

    REVDEQ_FORCE_CUDA=1        build CUDA or fail loudly (instead of skipping with a message)
    REVDEQ_SKIP_CUDA_BUILD=1   never build CUDA
    REVDEQ_SKIP_BUILD=1        build nothing: a pure-Python install (PyTorch reference backend)
    REVDEQ_CUDA_ARCHS="8.0;9.0" compute capabilities to compile for; else TORCH_CUDA_ARCH_LIST (what
                               every torch extension reads, e.g. "8.0;9.0+PTX"); else the default: 8.0,
                               9.0, and 10.0 and 12.0 where the installed nvcc knows them, plus PTX of the
                               newest so later GPUs can JIT it
    MAX_JOBS=N                 parallel compile jobs (ninja; torch's default: the CPU count)
    REVDEQ_PRINT_CUDA_ARCHS=1  print the arch plan as JSON and exit (no build; tests use it)

The build prints what it compiles and why.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Current datacenter GPUs: A100 (8.0) and H100/H200 (9.0) always; B200 (10.0) and the 12.0 parts
# when nvcc can target them. PTX of the newest is added in every case.
BASE_CUDA_ARCHS = ["8.0", "9.0"]
OPTIONAL_CUDA_ARCHS = ["10.0", "12.0"]


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg):
    print(f"[revdeq_kernels setup] {msg}", file=sys.stderr, flush=True)


def _sources(*patterns):
    found = []
    for pattern in patterns:
        found += glob.glob(os.path.join(ROOT, pattern))
    return sorted(os.path.relpath(p, ROOT) for p in found)


def _parse_archs(name, value):
    """Compute capabilities from REVDEQ_CUDA_ARCHS or TORCH_CUDA_ARCH_LIST ("8.0;9.0", "8.0 9.0+PTX"):
    (caps like "90", whether PTX was asked for explicitly)."""
    caps, ptx = [], False
    for item in re.split(r"[;,\s]+", value.strip()):
        if not item:
            continue
        if item.endswith("+PTX"):
            ptx, item = True, item[:-4]
        if not re.fullmatch(r"\d+\.\d+[af]?|\d+", item):
            raise SystemExit(f"{name} must list compute capabilities like '8.0;9.0' (optionally '+PTX'), got {value!r}")
        caps.append(item.replace(".", ""))
    if not caps:
        raise SystemExit(f"{name} is set but lists no compute capability: {value!r}")
    return caps, ptx


def nvcc_archs(nvcc):
    """The compute capabilities the given nvcc can target ("90", ...), or None when it cannot say."""
    if os.environ.get("REVDEQ_NVCC_ARCHS") is not None:  # tests and cross builds: what nvcc would answer
        return set(os.environ["REVDEQ_NVCC_ARCHS"].replace(".", "").split(";"))
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = set(re.findall(r"compute_(\d+)", out))
    return found or None


def cuda_arch_plan(environ, supported):
    """{"source", "archs", "ptx", "gencode"}: what to compile for, from the environment and the compute
    capabilities nvcc supports (None: unknown, then only the base archs are defaulted)."""
    for name in ("REVDEQ_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        if environ.get(name, "").strip():
            caps, _ = _parse_archs(name, environ[name])
            source = name
            break
    else:
        caps = [a.replace(".", "") for a in BASE_CUDA_ARCHS]
        caps += [a.replace(".", "") for a in OPTIONAL_CUDA_ARCHS if supported and a.replace(".", "") in supported]
        source = "default" + ("" if supported else " (nvcc did not list its archs: base archs only)")
    newest = max(caps, key=lambda c: int(re.match(r"\d+", c).group()))
    gencode = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in caps]
    gencode.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")  # PTX: later GPUs JIT it
    return {"source": source, "archs": caps, "ptx": newest, "gencode": gencode}


def _find_nvcc(cpp_extension=None):
    home = cpp_extension.CUDA_HOME if cpp_extension is not None else os.environ.get("CUDA_HOME")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_decision(torch, cpp_extension, cuda_sources):
    """(build_cuda, reason): reason says why CUDA is skipped or what it builds for."""
    force = _env_flag("REVDEQ_FORCE_CUDA")
    if _env_flag("REVDEQ_SKIP_CUDA_BUILD"):
        return False, "REVDEQ_SKIP_CUDA_BUILD is set"
    problems = []
    if not cuda_sources:
        problems.append("no CUDA sources in csrc/cuda/")
    if torch.version.cuda is None:
        problems.append(f"the installed torch {torch.__version__} has no CUDA")
    if cpp_extension.CUDA_HOME is None:
        problems.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if problems and force:
        raise SystemExit("REVDEQ_FORCE_CUDA is set but CUDA cannot be built: " + "; ".join(problems))
    if problems:
        return False, "; ".join(problems)
    return True, f"torch CUDA {torch.version.cuda}, nvcc in {cpp_extension.CUDA_HOME}"


def _openmp_flags(torch) -> list:
    """-fopenmp where torch's at::parallel_for is OpenMP (Linux builds): its loop is a `#pragma omp parallel`
    in a header, so the kernels compiled without the flag ran on one thread whatever torch.set_num_threads
    said. Only the compile flag: the GOMP symbols resolve to the OpenMP runtime torch already loads, never a
    second one."""
    if not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info():
        return []
    return ["-fopenmp"]


def _extensions():
    if _env_flag("REVDEQ_SKIP_BUILD"):
        _say("REVDEQ_SKIP_BUILD is set: nothing compiled, the PyTorch reference backend serves every op")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        raise SystemExit(
            "revdeq_kernels builds against the installed torch: install torch first, then run\n"
            "    pip install --no-build-isolation -e ."
        ) from None

    cpu_sources = _sources("csrc/*.cpp", "csrc/common/*.cpp", "csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/kernels/*.cu", "csrc/cuda/bindings/*.cpp")
    build_cuda, why = _cuda_decision(torch, cpp_extension, cuda_sources)

    cxx_flags = ["-O3", "-fvisibility=hidden", *_openmp_flags(torch)]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if build_cuda:
        plan = cuda_arch_plan(os.environ, nvcc_archs(_find_nvcc(cpp_extension)))
        archs = ", ".join(f"sm_{c}" for c in plan["archs"]) + f" + PTX {plan['ptx']} ({plan['source']})"
        nvcc_flags = ["-O3", "-lineinfo", "-DREVDEQ_WITH_CUDA"] + plan["gencode"]
        ext = cpp_extension.CUDAExtension(
            "revdeq_kernels._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-DREVDEQ_WITH_CUDA"], "nvcc": nvcc_flags},
        )
        _say(f"building _C: {len(cpu_sources)} C++ CPU sources + {len(cuda_sources)} CUDA sources "
             f"for archs {archs} ({why})")
    else:
        ext = cpp_extension.CppExtension(
            "revdeq_kernels._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
        )
        _say(f"building _C: {len(cpu_sources)} C++ CPU sources; CUDA skipped: {why}")
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


if _env_flag("REVDEQ_PRINT_CUDA_ARCHS"):
    print(json.dumps(cuda_arch_plan(os.environ, nvcc_archs(_find_nvcc()))))
    sys.exit(0)
_say(f"MAX_JOBS={os.environ['MAX_JOBS']}" if os.environ.get("MAX_JOBS") else "MAX_JOBS not set: ninja uses every core")
ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
