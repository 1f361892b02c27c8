"""What the Triton backend's op families share: whether Triton is usable here and whether its kernels
are interpreted, how tensors are laid out for the kernels, how scalars reach them, and how a launcher
becomes a torch op.

Only imported when triton is installed (triton_backend/__init__.py checks first). Kernels are
compiled, or interpreted on CPU tensors when TRITON_INTERPRET=1 was set before triton was first
imported (how the tests run them without a GPU): triton.jit decides when a kernel is defined.

Layouts: tensors that fill one block of memory (contiguous, or a permutation of it) are walked as flat
arrays in place; an f laid out differently from a dense state is first copied into the state's
layout; a state with gaps (a strided slice) is updated through a contiguous copy that is copied back,
so nothing outside the view is written.
"""

import contextlib
import struct

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from ...ops.arithmetic import affine_coefficients


@triton.jit
def _probe(x_ptr):  # never launched: its type says how triton.jit builds kernels in this process
    pass


INTERPRETED = isinstance(_probe, InterpretedFunction)

# torch.library.triton_op makes the kernels visible to torch.compile; it cannot wrap interpreted kernels
# (and torch < 2.6 has neither it nor wrap_triton), so those ops are opaque custom ops with fakes.
USE_TRITON_OP = not INTERPRETED and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def wrap(kernel):
    """The kernel as launched from inside an op: through wrap_triton where torch.compile can trace it."""
    return torch.library.wrap_triton(kernel) if USE_TRITON_OP else kernel


def register(fn, mutates, fake) -> None:
    """Registers ``fn`` (named ``_triton_<op>``) as ``torch.ops.revdeq.triton_<op>``: a triton_op with compiled
    kernels (its fake is derived by running fn on fake tensors), else a custom op with ``fake``."""
    name = f"revdeq::{fn.__name__.lstrip('_')}"
    if USE_TRITON_OP:
        torch.library.triton_op(name, fn, mutates_args=mutates)
    else:
        torch.library.custom_op(name, fn, mutates_args=mutates).register_fake(fake)


# Pointwise launch configs for GPUs: 8 to 32 elements per thread, i.e. several 16-byte accesses per
# tensor in flight. Below TUNE_MIN_ELEMENTS a launch takes a few microseconds whatever the config, so
# the launchers use the first (smallest) one there without benchmarking. The interpreter runs one
# program at a time in numpy: one config, nothing to benchmark.
POINTWISE_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=4),
    triton.Config({"BLOCK": 4096}, num_warps=8),
    triton.Config({"BLOCK": 8192}, num_warps=8),
]
INTERPRETER_POINTWISE_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4)]
TUNE_MIN_ELEMENTS = 1 << 20


def pointwise_configs(large: bool) -> list:
    """The configs an autotuned pointwise kernel gets for sizes from TUNE_MIN_ELEMENTS up, or below."""
    if INTERPRETED:
        return INTERPRETER_POINTWISE_CONFIGS
    return POINTWISE_CONFIGS if large else POINTWISE_CONFIGS[:1]


# residual is not autotuned: its rounding depends on the block and warp layout, and a config picked by
# timing could differ from one process to the next. A fixed launch makes the result a function of the
# inputs alone (on a given GPU model and Triton version): (block, most programs, warps).
RESIDUAL_GPU_LAUNCH = (4096, 1024, 8)  # 1024 programs keep every SM of an H100 busy; each loops over tiles
RESIDUAL_INTERPRETER_LAUNCH = (1024, 8, 4)  # small, so CPU tests reach the multi-tile loop at modest sizes
RESIDUAL_LAUNCH = RESIDUAL_INTERPRETER_LAUNCH if INTERPRETED else RESIDUAL_GPU_LAUNCH


def is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill one gap-free, non-overlapping block of memory, in any dim order."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_order(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride()) if size != 1)


def flat_pair(primary: torch.Tensor, secondary: torch.Tensor):
    """(primary', secondary'): dense tensors whose memory, read as flat arrays, pairs element k of one
    with element k of the other. primary' is primary itself whenever primary is dense."""
    if is_dense(primary):
        if not (is_dense(secondary) and _same_order(primary, secondary)):
            # empty_like keeps a dense tensor's strides, so the copy is laid out like primary.
            secondary = torch.empty_like(primary, dtype=secondary.dtype).copy_(secondary)
        return primary, secondary
    return primary.contiguous(), secondary.contiguous()


def float64_bits(x: float) -> int:
    """x's IEEE-754 bit pattern as a signed int64: how a scalar reaches a kernel without rounding (Triton
    passes Python floats as float32)."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def coefficient_bits(beta: float, inverse: bool) -> tuple:
    """The float64 bit patterns of (a, b, c) with relax_ (inverse=False) or unrelax_ = c * (a * state + b * f),
    the coefficients of every backend (ops/arithmetic.py)."""
    return tuple(float64_bits(k) for k in affine_coefficients(beta, inverse))


def on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device, so make it t's (a no-op without CUDA)."""
    if t.device.type == "cuda" and torch.cuda.is_available() and t.device.index is not None \
            and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device.index)
    return contextlib.nullcontext()
