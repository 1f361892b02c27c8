"""Pure-PyTorch implementations of the ops: the test oracle and the fallback on every device.

Arithmetic happens in float64 for float64 states and in float32 otherwise, then rounds once to
the state's dtype, which is what the compiled backends do too. The fixed-point ops (exact mode)
follow revdeq_kernels/exact to the bit, in int64 tensor arithmetic. Runs wherever torch runs.
"""

import math

import torch

from ..exact import LIMIT, FixedStatus, inverse_mod_2_64, pack_remainder, unpack_remainder
from ..ops.arithmetic import affine_coefficients
from ..ops.dtypes import compute_dtype, multi_residual_dtype

NAME = "reference"


def unavailable_reason(device_type: str, family: str) -> str | None:
    return None  # every family, wherever torch runs


def _affine_update(state: torch.Tensor, f_val: torch.Tensor, beta: float, inverse: bool) -> None:
    # (1 - beta) * state + beta * f, or (state - beta * f) / (1 - beta), arranged so that nothing
    # overflows before the result does (ops/arithmetic.py).
    acc = compute_dtype(state.dtype)
    a, b, c = affine_coefficients(beta, inverse)
    state.copy_(c * (a * state.to(acc) + b * f_val.to(acc)))


def relax_(state: torch.Tensor, f_val: torch.Tensor, beta: float) -> None:
    _affine_update(state, f_val, beta, inverse=False)


def unrelax_(state: torch.Tensor, f_val: torch.Tensor, beta: float) -> None:
    _affine_update(state, f_val, beta, inverse=True)


def residual(z: torch.Tensor, fz: torch.Tensor) -> torch.Tensor:
    acc = compute_dtype(z.dtype)
    f = fz.to(acc)
    diff = z.to(acc) - f
    return torch.stack([diff.square().sum(), f.square().sum()])


# Tuple states. The oracle loops over the members with the single-tensor functions above: the
# compiled backends do the same arithmetic per element in one op call.


def multi_relax_(states: list, f_vals: list, beta: float) -> None:
    for state, f_val in zip(states, f_vals):
        if state.numel() > 0:
            relax_(state, f_val, beta)


def multi_unrelax_(states: list, f_vals: list, beta: float) -> None:
    for state, f_val in zip(states, f_vals):
        if state.numel() > 0:
            unrelax_(state, f_val, beta)


def multi_residual(zs: list, fzs: list) -> torch.Tensor:
    """Each pair's residual in its own accumulation dtype, added in float64 in member order."""
    total = torch.zeros(2, dtype=torch.float64, device=zs[0].device)
    for z, fz in zip(zs, fzs):
        if z.numel() > 0:
            total = total + residual(z, fz).to(torch.float64)
    return total.to(multi_residual_dtype(zs))


def _in_range(v: torch.Tensor) -> torch.Tensor:
    return (v >= -LIMIT) & (v <= LIMIT)  # not v.abs(): abs(-2^63) wraps to -2^63


def _quantize(f_val: torch.Tensor, frac_bits: int):
    """(q, finite, in_range): q = round_half_even(f * 2^F) as int64, 0 where f cannot be represented."""
    f = f_val.reshape(-1).to(torch.float64)
    finite = torch.isfinite(f)
    scaled = f * math.ldexp(1.0, frac_bits)  # exact: a power of two (huge float64 f may become inf)
    in_range = scaled.abs() <= LIMIT
    q = torch.where(in_range, scaled, 0.0).round().to(torch.int64)  # torch.round: half to even
    return q, finite, in_range


def _flag(status: torch.Tensor, code: FixedStatus, where: torch.Tensor) -> None:
    # No host sync: the flag is computed and ORed on the device.
    status.bitwise_or_(where.any().to(torch.int32) * int(code))


def relax_fixed_(state, f_val, remainder, status, p: int, m: int, frac_bits: int) -> None:
    y = state.reshape(-1)
    q, finite, f_ok = _quantize(f_val, frac_bits)
    y_ok = _in_range(y)
    ok = f_ok & y_ok
    t = ((1 << m) - p) * torch.where(ok, y, 0) + p * torch.where(ok, q, 0)  # exact: |t| < 766 * 2^53
    y_new = t >> m
    ok_out = _in_range(y_new)
    done = ok & ok_out
    remainder.copy_(pack_remainder(torch.where(done, t & ((1 << m) - 1), 0), m))
    state.copy_(torch.where(done, y_new, y).view(state.shape))
    _flag(status, FixedStatus.F_NOT_FINITE, ~finite)
    _flag(status, FixedStatus.F_OUT_OF_RANGE, finite & ~f_ok)
    _flag(status, FixedStatus.STATE_OUT_OF_RANGE, f_ok & ~(y_ok & ok_out))


def unrelax_fixed_(state, f_val, remainder, status, p: int, m: int, frac_bits: int) -> None:
    y = state.reshape(-1)
    q, finite, f_ok = _quantize(f_val, frac_bits)
    y_ok = _in_range(y)
    ok = f_ok & y_ok
    t = torch.where(ok, y, 0) * (1 << m) + unpack_remainder(remainder, m, y.numel())
    # t - p*q is (2^m - p) * y_old exactly when f_val matches the forward; multiplying by the inverse
    # of the odd 2^m - p modulo 2^64 then divides exactly (int64 products wrap modulo 2^64 in torch).
    y_old = (t - p * torch.where(ok, q, 0)) * inverse_mod_2_64((1 << m) - p)
    ok_out = _in_range(y_old)
    state.copy_(torch.where(ok & ok_out, y_old, y).view(state.shape))
    _flag(status, FixedStatus.F_NOT_FINITE, ~finite)
    _flag(status, FixedStatus.F_OUT_OF_RANGE, finite & ~f_ok)
    _flag(status, FixedStatus.STATE_OUT_OF_RANGE, f_ok & ~y_ok)
    _flag(status, FixedStatus.INVERSE_MISMATCH, ok & ~ok_out)


# The residuals into a given tensor (the solver's per-step rows): what the C++ kernels do without
# allocating; the oracle computes it the plain way.


def residual_out_(z: torch.Tensor, fz: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(residual(z, fz))


def multi_residual_out_(zs: list, fzs: list, out: torch.Tensor) -> None:
    out.copy_(multi_residual(zs, fzs))
