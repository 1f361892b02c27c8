"""Every argument check of the fused ops, once, with messages that name the op, the argument, what was
expected and what was given.

The public ops (ops/__init__.py) run them before choosing a backend; the Triton ops and the fake
(meta) kernels run the same ones for direct ``torch.ops.revdeq.*`` calls. The C++ kernels keep only
what a direct call must still refuse to stay in bounds (csrc/common/checks.cpp). Plain Python
conditions on shapes, dtypes and devices, so they also run on fake tensors while torch.compile traces;
the memory checks need addresses and are skipped there (the compiled kernels check them at run time).

Memory is compared by address range, not by storage: two tensors over the same memory through
separate storages (``torch.from_numpy`` of overlapping numpy slices) overlap too. Imports only torch,
dtypes.py and exact/.
"""

import math
import numbers

import torch

from .. import exact
from .dtypes import DTYPE_NAMES, FLOAT_DTYPES, PAIRS

SEQUENCES = (tuple, list)


def check_beta(op: str, beta) -> float:
    """beta as a float, or a clear error: it must be a finite real number in (0, 2) other than 1."""
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        hint = " (a tensor would need a device-to-host sync; pass a Python float)" if isinstance(
            beta, torch.Tensor) else ""
        raise TypeError(f"{op}: beta must be a real number, got {type(beta).__name__}{hint}")
    beta = float(beta)
    if not (math.isfinite(beta) and 0.0 < beta < 2.0 and beta != 1.0):
        raise ValueError(f"{op}: beta must be a finite number in (0, 2) other than 1, got {beta!r}")
    return beta


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    check_dense(op, name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must have dtype {DTYPE_NAMES}, got {t.dtype}")


def check_dense(op: str, name: str, t: torch.Tensor) -> None:
    """A strided tensor: the kernels walk memory by strides, which sparse and nested tensors do not have."""
    if t.is_nested:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got a nested tensor; pass each of its "
                        "components (t.unbind()) or a padded dense tensor (t.to_padded_tensor(0.0))")
    if t.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}; convert it with "
                        f"{name}.to_dense()")


def check_pair(op: str, state_name: str, state, f_name: str, f) -> None:
    """A (state, f) pair: floating tensors, f no more precise than state, one device, one shape."""
    check_tensor(op, state_name, state)
    check_tensor(op, f_name, f)
    if f.device != state.device:
        raise ValueError(f"{op}: {f_name} is on {f.device} but {state_name} is on {state.device}")
    if torch.promote_types(state.dtype, f.dtype) != state.dtype:
        raise TypeError(
            f"{op}: {f_name} has dtype {f.dtype}, which {state_name} ({state.dtype}) cannot hold without "
            f"losing precision; {f_name} may be as precise as {state_name} or less"
        )
    if f.shape != state.shape:
        raise ValueError(f"{op}: {f_name} has shape {tuple(f.shape)} but {state_name} has shape "
                         f"{tuple(state.shape)}")


def check_no_grad(op: str, named) -> None:
    """The ops record no autograd history: in grad mode none of ``named`` ((name, tensor) pairs) may
    require grad."""
    if not torch.is_grad_enabled():
        return
    for name, t in named:
        if t.requires_grad:
            raise RuntimeError(
                f"{op}: {name} requires grad and grad mode is on, but {op} records no autograd history; "
                f"call it under torch.no_grad() or pass detached tensors")


