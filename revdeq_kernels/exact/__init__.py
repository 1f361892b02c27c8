"""Exact mode's number format: int64 fixed point, dyadic beta, conversions, remainders and range errors.

"Fixed point" here means the number format (an integer with ``frac_bits`` fractional bits), not the
DEQ's fixed point ``z = f(z, x)``. The rules and the reasons behind them are in :mod:`.format`; the
fused ops that use them are ``relax_fixed_`` / ``unrelax_fixed_`` (:mod:`revdeq_kernels.ops`), and the
solver's exact-mode states are :mod:`revdeq_kernels.solver.exact_states`. This package imports nothing
else from revdeq_kernels: every layer above may use it.

Example:
    >>> from revdeq_kernels import exact
    >>> exact.dyadic_beta(0.8125), exact.to_fixed(torch.tensor([1.5]), frac_bits=4)
    (DyadicBeta(p=13, m=4), tensor([24]))
"""

from .format import (
    DEFAULT_FRAC_BITS,
    LIMIT,
    MAX_BETA_BITS,
    MAX_FRAC_BITS,
    WORD_BITS,
    DyadicBeta,
    ExactModeError,
    FixedStatus,
    check_beta,
    check_frac_bits,
    check_status,
    describe_status,
    dyadic_beta,
    from_fixed,
    inverse_mod_2_64,
    new_status,
    pack_remainder,
    remainder_buffer,
    remainder_bytes,
    remainder_shape,
    state_bytes,
    status_error,
    to_fixed,
    unpack_remainder,
    value_range,
)

__all__ = [
    "DEFAULT_FRAC_BITS", "LIMIT", "MAX_BETA_BITS", "MAX_FRAC_BITS", "WORD_BITS", "DyadicBeta", "ExactModeError",
    "FixedStatus", "check_beta", "check_frac_bits", "check_status", "describe_status", "dyadic_beta", "from_fixed",
    "inverse_mod_2_64", "new_status", "pack_remainder", "remainder_buffer", "remainder_bytes", "remainder_shape",
    "state_bytes", "status_error", "to_fixed", "unpack_remainder", "value_range",
]
