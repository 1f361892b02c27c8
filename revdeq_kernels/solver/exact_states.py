"""FixedStates: exact-mode RevDEQ states, int64 fixed point that the backward reverses bit for bit.

The same seam as :class:`~revdeq_kernels.solver.states.FloatStates`: the solver's loops call the same
methods and do not know which one they hold. Here a state is ``Y = round(x * 2^F)`` in int64 (format
in :mod:`revdeq_kernels.exact`), every half-step is ``relax_fixed_``, and the m bits each
half-step drops are kept on a :class:`RemainderTape`: the forward pushes one slot per half-step, the
backward pops them in reverse order, so ``unrelax_fixed_`` gives back the previous state exactly.

Problems (NaN/Inf or out-of-range values) never reach the states: the kernels leave such elements
unchanged and OR a flag into a status row, one int32 per step, with no host sync. The solver's
:class:`~revdeq_kernels.solver.info.SolverInfo` reads the rows when it synchronises anyway and raises
:class:`~revdeq_kernels.exact.ExactModeError` naming the pass and the step
(:func:`status_error`).
"""

import bisect
import math

import torch

from .. import exact
from ..ops.bound import BoundOps
from .layout import StateLayout
from .step_rows import StepRows

# A status bit of the solver's own, beside exact.FixedStatus (which uses the low 4 bits): z0
# held values that fixed point cannot represent. Only row 0 of the forward's status carries it.
Z0_NOT_REPRESENTABLE = 1 << 16


class RemainderTape:
    """The remainder bits of the forward's half-steps: pushed by the forward, popped by the backward.

    Storage is a list of chunks from :func:`~revdeq_kernels.exact.remainder_buffer`, int32 of
    shape ``(half_steps, m, ceil(numel / 32))``. With a known number of half-steps (``tol=None``) the
    first chunk holds them all; otherwise chunks are added as needed, each doubling the capacity (up
    to ``limit``), and :meth:`trim` copies the used part of a partly used last chunk, so that after
    the forward the tape holds exactly the half-steps taken: m bits per element each, rounded up to
    whole 32-bit words per bit plane. With ``keep=False`` (no backward will run) one slot is reused.

    Example:
        >>> tape = RemainderTape(1000, 4, "cpu", first=8, limit=64)
        >>> slot = tape.push()          # remainder of half-step 0: shape (4, 32)
        >>> tape.trim(); tape.held_bytes
        512
    """

    def __init__(self, numel: int, m: int, device, first: int, limit: int, keep: bool = True, chunks=None):
        self.numel, self.m, self.device = numel, m, device
        self.limit, self.keep = limit, keep
        self.chunks = list(chunks) if chunks is not None else [self._new_chunk(first if keep else 1)]
        self._starts = [0]
        for chunk in self.chunks[:-1]:
            self._starts.append(self._starts[-1] + len(chunk))
        self.used = self.capacity if chunks is not None else 0

    @property
    def capacity(self) -> int:
        return self._starts[-1] + len(self.chunks[-1])

    @property
    def held_bytes(self) -> int:
        """Bytes of remainder memory this tape holds for a backward (0 without ``keep``)."""
        return sum(c.numel() * c.element_size() for c in self.chunks) if self.keep else 0

    def _new_chunk(self, half_steps: int) -> torch.Tensor:
        return exact.remainder_buffer(self.numel, self.m, half_steps, self.device)

    def _slot(self, k: int) -> torch.Tensor:
        i = bisect.bisect_right(self._starts, k) - 1
        return self.chunks[i][k - self._starts[i]]

    def push(self) -> torch.Tensor:
        """The buffer for the next half-step's remainders (the kernel overwrites all of it)."""
        if not self.keep:
            self.used += 1
            return self.chunks[0][0]
        capacity = self.capacity
        if self.used == capacity:
            if capacity >= self.limit:
                raise RuntimeError(f"RemainderTape: all {self.limit} half-steps are in use")
            self._starts.append(capacity)
            self.chunks.append(self._new_chunk(min(capacity, self.limit - capacity)))  # doubles the capacity
        self.used += 1
        return self._slot(self.used - 1)

    def pop(self) -> torch.Tensor:
        """The last pushed half-step's remainders, for its inverse."""
        if not self.keep or self.used == 0:
            raise RuntimeError("RemainderTape: no remainders left to pop (the tape did not keep them, or the "
                               "backward ran more half-steps than the forward)")
        self.used -= 1
        return self._slot(self.used)

    def trim(self) -> None:
        """Drop the capacity past the used half-steps, so :attr:`held_bytes` is what the steps cost."""
        if not self.keep or self.used == self.capacity:
            return
        while len(self.chunks) > 1 and self._starts[-1] >= self.used:
            self.chunks.pop()
            self._starts.pop()
        last = self.used - self._starts[-1]
        self.chunks[-1] = self.chunks[-1][:last].clone()  # a copy: a view would keep the whole chunk alive


