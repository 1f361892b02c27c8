"""Shared pieces of the tests that need the CUDA toolkit or a GPU.

test_cuda.py and test_exact_cuda.py (the GPU kernels) share the build-switch skip, the compute-sanitizer
run and the side-stream check; test_cuda_build.py and test_multi_tensor.py (nvcc, no GPU) share the way
tools/cuda_check.py is loaded and how a host program that includes csrc/ headers is built and run.
"""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import ROOT

# An install told to leave the CUDA kernels out has none to test; anywhere else a missing kernel fails.
_SKIPPED_BUILD = next((v for v in ("REVDEQ_SKIP_BUILD", "REVDEQ_SKIP_CUDA_BUILD") if os.environ.get(v) == "1"), None)
skip_if_cuda_build_skipped = pytest.mark.skipif(_SKIPPED_BUILD is not None,
                                                reason=f"{_SKIPPED_BUILD}=1: installed without CUDA kernels")


def load_cuda_check():
    """tools/cuda_check.py as a module (tools/ is not a package): find_nvcc, check, format_report."""
    spec = importlib.util.spec_from_file_location("cuda_check", os.path.join(ROOT, "tools", "cuda_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The check macro of the host programs, placed after their includes: a failed EXPECT prints its message
# (the first 20 of them) and counts in `failures`, which each program's main() turns into its exit status.
HOST_EXPECT = r"""
static int failures = 0;
#define EXPECT(cond, ...) \
  do { \
    if (!(cond) && ++failures <= 20) { std::printf(__VA_ARGS__); std::printf("\n"); } \
  } while (0)
"""


def run_host_program(nvcc, workdir, name, program, flags=()):
    """Compile `program` (CUDA C++ source text that may include csrc/ headers) into workdir/name with nvcc
    and run it on the host: (return code, output). If the compile fails, the output is the command and
    the compiler's messages; otherwise it is what the program printed (stdout, then stderr)."""
    source = os.path.join(workdir, f"{name}.cu")
    binary = os.path.join(workdir, name)
    with open(source, "w") as fh:
        fh.write(program)
    cmd = [nvcc, "-std=c++17", "-O1", *flags, f"-I{os.path.join(ROOT, 'csrc')}", source, "-o", binary]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return proc.returncode, f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
    run = subprocess.run([binary], capture_output=True, text=True)
    return run.returncode, run.stdout + run.stderr


def _find_compute_sanitizer():
    candidates = [shutil.which("compute-sanitizer")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "compute-sanitizer"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def run_compute_sanitizer(tool, script):
    """Run `python -c script` under compute-sanitizer --tool `tool` and return its output (stdout + stderr).

    The test skips when compute-sanitizer is not found. The run must exit 0 and the script must have
    printed "sanitizer script done" (its last line), so a script that died early cannot pass. The caching
    allocator is off: each allocation is its own cudaMalloc, and an access past a tensor's end is caught
    instead of landing in the allocator's slack."""
    sanitizer = _find_compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin)")
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    proc = subprocess.run([sanitizer, "--tool", tool, "--error-exitcode", "1", sys.executable, "-c", script],
                          capture_output=True, text=True, env=env, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "sanitizer script done" in output, output[-6000:]
    return output


def launch_after_a_late_write(dst, src, launch):
    """On a side stream: sleep about 50 ms on the GPU, copy src into dst, then call launch(); return what
    launch() returned, once the current stream has waited for the side one.

    Kernels that run on the stream they were launched from see the new dst; kernels launched on any
    other stream would race ahead and read the old one."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        dst.copy_(src)
        out = launch()
    torch.cuda.current_stream().wait_stream(side)
    return out
