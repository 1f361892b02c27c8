"""FloatStates: how the two RevDEQ states are stored, updated in place and shown to f.

The solver's loops go through this class only, so another representation replaces it without
touching the loops: :class:`~revdeq_kernels.solver.exact_states.FixedStates` (exact mode: int64 fixed-point
states that keep the low bits each half-step loses) has the same methods. Both hold a state as one
buffer laid out by a :class:`~revdeq_kernels.solver.layout.StateLayout`, so a tuple state (several tensors)
goes through the same methods as a single tensor: structured values in and out (a tensor, or a tuple
of member tensors), one fused op call per update.
"""

import torch

from ..ops.bound import BoundOps
from ..ops.dtypes import residual_dtype
from .layout import StateLayout


class FloatStates:
    """The two RevDEQ states held as floating buffers of ``state_dtype``.

    This is the seam between the loops and the representation of a state: everything that knows how
    a state is stored, updated in place, and shown to ``f`` (as a cast to its compute dtypes) is here.

    Args:
        y, z: state buffers of ``state_dtype`` (float64 or float32) laid out by ``layout``; owned and
            updated in place. For a tuple state each is one flat buffer and the ops see its members
            as views, so ``relax_``, ``unrelax_`` and ``residual`` are one multi-tensor call each.
        layout: the state's :class:`~revdeq_kernels.solver.layout.StateLayout` (its members' shapes and
            compute dtypes; ``state_dtype`` must be able to hold each compute dtype).
        beta, backend: as for :func:`revdeq_kernels.relax_`.

    Example:
        >>> layout = StateLayout(torch.Tensor, [(4, 8)], [torch.float32], "cpu")
        >>> s = FloatStates.start(None, layout, torch.float64, 0.8, None)
        >>> s.relax_("y", torch.randn(4, 8)); s.show("y").dtype
        torch.float32
    """

    status = None  # float states have no fixed-point status; non-finite values show in the residuals
    recomputes_first_step = True  # the backward recomputes step 1 from the start (loop.backward says why)

    def __init__(self, y, z, layout: StateLayout, beta, backend):
        self.y, self.z = y, z
        self.layout = layout
        self.beta, self.backend = beta, backend
        self.ops = BoundOps(y.device, backend)  # resolved once: no per-call checks or lookup (ops/bound.py)
        self._members = {"y": layout.members(y), "z": layout.members(z)}
        self._shown = {}  # which -> (cast buffer, its members): show's reused casts

    @classmethod
    def start(cls, start, layout: StateLayout, state_dtype, beta, backend) -> "FloatStates":
        """Both states at ``start`` (a structured value like z0; None means zeros)."""
        y = layout.start_buffer(start, state_dtype)
        return cls(y, y.clone(), layout, beta, backend)

    @property
    def residual_dtype(self) -> torch.dtype:
        """The dtype :meth:`residual` returns."""
        return residual_dtype(self.z.dtype)

    def finish_forward(self) -> None:
        """Called once when the forward loop ends (nothing to tidy up for float states)."""

    def facts(self, steps: int) -> dict:
        """Representation-specific entries for :class:`~revdeq_kernels.solver.info.SolverInfo` (none here)."""
        return {}

    def saved(self) -> tuple:
        """The tensors that must outlive the forward for the backward to start from."""
        return self.y, self.z

    @classmethod
    def from_saved(cls, saved, layout: StateLayout, beta, backend) -> "FloatStates":
        """The states again from what :meth:`saved` returned (the backward updates them in place)."""
        y, z = saved
        return cls(y, z, layout, beta, backend)

    def show(self, which: str):
        """The state as f sees it: a cast to the compute dtypes (detached aliases when they agree).

        With one compute dtype other than the state's, the cast goes into a buffer kept per state and
        rewritten at every call (a copy into it, no allocation): what f saw last is overwritten, which is
        safe because each value shown is used only until the next call for the same state."""
        buffer = getattr(self, which)
        dtype = self.layout.common_dtype
        if dtype is None or dtype == buffer.dtype:
            return self.layout.cast(buffer)
        cast, members = self.layout.kept_buffer(self._shown, which, dtype)
        cast.copy_(buffer)
        return members

    def show_for_grad(self, which: str):
        """Like :meth:`show`, each member a fresh leaf that requires grad (for one vector-Jacobian product)."""
        return self.layout.leaves(self.show(which))

    def show_start_for_grad(self, start):
        """The start as f saw it in the forward (z0, or zeros: exactly, z0 is in the compute dtypes), like
        :meth:`show_for_grad`; the backward differentiates f there instead of at z's reconstruction."""
        return self.layout.leaves(self.layout.cast(self.layout.start_buffer(start, self.z.dtype)))

    def first_y_for_grad(self, start, fz):
        """y[1] = relax_(start, f(start)) exactly as the forward computed it (same op, same inputs, same bits),
        like :meth:`show_for_grad`; ``fz`` is f at :meth:`show_start_for_grad`'s value."""
        layout = self.layout
        buffer = layout.start_buffer(start, self.z.dtype)
        self.ops.relax_(layout.members(buffer), layout.detach(fz), self.beta)
        return layout.leaves(layout.cast(buffer))

    def relax_(self, which: str, f_val) -> None:
        self.ops.relax_(self._members[which], self.layout.detach(f_val), self.beta)

    def unrelax_(self, which: str, f_val) -> None:
        self.ops.unrelax_(self._members[which], self.layout.detach(f_val), self.beta)

    def residual_into(self, fz, out: torch.Tensor) -> None:
        """[||z - fz||^2, ||fz||^2] over all members into ``out`` (a (2,) row of float64 or
        :attr:`residual_dtype`) on the device."""
        self.ops.residual_into(self._members["z"], self.layout.detach(fz), out)

    def output(self):
        """z in the compute dtypes, each member a fresh tensor: the states keep changing in the backward."""
        layout = self.layout
        return layout.join([m.to(d, copy=True) for m, d in zip(layout.split(self._members["z"]),
                                                                 layout.compute_dtypes)])

    def scale(self, start) -> torch.Tensor:
        """max(|z|, |start|) over all members as a device scalar (before the backward: |z| is the final
        state's)."""
        scale = self.z.abs().amax() if self.z.numel() else self.z.new_zeros(())
        if start is not None and self.z.numel():
            scale = torch.maximum(scale, self.layout.gather(start, self.z.dtype).abs().amax())
        return scale

    def distance_to(self, start) -> torch.Tensor:
        """max |state - start| over both states and all members as a device scalar (None means zeros)."""
        if self.z.numel() == 0:
            return self.z.new_zeros(())
        if start is None:
            return torch.maximum(self.y.abs().amax(), self.z.abs().amax())
        s = self.layout.gather(start, self.z.dtype)
        return torch.maximum((self.y - s).abs().amax(), (self.z - s).abs().amax())
