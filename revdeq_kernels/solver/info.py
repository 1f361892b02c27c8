"""SolverInfo: what one solve did, read lazily from the device, and the checks made when it is read.

The solver leaves its evidence on the device (the residual after every forward step, NaN-propagating
residuals per backward step, the drift); reading it costs one host synchronisation per pass, and that is
where non-finite values and excess drift are reported. For a tuple state (several tensors) the residual
and the drift are taken over all members together.
"""

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from .. import exact
from . import exact_states

if TYPE_CHECKING:
    from .options import SolverOptions

# Default bound on the reported drift above which the backward warns (once per process). The
# reversed iteration amplifies rounding by 1/|1-beta| per half-step while the adjoints shrink, so the
# start state is always the worst-reconstructed point: gradients stay close to stored-activation
# backprop while the drift is well below 1, and go wrong (1e-3 and worse) once it is O(1) or more
# (benchmarks/drift_table.py measures both).
DRIFT_WARN_BOUND = 0.1
_warned = {"drift": False}


class DriftError(RuntimeError):
    """The backward pass reconstructed the start state further from the truth than ``max_drift``."""


def _relative(d2: float, f2: float) -> float:
    """||z - f(z)|| / ||f(z)|| from the two squared norms; 0 when both are 0."""
    if f2 > 0.0:
        return math.sqrt(d2 / f2)
    return 0.0 if d2 == 0.0 else math.inf


def _all_finite(row) -> bool:
    return all(math.isfinite(v) for v in row)


