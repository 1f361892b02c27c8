"""The reversible RevDEQ solver, built only on the fused ops (:mod:`revdeq_kernels.ops`).

    reversible_fixed_point(f, x, ...)   the public function; solve() is the same with validated options

The modules, from the top: function.py (the one torch.autograd.Function), loop.py (the forward
iteration and the reversible backward, DESIGN section 1), problem.py (f, its inputs and the checks on
its outputs and graph), options.py; the state representations states.py (float) and exact_states.py
(int64 fixed point with a remainder tape), layout.py (tuple states), rng.py (RNG replay), info.py
(SolverInfo, DriftError), step_rows.py (per-step rows) and fsdp.py (FSDP2 on f). The kernels are called
through ops.bound (resolved once per solve). Imports point downward: nothing here is imported by ops/,
backends/ or exact/.
"""

import dataclasses

import torch

from . import exact_states, loop
from .fsdp import FsdpBridge, sharded_modules
from .function import ReversibleFixedPoint
from .info import DriftError, SolverInfo
from .options import SolverOptions
from .problem import Problem, params_of, state_layout, x_tensors

__all__ = ["DriftError", "SolverInfo", "SolverOptions", "reversible_fixed_point", "solve"]


def start_scale(problem: Problem, x, z0) -> float:
    """max(|z0|, |f(z0)|) over every member, for frac_bits="auto" (one extra evaluation of f, one host read).

    f is evaluated without grad and with the RNG states put back afterwards, so the solve's own evaluations
    (and any dropout masks they draw) are those it would have had without this one."""
    layout = problem.layout
    start = layout.start_buffer(z0, torch.float64)
    devices = [problem.device.index or 0] if problem.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        fz = problem.evaluate(layout.cast(start), x, "forward pass, evaluating f(z0) to choose frac_bits")
    largest = [start.abs().amax()] if start.numel() else []
    largest += [t.detach().abs().amax().to(torch.float64) for t in layout.split(fz) if t.numel()]
    return torch.stack(largest).amax().item() if largest else 0.0


# torch.compile graph-breaks once here by design: the solver is host-controlled (its loop length, checks and
# messages depend on values), and tracing into it recompiled at every step. f runs as given: pass
# torch.compile(f) to compile it (RevDEQ(torch.compile(cell)) or reversible_fixed_point(torch.compile(f), x)).
@torch.compiler.disable
def solve(f, x, *, z0=None, params=None, options: SolverOptions, caller: str = "reversible_fixed_point"):
    """:func:`reversible_fixed_point` with validated options (RevDEQ calls this with its own)."""
    if not callable(f):
        raise TypeError(f"{caller}: f must be callable as f(z, x), got {type(f).__name__}")
    sharded = sharded_modules(f)
    fsdp = FsdpBridge(f, sharded) if sharded else None  # reshards them first: f's parameters are the shards
    x_kind, inputs = x_tensors(caller, x)
    layout = state_layout(caller, inputs, z0, options)
    params = params_of(caller, f, params, inputs)
    # A closure, and a Module too (a tensor attribute that requires grad, an encoder's output stored
    # on it), may use tensors that require grad but are not among the inputs: they would get no gradient.
    check_closures = torch.is_grad_enabled()
    problem = Problem(caller, f, x_kind, len(inputs), layout, z0 is None, options, check_closures, fsdp)
    scale = None
    if options.auto_frac_bits:
        scale = start_scale(problem, x, z0)
        options = dataclasses.replace(options, frac_bits=exact_states.choose_frac_bits(scale))
        problem.options = options
    info = SolverInfo(caller, options)
    if scale is not None:
        info.add_facts({"exact_scale": scale})
    starts = layout.split(z0) if z0 is not None else [None]
    tensors = [*inputs, *params]
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in [*starts, *tensors])
    if wants_grad:
        z = ReversibleFixedPoint.apply(problem, info, *starts, *tensors)
    else:
        declared = [] if problem.check_closures else None
        start = None if z0 is None else layout.join(starts)
        with torch.no_grad():
            result = loop.forward(problem, info, x, inputs, start, declared, keep_rng=False)
        z = result.states.output()
    return (layout.pack(layout.split(z)) if layout.is_tuple else z), info


