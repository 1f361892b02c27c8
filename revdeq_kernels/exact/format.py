"""Exact mode: int64 fixed-point states whose RevDEQ update reverses bit for bit.

Floating-point reversal amplifies rounding by 1/|1 - beta| per step, so reconstructed states drift
and, after a few dozen steps, explode. Exact mode removes the rounding from the state update
altogether: states are integers, the update is integer arithmetic, and the few low bits it has to
drop are kept (the idea of MacKay et al. 2018, "Reversible Recurrent Neural Networks", applied to
the RevDEQ relaxation). This module defines the format and the helpers around it; the fused ops
are ``relax_fixed_`` / ``unrelax_fixed_`` in :mod:`revdeq_kernels.ops`.

Format
    A state holds ``Y = round(x * 2^F)`` in an int64 tensor: ``F`` fractional bits (``frac_bits``,
    default 32, any value in [0, 52]). Every state and every scaled ``f`` value must satisfy
    ``|Y| <= 2^53`` (:data:`LIMIT`), i.e. ``|x| <= 2^(53 - F)``. Two reasons for 2^53: it is where
    float64 stops holding every integer, so the conversions to and from float64 are exact; and it
    leaves room for the largest dyadic beta, whose products ``(2^m - p) * Y + p * q`` stay below
    ``(|2^m - p| + p) * 2^53 <= 766 * 2^53 < 2^63`` for every m <= 8, so the update can never
    overflow int64. With F = 32 the range is |x| <= 2^21 (about 2.1e6) at a resolution of 2^-32
    (about 2.3e-10): a float32 ``f`` near 1 is spaced 6e-8 apart, so quantising it to 2^-33 adds
    nothing visible, and DEQ states (normalised activations) sit far inside the range. Fewer
    fractional bits widen the range (each bit doubles it); more refine the resolution.

Dyadic beta
    beta is ``p / 2^m`` with 1 <= m <= 8 (:data:`MAX_BETA_BITS`) and p odd, 0 < p < 2^(m+1), so
    beta lies in (0, 2) and is never 1. :func:`dyadic_beta` rounds a float beta to the nearest
    multiple of 2^-max_bits (ties to the one with fewer bits) and reduces the fraction; the
    remainder memory is m bits per element per half-step, so a beta with fewer bits is cheaper
    (13/16 costs 4 bits, 0.8 = 205/256 costs 8). beta > 1 (over-relaxation) works unchanged: the
    state coefficient ``2^m - p`` is then negative, still odd, still invertible modulo 2^64.

Forward half-step (``relax_fixed_``), per element
    q  = round_half_even(f * 2^F)            f converted exactly to float64, scaled exactly
    t  = (2^m - p) * Y + p * q               exact in int64 (see Format)
    Y' = t >> m                              arithmetic shift: floor(t / 2^m)
    r  = t & (2^m - 1)                       the m bits the shift drops, stored (see Remainders)

Inverse (``unrelax_fixed_``)
    t = Y' * 2^m + r;   Y = (t - p * q) * inv(2^m - p)   (mod 2^64)
    ``t - p * q`` equals ``(2^m - p) * Y`` exactly, and 2^m - p is odd, so multiplying by its inverse
    modulo 2^64 (:func:`inverse_mod_2_64`) divides exactly: no integer division in any kernel. It
    needs the same q, so ``f`` must return the same bits for the same input; its input is
    :func:`from_fixed` of the state, a deterministic function of Y.

Remainders
    Bit planes, so a half-step costs exactly m bits per element however m divides a byte. For one
    half-step, an int32 buffer of shape ``(m, ceil(n / 32))`` (:func:`remainder_shape`) holds
    bit b of element i's remainder in bit ``i % 32`` of word ``[b, i // 32]``; i is the element's
    index in row-major (logical) order, bits past n are zero. Each 32-element group owns its words,
    so backends write them without races: a loop in C++, a 32 x 32 bit transpose across a CUDA warp,
    a 32-wide sum in Triton. A solver allocates all half-steps at once,
    :func:`remainder_buffer` ``(half_steps, m, ceil(n / 32))``, and passes one slice per call.

Errors, without a host sync per step (errors.py)
    An element whose ``f`` is NaN/Inf, whose scaled ``f`` or state is outside ±2^53, or whose result
    would be is left untouched (remainder bits 0), and the kernel ORs a :class:`FixedStatus` flag
    into a one-element int32 ``status`` tensor on the state's device. The inverse also flags a
    result outside the range, which the forward can never produce: it means ``f`` did not
    reproduce its forward bits (or the remainder belongs to another half-step). The check catches
    that whenever ``|2^m - p| > 1``; for beta = 1/2 or 255/256 every q gives an in-range result, and
    only the comparison of the reconstructed start with the true one (which a solver does anyway)
    can tell. Called without ``status``, an op makes its own, synchronises and raises
    :class:`ExactModeError` with the offending values; a solver passes one status tensor to every
    step and calls :func:`check_status` when it synchronises anyway. After an error the state is
    partially updated and should be discarded.
"""

