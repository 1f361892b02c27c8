"""The Triton kernels of exact mode (relax_fixed_, unrelax_fixed_); launched by backends/_triton_fixed.py.

The arithmetic is revdeq_kernels/fixed_point.py's, bit for bit (the reference backend is the oracle):
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
"""

import triton
import triton.language as tl

# FixedStatus bits (revdeq_kernels/fixed_point.py) and the range of the format.
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
    f = f.to(tl.float64)  # exact for every f dtype
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
def _relax_tile(state_ptr, f_ptr, rem_ptr, status_ptr, n, words_per_plane, p, keep, m, scale, word,
                WORDS: tl.constexpr, MASKED: tl.constexpr):
    offs, lanes = _tile(word)
    if MASKED:
        # Lanes past n read y = 0 and f = 0: they compute t = 0, so their remainder bits (the padding
        # of the last word) are 0 and they raise no flag.
        y = tl.load(state_ptr + offs, mask=offs < n, other=0)
        f = tl.load(f_ptr + offs, mask=offs < n, other=0.0)
    else:
        y = tl.load(state_ptr + offs)
        f = tl.load(f_ptr + offs)
    q, why = _quantize(f, scale)
    ok = (why == 0) & _in_range(y)
    # Rejected inputs are zeroed first, so nothing computed here overflows.
    t = keep * tl.where(ok, y, 0) + p * tl.where(ok, q, 0)
    y_new = t >> m  # arithmetic shift: floor(t / 2^m)
    done = ok & _in_range(y_new)  # y_new leaves the range only for beta > 1
    r = tl.where(done, t - (y_new << m), 0)  # t & (2^m - 1)
    if MASKED:
        tl.store(state_ptr + offs, tl.where(done, y_new, y), mask=offs < n)
    else:
        tl.store(state_ptr + offs, tl.where(done, y_new, y))
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
    pid = tl.program_id(0).to(tl.int64)  # int64: n may exceed 2^31
    word = pid * WORDS + tl.arange(0, WORDS)
    scale = ((frac_bits.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)  # 2^frac_bits, exactly
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
    if MASKED:
        y = tl.load(state_ptr + offs, mask=offs < n, other=0)
        f = tl.load(f_ptr + offs, mask=offs < n, other=0.0)
    else:
        y = tl.load(state_ptr + offs)
        f = tl.load(f_ptr + offs)
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
    if MASKED:
        tl.store(state_ptr + offs, tl.where(done, y_old, y), mask=offs < n)
    else:
        tl.store(state_ptr + offs, tl.where(done, y_old, y))
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
    pid = tl.program_id(0).to(tl.int64)
    word = pid * WORDS + tl.arange(0, WORDS)
    scale = ((frac_bits.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)
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
