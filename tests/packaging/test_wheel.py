"""The package as a user installs it: an sdist, a wheel built from it, installed into a fresh virtual
environment and used from outside the source tree.

One compile of ``_C`` (the wheel, from the sdist: that also proves the sdist carries every source and
header), then a smoke test of every op family and the solver with the installed package. The fresh
environment gets torch from this one through a .pth file (torch is the wheel's only dependency; no
download), and nothing else of this environment's packages is installed into it.
"""

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMOKE = """
import json, os, sys
import torch
import revdeq_kernels as rk
from revdeq_kernels.backends import compiled

where = os.path.dirname(rk.__file__)
assert compiled.loaded(), "revdeq_kernels._C did not load from the wheel"
x = torch.randn(4, 16, dtype=torch.float64)
for backend in ("cpp", "reference"):
    s, f = torch.randn(1000), torch.randn(1000)
    want = 0.2 * s + 0.8 * f
    rk.relax_(s, f, 0.8, backend=backend)
    torch.testing.assert_close(s, want)
    rk.unrelax_([s], [f], 0.8, backend=backend)
    assert rk.residual(s, f, backend=backend).shape == (2,)
lin = torch.nn.Linear(16, 16, dtype=torch.float64)
params = list(lin.parameters())
xg = x.clone().requires_grad_()
z, info = rk.reversible_fixed_point(lambda z, x: torch.tanh(0.5 * lin(z) + x), xg, params=params, beta=0.5,
                                    max_steps=6, tol=None, backend="cpp")
got = torch.autograd.grad(z.square().sum(), [xg, *params])
y = zz = torch.zeros_like(x)
for _ in range(6):
    y = 0.5 * y + 0.5 * torch.tanh(0.5 * lin(zz) + xg)
    zz = 0.5 * zz + 0.5 * torch.tanh(0.5 * lin(y) + xg)
want = torch.autograd.grad(zz.square().sum(), [xg, *params])
err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))
assert err < 1e-10, err
z, info = rk.reversible_fixed_point(lambda z, x: torch.tanh(0.5 * lin(z) + x), xg, params=params, beta=0.5,
                                    max_steps=20, tol=None, exact=True)
z.sum().backward()
assert info["drift"] == 0.0
print(json.dumps({"where": where, "backends": rk.available_backends()["cpu"], "grad_error": err}))
"""


def _run(cmd, cwd, env=None, timeout=900):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("REVDEQ_SKIP_BUILD") == "1", reason="REVDEQ_SKIP_BUILD=1: no compiled module")
def test_sdist_to_wheel_installs_into_a_fresh_environment_and_works_outside_the_tree(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("build", reason="the build package is in the test extra")
    dist, work = tmp_path / "dist", tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2"), "REVDEQ_SKIP_CUDA_BUILD": "1"}
    env.pop("PYTHONPATH", None)
    # From outside the tree: the repository's build/ folder would shadow the build package.
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist), ROOT], work, env)
    (sdist,) = dist.glob("revdeq_kernels-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("csrc/common/affine.h", "csrc/common/checks.h", "csrc/cpu/loops.h",
                   "csrc/cuda/kernels/common.cuh", "csrc/cuda/kernels/revdeq_cuda.h", "setup.py"):
        assert needed in names, f"the sdist lacks {needed}"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(dist), str(sdist)],
         work, env)
    (wheel,) = dist.glob("revdeq_kernels-*.whl")

    fresh = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(fresh)
    python = str(fresh / "bin" / "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work).stdout.strip()
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    with open(os.path.join(site, "torch_from_test_env.pth"), "w") as fh:
        fh.write(torch_site + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], work, env)
    out = _run([python, "-c", textwrap.dedent(SMOKE)], work, {k: v for k, v in env.items() if k != "PYTHONPATH"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["where"].startswith(site), result  # the installed copy, not the source tree
    assert "cpp" in result["backends"], result