import enum
import math
import numbers
from typing import NamedTuple

import torch

DEFAULT_FRAC_BITS = 32
MAX_FRAC_BITS = 52
MAX_BETA_BITS = 8
LIMIT = 1 << 53  # |state| and |round(f * 2^F)| never exceed this
WORD_BITS = 32  # remainder bits per int32 word of a bit plane


class ExactModeError(ValueError):
    """A value that exact mode cannot represent: NaN/Inf from f, or a value outside the fixed-point range.

    (Formerly ``ExactModeError``, a name still importable from :mod:`revdeq_kernels` for one release:
    "fixed point" there meant the int64 number format, not the DEQ's fixed point.)
    """


class FixedStatus(enum.IntFlag):
    """Bits the fixed-point kernels OR into their ``status`` tensor (0 means all went well)."""

    F_NOT_FINITE = 1  # f_val held NaN or Inf
    F_OUT_OF_RANGE = 2  # |f_val * 2^F| > 2^53
    STATE_OUT_OF_RANGE = 4  # |state| > 2^53, or the forward update would leave the range
    INVERSE_MISMATCH = 8  # the inverse left the range: f_val is not what the forward saw


class DyadicBeta(NamedTuple):
    """beta = p / 2^m with p odd, 1 <= m <= 8 and 0 < p < 2^(m+1)."""

    p: int
    m: int

    @property
    def value(self) -> float:
        return self.p / (1 << self.m)

    @property
    def keep(self) -> int:
        """The integer coefficient of the old state, 2^m - p (negative when beta > 1)."""
        return (1 << self.m) - self.p

    def __str__(self) -> str:
        return f"{self.p}/{1 << self.m}"


def dyadic_beta(beta: float, max_bits: int = MAX_BETA_BITS) -> DyadicBeta:
    """The dyadic rational ``p / 2^m`` (m <= max_bits) nearest to ``beta``, in lowest terms.

    Ties go to the fraction with fewer bits. Raises ValueError when ``beta`` is not finite, or rounds
    to 0, 1 or 2 or beyond, none of which is a valid relaxation.

    Example:
        >>> dyadic_beta(0.8125)
        DyadicBeta(p=13, m=4)
        >>> dyadic_beta(0.8).value, dyadic_beta(0.8, max_bits=4)
        (0.80078125, DyadicBeta(p=13, m=4))
    """
    if isinstance(max_bits, bool) or not isinstance(max_bits, numbers.Integral) or not (
            1 <= max_bits <= MAX_BETA_BITS):
        raise ValueError(f"dyadic_beta: max_bits must be an integer in [1, {MAX_BETA_BITS}], got {max_bits!r}")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta):
        raise ValueError(f"dyadic_beta: beta must be a finite real number, got {beta!r}")
    scale = 1 << max_bits
    k = round(float(beta) * scale)  # round half to even: a tie picks the even k, which has fewer bits
    if not (0 < k < 2 * scale) or k == scale:
        lo, hi = 1 / scale, 2 - 1 / scale
        raise ValueError(f"dyadic_beta: beta={beta!r} rounds to {k}/{scale}; exact mode needs beta in "
                         f"[{lo}, {hi}] and not within {0.5 / scale} of 1 (max_bits={max_bits})")
    m = max_bits
    while k % 2 == 0:
        k //= 2
        m -= 1
    return DyadicBeta(k, m)


