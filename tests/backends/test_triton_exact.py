"""What only exact mode on the Triton backend has: every GPU config and autotuning of its kernels, direct op
calls, kernels that fail to load, the kernels compiled for sm_90 without a GPU, and on a GPU 2^26 elements and
the choice of auto (the shared cases are in tests/ops/test_exact.py).

Without a GPU (CI) the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import revdeq_kernels as rk
from helpers import ROOT
from helpers.exact_cases import F_DTYPES, assert_same, beta_id, check_against_reference, random_f, random_state, run
from revdeq_kernels import exact as fxp
from revdeq_kernels.backends import triton_backend
from revdeq_kernels.exact import DyadicBeta

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if triton_backend.unavailable_reason(DEVICE, "exact") is not None:  # the test extra installs triton: broken env
    pytest.fail(f"exact mode on the Triton backend cannot load: {triton_backend.unavailable_reason(DEVICE, 'exact')}",
                pytrace=False)
from revdeq_kernels.backends.triton_backend import exact as triton_exact  # noqa: E402


def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


@pytest.mark.parametrize("config", triton_exact.FIXED_CONFIGS, ids=lambda c: f"WORDS{c.kwargs['WORDS']}")
def test_every_gpu_config_is_correct(config):
    # Each config the GPU autotuner may pick, launched directly (in the interpreter on CPU): full tiles
    # of that size and a masked tail.
    n = 2 * config.kwargs["WORDS"] * 32 + 45
    beta = DyadicBeta(255, 8)
    g = torch.Generator().manual_seed(1)
    state, f = random_state(n, g).to(DEVICE), random_f(n, torch.float32, g).to(DEVICE)
    for inverse in (False, True):
        kernel = triton_exact.autotuned(
            triton_exact.unrelax_fixed_kernel if inverse else triton_exact.relax_fixed_kernel,
            [config])
        rem = torch.zeros(fxp.remainder_shape(n, beta.m), dtype=torch.int32, device=DEVICE).random_(generator=g) \
            if inverse else torch.full(fxp.remainder_shape(n, beta.m), -1, dtype=torch.int32, device=DEVICE)
        op = "unrelax_fixed_" if inverse else "relax_fixed_"
        want = run(op, "reference", state, f, beta, rem)
        got_state, got_rem, got_status = state.clone(), rem.clone(), fxp.new_status(DEVICE)
        _launch_with(kernel, inverse, got_state, f, got_rem, got_status, beta)
        assert_same((got_state, got_rem, got_status), want, f"WORDS={config.kwargs['WORDS']} {op}")


def _launch_with(kernel, inverse, state, f, rem, status, beta):
    n = state.numel()
    words = -(-n // 32)
    coefficient = fxp.inverse_mod_2_64(beta.keep) if inverse else beta.keep
    args = (beta.p, beta.m, coefficient) if inverse else (beta.p, coefficient, beta.m)
    kernel[lambda meta: (-(-words // meta["WORDS"]),)](state, f, rem, status, n, words, *args, fxp.DEFAULT_FRAC_BITS)


def test_autotuning_applies_an_in_place_update_once():
    # Benchmarking runs each config several times; restore_value must undo those runs so the first
    # call on a new size updates the state exactly once. Without it (the negative control), the same
    # launch applies the update several times.
    import triton

    configs = [triton.Config({"WORDS": w}, num_warps=4) for w in (4, 8, 16)]
    benchmarked = []

    def bench(launch, quantiles):
        for _ in range(3):
            launch()
        benchmarked.append(len(benchmarked))
        return [1.0 + len(benchmarked)] * len(quantiles)

    beta = DyadicBeta(13, 4)
    g = torch.Generator().manual_seed(3)
    state, f = random_state(1000, g).to(DEVICE), random_f(1000, torch.float32, g).to(DEVICE)
    want = run("relax_fixed_", "reference", state, f, beta, torch.zeros(4, 32, dtype=torch.int32, device=DEVICE))
    for restore in (True, False):
        kernel = (triton_exact.autotuned(triton_exact.relax_fixed_kernel, configs, do_bench=bench)
                  if restore else triton.autotune(configs, key=["n"], do_bench=bench)(
                      triton_exact.relax_fixed_kernel))
        benchmarked.clear()
        got = state.clone(), torch.zeros(4, 32, dtype=torch.int32, device=DEVICE), fxp.new_status(DEVICE)
        _launch_with(kernel, False, got[0], f, got[1], got[2], beta)
        assert len(benchmarked) == len(configs), "the autotuner did not benchmark every config"
        assert torch.equal(got[0], want[0]) == restore, f"restore_value={restore}"
        if restore:
            assert_same(got, want, "autotuned with restore_value")


def test_direct_op_calls_check_their_arguments():
    # torch.ops.revdeq.triton_*_fixed_ bypass revdeq_kernels.ops, so they check what would read or
    # write out of bounds.
    state = fxp.to_fixed(torch.ones(40)).to(DEVICE)
    f, rem, status = torch.ones(40, device=DEVICE), torch.zeros(4, 2, dtype=torch.int32, device=DEVICE), \
        fxp.new_status(DEVICE)
    op = torch.ops.revdeq.triton_relax_fixed_
    cases = [
        ((state.double(), f, rem, status, 13, 4, 32), TypeError, "triton_relax_fixed_: state must have dtype "
                                                                 "torch.int64"),
        ((state, state, rem, status, 13, 4, 32), TypeError, "triton_relax_fixed_: f_val must have dtype float64, "
                                                            "float32"),
        ((state, f[:39], rem, status, 13, 4, 32), ValueError, r"f_val has shape \(39,\) but state has shape \(40,\)"),
        ((state, f, rem, status, 12, 4, 32), ValueError, r"needs p odd in \(0, 2\^\(m\+1\)\).* got p=12, m=4"),
        ((state, f, rem, status, 13, 9, 32), ValueError, r"needs m in \[1, 8\], got m=9"),
        ((state, f, rem, status, 13, 4, 53), ValueError, r"frac_bits must be an integer in \[0, 52\], got 53"),
        ((state, f, rem[:3], status, 13, 4, 32), ValueError, r"remainder must be an int32 tensor of shape \(4, 2\)"),
        ((state, f, rem.t().contiguous().t(), status, 13, 4, 32), ValueError, r"remainder must be contiguous"),
        ((state, f, rem, torch.zeros(2, dtype=torch.int32, device=DEVICE), 13, 4, 32), ValueError,
         r"status must be an int32 tensor of shape \(1,\) .* got torch.int32 of shape \(2,\)"),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            op(*args)
    if DEVICE == "cuda":  # on CPU there is no second device to disagree with (meta goes to the fake kernel)
        with pytest.raises(ValueError, match=r"triton_unrelax_fixed_: f_val is on cpu but state is on cuda"):
            torch.ops.revdeq.triton_unrelax_fixed_(state, f.cpu(), rem, status, 13, 4, 32)


def test_backend_reports_exact_mode():
    assert triton_backend.unavailable_reason(DEVICE, "exact") is None
    report = rk.available_backends()
    assert "triton" in report["exact"][DEVICE], report


def test_kernels_that_fail_to_load_are_reported_not_raised(monkeypatch):
    # A Triton whose API the fixed kernels cannot use (simulated by blocking their module): exact mode
    # reports why, refuses the backend by name, and auto still finds a backend; the float ops stay.
    from revdeq_kernels import ops

    monkeypatch.setitem(sys.modules, "revdeq_kernels.backends.triton_backend.exact", None)
    monkeypatch.delattr(triton_backend, "exact")
    monkeypatch.setattr(triton_backend, "_exact_error", None)
    monkeypatch.setattr(ops, "_resolved", {})
    report = rk.available_backends()
    reason = report["unavailable"][f"triton ({DEVICE}, exact mode)"]
    assert "exact-mode Triton kernels failed to load (ModuleNotFoundError" in reason, reason
    assert "triton" not in report["exact"][DEVICE] and "triton" in report[DEVICE], report
    state, f = fxp.to_fixed(torch.ones(5)).to(DEVICE), torch.ones(5, device=DEVICE)
    rem = torch.zeros(4, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"relax_fixed_: backend 'triton' is not available for .* tensors: the "
                                           r"exact-mode Triton kernels failed to load"):
        rk.relax_fixed_(state, f, (13, 4), rem, backend="triton")
    rk.relax_fixed_(state, f, (13, 4), rem)  # auto
    assert ops._resolved[(DEVICE, "auto", "exact")] != "triton"


def test_kernels_compile_for_sm90():
    # Compiles the fixed kernels for an H100 (sm_90) without a GPU and reads the PTX: the interpreter
    # does not type-check like the compiler does. Full tiles must move the int64 state with 16-byte
    # accesses, the rounding adds must survive (not folded away), and the status must be reached
    # with an atomic OR.
    code = """
        import re
        import triton
        try:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource
        except ImportError as exc:
            print("NO-OFFLINE-COMPILE", exc); raise SystemExit(0)
        from revdeq_kernels.backends.triton_backend import exact as K

        cfg = K.FIXED_CONFIGS[-1]
        for name, fn, scalars in (("relax", K.relax_fixed_kernel, ("p", "keep", "m", "frac_bits")),
                                  ("unrelax", K.unrelax_fixed_kernel, ("p", "m", "inverse", "frac_bits"))):
            for f, n_type in (("fp32", "i32"), ("bf16", "i64")):  # n >= 2^31 arrives as i64
                sig = {"state_ptr": "*i64", "f_ptr": "*" + f, "rem_ptr": "*i32", "status_ptr": "*i32",
                       "n": n_type, "words_per_plane": n_type,
                       **{s: "i64" if s == "inverse" else "i32" for s in scalars}, "WORDS": "constexpr"}
                attrs = {(i,): [["tt.divisibility", 16]] for i in range(4)}
                src = ASTSource(fn=fn, signature=sig, constexprs={"WORDS": cfg.kwargs["WORDS"]}, attrs=attrs)
                ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                     options={"num_warps": cfg.num_warps}).asm["ptx"]
                print("KERNEL", name, f, n_type, "ld.global.v2.b64" in ptx, "st.global.v2.b64" in ptx,
                      "0d4330000000000000" in ptx, bool(re.search(r"(red|atom)\\.global\\.\\S*or\\.b32", ptx)))
    """
    out = _run_python(code, {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    if "NO-OFFLINE-COMPILE" in out.stdout:
        pytest.skip(f"this triton has no offline compile API ({out.stdout.strip()}); the GPU tests compile "
                    "the kernels instead")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("KERNEL")]
    assert len(lines) == 4, out.stdout
    for line in lines:
        assert line.endswith("True True True True"), f"16-byte state access, 2^52 rounding, atomic OR: {line}"


# ---------------------------------------------------------------------------------------------------
# GPU only: compiled kernels at the size of the bandwidth goal, autotuning for real, inductor.

LARGE = 1 << 26


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("f_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("beta", [DyadicBeta(13, 4), DyadicBeta(255, 8), DyadicBeta(21, 4)], ids=beta_id)
def test_gpu_large(beta, f_dtype):
    check_against_reference("triton", LARGE, beta, f_dtype, "cuda")


@pytest.mark.gpu
def test_gpu_first_call_on_a_new_size_is_right():
    # A size no other test uses, above TUNE_MIN_ELEMENTS: this call benchmarks every config.
    check_against_reference("triton", LARGE + 12345, DyadicBeta(3, 3), torch.float32, "cuda", seed=7)


@pytest.mark.gpu
@pytest.mark.parametrize("f_dtype", F_DTYPES, ids=str)
def test_gpu_every_f_dtype_at_odd_sizes(f_dtype):
    for n in (7, 31, 33, 1023, (1 << 20) + 3):
        check_against_reference("triton", n, DyadicBeta(13, 4), f_dtype, "cuda")


@pytest.mark.gpu
def test_gpu_auto_uses_triton_for_exact_mode_without_the_cuda_extension(monkeypatch):
    from revdeq_kernels import ops
    from revdeq_kernels.backends import compiled as extension

    monkeypatch.setattr(extension, "_C", None)
    monkeypatch.setattr(extension, "_LOAD_ERROR", "not built")
    monkeypatch.setattr(ops, "_resolved", {})
    assert rk.available_backends()["exact"]["cuda"][0] == "triton"
    check_against_reference(None, 4097, DyadicBeta(13, 4), torch.float32, "cuda")
    assert ops._resolved[("cuda", "auto", "exact")] == "triton"
