"""Triton exact mode: relax_fixed_ / unrelax_fixed_ kernels, their launchers, and the ops
``torch.ops.revdeq.triton_relax_fixed_`` and ``triton_unrelax_fixed_``.

The arithmetic is revdeq_kernels/exact's, bit for bit (the reference backend is the oracle):
int64 states, ``q = round_half_even(f * 2^F)``, ``t = (2^m - p) * Y + p * q``, ``Y' = t >> m`` and the
m dropped bits stored as bit planes; the inverse multiplies by ``(2^m - p)^-1`` modulo 2^64. int64
products wrap modulo 2^64 on the GPU and in the interpreter (numpy arrays) alike, which the inverse
relies on; the forward never wraps (the range rule keeps |t| < 766 * 2^53).

A program owns WORDS remainder words, i.e. WORDS * 32 consecutive elements, and sees them as a
(WORDS, 32) tile: row k is word k, column l is bit l. A bit plane is then one sum along the rows of
``bit << l`` (disjoint bits, so the sum is an OR), two planes per 64-bit sum. No two programs share
a word, so the remainders need no atomics; the status flags are ORed per word and added with
``tl.atomic_or`` only by the words that saw a problem. Full tiles take an unmasked branch, so the
state and f are read and written with 16-byte accesses; only the last tile is masked.

Rounding half to even uses the 2^52 trick (below 2^52, adding 2^52 leaves no fraction bits, so the
add rounds to nearest even): plain IEEE float64 adds, which both Triton's compiler (no fast-math
reassociation) and numpy honour, where a libdevice call would not exist in the interpreter.

Layout: remainder bits belong to row-major element indices, so the kernels walk contiguous tensors.
A state laid out otherwise is updated in a contiguous copy that is copied back (nothing outside the
view is written); f_val is read through a contiguous copy when it is not contiguous. Imported on first
use of exact mode (triton_backend/__init__.py), so an older Triton that lacks something these kernels
use costs exact mode only.
"""

import torch
import triton
import triton.language as tl

from ... import exact
from ...ops import checks, library
from . import common
from .convert import widen

# FixedStatus bits (revdeq_kernels/exact) and the range of the format.
F_NOT_FINITE = tl.constexpr(1)
F_OUT_OF_RANGE = tl.constexpr(2)
STATE_OUT_OF_RANGE = tl.constexpr(4)
INVERSE_MISMATCH = tl.constexpr(8)
LIMIT = tl.constexpr(1 << 53)
LIMIT_F = tl.constexpr(9007199254740992.0)  # 2^53, exact in float32 and float64
TWO_52 = tl.constexpr(4503599627370496.0)
EXPONENT_BITS = tl.constexpr(0x7FF0000000000000)  # all ones: Inf or NaN

# GPU configs: 8 to 16 int64 elements per thread. The result does not depend on the config (integer
# arithmetic, one owner per word), so autotuning is safe; restore_value undoes the benchmark runs.
FIXED_CONFIGS = [
    triton.Config({"WORDS": 32}, num_warps=4),
    triton.Config({"WORDS": 64}, num_warps=4),
    triton.Config({"WORDS": 128}, num_warps=8),
]
# The interpreter runs one program at a time in numpy: one config, 1024 elements per program.
INTERPRETER_FIXED_CONFIGS = [triton.Config({"WORDS": 32}, num_warps=4)]


@triton.jit
def _in_range(v):
    return (v >= -LIMIT) & (v <= LIMIT)  # not abs(v): abs(-2^63) wraps


@triton.jit
def _quantize(f, scale):
    """(q, why): q = round_half_even(f * scale) as int64 (0 where f cannot enter the state) and the
    FixedStatus bit that says why it cannot (0 when it can)."""
    f = widen(f, tl.float64)  # exact for every f dtype (convert.py: the interpreter's bfloat16 is not)
    x = f * scale  # exact: scale is a power of two (a huge float64 f may overflow to inf)
    representable = tl.abs(x) <= LIMIT_F  # false for NaN and Inf too
    finite = (f.to(tl.int64, bitcast=True) & EXPONENT_BITS) != EXPONENT_BITS
    why = tl.where(representable, 0, tl.where(finite, F_OUT_OF_RANGE, F_NOT_FINITE))
    x = tl.where(representable, x, 0.0)  # converting NaN/Inf to int64 would be undefined
    a = tl.abs(x)
    rounded = tl.where(a < TWO_52, (a + TWO_52) - TWO_52, a)
    return tl.where(x < 0, -rounded, rounded).to(tl.int64), why