def check_lists(op: str, a_name: str, a_seq, b_name: str, b_seq) -> None:
    """Two sequences of pairs: as long as each other, not empty, each pair as :func:`check_pair`, one device.

    One cheap pass over the members; only when it finds a problem does the member-by-member pass run,
    to name the first bad member and what is wrong with it."""
    if len(a_seq) == 0:
        raise ValueError(f"{op}: {a_name} is an empty {type(a_seq).__name__}; pass at least one tensor")
    if len(b_seq) != len(a_seq):
        raise ValueError(f"{op}: {b_name} has {len(b_seq)} tensors but {a_name} has {len(a_seq)}")
    device = getattr(a_seq[0], "device", None)
    for a, b in zip(a_seq, b_seq):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.layout == torch.strided
                and b.layout == torch.strided and not (a.is_nested or b.is_nested) and (a.dtype, b.dtype) in PAIRS
                and a.device == device and b.device == device and a.shape == b.shape):
            break
    else:
        return
    for i, (a, b) in enumerate(zip(a_seq, b_seq)):
        check_pair(op, f"{a_name}[{i}]", a, f"{b_name}[{i}]", b)
        if a.device != a_seq[0].device:
            raise ValueError(f"{op}: {a_name}[{i}] is on {a.device} but {a_name}[0] is on {a_seq[0].device}; all "
                             "tensors of one call must be on one device")
    raise AssertionError(f"{op}: the argument checks disagree about {a_name} and {b_name}")  # a bug, not bad input


# -------------------------------------------------------------------------------------------------
# Memory: in-place updates must not read what they overwrite nor write an element twice.


def has_addresses(*tensors) -> bool:
    """False while tracing and for fake tensors (no memory to compare) and meta tensors (none at all)."""
    if all(type(t) is torch.Tensor for t in tensors):  # the common case, cheaply: fake tensors are a subclass
        return not torch.compiler.is_compiling() and all(t.device.type != "meta" for t in tensors)
    if torch.compiler.is_compiling():
        return False
    return all(t.device.type != "meta" and not torch._subclasses.fake_tensor.is_fake(t) for t in tensors)


def byte_span(t: torch.Tensor) -> tuple:
    """[first byte, one past the last byte) that a non-empty tensor's elements span (strides are never
    negative)."""
    start = t.data_ptr()
    if t.is_contiguous():  # the common case, without a Python loop over the dimensions
        return start, start + t.numel() * t.element_size()
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + span * t.element_size()


def may_share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the byte ranges the two tensors span intersect (exact for dense tensors; interleaved
    strided views count as sharing)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, a1 = byte_span(a)
    b0, b1 = byte_span(b)
    return a0 < b1 and b0 < a1


