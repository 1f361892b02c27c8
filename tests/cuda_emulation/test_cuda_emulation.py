"""The CUDA kernels of csrc/, executed on the CPU: built by the host compiler under the emulation in
this folder (emu.h, runtime.cpp, emu_build.py) and run by the drivers (drivers/) against an independent
reference. CI has a host compiler and the CUDA headers; elsewhere the tests skip, saying which is missing.

Three builds: plain (every section in quick mode), AddressSanitizer + UndefinedBehaviorSanitizer (quick,
alignment checks on, any finding fatal) and ThreadSanitizer (the *-small sections, one OS thread per
CUDA thread). `make cuda-emu` runs the full sections; tests/cuda_emulation/README.md says more.
"""

import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import emu_build as build  # noqa: E402

MISSING = build.missing_tools()
needs_tools = pytest.mark.skipif(MISSING is not None, reason=f"cannot build the CUDA emulation: {MISSING}")


def _built(variant):
    try:
        return build.build(variant)
    except build.BuildError as exc:
        pytest.fail(f"the {variant} emulation build failed:\n{exc}")


@pytest.fixture(scope="module")
def plain():
    return _built("plain")


def _run(binary, *args, env=None):
    proc = subprocess.run([binary, *args], capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=1200)
    return proc.returncode, proc.stdout + proc.stderr


def _sections(binary, *, small=False):
    rc, out = _run(binary, "--list")
    assert rc == 0, out
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.endswith("-small")] if small else names


def _assert_all_ok(binary, output, rc, *, small=False):
    expected = _sections(binary, small=small)
    ok = set(re.findall(r"^section (\S+): OK, \d+ checks", output, re.M))
    missing = [name for name in expected if name not in ok]
    assert rc == 0 and not missing, f"sections not OK: {missing}\n{output[-8000:]}"


@needs_tools
def test_every_section_passes_on_the_plain_build(plain):
    rc, output = _run(plain, "--quick")
    _assert_all_ok(plain, output, rc)


@needs_tools
def test_every_section_passes_under_address_and_undefined_behavior_sanitizers():
    binary = _built("asan")
    rc, output = _run(binary, "--quick", env=build.RUN_ENV["asan"])
    assert "runtime error" not in output and "AddressSanitizer" not in output and "LeakSanitizer" not in output, \
        output[-8000:]
    _assert_all_ok(binary, output, rc)


@needs_tools
def test_small_sections_have_no_data_race_under_thread_sanitizer():
    # Among them exact mode on partial warp tiles, where lanes past the end used to load the element
    # their neighbour lane stores (csrc/cuda/kernels/exact.cu, load_group).
    binary = _built("tsan")
    rc, output = _run(binary, "--small", env=build.RUN_ENV["tsan"])
    assert "ThreadSanitizer" not in output, output[-8000:]
    _assert_all_ok(binary, output, rc, small=True)


@needs_tools
def test_a_failing_check_fails_the_run(plain):
    # The harness itself: an unknown section is a usage error, and `--list` names what CI runs.
    rc, output = _run(plain, "no-such-section")
    assert rc == 2 and "unknown section" in output
    names = _sections(plain)
    assert {"pointwise", "residual", "fixed", "multi", "emulator-barrier", "earlier-errors"} <= set(names), names


# The rewrites, on text: no compiler needed.

def test_launch_rewrite_keeps_lines_and_arguments():
    src = ("  if (err) return err;\n"
           "  multi_affine_kernel<S, F><<<grid_for(chunks, max_blocks), kThreads, 0, stream>>>(\n"
           "      table, static_cast<acc_t<S>>(a), static_cast<acc_t<S>>(b));\n"
           "  return cudaGetLastError();\n")
    out = build.rewrite_launches(src)
    assert out.count("\n") == src.count("\n")
    assert ('::revdeq_emu::launch("multi_affine_kernel<S, F>", __FILE__, __LINE__, '
            '::revdeq_emu::LaunchConfig(grid_for(chunks, max_blocks), kThreads, 0, stream), multi_affine_kernel<S, F>, '
            '\n      table, static_cast<acc_t<S>>(a), static_cast<acc_t<S>>(b));') in out
    assert "<<<" not in out and ">>>" not in out
    assert build.rewrite_launches("{ k<<<1, 32>>>(); }") == \
        '{ ::revdeq_emu::launch("k", __FILE__, __LINE__, ::revdeq_emu::LaunchConfig(1, 32), k); }'


def test_shared_rewrite_gives_each_declaration_a_block_instance():
    out = build.rewrite_shared("  __shared__ T partial[2][kWarps];\n  __shared__ bool last_block;\n")
    assert out == ("  static char revdeq_emu_key_partial; auto& partial = "
                   "::revdeq_emu::shared_variable<T[2][kWarps]>(&revdeq_emu_key_partial);\n"
                   "  static char revdeq_emu_key_last_block; auto& last_block = "
                   "::revdeq_emu::shared_variable<bool>(&revdeq_emu_key_last_block);\n")


def test_rewrites_cover_every_launch_and_shared_declaration_in_csrc():
    for root, _, files in os.walk(build.CSRC):
        for name in files:
            if name.endswith((".cu", ".cuh")):
                with open(os.path.join(root, name)) as fh:
                    text = build.rewrite(fh.read(), name)
                assert "<<<" not in text and "__shared__" not in text, name


def test_unparsable_launch_is_an_error():
    with pytest.raises(build.BuildError, match="without an argument list"):
        build.rewrite_launches("k<<<1, 32>>>;")
