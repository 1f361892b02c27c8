"""The fused ops resolved once per solve: what the solver calls at every step.

The public functions check every argument and look the backend up on each call: about 15 us of Python
on a CPU, where the kernel itself takes 3 us on a small state, and a training step makes about ten such
calls per RevDEQ step. The solver calls them on its own buffers (laid out and typed by it) and on f's
outputs after checking their shape, dtype and device, so those checks can only repeat themselves: a
:class:`BoundOps` resolves the backend once and calls its kernels directly. The compiled kernels still
check their arguments in C++.
"""

import torch

from . import SEQUENCES, _backend_for, _chosen_backend
from .dtypes import multi_residual_dtype, residual_dtype

_UNRESOLVED = object()


class BoundOps:
    """relax_, unrelax_ and residual of one backend for one device, on tensors or member sequences, and exact
    mode's relax_fixed_ and unrelax_fixed_ with a status tensor.

    Args:
        device: the device of every tensor passed.
        backend: as for :func:`revdeq_kernels.relax_`; resolved here, on the first use of each op family
            (a backend named without multi-tensor kernels raises the public ops' error then).
    """

    def __init__(self, device: torch.device, backend: str | None):
        self.device, self.backend = device, backend
        self._kernels = {}
        self._out_kernels = {}

    def _kernel(self, op: str, family: str, name: str):
        kernel = self._kernels.get(name)
        if kernel is None:
            kernel = self._kernels[name] = getattr(_backend_for(op, self.device, self.backend, family), name)
        return kernel

    def relax_(self, state, f_val, beta: float) -> None:
        self._update("relax_", state, f_val, beta)

    def unrelax_(self, state, f_val, beta: float) -> None:
        self._update("unrelax_", state, f_val, beta)

    def _update(self, op: str, state, f_val, beta: float) -> None:
        if isinstance(state, SEQUENCES):
            if any(s.numel() for s in state):
                self._kernel(op, "multi", "multi_" + op)(list(state), list(f_val), beta)
        elif state.numel():
            self._kernel(op, "float", op)(state, f_val, beta)

    def relax_fixed_(self, state, f_val, beta, remainder, frac_bits: int, status) -> None:
        """Exact mode's half-step; ``status`` (int32, one element) collects the flags, never a host sync."""
        if state.numel():
            self._kernel("relax_fixed_", "exact", "relax_fixed_")(state, f_val, remainder, status, beta.p, beta.m,
                                                                  frac_bits)

    def unrelax_fixed_(self, state, f_val, beta, remainder, frac_bits: int, status) -> None:
        if state.numel():
            self._kernel("unrelax_fixed_", "exact", "unrelax_fixed_")(state, f_val, remainder, status, beta.p,
                                                                      beta.m, frac_bits)

    def residual(self, z, fz) -> torch.Tensor:
        """[sum((z - fz)^2), sum(fz^2)], as :func:`revdeq_kernels.residual` returns it."""
        if isinstance(z, SEQUENCES):
            if not any(t.numel() for t in z):
                return torch.zeros(2, dtype=multi_residual_dtype(z), device=self.device)
            return self._kernel("residual", "multi", "multi_residual")(list(z), list(fz))
        if not z.numel():
            return torch.zeros(2, dtype=residual_dtype(z.dtype), device=self.device)
        return self._kernel("residual", "float", "residual")(z, fz)

    def residual_into(self, z, fz, out: torch.Tensor) -> None:
        """:meth:`residual` written into ``out`` (shape (2,), float64 or the residual's dtype: a row of the
        solver's per-step records), allocating nothing where the backend has residual_out_ kernels (C++ CPU,
        reference); elsewhere it is computed and copied."""
        multi = isinstance(z, SEQUENCES)
        kernel = self._out_kernel("multi_residual_out_" if multi else "residual_out_", "multi" if multi else "float")
        if kernel is None or not any(t.numel() for t in (z if multi else (z,))):
            out.copy_(self.residual(z, fz))
        elif multi:
            kernel(list(z), list(fz), out)
        else:
            kernel(z, fz, out)

    def _out_kernel(self, name: str, family: str):
        kernel = self._out_kernels.get(name, _UNRESOLVED)
        if kernel is _UNRESOLVED:
            from ..backends import compiled, reference

            chosen = _chosen_backend("residual", self.device, self.backend, family)
            kernel = None
            if chosen == "reference":
                kernel = getattr(reference, name)
            elif chosen == "cpp" and compiled.has_kernel(name, self.device.type):
                kernel = getattr(torch.ops.revdeq, name)
            self._out_kernels[name] = kernel
        return kernel
