"""The Triton kernels of the multi-tensor (tuple state) ops; imported only when triton is installed.

One launch serves up to MAX_TENSORS (state, f) pairs, passed as separate pointer arguments so each
keeps its own dtype (members of different dtype pairs mix in one launch) and torch.compile sees
every tensor a kernel writes. The grid is the tiles of all members laid end to end: member k owns
programs [cdiv(n_0, BLOCK) + ... + cdiv(n_(k-1), BLOCK), ... + cdiv(n_k, BLOCK)), and a chain of
range tests, unrolled over the COUNT members actually passed, sends each program to its member.

Per member the arithmetic is the single-tensor kernels': float64 for float64 states, float32
otherwise, rounded once to the stored dtype; coefficients travel as float64 bit patterns.
"""

import triton
import triton.language as tl

MAX_TENSORS = 8  # pairs per launch; a call with more launches once per MAX_TENSORS pairs


@triton.jit
def _affine_tile(state_ptr, f_ptr, n, tile, a64, b64, BLOCK: tl.constexpr):
    """state = a * state + b * f on tile `tile` (BLOCK elements) of one member; masked only if partial."""
    if state_ptr.dtype.element_ty == tl.float64:
        a = a64
        b = b64
    else:
        a = a64.to(tl.float32)
        b = b64.to(tl.float32)
    start = tl.cast(tile, tl.int64) * BLOCK  # int64: a member may exceed 2^31 elements
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


_SIZES = [f"n{k}" for k in range(MAX_TENSORS)]


@triton.jit(do_not_specialize=_SIZES + ["a_bits", "b_bits", "total"])
def multi_affine_kernel(s0, f0, n0, s1, f1, n1, s2, f2, n2, s3, f3, n3,
                        s4, f4, n4, s5, f5, n5, s6, f6, n6, s7, f7, n7,
                        a_bits, b_bits, total, COUNT: tl.constexpr, BLOCK: tl.constexpr):
    """s_k = a * s_k + b * f_k for the COUNT members passed (the other slots are never touched).

    n_k: member k's element count (> 0); total: the sum of the n_k, the autotuning key. a_bits,
    b_bits: float64 bit patterns of the coefficients (see _triton_kernels.affine_kernel).
    """
    a = a_bits.to(tl.int64).to(tl.float64, bitcast=True)
    b = b_bits.to(tl.int64).to(tl.float64, bitcast=True)
    pid = tl.program_id(0)
    end = tl.cdiv(n0, BLOCK)
    if pid < end:
        _affine_tile(s0, f0, n0, pid, a, b, BLOCK)
    if COUNT > 1:
        begin = end
        end = begin + tl.cdiv(n1, BLOCK)
        if (pid >= begin) & (pid < end):
            _affine_tile(s1, f1, n1, pid - begin, a, b, BLOCK)
    if COUNT > 2:
        begin = end
        end = begin + tl.cdiv(n2, BLOCK)
        if (pid >= begin) & (pid < end):
            _affine_tile(s2, f2, n2, pid - begin, a, b, BLOCK)
    if COUNT > 3:
        begin = end
        end = begin + tl.cdiv(n3, BLOCK)
        if (pid >= begin) & (pid < end):
            _affine_tile(s3, f3, n3, pid - begin, a, b, BLOCK)
    if COUNT > 4:
        begin = end
        end = begin + tl.cdiv(n4, BLOCK)
        if (pid >= begin) & (pid < end):
            _affine_tile(s4, f4, n4, pid - begin, a, b, BLOCK)
    if COUNT > 5:
        begin = end
        end = begin + tl.cdiv(n5, BLOCK)
        if (pid >= begin) & (pid < end):
            _affine_tile(s5, f5, n5, pid - begin, a, b, BLOCK)
    if COUNT > 6:
        begin = end
        end = begin + tl.cdiv(n6, BLOCK)
        if (pid >= begin) & (pid < end):
            _affine_tile(s6, f6, n6, pid - begin, a, b, BLOCK)
    if COUNT > 7:
        begin = end
        end = begin + tl.cdiv(n7, BLOCK)
        if (pid >= begin) & (pid < end):
            _affine_tile(s7, f7, n7, pid - begin, a, b, BLOCK)


def autotuned_multi_affine(configs, do_bench=None):
    """multi_affine_kernel behind triton.autotune, keyed by the total element count (and, by Triton,
    by every pointer's dtype). restore_value puts every state back after each benchmark run, so the
    first call on a new size still applies the update exactly once."""
    extra = {} if do_bench is None else {"do_bench": do_bench}
    states = [f"s{k}" for k in range(MAX_TENSORS)]
    return triton.autotune(configs, key=["total"], restore_value=states, **extra)(multi_affine_kernel)