@triton.jit
def _tile(word):
    """Element offsets (WORDS, 32) of the words `word` (WORDS,), and the lanes (1, 32), as int64."""
    lanes = tl.arange(0, 32).to(tl.int64)[None, :]
    return word[:, None] * 32 + lanes, lanes


@triton.jit
def _report(status_ptr, flags):
    """ORs the (WORDS, 32) flags of a tile into *status: each word's flags are ORed along its row (the
    max of each FixedStatus bit, a reduction within a warp), and only words that saw a problem issue
    an atomic, so a tile of good elements touches *status not at all."""
    word_flags = tl.max(flags & 1, axis=1)
    for bit in tl.static_range(1, 4):
        word_flags |= tl.max(flags & (1 << bit), axis=1)
    tl.atomic_or(status_ptr + tl.zeros_like(word_flags), word_flags, mask=word_flags != 0, sem="relaxed")


@triton.jit
def _load(state_ptr, f_ptr, offs, n, MASKED: tl.constexpr):
    """A tile's states and f values; with MASKED, lanes past n read y = 0 and f = 0."""
    if MASKED:
        y = tl.load(state_ptr + offs, mask=offs < n, other=0)
        f = tl.load(f_ptr + offs, mask=offs < n, other=0.0)
    else:
        y = tl.load(state_ptr + offs)
        f = tl.load(f_ptr + offs)
    return y, f


@triton.jit
def _store(state_ptr, offs, n, value, MASKED: tl.constexpr):
    if MASKED:
        tl.store(state_ptr + offs, value, mask=offs < n)
    else:
        tl.store(state_ptr + offs, value)


