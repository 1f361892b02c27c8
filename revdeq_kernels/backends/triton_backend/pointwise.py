"""Triton relax_, unrelax_ and residual: the kernels, their launchers, and the ops
``torch.ops.revdeq.triton_relax_``, ``triton_unrelax_`` and ``triton_residual``.

Every kernel walks its tensors as flat arrays of n elements (common.flat_pair arranges that).
Arithmetic is float64 for float64 states and float32 otherwise (ops/dtypes.py), rounded once to the
stored dtype. Coefficients that must keep full float64 precision travel as their IEEE-754 bit patterns
in int64 arguments. The tile function is shared with the multi-tensor kernels (multi.py).
"""

import torch
import triton
import triton.language as tl

from ...ops import checks, library
from ...ops.dtypes import residual_dtype
from . import common
from .convert import round_to, widen


@triton.jit
def affine_tile(state_ptr, f_ptr, n, tile, a64, b64, c64, BLOCK: tl.constexpr):
    """state = c * (a * state + b * f) on tile `tile` (BLOCK elements) of a flat array of n elements, in
    float64 for float64 states and float32 otherwise (|a|, |b| <= 1: nothing overflows before the result,
    ops/arithmetic.py); only a partial tile is masked, so full tiles compile to 16-byte accesses whenever
    the pointers are 16-byte aligned."""
    if state_ptr.dtype.element_ty == tl.float64:
        a = a64
        b = b64
        c = c64
    else:
        a = a64.to(tl.float32)
        b = b64.to(tl.float32)
        c = c64.to(tl.float32)
    start = tl.cast(tile, tl.int64) * BLOCK  # int64: n may exceed 2^31
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        s = widen(tl.load(state_ptr + offs), a.dtype)
        f = widen(tl.load(f_ptr + offs), a.dtype)
        tl.store(state_ptr + offs, round_to(c * (a * s + b * f), state_ptr.dtype.element_ty))
    else:
        mask = offs < n
        s = widen(tl.load(state_ptr + offs, mask=mask), a.dtype)
        f = widen(tl.load(f_ptr + offs, mask=mask), a.dtype)
        tl.store(state_ptr + offs, round_to(c * (a * s + b * f), state_ptr.dtype.element_ty), mask=mask)