def check_beta(op: str, beta) -> DyadicBeta:
    """``beta`` as a validated DyadicBeta, or a clear error (floats are refused, never rounded here)."""
    if isinstance(beta, numbers.Real) and not isinstance(beta, bool):
        raise TypeError(f"{op}: beta must be a (p, m) pair meaning p / 2^m, got the float {beta!r}; round a "
                        f"float once with revdeq_kernels.exact.dyadic_beta({beta!r})")
    if not (isinstance(beta, tuple) and len(beta) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in beta)):
        raise TypeError(f"{op}: beta must be a (p, m) pair of integers meaning p / 2^m, got {beta!r}")
    p, m = int(beta[0]), int(beta[1])
    if not 1 <= m <= MAX_BETA_BITS:
        raise ValueError(f"{op}: beta = p / 2^m needs m in [1, {MAX_BETA_BITS}], got m={m}")
    if p % 2 == 0 or not 0 < p < (2 << m):
        raise ValueError(f"{op}: beta = p / 2^m needs p odd in (0, 2^(m+1)) = (0, {2 << m}) (beta in (0, 2), in "
                         f"lowest terms), got p={p}, m={m}")
    return DyadicBeta(p, m)


def check_frac_bits(op: str, frac_bits) -> int:
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, numbers.Integral) or not (
            0 <= frac_bits <= MAX_FRAC_BITS):
        raise ValueError(f"{op}: frac_bits must be an integer in [0, {MAX_FRAC_BITS}], got {frac_bits!r}")
    return int(frac_bits)


def inverse_mod_2_64(a: int) -> int:
    """The int64 ``x`` with ``a * x == 1`` modulo 2^64, for odd ``a`` (the kernels' exact division).

    Example:
        >>> x = inverse_mod_2_64(-5)
        >>> (-5 * x) % 2**64
        1
    """
    if a % 2 == 0:
        raise ValueError(f"inverse_mod_2_64: a must be odd, got {a}")
    x = pow(a, -1, 1 << 64)
    return x - (1 << 64) if x >= 1 << 63 else x


def value_range(frac_bits: int = DEFAULT_FRAC_BITS) -> float:
    """The largest magnitude a state or f value may have with ``frac_bits``: 2^(53 - frac_bits)."""
    return math.ldexp(1.0, 53 - frac_bits)