# frac_bits="auto": the largest value seen at the start may grow this many bits before leaving the range.
HEADROOM_BITS = 6


def choose_frac_bits(largest: float) -> int:
    """F for a solve whose start and f(start) are at most ``largest`` in magnitude: as many fractional bits
    as leave 2^HEADROOM_BITS of growth inside the range ``|x| <= 2^(53 - F)``, in [0, 52]. Small values get a
    fine resolution (a graph network's states of 1e-3 get F = 52, where the default F = 32 resolved them to
    2e-7 relative), large ones a wide range."""
    if not math.isfinite(largest) or largest <= 0.0:
        return exact.MAX_FRAC_BITS if largest == 0.0 else exact.DEFAULT_FRAC_BITS  # NaN/Inf: f raises later
    top = math.frexp(largest)[1]  # largest < 2^top
    return max(0, min(exact.MAX_FRAC_BITS, 53 - HEADROOM_BITS - top))


def quantize(x: torch.Tensor, frac_bits: int, status: torch.Tensor | None = None) -> torch.Tensor:
    """``round(x * 2^F)`` as int64 without a host sync; elements that cannot be represented become 0.

    Bit-identical to :func:`~revdeq_kernels.exact.to_fixed` where that succeeds. Where it would
    raise (NaN/Inf, ``|x| > 2^(53 - F)``), this ORs :data:`Z0_NOT_REPRESENTABLE` into ``status``.
    """
    scaled = x.detach().to(torch.float64) * math.ldexp(1.0, frac_bits)  # exact: a power of two
    bad = ~(scaled.abs() <= exact.LIMIT)  # NaN compares False, so it is bad too
    if status is not None:
        status.bitwise_or_(bad.any().to(torch.int32) * Z0_NOT_REPRESENTABLE)
    return torch.where(bad, 0.0, scaled).round().to(torch.int64)


