"""The arithmetic of relax_ and unrelax_ that every backend computes (the same as csrc/common/affine.h).

    relax_:   state = (1 - beta) * state + beta * f
    unrelax_: state = (state - beta * f) / (1 - beta)

Each is computed as ``c * (a * state + b * f)`` with ``|a| <= 1`` and ``|b| <= 1``: no product and no sum
overflows unless the exact result does (``|1 - beta| < 1`` for beta in (0, 2), so ``c`` only grows what it
multiplies). The textbook coefficients overflowed near the top of the range: unrelax_ at beta = 0.8
multiplied f by -beta / (1 - beta) = -4, so a float32 state and f of 3e38 gave inf where the result is
3e38. Imports nothing.
"""

from typing import NamedTuple


class Affine(NamedTuple):
    a: float  # the state's coefficient
    b: float  # f's coefficient
    c: float  # applied last; exactly 1.0 for relax_ with beta <= 1 (no extra rounding in the common case)


def affine_coefficients(beta: float, inverse: bool) -> Affine:
    """The coefficients of relax_ (``inverse=False``) or unrelax_ for a checked beta in (0, 2), not 1."""
    if not inverse:
        if beta <= 1.0:
            return Affine(1.0 - beta, beta, 1.0)
        return Affine((1.0 - beta) / beta, 1.0, beta)  # beta * f alone may overflow for beta > 1
    if beta <= 1.0:
        return Affine(1.0, -beta, 1.0 / (1.0 - beta))
    return Affine(1.0 / beta, -1.0, beta / (1.0 - beta))