def remainder_shape(numel: int, m: int) -> tuple:
    """Shape of the int32 remainder buffer of one half-step over ``numel`` elements: (m, ceil(numel/32))."""
    return (m, -(-numel // WORD_BITS))


def remainder_buffer(numel: int, m: int, half_steps: int, device=None) -> torch.Tensor:
    """Zeroed int32 remainders for ``half_steps`` half-steps: shape (half_steps, m, ceil(numel/32)).

    ``buffer[k]`` is the ``remainder`` argument of the k-th call.

    Example:
        >>> remainder_buffer(1000, 4, 128).shape   # 128 half-steps at beta = 13/16
        torch.Size([128, 4, 32])
    """
    return torch.zeros((half_steps, *remainder_shape(numel, m)), dtype=torch.int32, device=device)


def remainder_bytes(numel: int, m: int, half_steps: int) -> int:
    """Bytes the remainders of ``half_steps`` half-steps take: m bits per element each, in 32-bit words."""
    return 4 * half_steps * m * -(-numel // WORD_BITS)


def state_bytes(numel: int, half_steps: int, dtype=torch.int64) -> int:
    """Bytes that storing the updated state of every half-step would take instead."""
    return half_steps * numel * torch.empty((), dtype=dtype).element_size()


def new_status(device=None) -> torch.Tensor:
    """A zeroed status tensor (shape (1,), int32) for the ``status=`` argument of the fixed-point ops."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def pack_remainder(r: torch.Tensor, m: int) -> torch.Tensor:
    """Bit-plane pack: int64 remainders ``r`` (shape (n,), values in [0, 2^m)) -> int32 (m, ceil(n/32)).

    Example:
        >>> r = torch.tensor([5, 0, 3])
        >>> unpack_remainder(pack_remainder(r, 3), 3, 3)
        tensor([5, 0, 3])
    """
    n = r.numel()
    words = -(-n // WORD_BITS)
    padded = torch.zeros(words * WORD_BITS, dtype=torch.int64, device=r.device)
    padded[:n] = r
    lanes = torch.arange(WORD_BITS, device=r.device)
    planes = (padded.view(1, words, WORD_BITS) >> torch.arange(m, device=r.device).view(m, 1, 1)) & 1
    packed = (planes << lanes).sum(dim=2)  # each word as an unsigned 32-bit value in an int64
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def unpack_remainder(words: torch.Tensor, m: int, numel: int) -> torch.Tensor:
    """The inverse of :func:`pack_remainder`: int32 (m, ceil(n/32)) -> int64 remainders of shape (numel,)."""
    lanes = torch.arange(WORD_BITS, device=words.device)
    bits = (words.to(torch.int64).unsqueeze(-1) >> lanes) & 1  # (m, words, 32)
    bits = bits.reshape(m, -1)[:, :numel]
    return (bits << torch.arange(m, device=words.device).view(m, 1)).sum(dim=0)


def to_fixed(x: torch.Tensor, frac_bits: int = DEFAULT_FRAC_BITS) -> torch.Tensor:
    """``round(x * 2^frac_bits)`` as int64 (round half to even), same shape and device as ``x``.

    Args:
        x: floating tensor, any shape; every value finite and within ±2^(53 - frac_bits).
        frac_bits: fractional bits, in [0, 52].

    Raises ExactModeError (after a host sync) for NaN/Inf or values out of range.

    Example:
        >>> to_fixed(torch.tensor([1.5, -0.25]), frac_bits=4)
        tensor([24, -4])
    """
    frac_bits = check_frac_bits("to_fixed", frac_bits)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"to_fixed: x must be a floating-point tensor, got {got}")
    x64 = x.detach().to(torch.float64)
    not_finite = ~torch.isfinite(x64)
    if bool(not_finite.any()):
        raise _non_finite_error("to_fixed", "x", x64, not_finite)
    scaled = x64 * math.ldexp(1.0, frac_bits)  # exact: a power of two
    too_big = ~(scaled.abs() <= LIMIT)
    if bool(too_big.any()):
        raise _range_error("to_fixed", "x", x64.abs().max().item(), frac_bits)
    return scaled.round().to(torch.int64)


def from_fixed(state: torch.Tensor, frac_bits: int = DEFAULT_FRAC_BITS, dtype=torch.float32) -> torch.Tensor:
    """The value ``state * 2^-frac_bits`` in ``dtype``: what ``f`` sees for a fixed-point state.

    The conversion goes through float64 (exact for |state| <= 2^53) and rounds once to ``dtype``, so
    the same state always gives bit-identical inputs to ``f``, on every device.

    Args:
        state: int64 tensor, any shape.
        frac_bits: fractional bits, in [0, 52].
        dtype: floating dtype of the result.

    Example:
        >>> from_fixed(torch.tensor([24, -4]), frac_bits=4)
        tensor([ 1.5000, -0.2500])
    """
    frac_bits = check_frac_bits("from_fixed", frac_bits)
    if not isinstance(state, torch.Tensor) or state.dtype != torch.int64:
        got = state.dtype if isinstance(state, torch.Tensor) else type(state).__name__
        raise TypeError(f"from_fixed: state must be an int64 tensor, got {got}")
    return (state.to(torch.float64) * math.ldexp(1.0, -frac_bits)).to(dtype)


def check_status(status: torch.Tensor, frac_bits: int = DEFAULT_FRAC_BITS, op: str = "exact mode") -> None:
    """Raise ExactModeError if any fixed-point op flagged ``status`` (one host sync).

    Use it when several ops share one status tensor (``status=``) and the caller synchronises
    anyway, e.g. once per forward solve.

    Example:
        >>> status = new_status()
        >>> # ... relax_fixed_(..., status=status) many times ...
        >>> check_status(status)
    """
    code = FixedStatus(int(status.item()))
    if code:
        raise ExactModeError(describe_status(op, code, frac_bits))


def describe_status(op: str, code: FixedStatus, frac_bits: int) -> str:
    """What each flag in ``code`` means and what to do about it, as one message."""
    parts = []
    if code & FixedStatus.F_NOT_FINITE:
        parts.append("f_val held NaN or Inf, which fixed point cannot represent")
    if code & FixedStatus.F_OUT_OF_RANGE:
        parts.append(f"f_val held values outside {_range_text(frac_bits)}")
    if code & FixedStatus.STATE_OUT_OF_RANGE:
        parts.append(f"a state left {_range_text(frac_bits)}")
    if code & FixedStatus.INVERSE_MISMATCH:
        parts.append(_MISMATCH_TEXT)
    advice = (f"; {_RANGE_ADVICE.format(frac_bits=frac_bits)}"
              if code & (FixedStatus.F_OUT_OF_RANGE | FixedStatus.STATE_OUT_OF_RANGE) else "")
    return (f"{op}: {'; '.join(parts)}{advice}. The offending elements were left unchanged, the rest "
            f"updated: discard the state")


_RANGE_ADVICE = ("exact mode keeps every int64 value within ±2^53 so the update cannot overflow; pass a "
                 "smaller frac_bits to widen the range (each bit fewer doubles it and doubles the "
                 "resolution step 2^-{frac_bits})")
_MISMATCH_TEXT = ("the inverse produced states outside the range the forward can produce, so f_val is not "
                  "bit-identical to the value the forward step saw (f must be deterministic) or the "
                  "remainder/state belong to another half-step")


def _range_text(frac_bits: int) -> str:
    return (f"the range |x| <= 2^{53 - frac_bits} = {value_range(frac_bits):.6g} that frac_bits={frac_bits} "
            f"represents")


def _range_error(op: str, name: str, largest: float, frac_bits: int) -> ExactModeError:
    return ExactModeError(f"{op}: {name} holds values up to {largest:.6g} in magnitude, outside "
                           f"{_range_text(frac_bits)}; {_RANGE_ADVICE.format(frac_bits=frac_bits)}")


def _non_finite_error(op: str, name: str, x: torch.Tensor, bad: torch.Tensor) -> ExactModeError:
    first = int(bad.reshape(-1).nonzero()[0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), bad.shape)) if bad.dim() else ()
    return ExactModeError(f"{op}: {name} has {int(bad.sum())} non-finite elements (first at index {index}: "
                           f"{x.reshape(-1)[first].item()}); exact mode cannot represent NaN or Inf")


def status_error(op: str, code: FixedStatus, state: torch.Tensor, f_val: torch.Tensor,
                 frac_bits: int) -> ExactModeError:
    """The error of a synchronous op call, naming the offending values (which the kernels left in place)."""
    f64 = f_val.detach().to(torch.float64)
    if code & FixedStatus.F_NOT_FINITE:
        return _non_finite_error(op, "f_val", f_val, ~torch.isfinite(f64))
    if code & FixedStatus.F_OUT_OF_RANGE:
        return _range_error(op, "f_val", f64.abs().max().item(), frac_bits)
    if code & FixedStatus.STATE_OUT_OF_RANGE:
        largest = from_fixed(state, frac_bits, torch.float64).abs().max().item()
        if largest <= value_range(frac_bits):
            return ExactModeError(f"{op}: the update would take a state outside {_range_text(frac_bits)} (beta > 1 "
                                   f"amplifies the state); {_RANGE_ADVICE.format(frac_bits=frac_bits)}")
        return _range_error(op, "state", largest, frac_bits)
    return ExactModeError(describe_status(op, code, frac_bits))