class SolverInfo(Mapping):
    """What one solve did, read lazily from the device.

    Keys:
        ``"steps"``: int, the forward steps taken (each evaluates ``f`` twice); known without a sync.
        ``"residual"``: float, ``||z - f(z)|| / ||f(z)||`` at the returned ``z``.
        ``"drift"``: float, after backward: ``max |reconstructed start - z0| / max(|z|, |z0|)``;
        None before the backward ran.
        ``"residual_trace"``: list of ``steps + 1`` floats, the relative residual after each step
        (entry 0 at the start ``z0``, the last one equals ``"residual"``); read with ``"residual"``.

    Keys present only when the solve was asked for them (:class:`~revdeq_kernels.RevDEQ` options):
        ``"spectral_radius"`` (``spectral_radius=``): float, an estimate of ``max |eigenvalue(df/dz)|``
        at the returned ``z`` (see :func:`~revdeq_kernels.spectral_radius`); computed on the device,
        read (one sync) on first access.
        ``"jac_penalty"`` (``jac_reg=``): 0-dim tensor, the Hutchinson estimate of
        ``||df/dz||_F^2 / z.numel()`` at the returned ``z`` (see :func:`~revdeq_kernels.jacobian_penalty`),
        differentiable, to add to the loss; None in eval mode, where it is not computed.

    Exact mode (``exact=True``) adds, known without a sync: ``"beta"`` (float, the effective beta
    p / 2^m), ``"dyadic_beta"`` (:class:`~revdeq_kernels.exact.DyadicBeta`, its p and m),
    ``"frac_bits"`` (int, F), ``"remainder_bytes"`` (int, the remainder memory held for the backward:
    m bits per element per half-step taken, in whole 32-bit words per bit plane; 0 when no backward
    will run) and ``"stored_states_bytes"`` (int, what storing both states after every step would
    take instead: 2 * steps * numel * 8). Its drift is exactly 0.0 when the reconstruction is
    bit-exact, and a value that exact mode cannot represent raises
    :class:`~revdeq_kernels.exact.ExactModeError` naming the pass and the step, at the same
    moments as the non-finite checks.

    With ``tol=None`` the solver never synchronises; reading ``"residual"`` or ``"drift"`` (or calling
    :meth:`check`) copies the device evidence to the host once, and that is when non-finite values
    from ``f`` raise ``FloatingPointError`` (naming the pass and the step) and a drift above
    ``max_drift`` raises :class:`DriftError`. With a tolerance these checks run inside the passes.

    Example:
        >>> z, info = reversible_fixed_point(f, x)
        >>> info["steps"], info["residual"]
        (12, 0.00094)
        >>> info["residual_trace"]  # [at z0, after step 1, ..., after step 12]
    """

    _KEYS = ("steps", "residual", "drift", "residual_trace")
    # Attached after the solve by the caller (RevDEQ), each a value or a zero-argument callable that
    # is called once, on first read, so device values cost a host sync only when somebody asks.
    DIAGNOSTICS = ("spectral_radius", "jac_penalty")

    def __init__(self, caller: str, options: "SolverOptions"):
        self._caller = caller
        self._options = options
        self.steps = 0
        self._history = None  # (max_steps + 1, 2): [||z - f(z)||^2, ||f(z)||^2] after each step
        self._read_rows = 0  # history rows already checked on the host
        self._residual = None
        self._trace = []  # relative residual of each history row read so far
        self._diagnostics = {}  # key -> value or zero-argument callable, in the order attached
        self._backward = None  # (steps + 1, 4): NaN-propagating evidence per backward step, drift last
        self._drift = None
        self._status = self._backward_status = None  # exact mode: int32 flags per step of each pass
        self._facts = {}  # further keys, set once by the solver (exact mode's beta and memory)

    # Mapping interface: the core keys, always present, then the diagnostics attached, then the facts
    # the solver added.
    def __getitem__(self, key):
        if key in self._facts:
            return self._facts[key]
        if key == "steps":
            return self.steps
        if key == "residual":
            return self._read_forward()
        if key == "drift":
            return self._read_backward()
        if key == "residual_trace":
            return None if self._read_forward() is None else self._trace[:self.steps + 1]
        if key in self._diagnostics:
            return self._read_diagnostic(key)
        raise KeyError(key)

    def __iter__(self):
        yield from self._KEYS
        yield from self._diagnostics
        yield from self._facts

    def __len__(self):
        return len(self._KEYS) + len(self._diagnostics) + len(self._facts)

    def add_facts(self, facts: Mapping) -> None:
        """Further read-only entries (values known on the host), e.g. exact mode's beta and memory."""
        self._facts.update(facts)

    def _exact(self) -> bool:
        return self._options.exact

    def __repr__(self):
        try:
            return f"SolverInfo({dict(self)})"
        except (FloatingPointError, DriftError) as exc:  # printing must not raise
            return f"SolverInfo(steps={self.steps}, error={exc})"

    def check(self) -> None:
        """Read the device evidence now and raise for non-finite values or excess drift."""
        self._read_forward()
        self._read_backward()

    # The forward's evidence.
    def start_forward(self, history: torch.Tensor, status: torch.Tensor | None = None) -> None:
        """``history``: (max_steps + 1, 2) residual rows; ``status``: exact mode's (max_steps + 1,) flags."""
        self._history = history
        self._status = status
        self._read_rows = 0
        self._residual = None
        self._trace = []

    def read_forward_rows(self, last: int) -> float:
        """Read the history rows not yet read, up to ``last`` (one sync), raise at the first non-finite
        one, and return the relative residual after step ``last``."""
        if last >= self._read_rows:
            rows = _with_status(self._history, self._status, self._read_rows, last + 1)
            for i, row in enumerate(rows):
                if self._status is not None:
                    self._check_fixed_point("forward", self._read_rows + i, row)
                elif not _all_finite(row):
                    step = self._read_rows + i
                    where = "evaluating f(z0)" if step == 0 else f"at step {step} of {self._options.max_steps}"
                    raise FloatingPointError(
                        f"{self._caller}: non-finite values in the forward pass {where}: f returned inf or NaN, "
                        f"or the iteration diverged (beta={self._options.beta})")
            self._read_rows = last + 1
            self._trace.extend(_relative(*row[:2]) for row in rows)
            self._residual = self._trace[-1]
        return self._residual

    def residual_history(self) -> torch.Tensor | None:
        """The forward's evidence as a device tensor, without a host sync: shape ``(steps + 1, 2)``, row ``n``
        holding ``[||z - f(z)||^2, ||f(z)||^2]`` after step ``n`` (row 0: at the start); float64 for float64
        states, else float32. Not checked for non-finite values (reading ``"residual"`` is). None before a
        forward. Adapters (e.g. the torchdeq core) build their per-step statistics from it."""
        return None if self._history is None else self._history[:self.steps + 1]

    def _read_forward(self) -> float | None:
        if self._history is None:
            return None
        return self.read_forward_rows(self.steps)

    # Diagnostics computed after the solve.
    def set_diagnostic(self, key: str, value) -> None:
        """Attach ``key`` (one of :attr:`DIAGNOSTICS`): a value, or a zero-argument callable whose result
        is computed on the first read and kept."""
        if key not in self.DIAGNOSTICS:
            raise KeyError(f"SolverInfo.set_diagnostic: unknown key {key!r}; expected one of {self.DIAGNOSTICS}")
        self._diagnostics[key] = value

    def _read_diagnostic(self, key: str):
        value = self._diagnostics[key]
        if callable(value) and not isinstance(value, torch.Tensor):
            value = self._diagnostics[key] = value()
        return value

    # The backward's evidence.
    def set_backward(self, evidence: torch.Tensor, status: torch.Tensor | None = None) -> None:
        """``evidence``: (steps + 1, 4), drift in row 0; ``status``: exact mode's (steps + 1,) flags."""
        self._backward = evidence
        self._backward_status = status
        self._drift = None

    def _read_backward(self) -> float | None:
        if self._backward is None:
            return None
        if self._drift is None:
            if self._exact():
                self._read_forward()  # a forward problem explains (and outranks) anything the backward saw
            rows = _with_status(self._backward, self._backward_status, 0, len(self._backward))
            drift = rows[0][0]
            for step in range(len(rows) - 1, 0, -1):  # the order the backward visited them
                if self._backward_status is not None:
                    self._check_fixed_point("backward", step, rows[step])
                if not _all_finite(rows[step][:4]):
                    raise FloatingPointError(
                        f"{self._caller}: non-finite values in the backward pass at step {step} (the backward "
                        f"visits steps {len(rows) - 1} down to 1): f or its vector-Jacobian product returned "
                        f"inf or NaN, or the reconstruction diverged ({self._describe_states()})")
            if not math.isfinite(drift):  # only y[0] and z[0] themselves can still be non-finite here
                raise FloatingPointError(
                    f"{self._caller}: non-finite values in the backward pass at step 1: the reconstruction of "
                    f"the start diverged ({self._describe_states()})")
            self._drift = drift
        self._check_drift(self._drift)  # on every read: an error stays an error
        return self._drift

    def _check_fixed_point(self, pass_name: str, step: int, row) -> None:
        """Raise ExactModeError for exact mode's flags in ``row`` (its last entry), or, in the forward,
        for a non-finite residual: states are integers, so only f can have produced it."""
        code = int(row[-1])
        if pass_name == "forward" and not code and not _all_finite(row[:-1]):
            code = exact.FixedStatus.F_NOT_FINITE
        if code:
            if pass_name == "forward":
                where = ("forward pass, evaluating f(z0)" if step == 0
                         else f"forward pass at step {step} of {self._options.max_steps}")
            else:
                where = f"backward pass at step {step} (the backward visits steps {self.steps} down to 1)"
            raise exact_states.status_error(self._caller, where, code, self._options.frac_bits)

    def _describe_states(self) -> str:
        o = self._options
        if self._exact():
            return (f"beta={o.dyadic_beta}, {self.steps} steps, exact mode with frac_bits={o.frac_bits}; it "
                    "reconstructs bit for bit when f returns the same bits for the same input")
        return (f"beta={o.beta}, {self.steps} steps, {str(o.state_dtype).replace('torch.', '')} states; "
                f"the inverse amplifies rounding by 1/|1-beta| = {1 / abs(1 - o.beta):.3g} per half-step")

    def _check_drift(self, drift: float) -> None:
        bound = self._options.max_drift
        if bound is not None and drift > bound:
            raise DriftError(
                f"{self._caller}: the backward pass reconstructed the start state with relative drift "
                f"{drift:.3e} > max_drift={bound:g} ({self._describe_states()}); "
                + ("make f deterministic" if self._exact() else "use float64 states, fewer steps, or beta closer "
                   "to 0.5"))
        # Exact mode reconstructs bit for bit: any drift at all means f was not deterministic.
        warn_bound = 0.0 if self._exact() else DRIFT_WARN_BOUND
        if bound is None and drift > warn_bound and not _warned["drift"]:
            _warned["drift"] = True
            warnings.warn(
                f"{self._caller}: the backward pass reconstructed the start state with relative drift "
                f"{drift:.3e} ({self._describe_states()}); gradients may be inexact. Pass max_drift= to "
                "turn this into an error; this warning is shown once", RuntimeWarning, stacklevel=2)


def _with_status(rows: torch.Tensor, status: torch.Tensor | None, start: int, stop: int) -> list:
    """rows[start:stop] as lists, each with its status flags appended (exact mode), in one host read."""
    if status is None:
        return rows[start:stop].tolist()
    flags = status[start:stop].to(rows.dtype).unsqueeze(1)  # int32 flags are exact in float32/64
    return torch.cat((rows[start:stop], flags), dim=1).tolist()
