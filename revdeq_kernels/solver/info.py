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

# Default bound on the reported drift above which the backward warns. The
# reversed iteration amplifies rounding by 1/|1-beta| per half-step while the adjoints shrink, so the
# start state is always the worst-reconstructed point: gradients stay close to stored-activation
# backprop while the drift is well below 1, and go wrong (1e-3 and worse) once it is O(1) or more
# (benchmarks/drift_table.py measures both).
DRIFT_WARN_BOUND = 0.1
# The reconstruction moved f's outputs (f_mismatch, reconstruction part) by more than this and more
# than F_MISMATCH_DRIFT_RATIO times the drift: f is not smooth where the reconstruction landed.
F_MISMATCH_WARN_BOUND = 1e-3
F_MISMATCH_DRIFT_RATIO = 100.0

# How often each warning has fired in this process: it is shown on occurrences 1, 2, 4, 8, ... so a
# training loop that hits it every step is not flooded, and a later occurrence is never silent for long.
_occurrences = {"drift": 0, "f_changed": 0, "f_mismatch": 0}


def _rate_limited(kind: str) -> str | None:
    """None when this occurrence of ``kind`` is not shown, else a note saying which occurrence it is."""
    _occurrences[kind] += 1
    count = _occurrences[kind]
    if count & (count - 1):
        return None
    return ("" if count == 1 else f" (occurrence {count} in this process)") + \
        "; repeats are shown at occurrences 2, 4, 8, ..."


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
        None before the backward ran. Above ``max_drift`` it raises :class:`DriftError` (inside the
        backward when ``tol`` or ``max_drift`` is set); with neither, above 0.1 it warns (rate-limited:
        occurrences 1, 2, 4, 8, ... in a process).
        ``"f_mismatch"``: float, after backward: a lower bound on how far f's outputs in the backward
        moved from the forward's at the same states, relative to ``||f||``: at the final ``y`` (stored
        exactly: any change means f changed between the passes, e.g. it reads global state; warns above
        16 ulps of f's dtype) and along the reconstruction (warns when far above the drift: f is not
        smooth where the reconstruction landed; exact mode avoids it). :meth:`drift_tensor` and
        :meth:`f_mismatch_tensor` give both without a host sync.
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

    _KEYS = ("steps", "residual", "drift", "f_mismatch", "residual_trace")
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
        self._abs_residual = None  # ||z - f(z)|| of the last history row read
        self._trace = []  # relative residual of each history row read so far
        self._diagnostics = {}  # key -> value or zero-argument callable, in the order attached
        self._backward = None  # (steps + 1, 4): NaN-propagating evidence per backward step, drift last
        self._drift = None
        self._drift_warned = False
        self._f_mismatch = None
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
        if key == "f_mismatch":
            return None if self._read_backward() is None else self._f_mismatch
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

    def read_forward_rows(self, last: int, stop_mode: str = "rel") -> float:
        """Read the history rows not yet read, up to ``last`` (one sync), raise at the first non-finite
        one, and return the residual after step ``last``: relative (``||z - f(z)|| / ||f(z)||``) or, with
        ``stop_mode="abs"``, absolute (``||z - f(z)||`` over the whole state)."""
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
            self._abs_residual = math.sqrt(max(rows[-1][0], 0.0))
        return self._abs_residual if stop_mode == "abs" else self._residual

    def residual_history(self) -> torch.Tensor | None:
        """The forward's evidence as a device tensor, without a host sync: shape ``(steps + 1, 2)``, row ``n``
        holding ``[||z - f(z)||^2, ||f(z)||^2]`` after step ``n`` (row 0: at the start); float64 for float64
        states, else float32. Not checked for non-finite values (reading ``"residual"`` is). None before a
        forward. Adapters (e.g. the torchdeq core) build their per-step statistics from it."""
        return None if self._history is None else self._history[:self.steps + 1]

    def _read_forward(self) -> float | None:
        if self._history is None or self._history.device.type == "meta":  # meta tensors hold no values
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

    def drift_tensor(self) -> torch.Tensor | None:
        """The drift as a 0-dim float64 tensor on the solve's device, without a host sync; None before the
        backward ran. The cheap per-call flag for a training loop: accumulate it (``worst = torch.maximum(worst,
        info.drift_tensor())``) and read it once in a while, instead of reading ``info["drift"]`` every step."""
        return None if self._backward is None else self._backward[0, 0]

    def f_mismatch_tensor(self) -> torch.Tensor | None:
        """``info["f_mismatch"]`` as a 0-dim float64 device tensor, without a host sync (None before the backward)."""
        return None if self._backward is None else self._backward[0, 1:3].amax()

    def _read_backward(self) -> float | None:
        if self._backward is None or self._backward.device.type == "meta":
            return None
        if self._drift is None:
            if self._exact():
                self._read_forward()  # a forward problem explains (and outranks) anything the backward saw
            rows = _with_status(self._backward, self._backward_status, 0, len(self._backward))
            drift, reconstruction, changed, changed_bound = rows[0][:4]
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
            self._f_mismatch = max(reconstruction, changed)
            self._check_f(reconstruction, changed, changed_bound)  # once: warnings, not errors
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
        if bound is None and drift > warn_bound and not self._drift_warned:
            self._drift_warned = True  # once per solve, however often info is read
            note = _rate_limited("drift")
            if note is not None:
                warnings.warn(
                    f"{self._caller}: the backward pass reconstructed the start state with relative drift "
                    f"{drift:.3e} ({self._describe_states()}); gradients may be inexact. Pass max_drift= to "
                    f"turn this into an error{note}", RuntimeWarning, stacklevel=3)

    def _check_f(self, reconstruction: float, changed: float, changed_bound: float) -> None:
        """Warn when f's outputs in the backward differ from the forward's at the same states."""
        if changed > changed_bound:
            note = _rate_limited("f_changed")
            if note is not None:
                warnings.warn(
                    f"{self._caller}: f returned a different value in the backward than in the forward for the same "
                    f"final state (relative change >= {changed:.3e}): f changed between forward and backward (it "
                    "reads global state, its parameters or buffers were modified in place, e.g. by torch's "
                    "spectral_norm parametrization, which runs a power iteration at every call in training mode, "
                    "or its kernels are nondeterministic), so the gradient is not that of the function the "
                    "forward solved. Keep what f depends on fixed until backward has run (torchdeq.norm's "
                    f"spectral norm updates only in reset_norm){note}", RuntimeWarning, stacklevel=4)
        elif reconstruction > max(F_MISMATCH_WARN_BOUND, F_MISMATCH_DRIFT_RATIO * self._drift):
            note = _rate_limited("f_mismatch")
            if note is not None:
                warnings.warn(
                    f"{self._caller}: f's outputs at the reconstructed states differ from the forward's by "
                    f">= {reconstruction:.3e} (relative) although the drift is only {self._drift:.3e}: the "
                    "reconstruction landed where f is not smooth (ReLU kinks, a normalisation of a near-constant "
                    "input), so gradients may be far off. Use exact=True, which reconstructs every state bit for "
                    f"bit{note}", RuntimeWarning, stacklevel=4)


def _with_status(rows: torch.Tensor, status: torch.Tensor | None, start: int, stop: int) -> list:
    """rows[start:stop] as lists, each with its status flags appended (exact mode), in one host read."""
    if status is None:
        return rows[start:stop].tolist()
    flags = status[start:stop].to(rows.dtype).unsqueeze(1)  # int32 flags are exact in float32/64
    return torch.cat((rows[start:stop], flags), dim=1).tolist()
