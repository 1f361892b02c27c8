"""The torch.autograd.Function that connects the reversible solver (solver.py) to autograd.

One Function runs the whole backward and returns every gradient (it never calls ``.backward()``
inside), so it composes with DistributedDataParallel, ``torch.autograd.grad`` and saved-tensor
hooks. What it saves: the two final states, z0 when given, and its inputs (x and params), never
a graph of ``f``; in exact mode also the remainder bits (m per element per half-step). A tuple state
is one input and one output per member, so each member of z0 and of z gets its own gradient.
"""

import torch
from torch.autograd.function import once_differentiable

from . import solver
from .info import SolverInfo
from .layout import StateLayout
from .solver import Problem, SolverOptions

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class _Autocast:
    """The autocast state of the forward, re-entered by the backward so f is evaluated alike."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type) if self.enabled else None

    def __call__(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


class ReversibleFixedPoint(torch.autograd.Function):
    """``apply(problem, info, *z0_members, *x_tensors, *params) -> z``; see :func:`reversible_fixed_point`.

    ``z0_members``: one entry per member of the state (one, possibly None, for a single tensor); z is a
    tensor for a single-tensor state, else a tuple of one tensor per member."""

    @staticmethod
    def forward(ctx, problem: Problem, info: SolverInfo, *tensors):
        layout = problem.layout
        n_start = len(layout.shapes)
        z0 = None if tensors[0] is None else layout.join(tensors[:n_start])
        tensors = tensors[n_start:]
        x_tensors = tensors[:problem.n_x]
        declared = [t for t in tensors if t.requires_grad] if problem.check_closures else None
        result = solver.forward(problem, info, problem.pack_x(x_tensors), x_tensors, z0, declared)
        ctx.problem, ctx.info = problem, info
        ctx.steps, ctx.tape = result.steps, result.tape
        ctx.autocast = _Autocast(problem.device.type)
        ctx.consumed = False
        saved_states = result.states.saved()
        ctx.n_saved_states = len(saved_states)
        ctx.save_for_backward(*saved_states, *(layout.split(z0) if z0 is not None else [None]), *tensors)
        return result.states.output()

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_z):
        problem = ctx.problem
        if ctx.consumed:
            raise RuntimeError(
                f"{problem.caller}: backward already ran through this solve; it reconstructs the states in place, "
                "so a second backward over the same graph (retain_graph=True) is not supported. Run the solver "
                "again for each backward")
        ctx.consumed = True
        layout = problem.layout
        saved = ctx.saved_tensors
        n, n_start = ctx.n_saved_states, len(layout.shapes)
        starts, tensors = saved[n:n + n_start], saved[n + n_start:]
        z0 = None if starts[0] is None else layout.join(starts)
        x_tensors, params = tensors[:problem.n_x], tensors[problem.n_x:]
        needs = ctx.needs_input_grad[2:]  # after problem and info
        need_x = needs[n_start:n_start + problem.n_x]
        states = solver.restore_states(problem, saved[:n], ctx.steps)
        with ctx.autocast():
            grad_z0, grad_x, grad_params = solver.backward(
                problem, ctx.info, states, ctx.steps, ctx.tape, layout.join(grad_z), z0,
                x_tensors, need_x, params, needs[n_start + problem.n_x:], needs[:n_start])
        ctx.tape = None
        return (None, None, *grad_z0, *grad_x, *grad_params)


def _x_tensors(caller: str, x):
    """(kind, tensors) for x: one tensor, or a tuple/list of tensors."""
    if isinstance(x, torch.Tensor):
        return "tensor", [x]
    if isinstance(x, (tuple, list)):
        for i, t in enumerate(x):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{caller}: x must be a tensor or a tuple of tensors, but x[{i}] is a "
                                f"{type(t).__name__}")
        return type(x), list(x)
    raise TypeError(f"{caller}: x must be a tensor or a tuple of tensors, got {type(x).__name__}")


def _params(caller: str, f, params, x_tensors):
    if params is None:
        params = f.parameters() if isinstance(f, torch.nn.Module) else ()
    elif isinstance(params, torch.Tensor):
        raise TypeError(f"{caller}: params must be an iterable of tensors (e.g. a list), got a single Tensor")
    seen = {id(t) for t in x_tensors}  # a tensor passed twice would get its gradient twice
    unique = []
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{caller}: params must hold tensors, but element {i} is a {type(p).__name__}")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


def _state_layout(caller, x_tensors, z0, options) -> StateLayout:
    """The state's :class:`StateLayout`: from z0 when given (a tensor, or a tuple or list of tensors for
    a tuple state), else one tensor shaped like x's first tensor."""
    if isinstance(z0, (tuple, list)):
        kind, members = type(z0), list(z0)
        if not members:
            raise ValueError(f"{caller}: z0 is an empty {kind.__name__}; a tuple state needs at least one tensor")
        names = [f"z0[{i}]" for i in range(len(members))]
    elif z0 is None or isinstance(z0, torch.Tensor):
        kind, members, names = torch.Tensor, [z0], ["z0"]
    else:
        raise TypeError(f"{caller}: z0 must be a torch.Tensor, a tuple or list of tensors (a tuple state) or None, "
                        f"got {type(z0).__name__}")
    if z0 is None:
        if not x_tensors:
            raise ValueError(f"{caller}: z0 is None and x holds no tensor to take the state's shape from; pass z0")
        floating = [t.dtype for t in x_tensors if t.dtype.is_floating_point]
        compute = floating[0] if floating else torch.get_default_dtype()
        layout = StateLayout(kind, [x_tensors[0].shape], [compute], x_tensors[0].device)
        origin = "z0's dtype, else x's"
    else:
        for name, t in zip(names, members):
            if not isinstance(t, torch.Tensor):
                nested = "; nested structures are not supported: pass one flat tuple" if isinstance(
                    t, (tuple, list)) else ""
                raise TypeError(f"{caller}: {name} must be a torch.Tensor, got {type(t).__name__}{nested}")
            if t.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{caller}: {name} must have dtype float64, float32, float16 or bfloat16, "
                                f"got {t.dtype}")
            if t.device != members[0].device:
                raise ValueError(f"{caller}: {name} is on {t.device} but z0[0] is on {members[0].device}; all members "
                                 "of a tuple state must be on one device")
        layout = StateLayout(kind, [t.shape for t in members], [t.dtype for t in members], members[0].device)
        origin = "z0's dtype" if kind is torch.Tensor else "a dtype of z0's members"
    for compute in layout.compute_dtypes:
        if torch.promote_types(options.state_dtype, compute) != options.state_dtype:
            raise TypeError(f"{caller}: state_dtype {options.state_dtype} cannot hold f's dtype {compute} ({origin}); "
                            "use state_dtype=torch.float64")
    return layout


