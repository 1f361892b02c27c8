"""RevDEQ: an nn.Module that swaps a reversible fixed-point solve in for a stack of layers.

Built on solver/ (and diagnostics.py for its optional Jacobian terms); nothing below imports it.
"""

import torch

from . import diagnostics
from .solver import SolverOptions, solve


class RevDEQ(torch.nn.Module):
    """A deep equilibrium layer: returns ``z`` with ``z = f(z, x)``, solved by the reversible RevDEQ
    iteration with exact gradients in memory that does not grow with ``max_steps``.

    Args:
        f: ``nn.Module`` called as ``f(z, x)`` and returning a tensor shaped like ``z``. Its
            parameters get gradients; its buffers (e.g. BatchNorm statistics) are restored after the
            backward's re-evaluations; dropout inside it is replayed exactly.
        beta, max_steps, tol, check_every, state_dtype, max_drift, backend: as for
            :func:`~revdeq_kernels.reversible_fixed_point`, validated here once.
        exact, frac_bits: exact mode, as for :func:`~revdeq_kernels.reversible_fixed_point`: int64
            fixed-point states that the backward reconstructs bit for bit (drift exactly 0 at any
            depth), beta rounded to the nearest p / 2^m (m <= 8), m bits per element per half-step of
            memory. ``self.options.beta`` and ``info["dyadic_beta"]`` hold the effective beta.
        jac_reg: Jacobian regularisation (Bai, Koltun & Kolter 2021). ``True`` (one probe vector) or a
            number of probe vectors: in training mode each forward also puts
            :func:`~revdeq_kernels.jacobian_penalty` at the returned ``z`` (held fixed) in
            ``self.info["jac_penalty"]``, a differentiable 0-dim tensor to add to the loss,
            ``loss = task_loss + gamma * deq.info["jac_penalty"]``; None in eval mode (not computed).
            Costs one more evaluation of ``f`` with graph and that many double-backward VJPs.
        spectral_radius: ``True`` (40 Arnoldi steps) or a number of steps: each forward also estimates
            ``max |eigenvalue(df/dz)|`` at the returned ``z`` (:func:`~revdeq_kernels.spectral_radius`)
            into ``self.info["spectral_radius"]``; below 1 means f contracts there. Computed on the
            device, read on first access. Costs one evaluation of ``f`` (shared with ``jac_reg``) and
            that many VJPs.

    ``forward(x, z0=None)``: ``x`` a tensor or tuple of tensors, ``z0`` the start (default zeros
    shaped like x's first tensor), or a tuple (or list) of tensors for a tuple state, with ``f``
    returning as many (see :func:`~revdeq_kernels.reversible_fixed_point`). Returns ``z`` in z0's
    dtype (else x's), structured like z0. The last call's :class:`~revdeq_kernels.solver.info.SolverInfo` is
    kept as ``self.info``.

    Example:
        >>> class Cell(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.lin = torch.nn.Linear(64, 64)
        ...     def forward(self, z, x):
        ...         return torch.tanh(self.lin(z) + x)
        >>> deq = RevDEQ(Cell(), beta=0.5, max_steps=20)
        >>> z = deq(torch.randn(32, 64)); deq.info["steps"]

        Exact mode, deep and at an aggressive beta, still with a bit-exact reconstruction:

        >>> deq = RevDEQ(Cell(), beta=0.8125, max_steps=100, tol=None, exact=True)
        >>> deq(torch.randn(32, 64)).sum().backward(); deq.info["drift"], deq.info["remainder_bytes"]
        (0.0, 204800)

        Jacobian regularisation and diagnostics:

        >>> deq = RevDEQ(Cell(), beta=0.5, max_steps=20, jac_reg=True, spectral_radius=True)
        >>> x = torch.randn(32, 64)
        >>> loss = deq(x).square().mean() + 0.5 * deq.info["jac_penalty"]
        >>> deq.info["residual_trace"], deq.info["spectral_radius"]
    """

    def __init__(self, f: torch.nn.Module, beta=0.8, max_steps=30, tol=1e-3, *, check_every=1,
                 state_dtype=torch.float64, max_drift=None, backend=None, exact=False, frac_bits=None,
                 jac_reg=False, spectral_radius=False):
        super().__init__()
        if not isinstance(f, torch.nn.Module):
            raise TypeError(f"RevDEQ: f must be an nn.Module called as f(z, x), got {type(f).__name__}; for a "
                            "plain function use reversible_fixed_point(f, x, params=[...])")
        self.f = f
        self.options = SolverOptions.make("RevDEQ", beta=beta, max_steps=max_steps, tol=tol,
                                          check_every=check_every, state_dtype=state_dtype,
                                          max_drift=max_drift, backend=backend, exact=exact,
                                          frac_bits=frac_bits)
        self.jac_samples = diagnostics.sample_count("RevDEQ", "jac_reg", jac_reg, default=1)
        self.radius_iters = diagnostics.sample_count("RevDEQ", "spectral_radius", spectral_radius,
                                                  default=diagnostics.DEFAULT_RADIUS_ITERS)
        self.info = None

    def forward(self, x, z0=None):
        if isinstance(z0, (tuple, list)) and (self.jac_samples or self.radius_iters):
            raise TypeError(f"RevDEQ: jac_reg and spectral_radius measure df/dz of a single-tensor state, but z0 is a "
                            f"{type(z0).__name__} of {len(z0)} tensors (a tuple state); turn them off for this model, "
                            "or write f on one flat tensor")
        z, info = solve(self.f, x, z0=z0, options=self.options, caller="RevDEQ")
        jac_samples = self.jac_samples if self.training else 0
        penalty = hessenberg = None
        if jac_samples or self.radius_iters:
            penalty, hessenberg = diagnostics.at_equilibrium("RevDEQ", self.f, z, x, jac_samples=jac_samples,
                                                          radius_iters=self.radius_iters)
        if self.jac_samples:
            info.set_diagnostic("jac_penalty", penalty)  # None in eval mode: the key says it is configured
        if hessenberg is not None:
            info.set_diagnostic("spectral_radius", lambda: diagnostics.radius_of(hessenberg))
        self.info = info
        return z

    def extra_repr(self) -> str:
        o = self.options
        text = (f"beta={o.beta}, max_steps={o.max_steps}, tol={o.tol}, check_every={o.check_every}, "
                f"state_dtype={o.state_dtype}")
        if o.exact:
            text += f", exact=True (beta={o.dyadic_beta}), frac_bits={o.frac_bits}"
        if self.jac_samples:
            text += f", jac_reg={self.jac_samples}"
        if self.radius_iters:
            text += f", spectral_radius={self.radius_iters}"
        return text
