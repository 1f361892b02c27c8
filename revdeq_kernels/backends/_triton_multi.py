"""Launchers and torch ops of the Triton multi-tensor (tuple state) kernels.

Imported by backends/triton.py once its kernels have loaded; registers
``torch.ops.revdeq.triton_multi_relax_``, ``triton_multi_unrelax_`` and ``triton_multi_residual``
the way triton.py registers the single-tensor ops (triton_op with compiled kernels, an opaque
custom op under the interpreter).

Launches: relax_/unrelax_ launch once per MAX_TENSORS (8) non-empty members; residual launches its
partials kernel as often, then one finishing kernel. Members are laid out as triton.py lays out a
single pair (dense ones in place, others through copies).
"""

import torch

from . import _triton_multi_kernels as multi_kernels
from . import triton as base
from .reference import multi_residual_dtype

MAX_TENSORS = multi_kernels.MAX_TENSORS

if base.INTERPRETED:
    _AFFINE_LARGE = _AFFINE_SMALL = multi_kernels.autotuned_multi_affine(base.kernels.INTERPRETER_POINTWISE_CONFIGS)
    _RESIDUAL_BLOCK = base.kernels.INTERPRETER_RESIDUAL_BLOCK
    _RESIDUAL_MAX_PROGRAMS = base.kernels.INTERPRETER_RESIDUAL_MAX_PROGRAMS
    _RESIDUAL_WARPS = 4
else:
    _AFFINE_LARGE = multi_kernels.autotuned_multi_affine(base.kernels.POINTWISE_CONFIGS)
    _AFFINE_SMALL = multi_kernels.autotuned_multi_affine(base.kernels.POINTWISE_CONFIGS[:1])
    _RESIDUAL_BLOCK = base.kernels.RESIDUAL_BLOCK
    _RESIDUAL_MAX_PROGRAMS = base.kernels.RESIDUAL_MAX_PROGRAMS
    _RESIDUAL_WARPS = base.kernels.RESIDUAL_WARPS
_FINISH_BLOCK = 1024


def _check_lists(op: str, a_name: str, a_list, b_name: str, b_list) -> None:
    """What a direct call of torch.ops.revdeq.triton_multi_* needs to stay in bounds."""
    torch._check_value(len(a_list) > 0, lambda: f"{op}: {a_name} is an empty list; pass at least one tensor")
    torch._check_value(len(b_list) == len(a_list),
                       lambda: f"{op}: {b_name} has {len(b_list)} tensors but {a_name} has {len(a_list)}")
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        base._check_pair(op, f"{a_name}[{i}]", a, f"{b_name}[{i}]", b)
        torch._check_value(a.device == a_list[0].device,
                           lambda i=i, a=a: f"{op}: {a_name}[{i}] is on {a.device} but {a_name}[0] is on "
                                            f"{a_list[0].device}; all tensors of one call must be on one device")


def _flat_members(primaries, secondaries):
    """[(caller's primary, flat primary, flat secondary)] for the non-empty members."""
    members = []
    for p, s in zip(primaries, secondaries):
        if p.numel() > 0:
            members.append((p, *base._flat_pair(p, s)))
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


def _launch_multi_affine(kernel, pairs, a: float, b: float) -> None:
    """s = a * s + b * f for up to MAX_TENSORS flat, paired, non-empty (s, f) in one launch."""
    sizes = [s.numel() for s, _ in pairs]

    def grid(meta):
        return (sum(-(-n // meta["BLOCK"]) for n in sizes),)

    base._wrap(kernel)[grid](*_slot_args(pairs), base._float64_bits(a), base._float64_bits(b), sum(sizes),
                             COUNT=len(pairs))


def _multi_affine_update(op: str, states, f_vals, beta: float, inverse: bool) -> None:
    _check_lists(op, "states", states, "f_vals", f_vals)
    base._check_beta(op, beta)
    members = _flat_members(states, f_vals)
    if not members:
        return
    a, b = base._coefficients(beta, inverse)
    with base._on_device_of(members[0][1]):
        for group in _groups(members):
            total = sum(work.numel() for _, work, _ in group)
            kernel = _AFFINE_LARGE if total >= base.kernels.TUNE_MIN_ELEMENTS else _AFFINE_SMALL
            _launch_multi_affine(kernel, [(work, f) for _, work, f in group], a, b)
    for state, work, _ in members:
        if work is not state:
            state.copy_(work)


def _launch_multi_residual(pairs_by_group, out: torch.Tensor, block: int, max_programs: int, num_warps: int):
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
        base._wrap(multi_kernels.multi_residual_partials_kernel)[(count,)](
            *_slot_args(pairs), partials, tiles, offset, stride, COUNT=len(pairs), BLOCK=block, num_warps=num_warps)
        offset += count
    base._wrap(multi_kernels.multi_residual_finish_kernel)[(1,)](partials, out, stride, BLOCK=_FINISH_BLOCK,
                                                                  num_warps=4)


# ---------------------------------------------------------------------------------------------------
# The ops


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
    _check_lists("triton_multi_residual", "zs", zs, "fzs", fzs)
    members = _flat_members(zs, fzs)
    if not members:
        return torch.zeros(2, dtype=multi_residual_dtype(zs), device=zs[0].device)
    out = torch.empty(2, dtype=multi_residual_dtype(zs), device=zs[0].device)
    with base._on_device_of(members[0][1]):
        _launch_multi_residual([[(z, f) for _, z, f in g] for g in _groups(members)], out, _RESIDUAL_BLOCK,
                               _RESIDUAL_MAX_PROGRAMS, _RESIDUAL_WARPS)
    return out


def _pointwise_fake(states, f_vals, beta):
    return None


def _residual_fake(zs, fzs):
    return zs[0].new_empty(2, dtype=multi_residual_dtype(zs))


def _register_ops() -> None:
    for fn, mutates in ((_triton_multi_relax_, {"states"}), (_triton_multi_unrelax_, {"states"}),
                        (_triton_multi_residual, ())):
        name = f"revdeq::{fn.__name__.lstrip('_')}"
        if base.INTERPRETED or not hasattr(torch.library, "triton_op"):
            op = torch.library.custom_op(name, fn, mutates_args=mutates)
            op.register_fake(_residual_fake if fn is _triton_multi_residual else _pointwise_fake)
        else:
            torch.library.triton_op(name, fn, mutates_args=mutates)


_register_ops()
