"""The fused in-place ops of RevDEQ: argument checks and the one backend choice point.

    relax_(state, f_val, beta)    state <- (1 - beta) * state + beta * f_val
    unrelax_(state, f_val, beta)  state <- (state - beta * f_val) / (1 - beta)
    residual(z, fz)               [sum((z - fz)^2), sum(fz^2)]
    relax_fixed_(state, f_val, beta, remainder)    the same update in int64 fixed point, bit-reversible
    unrelax_fixed_(state, f_val, beta, remainder)  its exact inverse (see fixed_point.py)

relax_, unrelax_ and residual also take a tuple or list of tensors on both sides (tuple states, as
multiscale DEQs keep them): every pair is updated, or summed, by one multi-tensor op call.

Backend choice: `backend=` argument, else the REVDEQ_BACKEND environment variable, else `auto`,
which tries, for CUDA tensors: cuda (compiled extension), triton, reference; for CPU tensors:
cpp (compiled extension), reference. A backend asked for by name that cannot serve the tensors
raises; it never falls back silently.
"""

import math
import numbers
import os

import torch

from . import backends
from . import fixed_point as fxp
from .backends.reference import multi_residual_dtype

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = "float64, float32, float16 or bfloat16"
_resolved = {}  # (device_type, requested name) -> backend name
_modules = {}  # backend name -> its module


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


def _check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must have dtype {_DTYPE_NAMES}, got {t.dtype}")


def _byte_range(t: torch.Tensor) -> tuple:
    start = t.storage_offset() * t.element_size()
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + span * t.element_size()


def _may_share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the byte ranges the two tensors span intersect (exact for dense tensors)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, a1 = _byte_range(a)
    b0, b1 = _byte_range(b)
    return a0 < b1 and b0 < a1


def _check_pair(op: str, state_name: str, state, f_name: str, f) -> None:
    _check_tensor(op, state_name, state)
    _check_tensor(op, f_name, f)
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
    if torch.is_grad_enabled() and (state.requires_grad or f.requires_grad):
        which = state_name if state.requires_grad else f_name
        raise RuntimeError(
            f"{op}: {which} requires grad and grad mode is on, but {op} records no autograd history; "
            f"call it under torch.no_grad() or pass detached tensors"
        )


def _check_pointwise(op: str, state, f_val, beta) -> float:
    _check_pair(op, "state", state, "f_val", f_val)
    beta = check_beta(op, beta)
    if not torch.compiler.is_compiling():  # storage pointers do not exist while tracing
        if torch._debug_has_internal_overlap(state) == 1:
            raise ValueError(f"{op}: state has internal overlap (e.g. an expanded view); an in-place "
                             "update would write some elements more than once")
        if _may_share_memory(state, f_val):
            raise ValueError(f"{op}: f_val shares memory with state; the in-place update would read "
                             "values it has already overwritten (pass f_val.clone())")
    return beta


def _backend_for(op: str, device: torch.device, backend: str | None, kind: str = "float"):
    requested = backend or os.environ.get("REVDEQ_BACKEND") or "auto"
    return _modules[_backend_name(op, device.type, requested, kind)]


@torch.compiler.assume_constant_result  # resolved once while tracing: imports are not traceable
def _backend_name(op: str, device_type: str, requested: str, kind: str = "float") -> str:
    """The backend that serves `device_type` tensors for `requested`, loading its module into _modules.

    kind "fixed" asks for a backend with the exact-mode ops (relax_fixed_, unrelax_fixed_), "multi" for
    one with the multi-tensor ops (tuple states)."""
    key = (device_type, requested, kind)
    name = _resolved.get(key)
    if name is not None:
        return name
    if requested == "auto":
        reasons = []
        for candidate in backends.auto_order(device_type):
            reason = backends.unavailable_reason(candidate, device_type, kind)
            if reason is None:
                name = candidate
                break
            reasons.append(f"{candidate}: {reason}")
        else:  # only reachable if even the reference backend is broken
            raise RuntimeError(f"{op}: no backend can serve {device_type} tensors ({'; '.join(reasons)})")
    elif requested not in backends.NAMES:
        raise ValueError(f"{op}: unknown backend {requested!r}; expected 'auto' or one of "
                         f"{', '.join(backends.NAMES)}")
    else:
        reason = backends.unavailable_reason(requested, device_type, kind)
        if reason is not None:
            raise RuntimeError(f"{op}: backend {requested!r} is not available for {device_type} tensors: "
                               f"{reason}")
        name = requested
    _modules[name] = backends.load(name)
    _resolved[key] = name
    return name


