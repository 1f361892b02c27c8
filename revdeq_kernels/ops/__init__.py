"""The fused in-place ops of RevDEQ and the one backend choice point (the public functions live here).

    relax_(state, f_val, beta)    state <- (1 - beta) * state + beta * f_val
    unrelax_(state, f_val, beta)  state <- (state - beta * f_val) / (1 - beta)
    residual(z, fz)               [sum((z - fz)^2), sum(fz^2)]
    relax_fixed_(state, f_val, beta, remainder)    the same update in int64 fixed point, bit-reversible
    unrelax_fixed_(state, f_val, beta, remainder)  its exact inverse (format: revdeq_kernels/exact)

relax_, unrelax_ and residual also take a tuple or list of tensors on both sides (tuple states, as
multiscale DEQs keep them): every pair is updated, or summed, by one multi-tensor op call.

Backend choice: `backend=` argument, else the REVDEQ_BACKEND environment variable, else `auto`,
which tries, for CUDA tensors: cuda (compiled extension), triton, reference; for CPU tensors:
cpp (compiled extension), reference. A backend asked for by name that cannot serve the tensors
raises; it never falls back silently.

This package: checks.py (every argument check), dtypes.py (the dtype rules), library.py (the ``revdeq``
op schemas and fakes). It imports backends/ (the registry and the implementations) and exact/; the
solver above builds on it, nothing here imports the solver.
"""

import os

import torch

from .. import backends, exact
from . import library  # noqa: F401  (defines the revdeq ops before any backend registers kernels for them)
from .checks import (
    SEQUENCES,
    check_beta,
    check_fixed,
    check_multi_memory,
    check_no_grad,
    check_pair,
    check_pointwise,
    check_sequences,
    has_addresses,
)
from .dtypes import FLOAT_DTYPES, multi_residual_dtype, residual_dtype

__all__ = ["FLOAT_DTYPES", "available_backends", "check_beta", "relax_", "relax_fixed_", "residual", "unrelax_",
           "unrelax_fixed_"]

_resolved = {}  # (device_type, requested name, family) -> backend name
_modules = {}  # backend name -> what implements its ops (Backend.implementation)


def _backend_for(op: str, device: torch.device, backend: str | None, family: str = "float"):
    return _modules[_chosen_backend(op, device, backend, family)]


def _chosen_backend(op: str, device: torch.device, backend: str | None, family: str = "float") -> str:
    """The name of the backend that serves ``op`` for ``backend=`` (then REVDEQ_BACKEND, then auto)."""
    requested = backend or os.environ.get("REVDEQ_BACKEND") or "auto"
    return _backend_name(op, device.type, requested, family)


def check_backend_name(caller: str, backend: str | None) -> None:
    """Refuses a backend name no registry entry has (None and 'auto' choose automatically)."""
    if backend is not None and backend != "auto" and backend not in backends.REGISTRY:
        raise ValueError(f"{caller}: unknown backend {backend!r}; expected None, 'auto' or one of "
                         f"{', '.join(backends.NAMES)}")


@torch.compiler.assume_constant_result  # resolved once while tracing: imports are not traceable
def _backend_name(op: str, device_type: str, requested: str, family: str = "float") -> str:
    """The backend that serves ``family`` ops (backends.FAMILIES) on ``device_type`` tensors for
    ``requested``, loading its module into _modules. A backend asked for by name never falls back."""
    key = (device_type, requested, family)
    name = _resolved.get(key)
    if name is not None:
        return name
    if requested == "auto":
        reasons = []
        for candidate in backends.auto_order(device_type):
            reason = backends.REGISTRY[candidate].unavailable_reason(device_type, family)
            if reason is None:
                name = candidate
                break
            reasons.append(f"{candidate}: {reason}")
        else:  # only reachable if even the reference backend is broken
            raise RuntimeError(f"{op}: no backend can serve {device_type} tensors ({'; '.join(reasons)})")
    else:
        check_backend_name(op, requested)
        reason = backends.REGISTRY[requested].unavailable_reason(device_type, family)
        if reason is not None:
            raise RuntimeError(f"{op}: backend {requested!r} is not available for {device_type} tensors: "
                               f"{reason}")
        name = requested
    _modules[name] = backends.REGISTRY[name].implementation()
    _resolved[key] = name
    return name


def _update(op: str, inverse: bool, state, f_val, beta, backend):
    if isinstance(state, SEQUENCES):
        return _multi_update(op, inverse, state, f_val, beta, backend)
    beta = check_pointwise(op, state, f_val, beta)
    if state.numel() > 0:
        impl = _backend_for(op, state.device, backend)
        (impl.unrelax_ if inverse else impl.relax_)(state, f_val, beta)
    return state


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
    return _update("relax_", False, state, f_val, beta, backend)


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
    return _update("unrelax_", True, state, f_val, beta, backend)


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
    if isinstance(z, SEQUENCES):
        return _multi_residual(z, fz, backend)
    check_pair("residual", "z", z, "fz", fz)
    check_no_grad("residual", (("z", z), ("fz", fz)))
    if z.numel() == 0:
        return torch.zeros(2, dtype=residual_dtype(z.dtype), device=z.device)
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
            backend = backends.REGISTRY[name]
            if not backend.can_serve(device_type):
                continue
            reason = backend.unavailable_reason(device_type)
            if reason is not None:
                report["unavailable"][f"{name} ({device_type})"] = reason
                continue
            report[device_type].append(name)
            exact_reason = backend.unavailable_reason(device_type, "exact")
            if exact_reason is None:
                report["exact"][device_type].append(name)
            else:
                report["unavailable"][f"{name} ({device_type}, exact mode)"] = exact_reason
    return report


