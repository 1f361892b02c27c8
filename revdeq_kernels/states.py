"""FloatStates: how the two RevDEQ states are stored, updated in place and shown to f.

The solver's loops go through this class only, so another representation replaces it without
touching the loops: :class:`~revdeq_kernels.fixed_states.FixedStates` (exact mode: int64 fixed-point
states that keep the low bits each half-step loses) has the same methods.
"""

import torch

from . import ops


class FloatStates:
    """The two RevDEQ states held as contiguous floating tensors of ``state_dtype``.

    This is the seam between the loops and the representation of a state: everything that knows how
    a state is stored, updated in place, and shown to ``f`` (as a cast to ``compute_dtype``) is here.

    Args:
        y, z: state tensors of ``state_dtype`` (float64 or float32), same shape; owned and updated
            in place.
        compute_dtype: the dtype ``f`` sees; ``state_dtype`` must be able to hold it.
        beta, backend: as for :func:`revdeq_kernels.relax_`.

    Example:
        >>> s = FloatStates.start(None, (4, 8), "cpu", torch.float64, torch.float32, 0.8, None)
        >>> s.relax_("y", torch.randn(4, 8)); s.show("y").dtype
        torch.float32
    """

    status = None  # float states have no fixed-point status; non-finite values show in the residuals

    def __init__(self, y, z, compute_dtype, beta, backend):
        self.y, self.z = y, z
        self.compute_dtype = compute_dtype
        self.beta, self.backend = beta, backend

    @classmethod
    def start(cls, start: torch.Tensor | None, shape, device, state_dtype, compute_dtype, beta,
              backend) -> "FloatStates":
        """Both states at ``start`` (None means zeros of ``shape`` on ``device``)."""
        y = torch.zeros(shape, dtype=state_dtype, device=device)
        if start is not None:
            y.copy_(start)
        return cls(y, y.clone(), compute_dtype, beta, backend)

    @property
    def residual_dtype(self) -> torch.dtype:
        """The dtype :meth:`residual` returns."""
        return torch.float64 if self.z.dtype == torch.float64 else torch.float32

    def finish_forward(self) -> None:
        """Called once when the forward loop ends (nothing to tidy up for float states)."""

    def facts(self, steps: int) -> dict:
        """Representation-specific entries for :class:`~revdeq_kernels.info.SolverInfo` (none here)."""
        return {}

    def saved(self) -> tuple:
        """The tensors that must outlive the forward for the backward to start from."""
        return self.y, self.z

    @classmethod
    def from_saved(cls, saved, compute_dtype, beta, backend) -> "FloatStates":
        """The states again from what :meth:`saved` returned (the backward updates them in place)."""
        y, z = saved
        return cls(y, z, compute_dtype, beta, backend)

    def show(self, which: str) -> torch.Tensor:
        """The state as f sees it: a cast to the compute dtype (a detached alias when they agree)."""
        return getattr(self, which).detach().to(self.compute_dtype)

    def show_for_grad(self, which: str) -> torch.Tensor:
        """Like :meth:`show`, as a fresh leaf that requires grad (for one vector-Jacobian product)."""
        return self.show(which).requires_grad_()

    def relax_(self, which: str, f_val: torch.Tensor) -> None:
        ops.relax_(getattr(self, which), f_val.detach(), self.beta, backend=self.backend)

    def unrelax_(self, which: str, f_val: torch.Tensor) -> None:
        ops.unrelax_(getattr(self, which), f_val.detach(), self.beta, backend=self.backend)

    def residual(self, fz: torch.Tensor) -> torch.Tensor:
        """[||z - fz||^2, ||fz||^2] on the device, float64 for float64 states."""
        return ops.residual(self.z, fz.detach(), backend=self.backend)

    def output(self) -> torch.Tensor:
        """z in the compute dtype, as a fresh tensor: the states keep changing in the backward."""
        return self.z.to(self.compute_dtype, copy=True)

    def scale(self, start: torch.Tensor | None) -> torch.Tensor:
        """max(|z|, |start|) as a device scalar (before the backward: |z| is the final state's)."""
        scale = self.z.abs().amax() if self.z.numel() else self.z.new_zeros(())
        if start is not None and start.numel():
            scale = torch.maximum(scale, start.detach().abs().amax().to(scale.dtype))
        return scale

    def distance_to(self, start: torch.Tensor | None) -> torch.Tensor:
        """max |state - start| over both states as a device scalar (start None means zeros)."""
        if self.z.numel() == 0:
            return self.z.new_zeros(())
        if start is None:
            return torch.maximum(self.y.abs().amax(), self.z.abs().amax())
        s = start.detach().to(self.z.dtype)
        return torch.maximum((self.y - s).abs().amax(), (self.z - s).abs().amax())
