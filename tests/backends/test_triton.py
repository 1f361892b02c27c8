"""What only the Triton backend has: its layout routing, every GPU config and autotuning, direct op calls,
compiled kernels traced and compiled for sm_90 without a GPU, and the package without a working triton
(the shared cases are in tests/ops/).

Without a GPU (CI) every kernel runs in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with one, the same tests run the compiled kernels on CUDA tensors, and the
tests marked gpu add 2^26-element sizes, autotuning and the choice of auto.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import revdeq_kernels as rk
from helpers import ROOT
from helpers.op_cases import (
    POINTWISE_OPS,
    assert_close,
    check_pointwise,
    check_residual,
    expected_pointwise,
    expected_residual,
    make_pair,
    pair_id,
)
from revdeq_kernels.backends import triton_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if triton_backend.unavailable_reason(DEVICE, "float") is not None:  # the test extra installs triton: a broken
    pytest.fail(f"the Triton backend cannot load: {triton_backend.unavailable_reason(DEVICE, 'float')}",  # env
                pytrace=False)
import triton  # noqa: E402  (after the check above)

from revdeq_kernels.backends.triton_backend import common, pointwise  # noqa: E402

GPU_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]


def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def _env_without_interpreter() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_backend_is_available_on_this_machine():
    assert triton_backend.unavailable_reason(DEVICE, "float") is None
    if DEVICE == "cpu":
        assert common.INTERPRETED, "conftest should have set TRITON_INTERPRET=1 before triton was imported"
        report = rk.available_backends()
        assert "triton" in report["cpu"] and report["cpu"][0] != "triton", report  # by name only on CPU


def test_layout_routing():
    # Dense tensors (any dim order) are walked in place; only what cannot be paired is copied.
    base = torch.randn(6, 5)
    state = base.t()
    same, matched = common.flat_pair(state, torch.randn(6, 5).t())
    assert same is state and matched.stride() == state.stride()
    same, matched = common.flat_pair(state, torch.randn(5, 6))  # f row-major, state transposed
    assert same is state and matched.stride() == state.stride()
    strided = torch.randn(20)[::2]
    work, f = common.flat_pair(strided, torch.randn(10))
    assert work is not strided and work.is_contiguous() and f.is_contiguous()
    assert common.is_dense(torch.randn(3, 1, 4).permute(2, 1, 0))
    assert not common.is_dense(torch.randn(1).expand(4))


@pytest.mark.parametrize("config", common.POINTWISE_CONFIGS, ids=lambda c: f"BLOCK{c.kwargs['BLOCK']}")
def test_every_gpu_config_is_correct(config):
    # Each config the GPU autotuner may pick, run directly (in the interpreter on CPU): full tiles,
    # the masked tail and float64 coefficients.
    block = config.kwargs["BLOCK"]
    kernel = pointwise.autotuned_affine([config])
    for pair in [(torch.float64, torch.float64), (torch.float32, torch.bfloat16)]:
        state, f, _ = make_pair(2 * block + 3, *pair, DEVICE)
        want = expected_pointwise("unrelax_", state, f, 1.3)
        pointwise.launch_affine(kernel, state, f, common.coefficient_bits(1.3, inverse=True))
        assert_close(state, want, pair[0], amplification=4 / 0.3, what=f"BLOCK={block} {pair_id(pair)}")


@pytest.mark.parametrize("pair", [(torch.float64, torch.float16), (torch.float32, torch.bfloat16)], ids=pair_id)
def test_residual_with_gpu_block_and_many_tiles_per_program(pair):
    # The GPU block size, with the program count capped low so that every program loops over tiles
    # and one of them also takes the masked tail.
    block, _, warps = common.RESIDUAL_GPU_LAUNCH
    z, fz, _ = make_pair(5 * block + 7, *pair, DEVICE)
    got = pointwise.launch_residual(z, fz, block, 4, warps)
    want = expected_residual(z, fz).cpu()
    rel = ((got.double().cpu() - want).abs() / want).max().item()
    assert rel <= (1e-12 if pair[0] == torch.float64 else 1e-5), f"relative error {rel:.3e}"


def test_autotuning_applies_an_in_place_update_once():
    # Benchmarking runs each config several times; restore_value must undo those runs so the first
    # call on a new size updates the state exactly once. The same launch without restore_value is
    # the negative control: it shows this test can fail.
    configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in (128, 256, 512)]
    benchmarked = []

    def bench(run, quantiles):
        for _ in range(3):
            run()
        benchmarked.append(len(benchmarked))
        return [1.0 + len(benchmarked)] * len(quantiles)

    for restore, must_match in ((True, True), (False, False)):
        kernel = pointwise.autotuned_affine(configs, do_bench=bench)
        if not restore:
            kernel = triton.autotune(configs, key=["n"], do_bench=bench)(pointwise.affine_kernel)
        benchmarked.clear()
        state, f, _ = make_pair(1000, torch.float32, torch.float32, DEVICE, seed=11)
        want = expected_pointwise("relax_", state, f, 0.8)
        pointwise.launch_affine(kernel, state, f, common.coefficient_bits(0.8, inverse=False))
        assert len(benchmarked) == len(configs), "the autotuner did not benchmark every config"
        close = torch.allclose(state.double().cpu(), want.cpu(), rtol=1e-6, atol=1e-6)
        assert close == must_match, f"restore_value={restore}: update applied {'once' if close else 'repeatedly'}"


def test_direct_op_calls_check_their_arguments():
    # torch.ops.revdeq.triton_* bypass revdeq_kernels.ops, so they check what would read out of bounds.
    t = torch.randn
    with pytest.raises(ValueError, match=r"triton_relax_: f_val has shape \(4,\) but state has shape \(5,\)"):
        torch.ops.revdeq.triton_relax_(t(5), t(4), 0.5)
    with pytest.raises(TypeError, match=r"triton_unrelax_: f_val has dtype torch.float64, which state"):
        torch.ops.revdeq.triton_unrelax_(t(5), t(5, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match=r"triton_relax_: beta must be a finite number in \(0, 2\) other than 1"):
        torch.ops.revdeq.triton_relax_(t(5), t(5), 1.0)
    with pytest.raises(TypeError, match=r"triton_residual: z must have dtype float64, float32, float16 or bfloat16, "
                                        r"got torch.int32"):
        torch.ops.revdeq.triton_residual(torch.ones(5, dtype=torch.int32), torch.ones(5, dtype=torch.int32))


def test_without_the_interpreter_cpu_is_refused_and_ops_trace_into_kernels():
    # A fresh interpreter without TRITON_INTERPRET gets compiled kernels: CPU tensors are refused with
    # the reason, and the ops are triton_ops that decompose into the kernels when functionalized, as
    # torch.compile's AOT stage does (traced with fake CUDA tensors; no GPU needed).
    code = """
        import torch, revdeq_kernels as rk
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch._subclasses.functional_tensor import dispatch_functionalize
        from torch.fx.experimental.proxy_tensor import make_fx
        from revdeq_kernels.backends.triton_backend import common
        assert not common.INTERPRETED
        print("REASON", rk.available_backends()["unavailable"]["triton (cpu)"])
        def step(state, f):
            torch.ops.revdeq.triton_relax_(state, f, 0.8)
            return torch.ops.revdeq.triton_residual(state, f)
        for n in (5000, common.TUNE_MIN_ELEMENTS + 5):  # one config; all configs, benchmarked
            with FakeTensorMode():
                state = torch.empty(n, device="cuda")
                f = torch.empty(n, device="cuda", dtype=torch.bfloat16)
                graph = make_fx(dispatch_functionalize(step), tracing_mode="fake")(state, f).graph
            for node in graph.nodes:
                if node.op == "call_function":
                    kernel = (kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                              if "kernel_idx" in node.kwargs else None)
                    name = getattr(getattr(kernel, "base_fn", getattr(kernel, "fn", None)), "__name__", "-")
                    configs = len(getattr(kernel, "configs", []))
                    restore = ",".join(getattr(kernel, "restore_value", [])) or "-"
                    print("NODE", n, node.target, name, configs, restore)
    """
    out = _run_python(code, _env_without_interpreter())
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    reason = next(line for line in lines if line.startswith("REASON"))
    assert "interpreter" in reason and "TRITON_INTERPRET=1" in reason, reason
    nodes = [line for line in lines if line.startswith("NODE")]
    assert not any("revdeq" in n for n in nodes), f"an op stayed opaque: {nodes}"
    launched = [n.split()[3:] for n in nodes if "triton_kernel_wrapper" in n]
    names = [entry[0] for entry in launched]
    assert names == ["affine_kernel", "residual_partials_kernel", "residual_finish_kernel"] * 2, nodes
    # What inductor will benchmark: the small size has one config; the large one has all of them, and
    # the state must still be restored between benchmark runs.
    assert launched[0][1:] == ["1", "state_ptr"], nodes
    assert launched[3][1:] == [str(len(common.POINTWISE_CONFIGS)), "state_ptr"], nodes


def test_kernels_compile_for_sm90_with_16_byte_accesses():
    # Compiles the kernels for an H100 (sm_90) without a GPU and reads the PTX: the interpreter does
    # not type-check like the compiler does, and full tiles should use 16-byte loads and stores.
    code = """
        import re
        import triton
        try:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource
        except ImportError as exc:
            print("NO-OFFLINE-COMPILE", exc); raise SystemExit(0)
        from revdeq_kernels.backends.triton_backend import common as C, pointwise as K

        def ptx(fn, signature, constexprs, aligned, num_warps):
            attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
            return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]

        for state, f, vector in [("fp32", "fp32", "v4.b32"), ("fp32", "bf16", "v4.b32"),
                                 ("bf16", "bf16", "v4.b32"), ("fp64", "fp64", "v2.b64")]:
            fp64 = state == "fp64"
            cfg = C.POINTWISE_CONFIGS[-1]
            sig = {"state_ptr": "*" + state, "f_ptr": "*" + f, "n": "i64", "a_bits": "i64", "b_bits": "i64",
                   "c_bits": "i64", "BLOCK": "constexpr"}
            code = ptx(K.affine_kernel, sig, {"BLOCK": cfg.kwargs["BLOCK"]}, [0, 1], cfg.num_warps)
            print("AFFINE", state, f, f"ld.global.{vector}" in code, f"st.global.{vector}" in code)
            acc = "fp64" if fp64 else "fp32"
            for n_type in ("i32", "i64"):  # n >= 2^31 arrives as i64 and makes the tile loop 64-bit
                sig = {"z_ptr": "*" + state, "f_ptr": "*" + f, "partials_ptr": "*" + acc, "n": n_type,
                       "BLOCK": "constexpr", "FP64": "constexpr"}
                block, programs, warps = C.RESIDUAL_GPU_LAUNCH
                code = ptx(K.residual_partials_kernel, sig, {"BLOCK": block, "FP64": fp64}, [0, 1, 2], warps)
                print("RESIDUAL", state, f, n_type, f"ld.global.{vector}" in code, "atom" not in code)
        sig = {"partials_ptr": "*fp32", "out_ptr": "*fp32", "programs": "i32", "BLOCK": "constexpr"}
        ptx(K.residual_finish_kernel, sig, {"BLOCK": C.RESIDUAL_GPU_LAUNCH[1]}, [0, 1], 4)
        print("FINISH ok")
    """
    out = _run_python(code, _env_without_interpreter())
    if "NO-OFFLINE-COMPILE" in out.stdout:
        pytest.skip(f"triton {triton.__version__} has no offline compile API ({out.stdout.strip()}); "
                    "the GPU tests compile these kernels instead")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert len([line for line in lines if line.startswith(("AFFINE", "RESIDUAL"))]) == 12 and "FINISH ok" in lines
    for line in lines:
        if line.startswith(("AFFINE", "RESIDUAL")):
            assert line.endswith("True True"), f"no 16-byte access (or an atomic) in: {line}\n{out.stdout}"


@pytest.mark.parametrize("blocked, says", [("triton", "pip install triton"),
                                            ("triton.runtime.interpreter", "installed but failed to import")],
                         ids=["not-installed", "broken"])
def test_package_without_a_working_triton(blocked, says):
    code = f"""
        import sys
        sys.modules["{blocked}"] = None  # as if triton were missing, or failed to import
        import torch, revdeq_kernels as rk
        reason = rk.available_backends()["unavailable"]["triton (cpu)"]
        assert "{says}" in reason, reason
        try:
            rk.relax_(torch.randn(3), torch.randn(3), 0.5, backend="triton")
        except RuntimeError as exc:
            assert "backend 'triton' is not available" in str(exc) and "{says}" in str(exc), exc
        else:
            raise AssertionError("asking for triton without triton installed did not raise")
        s, f = torch.randn(8), torch.randn(8)
        want = 0.5 * s + 0.5 * f
        rk.relax_(s, f, 0.5)
        torch.testing.assert_close(s, want)
        print("ok")
    """
    out = _run_python(code, dict(os.environ))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_importing_the_package_does_not_load_the_triton_backend():
    code = """
        import sys, torch, revdeq_kernels as rk
        rk.relax_(torch.randn(8), torch.randn(8), 0.5)
        rk.residual(torch.randn(8), torch.randn(8))
        print("revdeq_kernels.backends.triton_backend" in sys.modules)
    """
    out = _run_python(code, dict(os.environ))
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-3000:] or out.stdout


# ---------------------------------------------------------------------------------------------------
# GPU only: large sizes, autotuning for real, inductor.

LARGE = 1 << 26


@pytest.mark.gpu
@pytest.mark.parametrize("pair", GPU_PAIRS, ids=pair_id)
@pytest.mark.parametrize("op", POINTWISE_OPS)
def test_gpu_pointwise_large(op, pair):
    check_pointwise("triton", op, LARGE, pair, 0.8, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("pair", GPU_PAIRS, ids=pair_id)
def test_gpu_residual_large_is_deterministic(pair):
    check_residual("triton", LARGE, pair, "cuda")
    z, fz, _ = make_pair(LARGE, *pair, "cuda", seed=1)
    first = rk.residual(z, fz, backend="triton")
    for _ in range(5):
        assert torch.equal(rk.residual(z, fz, backend="triton"), first)


@pytest.mark.gpu
def test_gpu_more_than_2_31_elements():
    # Element offsets past 2^31 need 64-bit index arithmetic in every kernel. About 21 GiB of GPU memory.
    n = (1 << 31) + 4097
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with 40 GiB of memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    state = torch.randn(n, device="cuda", generator=g)
    f = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
    ends = (slice(0, 1 << 20), slice(n - (1 << 20), n))
    before = [state[s].double() for s in ends]
    rk.relax_(state, f, 0.8, backend="triton")
    for s, old in zip(ends, before):
        assert_close(state[s], 0.2 * old + 0.8 * f[s].double(), torch.float32, amplification=4, what=f"relax_ {s}")
    got = rk.residual(state, f, backend="triton")
    chunk = 1 << 27
    want = sum(expected_residual(state[i:i + chunk], f[i:i + chunk]) for i in range(0, n, chunk))
    rel = ((got.double() - want).abs() / want).max().item()
    assert rel <= 1e-5, f"residual relative error {rel:.3e} (got {got.tolist()}, want {want.tolist()})"


@pytest.mark.gpu
@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.float64, torch.float64)], ids=pair_id)
def test_gpu_first_call_on_a_new_size_is_right(pair):
    # A size no other test uses, above TUNE_MIN_ELEMENTS: this call benchmarks every config.
    n = LARGE + 12345
    for op in POINTWISE_OPS:
        check_pointwise("triton", op, n, pair, 1.3, "cuda", seed=3)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor_autotunes_in_place_correctly():
    # Above TUNE_MIN_ELEMENTS inductor benchmarks the pointwise configs itself on first run; it must
    # restore the state between runs as Triton's autotuner does.
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def step(y, fz):
        rk.unrelax_(y, fz, 0.8, backend="triton")
        return rk.residual(y, fz, backend="triton")

    y, fz, _ = make_pair((1 << 22) + 77, torch.float32, torch.bfloat16, "cuda", seed=9)
    want = expected_pointwise("unrelax_", y, fz, 0.8)
    out = step(y, fz)
    assert_close(y, want, torch.float32, amplification=20, what="inductor unrelax_")
    rel = ((out.double() - expected_residual(y, fz)).abs() / expected_residual(y, fz)).max().item()
    assert rel <= 1e-5, f"inductor residual relative error {rel:.3e}"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_tensors_on_a_device_that_is_not_current():
    # Triton launches on the current device; the ops must switch to the tensors' device.
    assert torch.cuda.current_device() == 0
    check_pointwise("triton", "relax_", 4097, (torch.float32, torch.bfloat16), 0.8, "cuda:1")
    check_residual("triton", 4097, (torch.float32, torch.bfloat16), "cuda:1")


@pytest.mark.gpu
def test_gpu_auto_uses_triton_without_the_cuda_extension(monkeypatch):
    from revdeq_kernels import ops
    from revdeq_kernels.backends import compiled as extension

    monkeypatch.setattr(extension, "_C", None)
    monkeypatch.setattr(extension, "_LOAD_ERROR", "not built")
    monkeypatch.setattr(ops, "_resolved", {})
    assert rk.available_backends()["cuda"][0] == "triton"
    check_pointwise(None, "relax_", 4097, (torch.float32, torch.float32), 0.8, "cuda")
    assert ops._resolved[("cuda", "auto", "float")] == "triton"