def reversible_fixed_point(f, x, *, z0=None, beta=0.8, max_steps=30, tol=1e-3, params=None, check_every=1,
                           state_dtype=torch.float64, max_drift=None, backend=None, exact=False, frac_bits=None,
                           stop_mode="rel"):
    """Solve ``z = f(z, x)`` with the reversible RevDEQ iteration; exact gradients in O(1) memory.

    Runs ``y = (1-beta) y + beta f(z, x); z = (1-beta) z + beta f(y, x)`` from ``y = z = z0`` until
    ``||z - f(z)|| / ||f(z)|| <= tol`` or ``max_steps``. The backward inverts the iteration in place
    and returns the gradient of the unrolled loop (the same steps) exactly, without storing any
    activation of ``f``: memory does not grow with the number of steps.

    Args:
        f: callable ``f(z, x) -> Tensor`` shaped like ``z``, e.g. an ``nn.Module``; for a tuple state
            (below) ``z`` is a tuple and ``f`` returns a tuple (or list) of as many tensors. It may use
            dropout (each evaluation's RNG state is replayed in the backward; an f that draws no random
            numbers in its first call is taken to draw none, and one that starts later raises) and BatchNorm-style
            buffers (restored after the backward's re-evaluations when ``f`` is an ``nn.Module``). An
            ``nn.Module`` ``f`` may be sharded with FSDP2 (``fully_shard`` on it or on modules inside it): its
            sharded parameters get FSDP2's gradients (averaged over the ranks; solver/fsdp.py).
        x: a tensor or a tuple of tensors, passed to ``f`` as given. Gradients flow to each tensor that
            requires grad.
        z0: the start: a tensor, or a tuple (or list) of tensors for a tuple state; None for zeros
            shaped like x (its first tensor if x is a tuple), which is always a single-tensor state:
            pass z0 when ``f``'s state has another shape or several tensors. Gradients flow to z0, or
            to each member of it, that requires grad.
        beta: relaxation in (0, 2), not 1. The inverse amplifies rounding by ``1/|1-beta|`` per
            half-step, so beta near 0.5 reconstructs best (exact mode has no rounding to amplify).
        max_steps: at most this many steps (each evaluates ``f`` twice); at least one is taken.
        tol: stop once the relative residual is at most ``tol``; ``None`` runs exactly ``max_steps``
            steps with no host synchronisation at all in forward or backward.
        params: the tensors ``f`` uses that should get gradients; default: ``f.parameters()`` when
            ``f`` is an ``nn.Module``. A closure passes the tensors it uses; a closure that hides a
            tensor requiring grad gets a clear error instead of a silently missing gradient.
        check_every: with a ``tol``, read the residual back (one sync) every this many steps.
        stop_mode: ``"rel"`` (default) stops on the relative residual above; ``"abs"`` once
            ``||z - f(z)|| <= tol``, the norm over the whole state (every sample's own norm is then below
            ``tol`` too: torchdeq's ``f_stop_mode="abs"``, met conservatively).
        state_dtype: ``torch.float64`` (default; gradients stay exact for far more steps) or
            ``torch.float32`` (faster, drifts after 8-16 steps). It must hold the compute dtype. In
            exact mode it is the dtype of the adjoint states (the backward's ``beta * dL/dz``).
        max_drift: raise :class:`~revdeq_kernels.DriftError` from inside the backward when its
            reconstructed start is further than this (relative) from the true one (one host sync, also
            with ``tol=None``); None warns above 0.1 (rate-limited: occurrences 1, 2, 4, 8, ...).
        backend: the backend of the fused ops (``None``/``"auto"``, ``"cuda"``, ``"triton"``,
            ``"cpp"``, ``"reference"``).
        exact: exact mode (see below).
        frac_bits: exact mode's fractional bits F, an int in [0, 52]; default
            ``exact.DEFAULT_FRAC_BITS`` = 32 (range ``|value| <= 2^21``, resolution 2^-32). ``"auto"``
            chooses F per solve from ``M = max(|z0|, |f(z0)|)``: the finest resolution that leaves the
            values 64x room to grow (``F = 47 - ceil(log2 M)``, in [0, 52]), reported in
            ``info["frac_bits"]`` with ``info["exact_scale"]`` = M. It costs one more evaluation of f
            and one host read per solve; small-valued states (1e-3) get F = 52 instead of 32.

    Exact mode (``exact=True``): the states are int64 fixed point, ``Y = round(value * 2^F)``, and every
    half-step ``Y <- ((2^m - p) Y + p round(f * 2^F)) >> m`` keeps the m bits the shift drops, so the
    backward undoes each half-step bit for bit (:mod:`revdeq_kernels.exact`). The reconstructed
    start equals the forward's start exactly at any depth and any beta: ``info["drift"]`` is 0.0, and
    the gradient is that of the iteration the forward ran, where float states drift to garbage after
    tens of steps (worst for beta far from 0.5). Details:

    - beta must be dyadic, p / 2^m with m <= 8: a float is rounded to the nearest one (0.8125 is 13/16,
      0.8 becomes 205/256); a ``(p, m)`` pair is taken as given. The effective value is in
      ``info["beta"]`` and ``info["dyadic_beta"]`` (p, m), and the backward uses it too.
    - Memory: the remainders cost m bits per element per half-step (13/16: 4 bits, 1/2: 1 bit, 205/256:
      8 bits), against 64 bits per element per half-step for storing the states; both are reported in
      ``info["remainder_bytes"]`` and ``info["stored_states_bytes"]``. With ``tol=None`` they are
      allocated at once for ``max_steps``; with a tolerance they grow (doubling) as the steps go, and
      what is kept for the backward is exactly the steps taken. Without a backward (no grad) one
      half-step's worth is reused.
    - ``f`` sees the state's value rounded once to the compute dtype (the same state always gives the
      same input), and its output is rounded to a multiple of 2^-F. ``f`` must return the same bits for
      the same input in the backward as in the forward (dropout is replayed; nondeterministic kernels
      break it, and the backward then raises or the drift is not 0).
    - z0 is rounded to a multiple of 2^-F; its gradient treats that rounding as the identity.
    - The adjoints stay floating point, in ``state_dtype``; the tolerance check uses the float64 value
      of the state.
    - NaN/Inf from ``f``, and values of ``f``, ``z0`` or the states outside ``|value| <= 2^(53 - F)``,
      raise :class:`~revdeq_kernels.ExactModeError` naming the pass and step (same
      moments as the non-finite checks: inside the passes with a ``tol``, when ``info`` is read
      with ``tol=None``); such values never reach the integer states.

    Dtypes: ``f`` sees the state cast to the compute dtype (z0's dtype when given, else the first
    floating tensor of x, else the default dtype) and must return that dtype, or a less precise one
    under ``torch.autocast``. ``z`` is returned in the compute dtype.

    Tuple states (multiscale DEQs): ``z0=(z0_a, z0_b, ...)`` (a tuple or list of tensors, any shapes,
    one device) makes the state that tuple; ``f`` receives it in z0's container and returns as many
    tensors, each shaped like its z0 member and in that member's dtype (each member has its own compute
    dtype). ``z`` comes back in the same container, each member differentiable on its own. The two
    states and the backward's adjoints are one flat buffer each, with the members as views, so every
    update of all members is one fused multi-tensor op call (one kernel launch on CUDA, one per 8
    members on Triton, one parallel loop on C++ CPU; the reference backend loops in Python). The
    residual and the drift are taken over all members together. Exact mode keeps one flat int64
    buffer and gathers ``f``'s outputs into one tensor per half-step (one copy). Errors name the member
    (``f (forward pass, step 3) returned shape (4, 8) as output [1] but z0[1] has shape (4, 9)``).

    Returns:
        ``(z, info)``: ``z`` shaped like the state (for a tuple state, z0's container of tensors shaped
        like its members); ``info`` a :class:`~revdeq_kernels.solver.info.SolverInfo`
        with ``"steps"``, ``"residual"`` and, after backward, ``"drift"``. Non-finite values from ``f``
        raise ``FloatingPointError`` naming the pass and step: inside the pass when ``tol`` is set,
        when ``info`` is read when ``tol=None``.

    Double backward is not supported: ``torch.autograd.grad(..., create_graph=True)`` through the solve raises
    at that call. ``f`` must not modify its arguments in place (it raises, naming the pass and step), and a
    Module ``f`` must own (as parameters) or receive (in ``x``) every tensor it uses that requires grad.

    Example:
        >>> f = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh())
        >>> cell = lambda z, x: f(z) + x
        >>> x = torch.randn(8, 16, requires_grad=True)
        >>> z, info = reversible_fixed_point(cell, x, params=list(f.parameters()))
        >>> z.square().sum().backward(); info["steps"], info["drift"]

        Exact mode, 200 steps at beta = 13/16 with float32 f (float states could not reverse this):

        >>> x = torch.randn(8, 16, requires_grad=True)
        >>> z, info = reversible_fixed_point(cell, x, params=list(f.parameters()), beta=0.8125, max_steps=200,
        ...                                  tol=None, exact=True)
        >>> z.square().sum().backward()
        >>> info["drift"], info["dyadic_beta"], info["remainder_bytes"], info["stored_states_bytes"]
        (0.0, DyadicBeta(p=13, m=4), 25600, 409600)

        A tuple state: a fine and a coarse resolution that drive each other:

        >>> fine, coarse = torch.nn.Linear(16, 16), torch.nn.Linear(8, 8)
        >>> def two_scale(z, x):
        ...     up = z[1].repeat_interleave(2, dim=1)
        ...     return (torch.tanh(0.5 * fine(z[0]) + 0.3 * up + x),
        ...             torch.tanh(0.5 * coarse(z[1]) + 0.3 * z[0][:, ::2]))
        >>> z0 = (torch.zeros(8, 16), torch.zeros(8, 8))
        >>> (z_fine, z_coarse), info = reversible_fixed_point(
        ...     two_scale, x, z0=z0, beta=0.5, params=[*fine.parameters(), *coarse.parameters()])
        >>> (z_fine.sum() + z_coarse.sum()).backward()
    """
    options = SolverOptions.make("reversible_fixed_point", beta=beta, max_steps=max_steps, tol=tol,
                                 check_every=check_every, state_dtype=state_dtype, max_drift=max_drift,
                                 backend=backend, exact=exact, frac_bits=frac_bits, stop_mode=stop_mode)
    return solve(f, x, z0=z0, params=params, options=options)
