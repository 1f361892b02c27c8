"""Estimates of ``df/dz`` at a point from vector-Jacobian products: the Jacobian penalty and the
spectral radius.

A DEQ trains stably while its layer stays a contraction near the equilibrium. Two numbers say how
close it is to losing that, both computed from one evaluation of ``f`` with graph and a few VJPs,
never from the Jacobian itself (it has ``z.numel()**2`` entries):

- :func:`jacobian_penalty`: Hutchinson's estimate of ``||df/dz||_F^2 / z.numel()``, differentiable
  with respect to ``f``'s parameters, to add to the loss (Bai, Koltun & Kolter, "Stabilizing
  Equilibrium Models by Jacobian Regularization", ICML 2021).
- :func:`spectral_radius`: ``max |eigenvalue(df/dz)|`` by Arnoldi's method on ``(df/dz)^T``: the
  Krylov subspace that power iteration walks through, with the estimate taken from all of it rather
  than its last vector: the same products give a better estimate, and a complex-conjugate pair of
  dominant eigenvalues, where power iteration never settles, is found exactly.

:class:`~revdeq_kernels.RevDEQ` computes both at its returned equilibrium on request
(``jac_reg=``, ``spectral_radius=``) and puts them in its ``info``. Imports only the dtype rules of ops/.
"""

import contextlib
import numbers

import torch

from .ops.dtypes import FLOAT_DTYPES

DEFAULT_RADIUS_ITERS = 40


def sample_count(caller: str, name: str, value, default: int) -> int:
    """An option that is off (False, None, 0), on (True: ``default``) or a positive count."""
    if value is None or value is False:
        return 0
    if value is True:
        return default
    if not isinstance(value, numbers.Integral):
        raise TypeError(f"{caller}: {name} must be a bool or a number of products (int), got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{caller}: {name} must be False, True or a count >= 1, got {value}")
    return int(value)