@triton.jit
def _program_words(frac_bits, WORDS: tl.constexpr):
    """This program's (pid, words (WORDS,), scale = 2^frac_bits exactly), in int64: n may exceed 2^31."""
    pid = tl.program_id(0).to(tl.int64)
    word = pid * WORDS + tl.arange(0, WORDS)
    scale = ((frac_bits.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)
    return pid, word, scale


@triton.jit
def _relax_tile(state_ptr, f_ptr, rem_ptr, status_ptr, n, words_per_plane, p, keep, m, scale, word,
                WORDS: tl.constexpr, MASKED: tl.constexpr):
    offs, lanes = _tile(word)
    # Lanes past n (MASKED) read y = 0 and f = 0: they compute t = 0, so their remainder bits (the
    # padding of the last word) are 0 and they raise no flag.
    y, f = _load(state_ptr, f_ptr, offs, n, MASKED)
    q, why = _quantize(f, scale)
    ok = (why == 0) & _in_range(y)
    # Rejected inputs are zeroed first, so nothing computed here overflows.
    t = keep * tl.where(ok, y, 0) + p * tl.where(ok, q, 0)
    y_new = t >> m  # arithmetic shift: floor(t / 2^m)
    done = ok & _in_range(y_new)  # y_new leaves the range only for beta > 1
    r = tl.where(done, t - (y_new << m), 0)  # t & (2^m - 1)
    _store(state_ptr, offs, n, tl.where(done, y_new, y), MASKED)
    word_ok = word < words_per_plane
    for b in range(0, m, 2):
        # Planes b and b + 1 in one 64-bit sum: bit l of the low half is bit b of lane l, bit l of
        # the high half bit b + 1 (0 when b + 1 == m, as r < 2^m).
        bits = (((r >> b) & 1) << lanes) | (((r >> (b + 1)) & 1) << (lanes + 32))
        both = tl.sum(bits, axis=1)
        tl.store(rem_ptr + b * words_per_plane + word, both.to(tl.int32), mask=word_ok)
        high_words = tl.where(b + 1 < m, words_per_plane, 0)  # no plane b + 1 when b + 1 == m
        tl.store(rem_ptr + (b + 1) * words_per_plane + word, (both >> 32).to(tl.int32), mask=word < high_words)
    _report(status_ptr, why | tl.where((why == 0) & ~done, STATE_OUT_OF_RANGE, 0))


@triton.jit(do_not_specialize=["p", "keep", "m", "frac_bits"])
def relax_fixed_kernel(state_ptr, f_ptr, rem_ptr, status_ptr, n, words_per_plane, p, keep, m, frac_bits,
                       WORDS: tl.constexpr):
    """Forward half-step over n elements: state = (keep * state + p * q) >> m, remainder bits written.

    keep = 2^m - p. rem_ptr: int32 (m, words_per_plane) bit planes; status_ptr: one int32.
    """
    pid, word, scale = _program_words(frac_bits, WORDS)
    p = p.to(tl.int64)
    keep = keep.to(tl.int64)
    m = m.to(tl.int64)
    if (pid + 1) * WORDS * 32 <= n:
        _relax_tile(state_ptr, f_ptr, rem_ptr, status_ptr, n, words_per_plane, p, keep, m, scale, word,
                    WORDS, MASKED=False)
    else:
        _relax_tile(state_ptr, f_ptr, rem_ptr, status_ptr, n, words_per_plane, p, keep, m, scale, word,
                    WORDS, MASKED=True)


@triton.jit
def _unrelax_tile(state_ptr, f_ptr, rem_ptr, status_ptr, n, words_per_plane, p, m, inverse, scale, word,
                  WORDS: tl.constexpr, MASKED: tl.constexpr):
    offs, lanes = _tile(word)
    y, f = _load(state_ptr, f_ptr, offs, n, MASKED)
    word_ok = word < words_per_plane
    r = tl.zeros([WORDS, 32], dtype=tl.int64)
    for b in range(0, m):
        plane = tl.load(rem_ptr + b * words_per_plane + word, mask=word_ok, other=0).to(tl.int64)
        r |= ((plane[:, None] >> lanes) & 1) << b
    q, why = _quantize(f, scale)
    y_ok = _in_range(y)
    ok = (why == 0) & y_ok
    # t - p * q is keep * y_old when f and r are the forward's; keep is odd, so multiplying by its
    # inverse modulo 2^64 divides exactly (the product wraps by design).
    y_old = ((tl.where(ok, y, 0) << m) + r - p * q) * inverse
    done = ok & _in_range(y_old)
    _store(state_ptr, offs, n, tl.where(done, y_old, y), MASKED)
    flags = why | tl.where((why == 0) & ~y_ok, STATE_OUT_OF_RANGE, 0) | tl.where(ok & ~done, INVERSE_MISMATCH, 0)
    if MASKED:
        # Lanes past n read y = 0 and f = 0 but the padding bits of a remainder that no forward
        # wrote may be set: what they compute is not stored, and must not be flagged either.
        flags = tl.where(offs < n, flags, 0)
    _report(status_ptr, flags)


@triton.jit(do_not_specialize=["p", "m", "inverse", "frac_bits"])
def unrelax_fixed_kernel(state_ptr, f_ptr, rem_ptr, status_ptr, n, words_per_plane, p, m, inverse, frac_bits,
                         WORDS: tl.constexpr):
    """Inverse half-step over n elements: state = ((state << m) + r - p * q) * inverse (mod 2^64).

    inverse = (2^m - p)^-1 modulo 2^64 as a signed int64; rem_ptr is read, not written.
    """
    pid, word, scale = _program_words(frac_bits, WORDS)
    p = p.to(tl.int64)
    m = m.to(tl.int64)
    inverse = inverse.to(tl.int64)
    if (pid + 1) * WORDS * 32 <= n:
        _unrelax_tile(state_ptr, f_ptr, rem_ptr, status_ptr, n, words_per_plane, p, m, inverse, scale, word,
                      WORDS, MASKED=False)
    else:
        _unrelax_tile(state_ptr, f_ptr, rem_ptr, status_ptr, n, words_per_plane, p, m, inverse, scale, word,
                      WORDS, MASKED=True)


def autotuned(kernel, configs, do_bench=None):
    """kernel behind triton.autotune keyed by n; restore_value undoes the in-place update of each
    benchmark run (the remainder and status writes repeat identically)."""
    extra = {} if do_bench is None else {"do_bench": do_bench}
    return triton.autotune(configs, key=["n"], restore_value=["state_ptr"], **extra)(kernel)


# ---------------------------------------------------------------------------------------------------
# Launchers and ops

# Below TUNE_MIN_ELEMENTS a launch costs a few microseconds whatever the config: one config, no
# benchmarking. Larger sizes are autotuned once per (size, f dtype).
if common.INTERPRETED:
    _CONFIGS_LARGE = _CONFIGS_SMALL = INTERPRETER_FIXED_CONFIGS
else:
    _CONFIGS_LARGE, _CONFIGS_SMALL = FIXED_CONFIGS, FIXED_CONFIGS[:1]
_KERNELS = {  # (inverse, large) -> autotuned kernel
    (inverse, large): autotuned(unrelax_fixed_kernel if inverse else relax_fixed_kernel,
                                _CONFIGS_LARGE if large else _CONFIGS_SMALL)
    for inverse in (False, True) for large in (False, True)
}

def _fixed_update(op: str, inverse: bool, state, f_val, remainder, status, p: int, m: int, frac_bits: int) -> None:
    checks.check_fixed(op, state, f_val, remainder, status, (p, m), frac_bits)
    n = state.numel()
    if n == 0:
        return
    work = state if state.is_contiguous() else state.contiguous()
    f = f_val.contiguous()
    words = -(-n // exact.WORD_BITS)
    kernel = _KERNELS[(inverse, n >= common.TUNE_MIN_ELEMENTS)]
    # The state's coefficient 2^m - p for the forward, its inverse modulo 2^64 for the inverse.
    coefficient = exact.inverse_mod_2_64((1 << m) - p) if inverse else (1 << m) - p

    def grid(meta):
        return (-(-words // meta["WORDS"]),)

    with common.on_device_of(state):
        if inverse:
            common.wrap(kernel)[grid](work, f, remainder, status, n, words, p, m, coefficient, frac_bits)
        else:
            common.wrap(kernel)[grid](work, f, remainder, status, n, words, p, coefficient, m, frac_bits)
    if work is not state:
        state.copy_(work)


def _triton_relax_fixed_(state: torch.Tensor, f_val: torch.Tensor, remainder: torch.Tensor, status: torch.Tensor,
                         p: int, m: int, frac_bits: int) -> None:
    """In place, exactly: state = ((2^m - p) * state + p * round(f_val * 2^frac_bits)) >> m.

    See revdeq_kernels.relax_fixed_ for the rules. state: int64, any shape and strides. f_val: float64,
    float32, float16 or bfloat16, state's shape and device. remainder: int32, contiguous, shape
    (m, ceil(numel / 32)), overwritten with the dropped bits as bit planes. status: int32, one
    element; FixedStatus flags are ORed into it.

    Example:
        >>> torch.ops.revdeq.triton_relax_fixed_(y, fz, rem, status, 13, 4, 32)  # beta = 13/16
    """
    _fixed_update("triton_relax_fixed_", False, state, f_val, remainder, status, p, m, frac_bits)


def _triton_unrelax_fixed_(state: torch.Tensor, f_val: torch.Tensor, remainder: torch.Tensor, status: torch.Tensor,
                           p: int, m: int, frac_bits: int) -> None:
    """In place, exactly: the inverse of triton_relax_fixed_, given its f_val and remainder (read only).

    Same argument rules as triton_relax_fixed_.

    Example:
        >>> torch.ops.revdeq.triton_unrelax_fixed_(y, fz, rem, status, 13, 4, 32)  # undoes the relax
    """
    _fixed_update("triton_unrelax_fixed_", True, state, f_val, remainder, status, p, m, frac_bits)


common.register(_triton_relax_fixed_, {"state", "remainder", "status"}, library.fixed_fake("triton_relax_fixed_"))
common.register(_triton_unrelax_fixed_, {"state", "status"}, library.fixed_fake("triton_unrelax_fixed_"))