@triton.jit
def coefficient(bits):
    """A float64 coefficient from its int64 bit pattern."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit(do_not_specialize=["a_bits", "b_bits", "c_bits"])
def affine_kernel(state_ptr, f_ptr, n, a_bits, b_bits, c_bits, BLOCK: tl.constexpr):
    """state[i] = c * (a * state[i] + b * f[i]) for i < n, in place, one tile per program, with the
    coefficients of relax_ or unrelax_ that every backend uses (ops/arithmetic.py)."""
    affine_tile(state_ptr, f_ptr, n, tl.program_id(0), coefficient(a_bits), coefficient(b_bits),
                coefficient(c_bits), BLOCK)


def autotuned_affine(configs, do_bench=None):
    """affine_kernel behind triton.autotune, keyed by n (and, by Triton, by the pointer dtypes).

    Benchmarking a config runs the kernel many times; restore_value puts the state back after each
    run, so the first call on a new size still applies the update exactly once. (No
    prune_configs_by: torch.compile re-wraps a pruned autotuner without its restore_value.)
    """
    extra = {} if do_bench is None else {"do_bench": do_bench}
    return triton.autotune(configs, key=["n"], restore_value=["state_ptr"], **extra)(affine_kernel)


@triton.jit
def residual_partials_kernel(z_ptr, f_ptr, partials_ptr, n, BLOCK: tl.constexpr, FP64: tl.constexpr):
    """Stage 1 of residual: program p writes sum((z - f)^2) and sum(f^2) over tiles p, p + P, ...

    partials holds 2 * P values (P programs): the diff sums, then the f sums. Each program keeps
    BLOCK running sums and reduces them once at the end. The last, partial tile is masked and
    handled by the program that would take the next tile in turn.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    acc_dtype: tl.constexpr = tl.float64 if FP64 else tl.float32
    diff_sq = tl.zeros([BLOCK], dtype=acc_dtype)
    f_sq = tl.zeros([BLOCK], dtype=acc_dtype)
    full_end = (n // BLOCK) * BLOCK
    # The loop counter takes n's integer type, so offsets are 64-bit exactly when n needs it.
    for start in range(pid * BLOCK, full_end, programs * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        f = widen(tl.load(f_ptr + offs), acc_dtype)
        d = widen(tl.load(z_ptr + offs), acc_dtype) - f
        diff_sq += d * d
        f_sq += f * f
    if pid == (n // BLOCK) % programs:
        offs = full_end + tl.arange(0, BLOCK)
        mask = offs < n
        f = widen(tl.load(f_ptr + offs, mask=mask, other=0.0), acc_dtype)
        d = widen(tl.load(z_ptr + offs, mask=mask, other=0.0), acc_dtype) - f
        diff_sq += d * d
        f_sq += f * f
    tl.store(partials_ptr + pid, tl.sum(diff_sq, axis=0))
    tl.store(partials_ptr + programs + pid, tl.sum(f_sq, axis=0))


@triton.jit
def residual_finish_kernel(partials_ptr, out_ptr, programs, BLOCK: tl.constexpr):
    """Stage 2 of residual, one program: out = [sum of diff partials, sum of f partials].

    BLOCK is a fixed power of two >= programs, so the reduction tree, and with it the rounding, is
    the same on every call.
    """
    i = tl.arange(0, BLOCK)
    mask = i < programs
    diff_sq = tl.load(partials_ptr + i, mask=mask, other=0.0)
    f_sq = tl.load(partials_ptr + programs + i, mask=mask, other=0.0)
    tl.store(out_ptr, tl.sum(diff_sq, axis=0))
    tl.store(out_ptr + 1, tl.sum(f_sq, axis=0))


_AFFINE = {large: autotuned_affine(common.pointwise_configs(large)) for large in (False, True)}


def launch_affine(kernel, state: torch.Tensor, f: torch.Tensor, bits: tuple) -> None:
    """state = c * (a * state + b * f) on flat, paired, non-empty tensors, with `kernel` (affine_kernel behind
    an autotuner); ``bits``: common.coefficient_bits."""
    n = state.numel()

    def grid(meta):
        return (-(-n // meta["BLOCK"]),)

    common.wrap(kernel)[grid](state, f, n, *bits)


def _affine_update(op: str, state: torch.Tensor, f_val: torch.Tensor, beta: float, inverse: bool) -> None:
    checks.check_pair(op, "state", state, "f_val", f_val)
    checks.check_beta(op, beta)
    if state.numel() == 0:
        return
    work, f = common.flat_pair(state, f_val)
    with common.on_device_of(state):
        launch_affine(_AFFINE[state.numel() >= common.TUNE_MIN_ELEMENTS], work, f,
                      common.coefficient_bits(beta, inverse))
    if work is not state:
        state.copy_(work)


def launch_residual(z: torch.Tensor, fz: torch.Tensor, block: int, max_programs: int, num_warps: int):
    """[sum((z - fz)^2), sum(fz^2)] of flat, paired, non-empty tensors, in two deterministic stages.

    max_programs must be a power of two: it is also the width of the final reduction.
    """
    acc = residual_dtype(z.dtype)
    n = z.numel()
    programs = min(-(-n // block), max_programs)
    partials = torch.empty(2 * programs, dtype=acc, device=z.device)
    out = torch.empty(2, dtype=acc, device=z.device)
    common.wrap(residual_partials_kernel)[(programs,)](
        z, fz, partials, n, BLOCK=block, FP64=acc == torch.float64, num_warps=num_warps)
    common.wrap(residual_finish_kernel)[(1,)](partials, out, programs, BLOCK=max_programs, num_warps=4)
    return out


def _triton_relax_(state: torch.Tensor, f_val: torch.Tensor, beta: float) -> None:
    """In place: state = (1 - beta) * state + beta * f_val. See revdeq_kernels.relax_ for the rules.

    state: float64/32/16 or bfloat16, any shape and strides. f_val: state's shape and device, dtype as
    precise as state's or less. beta: float in (0, 2), not 1.

    Example:
        >>> torch.ops.revdeq.triton_relax_(y, fz, 0.8)  # y, fz: CUDA tensors
    """
    _affine_update("triton_relax_", state, f_val, beta, inverse=False)


def _triton_unrelax_(state: torch.Tensor, f_val: torch.Tensor, beta: float) -> None:
    """In place: state = (state - beta * f_val) / (1 - beta), the inverse of triton_relax_.

    Same argument rules as triton_relax_.

    Example:
        >>> torch.ops.revdeq.triton_unrelax_(y, fz, 0.8)  # undoes triton_relax_(y, fz, 0.8)
    """
    _affine_update("triton_unrelax_", state, f_val, beta, inverse=True)


def _triton_residual(z: torch.Tensor, fz: torch.Tensor) -> torch.Tensor:
    """[sum((z - fz)^2), sum(fz^2)] in one pass over memory, without a host synchronisation.

    z: float64/32/16 or bfloat16, any shape and strides; fz: z's shape and device, dtype as precise
    as z's or less. Returns shape (2,) on z's device: float64 (float64 z, float64 sums) or float32
    (float32 sums). Bitwise reproducible for given inputs on a given GPU model and Triton version:
    fixed launch, fixed reduction order by element index, no atomics.

    Example:
        >>> d2, f2 = torch.ops.revdeq.triton_residual(z, fz)
    """
    checks.check_pair("triton_residual", "z", z, "fz", fz)
    if z.numel() == 0:
        return torch.zeros(2, dtype=residual_dtype(z.dtype), device=z.device)
    z, fz = common.flat_pair(z, fz)
    with common.on_device_of(z):
        return launch_residual(z, fz, *common.RESIDUAL_LAUNCH)


common.register(_triton_relax_, {"state"}, library.pointwise_fake("triton_relax_"))
common.register(_triton_unrelax_, {"state"}, library.pointwise_fake("triton_unrelax_"))
common.register(_triton_residual, (), library.residual_fake("triton_residual"))
