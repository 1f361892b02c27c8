"""Triton multi-tensor (tuple state) relax_, unrelax_ and residual: the kernels, their launchers, and the
ops ``torch.ops.revdeq.triton_multi_relax_``, ``triton_multi_unrelax_`` and ``triton_multi_residual``.

One launch serves up to MAX_TENSORS (state, f) pairs, passed as separate pointer arguments so each
keeps its own dtype (members of different dtype pairs mix in one launch) and torch.compile sees
every tensor a kernel writes. The grid is the tiles of all members laid end to end: member k owns
programs [cdiv(n_0, BLOCK) + ... + cdiv(n_(k-1), BLOCK), ... + cdiv(n_k, BLOCK)), and a chain of
range tests, unrolled over the COUNT members actually passed, sends each program to its member, where
the single-tensor tile function (pointwise.affine_tile) does the arithmetic. relax_/unrelax_ launch
once per MAX_TENSORS non-empty members; residual launches its partials kernel as often, then one
finishing kernel. Members are laid out as a single pair is (common.flat_pair).
"""

import torch
import triton
import triton.language as tl

from ...ops import checks, library
from ...ops.dtypes import multi_residual_dtype
from . import common
from .convert import widen
from .pointwise import affine_tile, coefficient

MAX_TENSORS = 8  # pairs per launch; a call with more launches once per MAX_TENSORS pairs


_SIZES = [f"n{k}" for k in range(MAX_TENSORS)]


@triton.jit(do_not_specialize=_SIZES + ["a_bits", "b_bits", "c_bits", "total"])
def multi_affine_kernel(s0, f0, n0, s1, f1, n1, s2, f2, n2, s3, f3, n3,
                        s4, f4, n4, s5, f5, n5, s6, f6, n6, s7, f7, n7,
                        a_bits, b_bits, c_bits, total, COUNT: tl.constexpr, BLOCK: tl.constexpr):
    """s_k = c * (a * s_k + b * f_k) for the COUNT members passed (the other slots are never touched).

    n_k: member k's element count (> 0); total: the sum of the n_k, the autotuning key. a_bits,
    b_bits, c_bits: float64 bit patterns of the coefficients (see pointwise.affine_kernel).
    """
    a = coefficient(a_bits)
    b = coefficient(b_bits)
    c = coefficient(c_bits)
    pid = tl.program_id(0)
    end = tl.cdiv(n0, BLOCK)
    if pid < end:
        affine_tile(s0, f0, n0, pid, a, b, c, BLOCK)
    if COUNT > 1:
        begin = end
        end = begin + tl.cdiv(n1, BLOCK)
        if (pid >= begin) & (pid < end):
            affine_tile(s1, f1, n1, pid - begin, a, b, c, BLOCK)
    if COUNT > 2:
        begin = end
        end = begin + tl.cdiv(n2, BLOCK)
        if (pid >= begin) & (pid < end):
            affine_tile(s2, f2, n2, pid - begin, a, b, c, BLOCK)
    if COUNT > 3:
        begin = end
        end = begin + tl.cdiv(n3, BLOCK)
        if (pid >= begin) & (pid < end):
            affine_tile(s3, f3, n3, pid - begin, a, b, c, BLOCK)
    if COUNT > 4:
        begin = end
        end = begin + tl.cdiv(n4, BLOCK)
        if (pid >= begin) & (pid < end):
            affine_tile(s4, f4, n4, pid - begin, a, b, c, BLOCK)
    if COUNT > 5:
        begin = end
        end = begin + tl.cdiv(n5, BLOCK)
        if (pid >= begin) & (pid < end):
            affine_tile(s5, f5, n5, pid - begin, a, b, c, BLOCK)
    if COUNT > 6:
        begin = end
        end = begin + tl.cdiv(n6, BLOCK)
        if (pid >= begin) & (pid < end):
            affine_tile(s6, f6, n6, pid - begin, a, b, c, BLOCK)
    if COUNT > 7:
        begin = end
        end = begin + tl.cdiv(n7, BLOCK)
        if (pid >= begin) & (pid < end):
            affine_tile(s7, f7, n7, pid - begin, a, b, c, BLOCK)


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
        f = widen(tl.load(f_ptr + offs), acc_dtype)
        d = widen(tl.load(z_ptr + offs), acc_dtype) - f
    else:
        mask = offs < n
        f = widen(tl.load(f_ptr + offs, mask=mask, other=0.0), acc_dtype)
        d = widen(tl.load(z_ptr + offs, mask=mask, other=0.0), acc_dtype) - f
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


# ---------------------------------------------------------------------------------------------------
# Launchers and ops

_AFFINE = {large: autotuned_multi_affine(common.pointwise_configs(large)) for large in (False, True)}
_FINISH_BLOCK = 1024


def _flat_members(primaries, secondaries):
    """[(caller's primary, flat primary, flat secondary)] for the non-empty members."""
    members = []
    for p, s in zip(primaries, secondaries):
        if p.numel() > 0:
            members.append((p, *common.flat_pair(p, s)))
    return members


def _groups(members):
    return [members[i:i + MAX_TENSORS] for i in range(0, len(members), MAX_TENSORS)]