def relax_(state: torch.Tensor, f_val: torch.Tensor, beta: float, *, backend: str | None = None):
    """In place: ``state = (1 - beta) * state + beta * f_val``; returns ``state``.

    Args:
        state: floating tensor (float64, float32, float16 or bfloat16), any shape and strides, updated
            in place. It must not require grad while grad mode is on.
        f_val: same shape and device as ``state``; its dtype may be less precise than ``state``'s
            (e.g. state float32, f_val bfloat16), never more. Must not share memory with ``state``.
        beta: Python float in (0, 2), not 1.
        backend: ``None``/``"auto"``, ``"cuda"``, ``"triton"``, ``"cpp"`` or ``"reference"``.

    Arithmetic is float64 for float64 states and float32 otherwise, rounded once to ``state.dtype``.
    Empty tensors are a no-op.

    Tuple states: ``state`` and ``f_val`` may both be tuples (or lists) of tensors of equal length;
    each ``state[i]`` is updated from ``f_val[i]`` under the rules above, all of them by one
    multi-tensor op call, and ``state`` itself is returned. Members may differ in shape, layout and
    dtype pair; they must share one device, and no state may share memory with any other tensor
    of the call.

    Example:
        >>> y, fz = torch.randn(1024), torch.randn(1024)
        >>> relax_(y, fz, 0.8)  # y is now 0.2 * y + 0.8 * fz
        >>> ys, fs = (torch.randn(64, 32), torch.randn(16, 8)), (torch.randn(64, 32), torch.randn(16, 8))
        >>> relax_(ys, fs, 0.8)  # both members, one call
    """
    if isinstance(state, _SEQUENCES):
        return _multi_update("relax_", False, state, f_val, beta, backend)
    beta = _check_pointwise("relax_", state, f_val, beta)
    if state.numel() > 0:
        _backend_for("relax_", state.device, backend).relax_(state, f_val, beta)
    return state


def unrelax_(state: torch.Tensor, f_val: torch.Tensor, beta: float, *, backend: str | None = None):
    """In place: ``state = (state - beta * f_val) / (1 - beta)``, the inverse of :func:`relax_`.

    Same argument rules as :func:`relax_` (tuple states included); returns ``state``. Rounding is
    amplified by ``1 / |1 - beta|`` per call, which is why RevDEQ keeps its states in float64 by default.

    Example:
        >>> y, fz = torch.randn(1024, dtype=torch.float64), torch.randn(1024, dtype=torch.float64)
        >>> y0 = y.clone()
        >>> unrelax_(relax_(y, fz, 0.5), fz, 0.5)
        >>> torch.allclose(y, y0)
        True
    """
    if isinstance(state, _SEQUENCES):
        return _multi_update("unrelax_", True, state, f_val, beta, backend)
    beta = _check_pointwise("unrelax_", state, f_val, beta)
    if state.numel() > 0:
        _backend_for("unrelax_", state.device, backend).unrelax_(state, f_val, beta)
    return state