# ---------------------------------------------------------------------------------------------
# Exact mode: int64 fixed-point states (format and rules in revdeq_kernels/exact).


def _fixed_update(op: str, inverse: bool, state, f_val, beta, remainder, frac_bits, status, backend):
    beta = check_fixed(op, state, f_val, remainder, status, beta, frac_bits)
    sync = status is None
    if sync:
        status = exact.new_status(state.device)
    if state.numel() > 0:
        impl = _backend_for(op, state.device, backend, "exact")
        kernel = impl.unrelax_fixed_ if inverse else impl.relax_fixed_
        kernel(state, f_val, remainder, status, beta.p, beta.m, int(frac_bits))
    if sync:
        code = exact.FixedStatus(int(status.item()))
        if code:
            raise exact.status_error(op, code, state, f_val, int(frac_bits))
    return state


def relax_fixed_(state: torch.Tensor, f_val: torch.Tensor, beta, remainder: torch.Tensor, *,
                 frac_bits: int = exact.DEFAULT_FRAC_BITS, status: torch.Tensor | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """In place, exactly: ``state = ((2^m - p) * state + p * round(f_val * 2^F)) >> m``; returns ``state``.

    The relaxation ``(1 - beta) * y + beta * f`` in int64 fixed point with beta = p / 2^m and F =
    ``frac_bits``; the m bits the shift drops go to ``remainder``, so :func:`unrelax_fixed_` can undo
    the step bit for bit. Format, ranges and error rules: :mod:`revdeq_kernels.exact`.

    Args:
        state: int64 tensor (fixed point with ``frac_bits`` fractional bits), any shape and strides,
            values within ±2^53; updated in place.
        f_val: float64, float32, float16 or bfloat16, same shape and device; finite, with
            ``|f_val| <= 2^(53 - frac_bits)``. Must not require grad while grad mode is on.
        beta: ``(p, m)`` meaning p / 2^m (a :class:`~revdeq_kernels.exact.DyadicBeta`): m in
            [1, 8], p odd in (0, 2^(m+1)). Round a float once with ``exact.dyadic_beta``.
        remainder: int32, contiguous, shape ``(m, ceil(state.numel() / 32))``, overwritten with the
            dropped bits as bit planes (bit b of element i, row-major, in bit i % 32 of word
            [b, i // 32]).
        frac_bits: fractional bits of ``state``, in [0, 52] (default 32).
        status: optional int32 tensor of shape (1,) on the state's device. Given, problems are ORed
            into it as :class:`~revdeq_kernels.exact.FixedStatus` flags with no host sync
            (check with ``exact.check_status``); omitted, the op synchronises and raises
            :class:`~revdeq_kernels.ExactModeError`. Either way, elements it cannot
            represent (NaN/Inf or out-of-range ``f_val`` or state) are left unchanged.
        backend: as for :func:`relax_` (backends without exact-mode kernels raise).

    Example:
        >>> from revdeq_kernels import exact
        >>> y, fz = exact.to_fixed(torch.randn(1000)), torch.randn(1000)
        >>> beta, rem = exact.dyadic_beta(0.8125), exact.remainder_buffer(1000, 4, 1)
        >>> y0 = y.clone()
        >>> unrelax_fixed_(relax_fixed_(y, fz, beta, rem[0]), fz, beta, rem[0])
        >>> torch.equal(y, y0)
        True
    """
    return _fixed_update("relax_fixed_", False, state, f_val, beta, remainder, frac_bits, status, backend)


def unrelax_fixed_(state: torch.Tensor, f_val: torch.Tensor, beta, remainder: torch.Tensor, *,
                   frac_bits: int = exact.DEFAULT_FRAC_BITS, status: torch.Tensor | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """In place, exactly: the inverse of :func:`relax_fixed_`; returns ``state``.

    Computes ``((state << m) + r - p * q) * (2^m - p)^-1 mod 2^64`` with q = round(f_val * 2^F) and r
    the remainder bits: an exact division (by multiplication with the modular inverse) when
    ``f_val`` is bit-identical to the value the forward step saw and ``remainder`` is what it wrote.

    Args: as for :func:`relax_fixed_`; ``remainder`` is read, not written. A result outside ±2^53,
    which no forward step produces, is left unchanged and flagged ``INVERSE_MISMATCH``: ``f`` did
    not reproduce its forward output (caught whenever |2^m - p| > 1).

    Example:
        >>> from revdeq_kernels import exact
        >>> y, fz, beta = exact.to_fixed(torch.randn(64)), torch.randn(64), exact.DyadicBeta(21, 4)
        >>> rem = exact.remainder_buffer(64, beta.m, 1)[0]
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

def _multi_update(op: str, inverse: bool, states, f_vals, beta, backend):
    check_sequences(op, "state", states, "f_val", f_vals)
    beta = check_beta(op, beta)
    if has_addresses(states[0]):
        check_multi_memory(op, states, f_vals)
    if any(s.numel() > 0 for s in states):
        impl = _backend_for(op, states[0].device, backend, "multi")
        (impl.multi_unrelax_ if inverse else impl.multi_relax_)(list(states), list(f_vals), beta)
    return states


def _multi_residual(zs, fzs, backend) -> torch.Tensor:
    check_sequences("residual", "z", zs, "fz", fzs)
    if all(z.numel() == 0 for z in zs):
        return torch.zeros(2, dtype=multi_residual_dtype(zs), device=zs[0].device)
    return _backend_for("residual", zs[0].device, backend, "multi").multi_residual(list(zs), list(fzs))