def _slot_args(pairs):
    """The 24 (pointer, pointer, size) arguments of a launch: the members, then the first member again
    in the unused slots (never touched: COUNT stops the kernel's chain before them)."""
    args = []
    for k in range(MAX_TENSORS):
        a, b = pairs[k] if k < len(pairs) else pairs[0]
        args += [a, b, a.numel()]
    return args


def launch_multi_affine(kernel, pairs, bits: tuple) -> None:
    """s = c * (a * s + b * f) for up to MAX_TENSORS flat, paired, non-empty (s, f) in one launch; ``bits``:
    common.coefficient_bits."""
    sizes = [s.numel() for s, _ in pairs]

    def grid(meta):
        return (sum(-(-n // meta["BLOCK"]) for n in sizes),)

    common.wrap(kernel)[grid](*_slot_args(pairs), *bits, sum(sizes),
                             COUNT=len(pairs))


def _multi_affine_update(op: str, states, f_vals, beta: float, inverse: bool) -> None:
    checks.check_lists(op, "states", states, "f_vals", f_vals)
    checks.check_beta(op, beta)
    members = _flat_members(states, f_vals)
    if not members:
        return
    bits = common.coefficient_bits(beta, inverse)
    with common.on_device_of(members[0][1]):
        for group in _groups(members):
            total = sum(work.numel() for _, work, _ in group)
            launch_multi_affine(_AFFINE[total >= common.TUNE_MIN_ELEMENTS], [(work, f) for _, work, f in group], bits)
    for state, work, _ in members:
        if work is not state:
            state.copy_(work)


def launch_multi_residual(pairs_by_group, out: torch.Tensor, block: int, max_programs: int, num_warps: int):
    """out = [sum((z - f)^2), sum(f^2)] over every (z, f) of every group: one partials launch per group
    (at most max_programs programs each), then one finishing launch over all partials."""
    programs = []
    for pairs in pairs_by_group:
        tiles = sum(-(-z.numel() // block) for z, _ in pairs)
        programs.append(min(tiles, max_programs))
    stride = sum(programs)
    partials = torch.empty(2 * stride, dtype=torch.float64, device=out.device)
    offset = 0
    for pairs, count in zip(pairs_by_group, programs):
        tiles = sum(-(-z.numel() // block) for z, _ in pairs)
        common.wrap(multi_residual_partials_kernel)[(count,)](
            *_slot_args(pairs), partials, tiles, offset, stride, COUNT=len(pairs), BLOCK=block, num_warps=num_warps)
        offset += count
    common.wrap(multi_residual_finish_kernel)[(1,)](partials, out, stride, BLOCK=_FINISH_BLOCK,
                                                                  num_warps=4)


def _triton_multi_relax_(states: list[torch.Tensor], f_vals: list[torch.Tensor], beta: float) -> None:
    """In place: states[i] = (1 - beta) * states[i] + beta * f_vals[i] for every i.

    Each pair follows triton_relax_'s rules (shapes equal, f no more precise than its state, any
    strides; empty members are skipped); all tensors on one device. Pairs of different dtypes may
    mix. One launch per 8 non-empty members.

    Example:
        >>> torch.ops.revdeq.triton_multi_relax_([y0, y1], [f0, f1], 0.8)  # CUDA tensors
    """
    _multi_affine_update("triton_multi_relax_", states, f_vals, beta, inverse=False)


def _triton_multi_unrelax_(states: list[torch.Tensor], f_vals: list[torch.Tensor], beta: float) -> None:
    """In place: states[i] = (states[i] - beta * f_vals[i]) / (1 - beta), the inverse of triton_multi_relax_.

    Same argument rules as triton_multi_relax_.

    Example:
        >>> torch.ops.revdeq.triton_multi_unrelax_([y0, y1], [f0, f1], 0.8)
    """
    _multi_affine_update("triton_multi_unrelax_", states, f_vals, beta, inverse=True)


def _triton_multi_residual(zs: list[torch.Tensor], fzs: list[torch.Tensor]) -> torch.Tensor:
    """[sum_i sum((zs[i] - fzs[i])^2), sum_i sum(fzs[i]^2)] without a host synchronisation.

    Each pair follows triton_residual's rules; all tensors on one device. Returns shape (2,):
    float64 when any z is float64, float32 otherwise. Each tile is summed in float64 (float64 z)
    or float32, tiles and members are added in float64. Bitwise reproducible for given inputs on a
    given GPU model and Triton version (fixed launches, fixed order, no atomics).

    Example:
        >>> d2, f2 = torch.ops.revdeq.triton_multi_residual([z0, z1], [f0, f1])
    """
    checks.check_lists("triton_multi_residual", "zs", zs, "fzs", fzs)
    members = _flat_members(zs, fzs)
    if not members:
        return torch.zeros(2, dtype=multi_residual_dtype(zs), device=zs[0].device)
    out = torch.empty(2, dtype=multi_residual_dtype(zs), device=zs[0].device)
    with common.on_device_of(members[0][1]):
        launch_multi_residual([[(z, f) for _, z, f in g] for g in _groups(members)], out, *common.RESIDUAL_LAUNCH)
    return out


common.register(_triton_multi_relax_, {"states"}, library.multi_pointwise_fake("triton_multi_relax_"))
common.register(_triton_multi_unrelax_, {"states"}, library.multi_pointwise_fake("triton_multi_unrelax_"))
common.register(_triton_multi_residual, (), library.multi_residual_fake("triton_multi_residual"))