class FixedStates:
    """The two RevDEQ states as int64 fixed point, updated by ``relax_fixed_`` / ``unrelax_fixed_``.

    Args:
        y, z: int64 state buffers with ``frac_bits`` fractional bits laid out by ``layout``; owned and
            updated in place. A tuple state is one flat buffer per state: the single-tensor fixed ops
            update all members at once, from ``f``'s outputs gathered into one flat tensor (one copy).
        layout: the state's :class:`~revdeq_kernels.solver.layout.StateLayout`; ``f`` sees each member as
            :func:`~revdeq_kernels.exact.from_fixed` in its compute dtype, so the same state
            always gives ``f`` the same bits.
        beta: a :class:`~revdeq_kernels.exact.DyadicBeta` p / 2^m.
        frac_bits: F, in [0, 52].
        remainders: the :class:`RemainderTape` of this solve.
        status: int32, shape (steps + 1,): row n collects the flags of step n's half-steps (forward or
            backward) and, in the forward, of step n's f(z); row 0 of the forward's flags a z0 or an
            f(z0) that cannot be represented.
        backend: as for :func:`revdeq_kernels.relax_fixed_`.
        forward: True for the forward's states, False for the backward's.

    Example:
        >>> layout = StateLayout(torch.Tensor, [(4, 8)], [torch.float32], "cpu")
        >>> s = FixedStates.start(None, layout, exact.DyadicBeta(13, 4), 32, None, 10, 10)
        >>> s.relax_("y", torch.randn(4, 8)); s.show("y").dtype, s.y.dtype
        (torch.float32, torch.int64)
    """

    residual_dtype = torch.float64  # the tolerance check runs on the float64 value of the state

    def __init__(self, y, z, layout: StateLayout, beta: exact.DyadicBeta, frac_bits: int, remainders: RemainderTape,
                 status: torch.Tensor, backend, forward: bool):
        self.y, self.z = y, z
        self.layout = layout
        self.beta, self.frac_bits = beta, frac_bits
        self.remainders, self.status = remainders, status
        self.backend = backend
        self.ops = BoundOps(y.device, backend)  # resolved once: no per-call checks or lookup (ops/bound.py)
        self.forward = forward
        self._values, self._fresh = {}, set()  # which -> (float64 value, members); the states it is current for
        self._shown = {}  # which -> (compute-dtype buffer, its members): show's reused casts
        self._f_range_flag = int(exact.FixedStatus.F_OUT_OF_RANGE)
        self._range_buffers = {}  # f's dtype -> the range check's kept scalars

    @classmethod
    def start(cls, start, layout: StateLayout, beta, frac_bits, backend, max_steps, first_steps,
              grow_status: bool = False) -> "FixedStates":
        """Both states at ``quantize(start)`` (a structured value like z0; None means zeros); room for
        ``first_steps`` steps of remainders to begin with, growing up to ``max_steps``
        (``first_steps=None``: keep none, no backward will run). ``grow_status``: the status rows grow with
        the steps taken (a tolerance may stop early) instead of being allocated for max_steps at once."""
        device = layout.device
        status = StepRows(max_steps, (), torch.int32, device, grow=grow_status, zeros=True)
        y = layout.zeros(torch.int64)
        if start is not None:
            y.copy_(quantize(layout.gather(start, torch.float64), frac_bits, status[0:1]))
        keep = first_steps is not None
        tape = RemainderTape(y.numel(), beta.m, device, 2 * (first_steps or 1), 2 * max_steps, keep=keep)
        return cls(y, y.clone(), layout, beta, frac_bits, tape, status, backend, forward=True)

    def finish_forward(self) -> None:
        self.remainders.trim()

    def saved(self) -> tuple:
        """The final states and the remainder chunks: all the backward needs to rebuild every state."""
        return (self.y, self.z, *self.remainders.chunks)

    @classmethod
    def from_saved(cls, saved, layout: StateLayout, beta, frac_bits, backend, steps: int) -> "FixedStates":
        """The states again from :meth:`saved`, with a fresh status for the backward's ``steps`` steps."""
        y, z, *chunks = saved
        tape = RemainderTape(y.numel(), beta.m, y.device, 0, 2 * steps, chunks=chunks)
        status = torch.zeros(steps + 1, dtype=torch.int32, device=y.device)
        return cls(y, z, layout, beta, frac_bits, tape, status, backend, forward=False)

    def show(self, which: str):
        """The state as f sees it: its value, rounded once to each member's compute dtype.

        The value goes through float64 exactly, so rounding it to a member's dtype afterwards gives the
        bits :func:`~revdeq_kernels.exact.from_fixed` would give for that member alone. With one compute
        dtype the rounding goes into a buffer kept per state (as for float states: what f saw is used only
        until the next show of that state)."""
        layout = self.layout
        dtype = layout.common_dtype
        if dtype is None or dtype == torch.float64:
            return layout.cast(self._value(which))
        cast, members = layout.kept_buffer(self._shown, which, dtype)
        if which == "z" or dtype != torch.float32:
            cast.copy_(self._value(which))  # z's float64 value is needed anyway, for the residual
        else:
            # y's float64 value is never needed: int64 -> float32 rounds once (|state| <= 2^53 converts
            # exactly through float64 too), and the power of two 2^-F scales without rounding (the smallest
            # value, 2^-52, is a normal float32), so these are the bits of the float64 route, in two passes
            # over 12 bytes per element instead of three over 44.
            cast.copy_(self.y).mul_(math.ldexp(1.0, -self.frac_bits))
        return members

    def show_for_grad(self, which: str):
        return self.layout.leaves(self.show(which))

    recomputes_first_step = False  # every state is reconstructed bit for bit: nothing to recompute

    def _status_row(self, half_step: int) -> torch.Tensor:
        step = half_step // 2 + 1  # half-steps 2n-2 (y) and 2n-1 (z) make up step n
        return self.status[step:step + 1]

    def _f_values(self, f_val) -> torch.Tensor:
        """f's output shaped like a state buffer (a tuple's members gathered into one flat tensor)."""
        return self.layout.flat(f_val)

    def relax_(self, which: str, f_val) -> None:
        self._fresh.discard(which)
        half_step = self.remainders.used
        self.ops.relax_fixed_(getattr(self, which), self._f_values(f_val), self.beta, self.remainders.push(),
                              self.frac_bits, self._status_row(half_step))

    def unrelax_(self, which: str, f_val) -> None:
        self._fresh.discard(which)
        remainder = self.remainders.pop()
        self.ops.unrelax_fixed_(getattr(self, which), self._f_values(f_val), self.beta, remainder, self.frac_bits,
                                self._status_row(self.remainders.used))

    def _value(self, which: str) -> torch.Tensor:
        """The state's exact float64 value, in a buffer kept per state and refreshed only after the state
        changed: the forward's f(z) and residual, and the backward's, read the same z."""
        value, _ = self.layout.kept_buffer(self._values, which, torch.float64)
        if which not in self._fresh:
            value.copy_(getattr(self, which)).mul_(math.ldexp(1.0, -self.frac_bits))  # exact: |state| <= 2^53
            self._fresh.add(which)
        return value

    def residual_into(self, fz, out: torch.Tensor) -> None:
        """[||z - fz||^2, ||fz||^2] over all members in float64 into ``out``, with z's exact float64 value.

        In the forward it also flags an ``fz`` outside the range in the row of the step that evaluated
        it (the next step's relaxation would flag it only there), as a non-finite ``fz`` shows in the
        residual of that step. A tuple state is summed member by member (one multi-tensor call), so
        this needs no gathered copy of ``fz``."""
        layout = self.layout
        members = [m.detach() for m in layout.split(fz) if m.numel()]
        if self.forward and members:
            step = self.remainders.used // 2  # called after the step's two half-steps (0: f(z0))
            self.status.data.select(0, step).bitwise_or_(self._f_range_flags(members))
        self.ops.residual_into(layout.members(self._value("z")), layout.detach(fz), out)

    def _f_range_flags(self, members) -> torch.Tensor:
        """F_OUT_OF_RANGE (int32, 0-dim) if a finite value of f is beyond the range, else 0; with one member,
        into buffers kept per dtype (no allocation per step)."""
        # |f| * 2^F > LIMIT, as |f| > 2^(53 - F): a power of two, so the comparison is exact in f's own dtype
        # (no cast per step); NaN and Inf compare False here (the residual shows them).
        threshold = math.ldexp(float(exact.LIMIT), -self.frac_bits)
        if len(members) > 1:
            largest = torch.stack([m.abs().amax().to(torch.float64) for m in members]).amax()
            too_big = (largest > threshold) & (largest != math.inf)
            return too_big.to(torch.int32).mul_(self._f_range_flag)
        m = members[0]
        kept = self._range_buffers.get(m.dtype)
        if kept is None:
            kept = self._range_buffers[m.dtype] = (
                m.new_empty(()), torch.empty((), dtype=torch.bool, device=m.device),
                torch.empty((), dtype=torch.bool, device=m.device),
                torch.tensor(self._f_range_flag, dtype=torch.int32, device=m.device),
                torch.zeros((), dtype=torch.int32, device=m.device),
                torch.empty((), dtype=torch.int32, device=m.device))
        largest, too_big, finite, flag, zero, flags = kept
        torch.linalg.vector_norm(m, ord=math.inf, out=largest)  # max |f|, without an |f| temporary
        torch.gt(largest, threshold, out=too_big)
        torch.ne(largest, math.inf, out=finite)
        too_big.logical_and_(finite)
        return torch.where(too_big, flag, zero, out=flags)

    def output(self):
        """z's value in the compute dtypes, each member a fresh tensor of its own."""
        layout = self.layout
        return layout.join([exact.from_fixed(m, self.frac_bits, d)
                            for m, d in zip(layout.split(layout.members(self.z)), layout.compute_dtypes)])

    def scale(self, start) -> torch.Tensor:
        """max(|z|, |start|) over all members in float64 as a device scalar."""
        scale = self._value("z").abs().amax() if self.z.numel() else torch.zeros((), dtype=torch.float64,
                                                                                 device=self.z.device)
        if start is not None and self.z.numel():
            scale = torch.maximum(scale, self.layout.gather(start, torch.float64).abs().amax())
        return scale

    def distance_to(self, start) -> torch.Tensor:
        """max |state - start| over both states in float64, from the exact integer difference with the
        forward's start (``quantize(start)``): exactly 0 when the reconstruction is bit-exact."""
        if self.z.numel() == 0:
            return torch.zeros((), dtype=torch.float64, device=self.z.device)
        s = (quantize(self.layout.gather(start, torch.float64), self.frac_bits) if start is not None
             else torch.zeros_like(self.z))
        d = torch.maximum((self.y - s).abs().amax(), (self.z - s).abs().amax())
        return d.to(torch.float64) * math.ldexp(1.0, -self.frac_bits)

    def facts(self, steps: int) -> dict:
        """What exact mode used and what it cost, for :class:`~revdeq_kernels.solver.info.SolverInfo`."""
        return {"beta": self.beta.value, "dyadic_beta": self.beta, "frac_bits": self.frac_bits,
                "remainder_bytes": self.remainders.held_bytes,
                "stored_states_bytes": exact.state_bytes(self.z.numel(), 2 * steps)}