@triton.jit
def _residual_tile(z_ptr, f_ptr, n, tile, BLOCK: tl.constexpr):
    """(sum((z - f)^2), sum(f^2)) over one tile of one member, accumulated in float64 for float64 z
    and float32 otherwise, returned as float64."""
    if z_ptr.dtype.element_ty == tl.float64:
        acc_dtype: tl.constexpr = tl.float64
    else:
        acc_dtype: tl.constexpr = tl.float32
    start = tl.cast(tile, tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        f = tl.load(f_ptr + offs).to(acc_dtype)
        d = tl.load(z_ptr + offs).to(acc_dtype) - f
    else:
        mask = offs < n
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
        d = tl.load(z_ptr + offs, mask=mask, other=0.0).to(acc_dtype) - f
    return tl.sum(d * d, axis=0).to(tl.float64), tl.sum(f * f, axis=0).to(tl.float64)


@triton.jit(do_not_specialize=_SIZES + ["tiles", "offset", "stride"])
def multi_residual_partials_kernel(z0, f0, n0, z1, f1, n1, z2, f2, n2, z3, f3, n3,
                                   z4, f4, n4, z5, f5, n5, z6, f6, n6, z7, f7, n7,
                                   partials_ptr, tiles, offset, stride, COUNT: tl.constexpr, BLOCK: tl.constexpr):
    """Stage 1 of multi_residual: program p sums tiles p, p + P, ... of the members' tiles laid end to
    end (`tiles` of them), one tile at a time, into float64, and writes the diff sum to
    partials[offset + p] and the f sum to partials[stride + offset + p].
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    diff_sq = tl.zeros([1], dtype=tl.float64)
    f_sq = tl.zeros([1], dtype=tl.float64)
    for t in range(pid, tiles, programs):
        end = tl.cdiv(n0, BLOCK)
        if t < end:
            d, f = _residual_tile(z0, f0, n0, t, BLOCK)
            diff_sq += d
            f_sq += f
        if COUNT > 1:
            begin = end
            end = begin + tl.cdiv(n1, BLOCK)
            if (t >= begin) & (t < end):
                d, f = _residual_tile(z1, f1, n1, t - begin, BLOCK)
                diff_sq += d
                f_sq += f
        if COUNT > 2:
            begin = end
            end = begin + tl.cdiv(n2, BLOCK)
            if (t >= begin) & (t < end):
                d, f = _residual_tile(z2, f2, n2, t - begin, BLOCK)
                diff_sq += d
                f_sq += f
        if COUNT > 3:
            begin = end
            end = begin + tl.cdiv(n3, BLOCK)
            if (t >= begin) & (t < end):
                d, f = _residual_tile(z3, f3, n3, t - begin, BLOCK)
                diff_sq += d
                f_sq += f
        if COUNT > 4:
            begin = end
            end = begin + tl.cdiv(n4, BLOCK)
            if (t >= begin) & (t < end):
                d, f = _residual_tile(z4, f4, n4, t - begin, BLOCK)
                diff_sq += d
                f_sq += f
        if COUNT > 5:
            begin = end
            end = begin + tl.cdiv(n5, BLOCK)
            if (t >= begin) & (t < end):
                d, f = _residual_tile(z5, f5, n5, t - begin, BLOCK)
                diff_sq += d
                f_sq += f
        if COUNT > 6:
            begin = end
            end = begin + tl.cdiv(n6, BLOCK)
            if (t >= begin) & (t < end):
                d, f = _residual_tile(z6, f6, n6, t - begin, BLOCK)
                diff_sq += d
                f_sq += f
        if COUNT > 7:
            begin = end
            end = begin + tl.cdiv(n7, BLOCK)
            if (t >= begin) & (t < end):
                d, f = _residual_tile(z7, f7, n7, t - begin, BLOCK)
                diff_sq += d
                f_sq += f
    index = tl.arange(0, 1)
    tl.store(partials_ptr + offset + pid + index, diff_sq)
    tl.store(partials_ptr + stride + offset + pid + index, f_sq)


@triton.jit
def multi_residual_finish_kernel(partials_ptr, out_ptr, count, BLOCK: tl.constexpr):
    """Stage 2, one program: out = [sum of the `count` diff partials, sum of the f partials], in float64
    in a fixed order (BLOCK running sums, then one tree), rounded once to out's dtype."""
    diff_sq = tl.zeros([BLOCK], dtype=tl.float64)
    f_sq = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, count, BLOCK):
        i = start + tl.arange(0, BLOCK)
        mask = i < count
        diff_sq += tl.load(partials_ptr + i, mask=mask, other=0.0)
        f_sq += tl.load(partials_ptr + count + i, mask=mask, other=0.0)
    tl.store(out_ptr, tl.sum(diff_sq, axis=0).to(out_ptr.dtype.element_ty))
    tl.store(out_ptr + 1, tl.sum(f_sq, axis=0).to(out_ptr.dtype.element_ty))