def check_no_internal_overlap(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1:
        raise ValueError(f"{op}: {name} has internal overlap (e.g. an expanded view); an in-place update "
                         "would write some elements more than once")


def check_disjoint(op: str, named) -> None:
    """No two of ``named`` ((name, tensor) pairs) share memory; the message names the later one first."""
    for i, (a_name, a) in enumerate(named):
        for b_name, b in named[i + 1:]:
            if may_share_memory(a, b):
                raise ValueError(f"{op}: {b_name} shares memory with {a_name}")


def check_pointwise(op: str, state, f_val, beta) -> float:
    """relax_ / unrelax_ on one pair; returns beta as a float."""
    check_pair(op, "state", state, "f_val", f_val)
    check_no_grad(op, (("state", state), ("f_val", f_val)))
    beta = check_beta(op, beta)
    if has_addresses(state):
        check_no_internal_overlap(op, "state", state)
        if may_share_memory(state, f_val):
            raise ValueError(f"{op}: f_val shares memory with state; the in-place update would read values it has "
                             "already overwritten (pass f_val.clone())")
    return beta


def check_multi_memory(op: str, states, f_vals) -> None:
    """No state overlaps itself, another state, or any f value; f values may overlap each other.

    Sorted by start, a range that begins before the furthest end seen so far intersects the range
    with that end (one pass, whatever the number of members)."""
    ranges = []
    for i, state in enumerate(states):
        check_no_internal_overlap(op, f"state[{i}]", state)
        if state.numel() > 0:
            ranges.append((*byte_span(state), 0, i))
    for i, f in enumerate(f_vals):
        if f.numel() > 0:
            ranges.append((*byte_span(f), 1, i))
    ranges.sort()
    furthest = furthest_state = None  # (end, kind, index) of the range reaching furthest, of any kind / a state
    for start, end, kind, i in ranges:
        other = furthest if kind == 0 else furthest_state  # f values only conflict with states
        if other is not None and start < other[0]:
            _, other_kind, j = other
            if kind == 1 or other_kind == 1:  # a state and an f value
                f_index, state_index = (i, j) if kind == 1 else (j, i)
                raise ValueError(f"{op}: f_val[{f_index}] shares memory with state[{state_index}]; the in-place "
                                 f"update would read values it has already overwritten (pass f_val[{f_index}].clone())")
            raise ValueError(f"{op}: state[{i}] shares memory with state[{j}]; the in-place updates would write the "
                             "same memory twice (pass distinct tensors)")
        if furthest is None or end > furthest[0]:
            furthest = (end, kind, i)
        if kind == 0 and (furthest_state is None or end > furthest_state[0]):
            furthest_state = (end, kind, i)


def check_sequences(op: str, a_name: str, a_seq, b_name: str, b_seq) -> None:
    """The public ops' tuple-state form: ``b_seq`` a sequence too, then :func:`check_lists`, no grad."""
    if not isinstance(b_seq, SEQUENCES):
        kind = type(a_seq).__name__
        raise TypeError(f"{op}: {a_name} must be a torch.Tensor, got {kind}; as a tuple state ({kind} of tensors) it "
                        f"needs {b_name} to be a tuple or list of as many tensors, got {type(b_seq).__name__}")
    check_lists(op, a_name, a_seq, b_name, b_seq)
    check_no_grad(op, [(f"{a_name}[{i}]", a) for i, a in enumerate(a_seq)] +
                  [(f"{b_name}[{i}]", b) for i, b in enumerate(b_seq)])


# -------------------------------------------------------------------------------------------------
# Exact mode (the format's rules: revdeq_kernels/exact).


def check_fixed(op: str, state, f_val, remainder, status, beta, frac_bits) -> exact.DyadicBeta:
    """relax_fixed_ / unrelax_fixed_: state int64, f_val floating of its shape and device, beta a (p, m)
    pair, remainder int32 (m, ceil(numel / 32)) contiguous, status int32 of shape (1,) or None, all on
    one device and disjoint. Returns beta as a DyadicBeta."""
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{op}: state must be a torch.Tensor, got {type(state).__name__}")
    if state.dtype != torch.int64:
        raise TypeError(f"{op}: state must have dtype torch.int64 (fixed point; convert with "
                        f"revdeq_kernels.exact.to_fixed), got {state.dtype}")
    check_tensor(op, "f_val", f_val)
    if f_val.device != state.device:
        raise ValueError(f"{op}: f_val is on {f_val.device} but state is on {state.device}")
    if f_val.shape != state.shape:
        raise ValueError(f"{op}: f_val has shape {tuple(f_val.shape)} but state has shape {tuple(state.shape)}")
    check_no_grad(op, (("f_val", f_val),))
    beta = exact.check_beta(op, beta)
    exact.check_frac_bits(op, frac_bits)
    want = exact.remainder_shape(state.numel(), beta.m)
    if not isinstance(remainder, torch.Tensor):
        raise TypeError(f"{op}: remainder must be a torch.Tensor, got {type(remainder).__name__}")
    if remainder.dtype != torch.int32 or tuple(remainder.shape) != want or remainder.device != state.device:
        raise ValueError(f"{op}: remainder must be an int32 tensor of shape {want} (m, ceil(numel / 32)) on "
                         f"{state.device}, got {remainder.dtype} of shape {tuple(remainder.shape)} on "
                         f"{remainder.device}; make one with exact.remainder_buffer(numel, m, half_steps)[k]")
    if not remainder.is_contiguous():
        raise ValueError(f"{op}: remainder must be contiguous, got strides {remainder.stride()}")
    if status is not None and (not isinstance(status, torch.Tensor) or status.dtype != torch.int32
                               or tuple(status.shape) != (1,) or status.device != state.device):
        got = (f"{status.dtype} of shape {tuple(status.shape)} on {status.device}"
               if isinstance(status, torch.Tensor) else type(status).__name__)
        raise ValueError(f"{op}: status must be an int32 tensor of shape (1,) on {state.device} (see "
                         f"exact.new_status), got {got}")
    if has_addresses(state):
        check_no_internal_overlap(op, "state", state)
        named = [("state", state), ("f_val", f_val), ("remainder", remainder)]
        check_disjoint(op, named + ([("status", status)] if status is not None else []))
    return beta