def residual(z: torch.Tensor, fz: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``[sum((z - fz)^2), sum(fz^2)]`` in one pass over memory, without a host synchronisation.

    Args:
        z: floating tensor (float64, float32, float16 or bfloat16), any shape and strides.
        fz: same shape and device as ``z``; dtype as precise as ``z``'s or less.
        backend: as for :func:`relax_`.

    Returns:
        A tensor of shape (2,) on ``z``'s device: float64 when ``z`` is float64 (accumulated in
        float64), float32 otherwise (accumulated in at least float32). Zeros for empty inputs.
        The relative residual is ``(out[0] / out[1]).sqrt()``.

    Tuple states: ``z`` and ``fz`` may both be tuples (or lists) of tensors of equal length; the
    result is then the sums over all pairs together, from one multi-tensor op call. It is float64
    when any ``z[i]`` is float64, float32 otherwise; each pair is accumulated as above and the pairs
    are added in float64.

    Example:
        >>> z, fz = torch.randn(1000), torch.randn(1000)
        >>> d2, f2 = residual(z, fz)
        >>> d2, f2 = residual((z, z[:10]), (fz, fz[:10]))  # over both pairs
    """
    if isinstance(z, _SEQUENCES):
        return _multi_residual(z, fz, backend)
    _check_pair("residual", "z", z, "fz", fz)
    if z.numel() == 0:
        return torch.zeros(2, dtype=torch.float64 if z.dtype == torch.float64 else torch.float32,
                           device=z.device)
    return _backend_for("residual", z.device, backend).residual(z, fz)


def available_backends() -> dict:
    """What serves which device type here, and why the other backends do not.

    Returns a dict: ``{"cpu": [...], "cuda": [...]}`` list the backends usable for that device type
    in the order ``auto`` tries them (the first one is the default), and ``"unavailable"`` maps
    ``"name (device type)"`` to the reason it cannot run there. ``"exact"`` does the same for exact
    mode (relax_fixed_ / unrelax_fixed_): ``{"cpu": [...], "cuda": [...]}``, and a backend that serves
    the float ops but not exact mode appears in ``"unavailable"`` as ``"name (device type, exact mode)"``.

    Example:
        >>> available_backends()["cpu"], available_backends()["exact"]["cpu"]
        (['cpp', 'reference'], ['cpp', 'reference'])
    """
    report = {"cpu": [], "cuda": [], "unavailable": {}, "exact": {"cpu": [], "cuda": []}}
    for device_type in ("cpu", "cuda"):
        listed = list(backends.auto_order(device_type))
        listed += [n for n in backends.NAMES if n not in listed]  # usable by name only
        for name in listed:
            reason = backends.unavailable_reason(name, device_type)
            if reason is None:
                report[device_type].append(name)
                fixed_reason = backends.unavailable_reason(name, device_type, "fixed")
                if fixed_reason is None:
                    report["exact"][device_type].append(name)
                else:
                    report["unavailable"][f"{name} ({device_type}, exact mode)"] = fixed_reason
            elif not reason.startswith("it serves"):
                report["unavailable"][f"{name} ({device_type})"] = reason
    return report


# ---------------------------------------------------------------------------------------------
# Exact mode: int64 fixed-point states (format and rules in revdeq_kernels/fixed_point.py).


def _check_fixed(op: str, state, f_val, beta, remainder, frac_bits, status) -> fxp.DyadicBeta:
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{op}: state must be a torch.Tensor, got {type(state).__name__}")
    if state.dtype != torch.int64:
        raise TypeError(f"{op}: state must have dtype torch.int64 (fixed point; convert with "
                        f"revdeq_kernels.fixed_point.to_fixed), got {state.dtype}")
    _check_tensor(op, "f_val", f_val)
    if f_val.device != state.device:
        raise ValueError(f"{op}: f_val is on {f_val.device} but state is on {state.device}")
    if f_val.shape != state.shape:
        raise ValueError(f"{op}: f_val has shape {tuple(f_val.shape)} but state has shape {tuple(state.shape)}")
    if torch.is_grad_enabled() and f_val.requires_grad:
        raise RuntimeError(f"{op}: f_val requires grad and grad mode is on, but {op} records no autograd "
                           "history; call it under torch.no_grad() or pass detached tensors")
    beta = fxp.check_beta(op, beta)
    fxp.check_frac_bits(op, frac_bits)
    want = fxp.remainder_shape(state.numel(), beta.m)
    if not isinstance(remainder, torch.Tensor):
        raise TypeError(f"{op}: remainder must be a torch.Tensor, got {type(remainder).__name__}")
    if remainder.dtype != torch.int32 or tuple(remainder.shape) != want or remainder.device != state.device:
        raise ValueError(f"{op}: remainder must be an int32 tensor of shape {want} (m, ceil(numel / 32)) on "
                         f"{state.device}, got {remainder.dtype} of shape {tuple(remainder.shape)} on "
                         f"{remainder.device}; make one with fixed_point.remainder_buffer(numel, m, half_steps)[k]")
    if not remainder.is_contiguous():
        raise ValueError(f"{op}: remainder must be contiguous, got strides {remainder.stride()}")
    if status is not None and (not isinstance(status, torch.Tensor) or status.dtype != torch.int32
                               or tuple(status.shape) != (1,) or status.device != state.device):
        got = (f"{status.dtype} of shape {tuple(status.shape)} on {status.device}"
               if isinstance(status, torch.Tensor) else type(status).__name__)
        raise ValueError(f"{op}: status must be an int32 tensor of shape (1,) on {state.device} (see "
                         f"fixed_point.new_status), got {got}")
    if not torch.compiler.is_compiling():  # storage pointers do not exist while tracing
        if torch._debug_has_internal_overlap(state) == 1:
            raise ValueError(f"{op}: state has internal overlap (e.g. an expanded view); an in-place update "
                             "would write some elements more than once")
        named = [("state", state), ("f_val", f_val), ("remainder", remainder)]
        if status is not None:
            named.append(("status", status))
        for i, (a_name, a) in enumerate(named):
            for b_name, b in named[i + 1:]:
                if _may_share_memory(a, b):
                    raise ValueError(f"{op}: {b_name} shares memory with {a_name}")
    return beta


def _fixed_update(op: str, inverse: bool, state, f_val, beta, remainder, frac_bits, status, backend):
    beta = _check_fixed(op, state, f_val, beta, remainder, frac_bits, status)
    sync = status is None
    if sync:
        status = fxp.new_status(state.device)
    if state.numel() > 0:
        impl = _backend_for(op, state.device, backend, "fixed")
        kernel = impl.unrelax_fixed_ if inverse else impl.relax_fixed_
        kernel(state, f_val, remainder, status, beta.p, beta.m, int(frac_bits))
    if sync:
        code = fxp.FixedStatus(int(status.item()))
        if code:
            raise fxp.status_error(op, code, state, f_val, int(frac_bits))
    return state


def relax_fixed_(state: torch.Tensor, f_val: torch.Tensor, beta, remainder: torch.Tensor, *,
                 frac_bits: int = fxp.DEFAULT_FRAC_BITS, status: torch.Tensor | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """In place, exactly: ``state = ((2^m - p) * state + p * round(f_val * 2^F)) >> m``; returns ``state``.

    The relaxation ``(1 - beta) * y + beta * f`` in int64 fixed point with beta = p / 2^m and F =
    ``frac_bits``; the m bits the shift drops go to ``remainder``, so :func:`unrelax_fixed_` can undo
    the step bit for bit. Format, ranges and error rules: :mod:`revdeq_kernels.fixed_point`.

    Args:
        state: int64 tensor (fixed point with ``frac_bits`` fractional bits), any shape and strides,
            values within ±2^53; updated in place.
        f_val: float64, float32, float16 or bfloat16, same shape and device; finite, with
            ``|f_val| <= 2^(53 - frac_bits)``. Must not require grad while grad mode is on.
        beta: ``(p, m)`` meaning p / 2^m (a :class:`~revdeq_kernels.fixed_point.DyadicBeta`): m in
            [1, 8], p odd in (0, 2^(m+1)). Round a float once with ``fixed_point.dyadic_beta``.
        remainder: int32, contiguous, shape ``(m, ceil(state.numel() / 32))``, overwritten with the
            dropped bits as bit planes (bit b of element i, row-major, in bit i % 32 of word
            [b, i // 32]).
        frac_bits: fractional bits of ``state``, in [0, 52] (default 32).
        status: optional int32 tensor of shape (1,) on the state's device. Given, problems are ORed
            into it as :class:`~revdeq_kernels.fixed_point.FixedStatus` flags with no host sync
            (check with ``fixed_point.check_status``); omitted, the op synchronises and raises
            :class:`~revdeq_kernels.fixed_point.FixedPointError`. Either way, elements it cannot
            represent (NaN/Inf or out-of-range ``f_val`` or state) are left unchanged.
        backend: as for :func:`relax_` (backends without exact-mode kernels raise).

    Example:
        >>> from revdeq_kernels import fixed_point as fxp
        >>> y, fz = fxp.to_fixed(torch.randn(1000)), torch.randn(1000)
        >>> beta, rem = fxp.dyadic_beta(0.8125), fxp.remainder_buffer(1000, 4, 1)
        >>> y0 = y.clone()
        >>> unrelax_fixed_(relax_fixed_(y, fz, beta, rem[0]), fz, beta, rem[0])
        >>> torch.equal(y, y0)
        True
    """
    return _fixed_update("relax_fixed_", False, state, f_val, beta, remainder, frac_bits, status, backend)


def unrelax_fixed_(state: torch.Tensor, f_val: torch.Tensor, beta, remainder: torch.Tensor, *,
                   frac_bits: int = fxp.DEFAULT_FRAC_BITS, status: torch.Tensor | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """In place, exactly: the inverse of :func:`relax_fixed_`; returns ``state``.

    Computes ``((state << m) + r - p * q) * (2^m - p)^-1 mod 2^64`` with q = round(f_val * 2^F) and r
    the remainder bits: an exact division (by multiplication with the modular inverse) when
    ``f_val`` is bit-identical to the value the forward step saw and ``remainder`` is what it wrote.

    Args: as for :func:`relax_fixed_`; ``remainder`` is read, not written. A result outside ±2^53,
    which no forward step produces, is left unchanged and flagged ``INVERSE_MISMATCH``: ``f`` did
    not reproduce its forward output (caught whenever |2^m - p| > 1).

    Example:
        >>> from revdeq_kernels import fixed_point as fxp
        >>> y, fz, beta = fxp.to_fixed(torch.randn(64)), torch.randn(64), fxp.DyadicBeta(21, 4)
        >>> rem = fxp.remainder_buffer(64, beta.m, 1)[0]
        >>> y0 = y.clone()
        >>> torch.equal(unrelax_fixed_(relax_fixed_(y, fz, beta, rem), fz, beta, rem), y0)
        True
    """
    return _fixed_update("unrelax_fixed_", True, state, f_val, beta, remainder, frac_bits, status, backend)


# ---------------------------------------------------------------------------------------------
# Multi-tensor (tuple) states: relax_, unrelax_ and residual on tuples or lists of tensors.
#
# Every member follows the single-tensor rules (dtype pairs, shapes, layouts, empty members); on
# top of that the call needs a non-empty sequence on both sides of one length, one device for all
# tensors, and no state sharing memory with any other tensor of the call (f values may share
# memory with each other: they are only read). Members of different dtype pairs mix freely.
# residual returns float64 when any z is float64, float32 otherwise.
#
# The backend gets all pairs at once, as lists, and serves them with one op call: cpp with one
# parallel loop over all members; cuda with one kernel launch per dtype pair among the members (and
# per 64 members), so one launch in the common case; triton with one launch per 8 members (plus one
# to finish residual). Only the reference backend, the oracle and last fallback, loops over the
# members in Python. `auto` picks a backend only if it has multi-tensor kernels; one asked for by
# name that lacks them raises.

_SEQUENCES = (tuple, list)
# (state dtype, f dtype) pairs the ops accept: f as precise as the state or less.
_PAIRS = frozenset((a, b) for a in FLOAT_DTYPES for b in FLOAT_DTYPES if torch.promote_types(a, b) == a)


def _check_sequences(op: str, a_name: str, a_seq, b_name: str, b_seq) -> None:
    """Lengths, each (a[i], b[i]) pair as in the single-tensor op, and one device for all.

    One cheap pass over the members; only when it finds a problem does the member-by-member pass
    run, to name the first bad member and what is wrong with it."""
    if not isinstance(b_seq, _SEQUENCES):
        kind = type(a_seq).__name__
        raise TypeError(f"{op}: {a_name} must be a torch.Tensor, got {kind}; as a tuple state ({kind} of tensors) it "
                        f"needs {b_name} to be a tuple or list of as many tensors, got {type(b_seq).__name__}")
    if len(a_seq) == 0:
        raise ValueError(f"{op}: {a_name} is an empty {type(a_seq).__name__}; pass at least one tensor")
    if len(b_seq) != len(a_seq):
        raise ValueError(f"{op}: {b_name} has {len(b_seq)} tensors but {a_name} has {len(a_seq)}")
    device = getattr(a_seq[0], "device", None)
    grad = torch.is_grad_enabled()
    for a, b in zip(a_seq, b_seq):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (a.dtype, b.dtype) in _PAIRS
                and a.device == device and b.device == device and a.shape == b.shape
                and not (grad and (a.requires_grad or b.requires_grad))):
            _explain_sequences(op, a_name, a_seq, b_name, b_seq)


def _explain_sequences(op: str, a_name: str, a_seq, b_name: str, b_seq) -> None:
    """Raises the error of the first bad member (the checks of the single-tensor ops, plus one device)."""
    for i, (a, b) in enumerate(zip(a_seq, b_seq)):
        _check_pair(op, f"{a_name}[{i}]", a, f"{b_name}[{i}]", b)
        if a.device != a_seq[0].device:
            raise ValueError(f"{op}: {a_name}[{i}] is on {a.device} but {a_name}[0] is on {a_seq[0].device}; all "
                             "tensors of one call must be on one device")
    raise AssertionError(f"{op}: the argument checks disagree about {a_name} and {b_name}")  # a bug, not bad input


def _address_range(t: torch.Tensor) -> tuple:
    """[first byte, one past the last byte) that t's elements span in memory (strides are never negative)."""
    span = t.numel() if t.is_contiguous() else 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + span * t.element_size()


def _check_multi_memory(op: str, states, f_vals) -> None:
    """No state overlaps itself, another state, or any f value; f values may overlap each other.

    Compares the address ranges the tensors span (so, like the single-tensor check, it is exact for
    dense tensors and may flag interleaved strided views): sorted by start, a range that begins before
    the furthest end seen so far intersects the range with that end."""
    ranges = []
    for i, state in enumerate(states):
        if not state.is_contiguous() and torch._debug_has_internal_overlap(state) == 1:
            raise ValueError(f"{op}: state[{i}] has internal overlap (e.g. an expanded view); an in-place "
                             "update would write some elements more than once")
        if state.numel() > 0:
            ranges.append((*_address_range(state), 0, i))
    for i, f in enumerate(f_vals):
        if f.numel() > 0:
            ranges.append((*_address_range(f), 1, i))
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


def _multi_update(op: str, inverse: bool, states, f_vals, beta, backend):
    _check_sequences(op, "state", states, "f_val", f_vals)
    beta = check_beta(op, beta)
    # Storage pointers do not exist while tracing, nor on meta tensors (all of whose storages start at 0).
    if not torch.compiler.is_compiling() and states[0].device.type != "meta":
        _check_multi_memory(op, states, f_vals)
    if any(s.numel() > 0 for s in states):
        impl = _backend_for(op, states[0].device, backend, "multi")
        (impl.multi_unrelax_ if inverse else impl.multi_relax_)(list(states), list(f_vals), beta)
    return states


def _multi_residual(zs, fzs, backend) -> torch.Tensor:
    _check_sequences("residual", "z", zs, "fz", fzs)
    if all(z.numel() == 0 for z in zs):
        return torch.zeros(2, dtype=multi_residual_dtype(zs), device=zs[0].device)
    return _backend_for("residual", zs[0].device, backend, "multi").multi_residual(list(zs), list(fzs))
