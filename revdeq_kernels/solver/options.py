"""SolverOptions: the solver's settings, validated once with errors that name the caller and the option."""

import dataclasses
import math
import numbers

import torch

from .. import exact as fixed_format  # not `exact`: SolverOptions has a field of that name
from .. import ops
from ..ops import checks

STATE_DTYPES = (torch.float64, torch.float32)
STOP_MODES = ("rel", "abs")
# Far beyond any solve that could finish (each step evaluates f twice); keeps step counts and the
# residual history's row indices in int32 range.
MAX_STEPS = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class SolverOptions:
    """Validated solver settings; build with :meth:`make`, which raises clear errors for bad values.

    In exact mode ``beta`` is the effective (dyadic) beta as a float, ``dyadic_beta`` its p / 2^m, and
    ``state_dtype`` the dtype of the adjoint states (the primal states are int64 fixed point).
    """

    beta: float = 0.8
    max_steps: int = 30
    tol: float | None = 1e-3
    check_every: int = 1
    state_dtype: torch.dtype = torch.float64
    max_drift: float | None = None
    backend: str | None = None
    exact: bool = False
    frac_bits: int | None = None  # exact mode only
    dyadic_beta: fixed_format.DyadicBeta | None = None  # exact mode only
    stop_mode: str = "rel"  # "rel": ||z - f(z)|| / ||f(z)|| <= tol; "abs": ||z - f(z)|| <= tol
    auto_frac_bits: bool = False  # exact mode with frac_bits="auto": F is chosen per solve (solve() resolves it)

    @classmethod
    def make(cls, caller: str, *, beta=0.8, max_steps=30, tol=1e-3, check_every=1,
             state_dtype=torch.float64, max_drift=None, backend=None, exact=False,
             frac_bits=None, stop_mode="rel") -> "SolverOptions":
        if not isinstance(exact, bool):
            raise TypeError(f"{caller}: exact must be True or False, got {type(exact).__name__}")
        dyadic, auto = None, False
        if exact:
            dyadic = _dyadic_beta(caller, beta)
            beta = dyadic.value
            if frac_bits is None:
                frac_bits = fixed_format.DEFAULT_FRAC_BITS
            auto = frac_bits == "auto"
            if isinstance(frac_bits, str) and not auto:
                raise ValueError(f"{caller}: frac_bits must be an integer in [0, {fixed_format.MAX_FRAC_BITS}] or "
                                 f"'auto', got {frac_bits!r}")
            frac_bits = fixed_format.DEFAULT_FRAC_BITS if auto else fixed_format.check_frac_bits(caller, frac_bits)
        else:
            if frac_bits is not None:
                raise ValueError(f"{caller}: frac_bits={frac_bits!r} sets the fixed-point format of exact mode, but "
                                 "exact=False; pass exact=True with it, or leave frac_bits out")
            beta = checks.check_beta(caller, beta)
        max_steps = _positive_int(caller, "max_steps", max_steps)
        if max_steps > MAX_STEPS:
            raise ValueError(f"{caller}: max_steps must be at most 2**31 - 1 = {MAX_STEPS}, got {max_steps}; with a "
                             "tol the solve stops when it converges, so a large bound costs nothing")
        check_every = _positive_int(caller, "check_every", check_every)
        tol = _optional_nonnegative(caller, "tol", tol)
        max_drift = _optional_nonnegative(caller, "max_drift", max_drift)
        if state_dtype not in STATE_DTYPES:
            raise TypeError(f"{caller}: state_dtype must be torch.float64 or torch.float32, got {state_dtype!r} "
                            "(half-precision states lose everything to the inverse's rounding amplification)")
        ops.check_backend_name(caller, backend)
        if stop_mode not in STOP_MODES:
            raise ValueError(f"{caller}: stop_mode must be 'rel' or 'abs', got {stop_mode!r}")
        return cls(beta, max_steps, tol, check_every, state_dtype, max_drift, backend, exact, frac_bits, dyadic,
                   stop_mode, exact and auto)


def _dyadic_beta(caller, beta) -> fixed_format.DyadicBeta:
    """Exact mode's beta: a (p, m) pair as given, or a float rounded to the nearest p / 2^m, m <= 8."""
    if isinstance(beta, tuple):
        return fixed_format.check_beta(caller, beta)
    beta = checks.check_beta(caller, beta)
    try:
        return fixed_format.dyadic_beta(beta)
    except ValueError as exc:
        reason = str(exc).removeprefix("dyadic_beta: ")
        raise ValueError(f"{caller}: exact mode rounds beta to the nearest p / 2^m with m <= "
                         f"{fixed_format.MAX_BETA_BITS}, but {reason}") from None


def _positive_int(caller, name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{caller}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{caller}: {name} must be at least 1, got {value}")
    return int(value)


def _optional_nonnegative(caller, name, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{caller}: {name} must be a real number or None, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{caller}: {name} must be a finite number >= 0 or None, got {value!r}")
    return value
