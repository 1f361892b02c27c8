"""The Triton kernels behind backends/triton.py; imported only when triton is installed.

Every kernel walks its tensors as flat arrays of n elements (backends/triton.py arranges that).
Arithmetic is float64 when FP64 is set (float64 states) and float32 otherwise, rounded once to the
stored dtype. Scalars that must keep full float64 precision travel as their IEEE-754 bit patterns
in int64 arguments, because Triton passes Python floats as float32.

Whether these are compiled or interpreted kernels is decided when this module is imported:
`triton.jit` returns an interpreter (numpy, runs on CPU tensors) when TRITON_INTERPRET=1 is set.
"""

import triton
import triton.language as tl

# Pointwise configs for GPUs: 8 to 32 elements per thread, i.e. several 16-byte accesses per tensor
# in flight. Below TUNE_MIN_ELEMENTS a launch takes a few microseconds whatever the config, so
# backends/triton.py launches the first (smallest) one there without benchmarking.
POINTWISE_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=4),
    triton.Config({"BLOCK": 4096}, num_warps=8),
    triton.Config({"BLOCK": 8192}, num_warps=8),
]
TUNE_MIN_ELEMENTS = 1 << 20
# The interpreter runs one program at a time in numpy: one config, nothing to benchmark.
INTERPRETER_POINTWISE_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4)]


@triton.jit(do_not_specialize=["a_bits", "b_bits"])
def affine_kernel(state_ptr, f_ptr, n, a_bits, b_bits, BLOCK: tl.constexpr, FP64: tl.constexpr):
    """state[i] = a * state[i] + b * f[i] for i < n, in place; a, b are float64 bit patterns.

    relax_ is (a, b) = (1 - beta, beta) and unrelax_ is (1 / (1 - beta), -beta / (1 - beta)), the
    coefficients the C++ kernels use too. Full tiles take the unmasked branch, which compiles to
    16-byte accesses whenever the pointers are 16-byte aligned; only the last tile is masked.
    """
    a = a_bits.to(tl.int64).to(tl.float64, bitcast=True)
    b = b_bits.to(tl.int64).to(tl.float64, bitcast=True)
    if not FP64:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    start = tl.program_id(0).to(tl.int64) * BLOCK  # int64: n may exceed 2^31
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        s = tl.load(state_ptr + offs).to(a.dtype)
        f = tl.load(f_ptr + offs).to(a.dtype)
        tl.store(state_ptr + offs, (a * s + b * f).to(state_ptr.dtype.element_ty))
    else:
        mask = offs < n
        s = tl.load(state_ptr + offs, mask=mask).to(a.dtype)
        f = tl.load(f_ptr + offs, mask=mask).to(a.dtype)
        tl.store(state_ptr + offs, (a * s + b * f).to(state_ptr.dtype.element_ty), mask=mask)


def autotuned_affine(configs, do_bench=None):
    """affine_kernel behind triton.autotune, keyed by n (and, by Triton, by the pointer dtypes).

    Benchmarking a config runs the kernel many times; restore_value puts the state back after each
    run, so the first call on a new size still applies the update exactly once. (No
    prune_configs_by: torch.compile re-wraps a pruned autotuner without its restore_value.)
    """
    extra = {} if do_bench is None else {"do_bench": do_bench}
    return triton.autotune(configs, key=["n"], restore_value=["state_ptr"], **extra)(affine_kernel)


# residual is not autotuned: its rounding depends on the block and warp layout, and a config picked
# by timing could differ from one process to the next. A fixed launch makes the result a function
# of the inputs alone (on a given GPU model and Triton version).
RESIDUAL_BLOCK = 4096
RESIDUAL_WARPS = 8
RESIDUAL_MAX_PROGRAMS = 1024  # enough to keep every SM of an H100 busy; each program loops over tiles
INTERPRETER_RESIDUAL_BLOCK = 1024
INTERPRETER_RESIDUAL_MAX_PROGRAMS = 8  # small, so CPU tests reach the multi-tile loop at modest sizes


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
        f = tl.load(f_ptr + offs).to(acc_dtype)
        d = tl.load(z_ptr + offs).to(acc_dtype) - f
        diff_sq += d * d
        f_sq += f * f
    if pid == (n // BLOCK) % programs:
        offs = full_end + tl.arange(0, BLOCK)
        mask = offs < n
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
        d = tl.load(z_ptr + offs, mask=mask, other=0.0).to(acc_dtype) - f
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