def solve(f, x, *, z0=None, params=None, options: SolverOptions, caller: str = "reversible_fixed_point"):
    """:func:`reversible_fixed_point` with validated options (RevDEQ calls this with its own)."""
    if not callable(f):
        raise TypeError(f"{caller}: f must be callable as f(z, x), got {type(f).__name__}")
    x_kind, x_tensors = _x_tensors(caller, x)
    layout = _state_layout(caller, x_tensors, z0, options)
    explicit_params = params is not None
    params = _params(caller, f, params, x_tensors)
    # A closure may hide tensors that require grad from us; a Module's own parameters cannot hide.
    check_closures = torch.is_grad_enabled() and (explicit_params or not isinstance(f, torch.nn.Module))
    problem = Problem(caller, f, x_kind, len(x_tensors), layout, z0 is None, options, check_closures)
    info = SolverInfo(caller, options)
    starts = layout.split(z0) if z0 is not None else [None]
    tensors = [*x_tensors, *params]
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in [*starts, *tensors])
    if wants_grad:
        z = ReversibleFixedPoint.apply(problem, info, *starts, *tensors)
    else:
        declared = [] if problem.check_closures else None
        start = None if z0 is None else layout.join(starts)
        with torch.no_grad():
            result = solver.forward(problem, info, x, x_tensors, start, declared, keep_rng=False)
        z = result.states.output()
    return (layout.pack(layout.split(z)) if layout.is_tuple else z), info


def reversible_fixed_point(f, x, *, z0=None, beta=0.8, max_steps=30, tol=1e-3, params=None, check_every=1,
                           state_dtype=torch.float64, max_drift=None, backend=None, exact=False, frac_bits=None):
    """Solve ``z = f(z, x)`` with the reversible RevDEQ iteration; exact gradients in O(1) memory.

    Runs ``y = (1-beta) y + beta f(z, x); z = (1-beta) z + beta f(y, x)`` from ``y = z = z0`` until
    ``||z - f(z)|| / ||f(z)|| <= tol`` or ``max_steps``. The backward inverts the iteration in place
    and returns the gradient of the unrolled loop (the same steps) exactly, without storing any
    activation of ``f``: memory does not grow with the number of steps.

    Args:
        f: callable ``f(z, x) -> Tensor`` shaped like ``z``, e.g. an ``nn.Module``; for a tuple state
            (below) ``z`` is a tuple and ``f`` returns a tuple (or list) of as many tensors. It may use
            dropout (each evaluation's RNG state is replayed in the backward) and BatchNorm-style
            buffers (restored after the backward's re-evaluations when ``f`` is an ``nn.Module``).
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
        state_dtype: ``torch.float64`` (default; gradients stay exact for far more steps) or
            ``torch.float32`` (faster, drifts after 8-16 steps). It must hold the compute dtype. In
            exact mode it is the dtype of the adjoint states (the backward's ``beta * dL/dz``).
        max_drift: raise :class:`~revdeq_kernels.DriftError` when the backward's reconstructed
            start is further than this (relative) from the true one; None warns once above 0.1.
        backend: the backend of the fused ops (``None``/``"auto"``, ``"cuda"``, ``"triton"``,
            ``"cpp"``, ``"reference"``).
        exact: exact mode (see below).
        frac_bits: exact mode's fractional bits F, an int in [0, 52]; default
            ``fixed_point.DEFAULT_FRAC_BITS`` = 32 (range ``|value| <= 2^21``, resolution 2^-32).

    Exact mode (``exact=True``): the states are int64 fixed point, ``Y = round(value * 2^F)``, and every
    half-step ``Y <- ((2^m - p) Y + p round(f * 2^F)) >> m`` keeps the m bits the shift drops, so the
    backward undoes each half-step bit for bit (:mod:`revdeq_kernels.fixed_point`). The reconstructed
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
      raise :class:`~revdeq_kernels.fixed_point.FixedPointError` naming the pass and step (same
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
        like its members); ``info`` a :class:`~revdeq_kernels.info.SolverInfo`
        with ``"steps"``, ``"residual"`` and, after backward, ``"drift"``. Non-finite values from ``f``
        raise ``FloatingPointError`` naming the pass and step: inside the pass when ``tol`` is set,
        when ``info`` is read when ``tol=None``.

    Double backward (``create_graph=True`` then differentiating again) is not supported and raises.

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
                                 backend=backend, exact=exact, frac_bits=frac_bits)
    return solve(f, x, z0=z0, params=params, options=options)
