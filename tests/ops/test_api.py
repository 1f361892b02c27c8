"""The public op API: argument errors, empty tensors, backend choice, and torch.compile."""

import dataclasses
import subprocess
import sys

import pytest
import torch

import revdeq_kernels as rk
from helpers import ROOT
from revdeq_kernels.backends import compiled as extension

t = torch.randn
base = torch.randn(20)

# (call, exception type, regex of the message): every message names the op, the argument,
# what was expected and what was given.
BAD_INPUTS = [
    ("shape", lambda: rk.relax_(t(4, 9), t(4, 8), 0.5), ValueError,
     r"relax_: f_val has shape \(4, 8\) but state has shape \(4, 9\)"),
    ("shape residual", lambda: rk.residual(t(3), t(4)), ValueError,
     r"residual: fz has shape \(4,\) but z has shape \(3,\)"),
    ("device", lambda: rk.unrelax_(t(4), t(4, device="meta"), 0.5), ValueError,
     r"unrelax_: f_val is on meta but state is on cpu"),
    ("int state", lambda: rk.relax_(torch.ones(4, dtype=torch.int64), t(4), 0.5), TypeError,
     r"relax_: state must have dtype float64, float32, float16 or bfloat16, got torch.int64"),
    ("bool f", lambda: rk.relax_(t(4), torch.ones(4, dtype=torch.bool), 0.5), TypeError,
     r"relax_: f_val must have dtype .* got torch.bool"),
    ("complex z", lambda: rk.residual(t(4, dtype=torch.complex64), t(4, dtype=torch.complex64)), TypeError,
     r"residual: z must have dtype .* got torch.complex64"),
    ("non-tensor state", lambda: rk.relax_([1.0, 2.0], t(2), 0.5), TypeError,
     r"relax_: state must be a torch.Tensor, got list"),
    ("non-tensor fz", lambda: rk.residual(t(2), 3.0), TypeError, r"residual: fz must be a torch.Tensor, got float"),
    ("f more precise", lambda: rk.relax_(t(4), t(4, dtype=torch.float64), 0.5), TypeError,
     r"relax_: f_val has dtype torch.float64, which state \(torch.float32\) cannot hold without losing precision"),
    ("f other half", lambda: rk.unrelax_(t(4, dtype=torch.float16), t(4, dtype=torch.bfloat16), 0.5), TypeError,
     r"unrelax_: f_val has dtype torch.bfloat16, which state \(torch.float16\)"),
    ("fz more precise", lambda: rk.residual(t(4, dtype=torch.bfloat16), t(4)), TypeError,
     r"residual: fz has dtype torch.float32, which z \(torch.bfloat16\)"),
    ("overlap", lambda: rk.relax_(base[:10], base[5:15], 0.5), ValueError,
     r"relax_: f_val shares memory with state"),
    ("alias", lambda: rk.unrelax_(base, base, 0.5), ValueError, r"unrelax_: f_val shares memory with state"),
    ("expanded state", lambda: rk.relax_(t(1).expand(6), t(6), 0.5), ValueError,
     r"relax_: state has internal overlap"),
    ("beta 1", lambda: rk.relax_(t(4), t(4), 1.0), ValueError,
     r"relax_: beta must be a finite number in \(0, 2\) other than 1, got 1.0"),
    ("beta 0", lambda: rk.unrelax_(t(4), t(4), 0), ValueError, r"unrelax_: beta must be .* got 0.0"),
    ("beta 2", lambda: rk.relax_(t(4), t(4), 2.0), ValueError, r"got 2.0"),
    ("beta negative", lambda: rk.relax_(t(4), t(4), -0.5), ValueError, r"got -0.5"),
    ("beta nan", lambda: rk.relax_(t(4), t(4), float("nan")), ValueError, r"got nan"),
    ("beta inf", lambda: rk.relax_(t(4), t(4), float("inf")), ValueError, r"got inf"),
    ("beta tensor", lambda: rk.relax_(t(4), t(4), torch.tensor(0.5)), TypeError,
     r"relax_: beta must be a real number, got Tensor \(a tensor would need a device-to-host sync"),
    ("beta string", lambda: rk.relax_(t(4), t(4), "0.5"), TypeError, r"relax_: beta must be a real number, got str"),
    ("beta bool", lambda: rk.relax_(t(4), t(4), True), TypeError, r"got bool"),
    ("state requires grad", lambda: rk.relax_(t(4, requires_grad=True), t(4), 0.5), RuntimeError,
     r"relax_: state requires grad and grad mode is on"),
    ("f requires grad", lambda: rk.unrelax_(t(4), t(4, requires_grad=True), 0.5), RuntimeError,
     r"unrelax_: f_val requires grad and grad mode is on"),
    ("residual requires grad", lambda: rk.residual(t(4, requires_grad=True), t(4)), RuntimeError,
     r"residual: z requires grad and grad mode is on"),
    ("unknown backend", lambda: rk.relax_(t(4), t(4), 0.5, backend="cudnn"), ValueError,
     r"relax_: unknown backend 'cudnn'; expected None, 'auto' or one of cuda, triton, cpp, reference"),
    ("wrong device backend", lambda: rk.residual(t(4), t(4), backend="cuda"), RuntimeError,
     r"residual: backend 'cuda' is not available for cpu tensors: it serves cuda tensors only"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(case):
    _, call, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        call()


def test_errors_leave_the_state_untouched():
    state = torch.randn(8)
    before = state.clone()
    with pytest.raises(ValueError):
        rk.relax_(state, torch.randn(8), 1.0)
    assert torch.equal(state, before)


def test_requires_grad_is_fine_under_no_grad():
    state = torch.randn(4, requires_grad=True)
    f = torch.randn(4)
    want = 0.5 * state.detach() + 0.5 * f
    with torch.no_grad():
        rk.relax_(state, f, 0.5)
    torch.testing.assert_close(state.detach(), want)


def test_adjacent_slices_of_one_buffer_are_not_overlap():
    buf = torch.randn(20)
    state, f = buf[:10], buf[10:]
    want = 0.3 * state + 0.7 * f
    rk.relax_(state, f, 0.7)
    torch.testing.assert_close(buf[:10], want)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5, 2)])
