"""Build revdeq_kernels._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

Install with the torch you will run against already present:

    pip install --no-build-isolation -e .

CUDA is built when the installed torch has CUDA (torch.version.cuda) and nvcc is found
(CUDA_HOME or PATH); a visible GPU is not needed. Environment switches:

    REVDEQ_FORCE_CUDA=1        build CUDA or fail loudly (instead of skipping with a message)
    REVDEQ_SKIP_CUDA_BUILD=1   never build CUDA
    REVDEQ_SKIP_BUILD=1        build nothing: a pure-Python install (PyTorch reference backend)
    REVDEQ_CUDA_ARCHS="8.0;9.0" compute capabilities to compile for (default 8.0 and 9.0)
    MAX_JOBS=N                 parallel compile jobs (ninja)
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg):
    print(f"[revdeq_kernels setup] {msg}", file=sys.stderr, flush=True)


def _sources(*patterns):
    found = []
    for pattern in patterns:
        found += glob.glob(os.path.join(ROOT, pattern))
    return sorted(os.path.relpath(p, ROOT) for p in found)


def _gencode_flags(archs):
    """-gencode for each arch, plus PTX of the newest so later GPUs can JIT it."""
    caps = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    if not caps or not all(c.isdigit() for c in caps):
        raise SystemExit(f"REVDEQ_CUDA_ARCHS must list compute capabilities like '8.0;9.0', got {archs!r}")
    flags = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in caps]
    newest = max(caps, key=int)
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


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

    cxx_flags = ["-O3", "-fvisibility=hidden"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if build_cuda:
        archs = os.environ.get("REVDEQ_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        nvcc_flags = ["-O3", "-lineinfo", "-DREVDEQ_WITH_CUDA"] + _gencode_flags(archs)
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


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