def status_error(caller: str, where: str, code: int, frac_bits: int) -> exact.ExactModeError:
    """The error for a status row with flags ``code``; ``where`` names the pass and the step."""
    flags = exact.FixedStatus(code & 0xF)
    limit = (f"the range |x| <= 2^{53 - frac_bits} = {exact.value_range(frac_bits):.6g} that "
             f"frac_bits={frac_bits} represents")
    parts = []
    if code & Z0_NOT_REPRESENTABLE:
        parts.append(f"z0 holds NaN, Inf or values outside {limit}")
    if flags & exact.FixedStatus.F_NOT_FINITE:
        parts.append("f returned NaN or Inf, which fixed point cannot represent")
    if flags & exact.FixedStatus.F_OUT_OF_RANGE:
        parts.append(f"f returned values outside {limit}")
    if flags & exact.FixedStatus.STATE_OUT_OF_RANGE:
        parts.append(f"a state would leave {limit} (beta > 1 amplifies the states)")
    if flags & exact.FixedStatus.INVERSE_MISMATCH:
        parts.append("f did not return the bits it returned in the forward pass for the same state, so the "
                     "states cannot be reconstructed: exact mode needs a deterministic f (dropout is replayed, "
                     "but nondeterministic kernels, e.g. ones using atomics, break it)")
    advice = ""
    if code & (Z0_NOT_REPRESENTABLE | exact.FixedStatus.F_OUT_OF_RANGE | exact.FixedStatus.STATE_OUT_OF_RANGE):
        advice = (f"; pass a smaller frac_bits to widen the range (each bit fewer doubles it and doubles the "
                  f"resolution 2^-{frac_bits})")
    return exact.ExactModeError(f"{caller}: exact mode, {where}: {'; '.join(parts)}{advice}")