class JacobianAt:
    """``df/dz`` at one point, as products with one evaluation of ``f`` that kept its graph.

    Args:
        out: ``f(z_in, x)``, evaluated with grad enabled.
        z_in: the point, a tensor that requires grad (a detached leaf, or ``z`` itself with its history).

    Build it with :meth:`evaluate`. The graph lives as long as this object (and any penalty built
    with ``create_graph=True`` from it).

    Example:
        >>> jac = JacobianAt.evaluate("demo", lambda z, x: torch.tanh(z + x), torch.zeros(3), torch.ones(3))
        >>> jac.vjp(torch.ones(3))  # 1 - tanh(1)^2 in each entry
    """

    def __init__(self, out: torch.Tensor, z_in: torch.Tensor):
        self.out, self.z_in = out, z_in

    @classmethod
    def evaluate(cls, caller: str, f, z, x) -> "JacobianAt":
        """Evaluate ``f(z, x)`` with graph (also under ``torch.no_grad()``) and check what it returns.

        ``z`` keeps its own history when it requires grad; otherwise a detached leaf stands in for it.
        f's buffers (BatchNorm statistics) are left as they were: this evaluation is a measurement, not
        a training update.
        """
        if not callable(f):
            raise TypeError(f"{caller}: f must be callable as f(z, x), got {type(f).__name__}")
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{caller}: z must be a torch.Tensor, got {type(z).__name__}")
        if z.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{caller}: z must have dtype float64, float32, float16 or bfloat16, got {z.dtype}")
        with torch.enable_grad(), _scratch_buffers(f):
            z_in = z if z.requires_grad else z.detach().requires_grad_()
            out = f(z_in, x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{caller}: f(z, x) must return a torch.Tensor, got {type(out).__name__}")
        if out.shape != z.shape:
            raise ValueError(f"{caller}: f(z, x) returned shape {tuple(out.shape)} but z has shape "
                             f"{tuple(z.shape)}; df/dz must be square")
        if out.device != z.device:
            raise ValueError(f"{caller}: f(z, x) returned a tensor on {out.device} but z is on {z.device}")
        if not out.dtype.is_floating_point:
            raise TypeError(f"{caller}: f(z, x) must return a floating tensor, got {out.dtype}")
        return cls(out, z_in)

    @property
    def numel(self) -> int:
        return self.z_in.numel()

    @property
    def accumulate_dtype(self) -> torch.dtype:
        """float64 for a float64 f, float32 otherwise (half-precision products are summed in float32)."""
        return torch.promote_types(self.out.dtype, torch.float32)

    def vjp(self, v: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """``v^T df/dz``, shaped like z (zeros where f does not depend on z)."""
        if not self.out.requires_grad:
            return torch.zeros_like(self.z_in)
        (g,) = torch.autograd.grad(self.out, self.z_in, v.to(self.out.dtype), retain_graph=True,
                                   create_graph=create_graph, allow_unused=True)
        return torch.zeros_like(self.z_in) if g is None else g

    def randn(self, generator) -> torch.Tensor:
        return torch.randn(self.out.shape, generator=generator, device=self.out.device, dtype=self.accumulate_dtype)


@contextlib.contextmanager
def _scratch_buffers(f):
    """Let ``f`` update copies of its buffers, then put the originals back.

    Copying the old values back in place (as the solver's backward does once it is done) would bump
    the buffers' version counters under a graph that still needs them: BatchNorm saves its running
    statistics for backward, and the penalty's graph is differentiated later, by the caller.
    """
    if not isinstance(f, torch.nn.Module):
        yield
        return
    originals = [(m, name, b) for m in f.modules() for name, b in m._buffers.items() if b is not None]
    for m, name, b in originals:
        m._buffers[name] = b.clone()
    try:
        yield
    finally:
        for m, name, b in originals:
            m._buffers[name] = b


def _check_generator(caller: str, generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{caller}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        if device.type == "meta":  # torch has no meta generators; meta tensors draw nothing anyway
            raise ValueError(f"{caller}: generator is on {generator.device} but z is on the meta device, for which "
                             "torch makes no generator; pass generator=None")
        raise ValueError(f"{caller}: generator is on {generator.device} but z is on {device}; make it with "
                         f"torch.Generator(device={str(device)!r})")


def hutchinson(jac: JacobianAt, n_samples: int, generator=None, create_graph: bool = False) -> torch.Tensor:
    """``mean_v ||v^T df/dz||^2 / numel`` over ``n_samples`` Gaussian ``v``: a 0-dim tensor, float64 for a
    float64 f, float32 otherwise; with ``create_graph`` it is differentiable (double backward)."""
    total = torch.zeros((), dtype=jac.accumulate_dtype, device=jac.out.device)
    if jac.numel == 0:
        return total
    for _ in range(n_samples):
        vj = jac.vjp(jac.randn(generator), create_graph=create_graph)
        total = total + vj.to(jac.accumulate_dtype).square().sum()
    return total / (n_samples * jac.numel)


def arnoldi_hessenberg(jac: JacobianAt, iters: int, generator=None) -> torch.Tensor:
    """The ``m x m`` upper Hessenberg matrix ``H = Q^T (df/dz)^T Q`` of ``m = min(iters, numel)`` Arnoldi
    steps on ``(df/dz)^T`` (which has the eigenvalues of ``df/dz``), left on the device: no host sync.

    Each step is one VJP, orthogonalised against the basis twice (classical Gram-Schmidt, repeated:
    once is not enough in floating point). The basis holds ``m + 1`` vectors shaped like z. If the
    Krylov space closes early (an invariant subspace), the next vector is zero or rounding noise; the
    eigenvalues of H stay Ritz values either way, so no step needs to read anything back.
    """
    n, dtype = jac.numel, jac.accumulate_dtype
    m = min(iters, n)
    basis = torch.zeros(m + 1, n, dtype=dtype, device=jac.out.device)
    h = torch.zeros(m + 1, m, dtype=dtype, device=jac.out.device)
    if m == 0:
        return h[:0, :0]
    start = jac.randn(generator).reshape(-1)
    basis[0] = start / start.norm()
    tiny = torch.finfo(dtype).tiny
    shape = jac.z_in.shape
    for j in range(m):
        w = jac.vjp(basis[j].view(shape)).reshape(-1).to(dtype)
        for _ in range(2):
            c = basis[:j + 1] @ w
            w = w - c @ basis[:j + 1]
            h[:j + 1, j] += c
        norm = w.norm()
        h[j + 1, j] = norm
        basis[j + 1] = w / norm.clamp_min(tiny)
    return h[:m, :m]


def radius_of(hessenberg: torch.Tensor) -> float:
    """The largest eigenvalue modulus of the Arnoldi matrix (one host copy); NaN if it is not finite."""
    h = hessenberg.detach().to("cpu", torch.float64)
    if h.numel() == 0:
        return 0.0
    if not torch.isfinite(h).all():
        return float("nan")
    return torch.linalg.eigvals(h).abs().max().item()


def jacobian_penalty(f, z, x, n_samples=1, *, generator=None) -> torch.Tensor:
    """Hutchinson's estimate of ``||df/dz||_F^2 / z.numel()`` at ``z``, to add to a training loss.

    For Gaussian ``v``, ``E ||v^T J||^2 = tr(J J^T) = ||J||_F^2``; the estimate averages ``n_samples``
    draws and divides by ``z.numel()`` (for a batch, the Jacobian is block-diagonal, so this is the
    per-sample squared Frobenius norm divided by the per-sample size, averaged over the batch). Its
    variance is ``2 ||J J^T||_F^2 / (n_samples * numel^2)``, at most ``2 / n_samples`` times its
    squared mean: one sample is noisy, but the noise averages out over training steps (Bai, Koltun &
    Kolter 2021 use one sample per step and find it "adds only minimal computational cost").
    Penalising it keeps ``f`` contractive near the equilibrium, so the forward solve needs fewer steps
    and stays stable as training goes on.

    Cost: one evaluation of ``f`` with graph and ``n_samples`` vector-Jacobian products with
    ``create_graph=True``; the backward of the penalty differentiates them again (double backward),
    so ``f`` must be twice differentiable by autograd. Memory: one graph of ``f`` plus one per sample,
    independent of how many solver steps produced ``z``.

    Args:
        f: callable ``f(z, x)`` returning a tensor shaped like ``z`` (any floating dtype, e.g. under
            autocast). Gradients of the penalty flow to everything ``f`` uses: its parameters and ``x``.
        z: the point, usually the equilibrium, any floating dtype. Pass ``z.detach()`` to hold it fixed
            (as Bai et al. and :class:`~revdeq_kernels.RevDEQ` do); a ``z`` that requires grad is
            differentiated through as well.
        x: passed to ``f`` unchanged (a tensor, a tuple of tensors, anything ``f`` accepts).
        n_samples: the number of Gaussian probe vectors ``v`` (at least 1).
        generator: a ``torch.Generator`` on z's device for ``v`` (default: the global one); with a
            freshly seeded generator the estimate is a deterministic function of ``f``'s parameters.

    Returns:
        A 0-dim tensor: float64 when ``f`` returns float64, float32 otherwise. It carries a graph when
        grad mode is on (the usual case, in training); under ``torch.no_grad()`` it is a plain value.

    Example:
        >>> cell = torch.nn.Linear(16, 16)
        >>> f = lambda z, x: torch.tanh(cell(z) + x)
        >>> z, info = reversible_fixed_point(f, x, params=list(cell.parameters()))
        >>> loss = task_loss(z) + 0.1 * jacobian_penalty(f, z.detach(), x)
        >>> loss.backward()
    """
    caller = "jacobian_penalty"
    n_samples = _positive("jacobian_penalty", "n_samples", n_samples)
    jac = JacobianAt.evaluate(caller, f, z, x)
    _check_generator(caller, generator, jac.out.device)
    return hutchinson(jac, n_samples, generator, create_graph=torch.is_grad_enabled())


def spectral_radius(f, z, x, iters=DEFAULT_RADIUS_ITERS, *, generator=None) -> float:
    """An estimate of the spectral radius ``max |eigenvalue(df/dz)|`` at ``z``: below 1, plain
    fixed-point iteration contracts near ``z``; above 1, it needs the relaxation (or diverges).

    Runs ``min(iters, z.numel())`` Arnoldi steps on ``(df/dz)^T`` with vector-Jacobian products and
    returns the largest Ritz value modulus. With ``iters >= z.numel()`` it is exact up to rounding;
    with fewer it is usually an underestimate that improves with ``iters``. For a batch the Jacobian
    is block-diagonal and the result is the largest radius over its samples; the spectrum is then the
    union of theirs, and a large batch needs more products. Measured on tanh layers: 64 and 128 units
    with batches of 1 to 8 came within 6% at 20 products and 3% at 30; 64 units with a batch of 32
    within 9% at 20 and 0.1% at 40; the 449-sample test set of ``benchmarks/bench_jacobian.py``
    within 5.5% at 20, 1.1% at 40.

    Cost: one evaluation of ``f`` with graph, ``min(iters, numel)`` VJPs, ``min(iters, numel) + 1``
    z-sized vectors of memory, one host copy of an ``iters x iters`` matrix.

    Args:
        f: callable ``f(z, x)`` returning a tensor shaped like ``z``.
        z: the point (any floating dtype; its history is not used).
        x: passed to ``f`` unchanged.
        iters: the number of Arnoldi steps (VJPs), at least 1.
        generator: a ``torch.Generator`` on z's device for the start vector (default: the global one).

    Returns:
        A Python float (NaN when ``f`` or its products are not finite at ``z``).

    Example:
        >>> W = 0.9 * torch.linalg.qr(torch.randn(8, 8))[0]       # an orthogonal matrix, scaled
        >>> spectral_radius(lambda z, x: z @ W.T + x, torch.randn(8), torch.randn(8))  # 0.9, up to rounding
    """
    caller = "spectral_radius"
    iters = _positive(caller, "iters", iters)
    if isinstance(z, torch.Tensor):
        z = z.detach()
    jac = JacobianAt.evaluate(caller, f, z, x)
    _check_generator(caller, generator, jac.out.device)
    return radius_of(arnoldi_hessenberg(jac, iters, generator))


def at_equilibrium(caller: str, f, z, x, *, jac_samples: int, radius_iters: int):
    """What :class:`~revdeq_kernels.RevDEQ` attaches to its info: ``(penalty or None, hessenberg or None)``
    from one shared evaluation of ``f`` at ``z.detach()``."""
    jac = JacobianAt.evaluate(caller, f, z.detach(), x)
    penalty = hutchinson(jac, jac_samples, create_graph=torch.is_grad_enabled()) if jac_samples else None
    hessenberg = arnoldi_hessenberg(jac, radius_iters) if radius_iters else None
    return penalty, hessenberg


def _positive(caller: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{caller}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{caller}: {name} must be at least 1, got {value}")
    return int(value)