def test_empty_tensors(backend, shape):
    if backend == "cpp" and not extension.loaded():
        pytest.skip("the C++ extension is not built")
    state, f = torch.empty(shape), torch.empty(shape, dtype=torch.bfloat16)
    assert rk.relax_(state, f, 0.5, backend=backend) is state
    assert rk.unrelax_(state, f, 0.5, backend=backend) is state
    out = rk.residual(state, f, backend=backend)
    assert out.shape == (2,) and out.dtype == torch.float32 and torch.equal(out, torch.zeros(2))
    out64 = rk.residual(state.double(), f, backend=backend)
    assert out64.dtype == torch.float64


def test_available_backends_report():
    report = rk.available_backends()
    assert set(report) == {"cpu", "cuda", "unavailable", "exact"}
    assert "reference" in report["cpu"]
    if extension.loaded():
        assert report["cpu"][0] == "cpp"
    if not torch.cuda.is_available():
        assert report["cuda"] == []
        assert "no CUDA device" in report["unavailable"]["reference (cuda)"]
        assert "cuda (cuda)" in report["unavailable"]
    for where, reason in report["unavailable"].items():
        assert isinstance(reason, str) and reason, where
    # Exact mode: the backends that serve it, in auto's order, among those that serve the float ops.
    assert set(report["exact"]) == {"cpu", "cuda"}
    for device_type in ("cpu", "cuda"):
        served = report["exact"][device_type]
        assert served == [name for name in report[device_type] if name in served], report
    assert report["exact"]["cpu"][0] == report["cpu"][0] and "reference" in report["exact"]["cpu"]


