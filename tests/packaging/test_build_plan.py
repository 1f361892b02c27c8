"""How the build decides: the CUDA arch plan setup.py derives from the environment, and the Makefile's
rule that compiles ``_C`` once on a fresh clone and not again while no source changes. Both run without
compiling anything (setup.py's REVDEQ_PRINT_CUDA_ARCHS mode; the Makefile against a stand-in python)."""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NVCC_13 = "75;80;86;87;88;89;90;100;103;110;120;121"  # what nvcc 13.0 lists (nvcc --list-gpu-arch)


def _plan(**env):
    full = {k: v for k, v in os.environ.items() if k not in ("REVDEQ_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST")}
    full.update(REVDEQ_PRINT_CUDA_ARCHS="1", **env)
    out = subprocess.run([sys.executable, "setup.py"], cwd=ROOT, env=full, capture_output=True, text=True,
                         timeout=120)
    return out.returncode, (json.loads(out.stdout) if out.returncode == 0 else out.stderr)


@pytest.mark.parametrize("env, archs, ptx, source", [
    (dict(REVDEQ_NVCC_ARCHS=NVCC_13), ["80", "90", "100", "120"], "120", "default"),
    (dict(REVDEQ_NVCC_ARCHS="80;86;90"), ["80", "90"], "90", "default"),  # an older nvcc: no sm_100/sm_120
    (dict(REVDEQ_NVCC_ARCHS=NVCC_13, TORCH_CUDA_ARCH_LIST="8.6;9.0+PTX"), ["86", "90"], "90", "TORCH_CUDA_ARCH_LIST"),
    (dict(REVDEQ_NVCC_ARCHS=NVCC_13, TORCH_CUDA_ARCH_LIST="7.5 8.0"), ["75", "80"], "80", "TORCH_CUDA_ARCH_LIST"),
    (dict(REVDEQ_NVCC_ARCHS=NVCC_13, TORCH_CUDA_ARCH_LIST="8.0", REVDEQ_CUDA_ARCHS="9.0"), ["90"], "90",
     "REVDEQ_CUDA_ARCHS"),  # ours wins: make gpu builds sm_90 only whatever the machine sets
], ids=["default-nvcc13", "default-older-nvcc", "torch-list", "torch-list-spaces", "revdeq-wins"])
def test_the_cuda_arch_plan_follows_the_environment(env, archs, ptx, source):
    rc, plan = _plan(**env)
    assert rc == 0, plan
    assert (plan["archs"], plan["ptx"], plan["source"]) == (archs, ptx, source)
    assert plan["gencode"] == [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs] + [
        f"-gencode=arch=compute_{ptx},code=compute_{ptx}"]


def test_a_bad_arch_list_is_refused_by_name():
    rc, err = _plan(TORCH_CUDA_ARCH_LIST="Hopper")
    assert rc != 0 and "TORCH_CUDA_ARCH_LIST must list compute capabilities like '8.0;9.0'" in err


STAND_IN = """#!/bin/sh
# Records each call; 'import torch' succeeds; pip installs do nothing.
echo "$*" >> "$(dirname "$0")/calls.log"
exit 0
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_compiles_the_extension_once_on_a_fresh_clone_and_not_again(tmp_path):
    # GNU make remakes a target whose prerequisite was remade in the same run, whatever the timestamps:
    # .built after .deps compiled _C twice on every fresh clone.
    for name in ("Makefile", "setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(STAND_IN)
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    log = python.parent / "calls.log"

    def builds():
        subprocess.run(["make", "install", f"PYTHON={python}"], cwd=tmp_path, check=True, capture_output=True,
                       timeout=120)
        calls = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return [c for c in calls if c.startswith("-m pip install") and " -e " in f" {c} "]

    first = builds()
    assert len(first) == 1 and ".[test,bench,examples]" in first[0], first  # the environment's install builds _C
    assert builds() == []  # nothing changed: nothing compiled
    os.utime(tmp_path / "csrc" / "cpu" / "loops.h")  # a source changes: one rebuild of _C only
    again = builds()
    assert len(again) == 1 and "--no-deps" in again[0], again
    assert builds() == []