def test_available_backends_names_backends_without_exact_mode(monkeypatch):
    from revdeq_kernels import backends

    reference = backends.REGISTRY["reference"]
    monkeypatch.setitem(backends.REGISTRY, "reference", dataclasses.replace(reference, families=("float", "multi")))
    report = rk.available_backends()
    assert "reference" in report["cpu"] and "reference" not in report["exact"]["cpu"], report
    reason = report["unavailable"]["reference (cpu, exact mode)"]
    assert "no fixed-point (exact mode) kernels" in reason, reason


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("REVDEQ_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="unknown backend 'no-such-backend'"):
        rk.relax_(torch.randn(3), torch.randn(3), 0.5)
    monkeypatch.setenv("REVDEQ_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available for cpu tensors"):
        rk.residual(torch.randn(3), torch.randn(3))
    monkeypatch.setenv("REVDEQ_BACKEND", "reference")
    state, f = torch.randn(3), torch.randn(3)
    want = 0.5 * state + 0.5 * f
    rk.relax_(state, f, 0.5)
    torch.testing.assert_close(state, want)


def test_backend_argument_beats_env_var(monkeypatch):
    monkeypatch.setenv("REVDEQ_BACKEND", "no-such-backend")
    state, f = torch.randn(3), torch.randn(3)
    rk.relax_(state, f, 0.5, backend="reference")


def test_backend_that_is_not_built_raises_with_build_command(monkeypatch):
    monkeypatch.setattr(extension, "_C", None)
    monkeypatch.setattr(extension, "_LOAD_ERROR", "revdeq_kernels._C is not importable; build it with: "
                        + extension.BUILD_COMMAND)
    from revdeq_kernels import ops
    monkeypatch.setattr(ops, "_resolved", {})
    with pytest.raises(RuntimeError, match=r"backend 'cpp' is not available .*pip install --no-build-isolation -e \."):
        rk.relax_(torch.randn(3), torch.randn(3), 0.5, backend="cpp")


def test_package_works_without_the_compiled_module():
    # A fresh interpreter where importing revdeq_kernels._C fails, as on a pure-Python install.
    code = (
        "import sys; sys.modules['revdeq_kernels._C'] = None\n"
        "import torch, revdeq_kernels as rk\n"
        "r = rk.available_backends()\n"
        "assert r['cpu'][0] == 'reference', r  # auto's choice; triton may follow under TRITON_INTERPRET=1\n"
        "assert 'pip install --no-build-isolation -e .' in r['unavailable']['cpp (cpu)'], r\n"
        "s, f = torch.randn(100), torch.randn(100)\n"
        "want = 0.2 * s + 0.8 * f\n"
        "rk.relax_(s, f, 0.8)\n"
        "torch.testing.assert_close(s, want)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_package_root_exports_the_public_api():
    import revdeq_kernels as rk
    from revdeq_kernels.exact import ExactModeError

    for name in rk.__all__:
        assert hasattr(rk, name), f"revdeq_kernels.__all__ lists {name} but the package has no such attribute"
    assert rk.ExactModeError is ExactModeError and issubclass(rk.ExactModeError, ValueError)
    assert issubclass(rk.DriftError, RuntimeError)


def test_the_previous_release_names_import_with_a_deprecation_warning():
    # A fresh interpreter, so nothing is cached: each old name warns once and is the new object.
    code = (
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "import revdeq_kernels as rk\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    from revdeq_kernels import FixedPointError\n"
        "    import revdeq_kernels.fixed_point as fixed_point\n"
        "    from revdeq_kernels.info import SolverInfo\n"
        "    from revdeq_kernels import jacobian\n"
        "assert FixedPointError is rk.ExactModeError and issubclass(FixedPointError, ValueError)\n"
        "assert fixed_point is rk.exact and fixed_point.dyadic_beta is rk.exact.dyadic_beta\n"
        "assert SolverInfo is rk.SolverInfo and jacobian.jacobian_penalty is rk.jacobian_penalty\n"
        "messages = [str(w.message) for w in caught if w.category is DeprecationWarning]\n"
        "for old, new in (('FixedPointError', 'ExactModeError'), ('fixed_point', 'exact'), ('info', 'solver.info'),\n"
        "                 ('jacobian', 'diagnostics')):\n"
        "    assert any(f'revdeq_kernels.{old} is deprecated' in m and f'revdeq_kernels.{new}' in m\n"
        "               for m in messages), (old, messages)\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('error')\n"
        "    import revdeq_kernels.exact, revdeq_kernels.solver.info, revdeq_kernels.diagnostics  # new names: quiet\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_unknown_attributes_still_raise_attribute_error():
    with pytest.raises(AttributeError, match="module 'revdeq_kernels' has no attribute 'no_such_name'"):
        rk.no_such_name  # noqa: B018
