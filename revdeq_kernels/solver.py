"""The RevDEQ fixed-point solver: the forward iteration and its reversible backward (DESIGN.md section 1).

Forward, from ``y[0] = z[0] = z0`` (evaluation ``k`` of ``f`` is numbered ``0, 1, ..., 2 * steps``)::

    fz = f(z[0])                                          # evaluation 0
    for n in 1 .. steps:
        y[n] = relax_(y[n-1], f(z[n-1]), beta)            # uses evaluation 2n-2
        z[n] = relax_(z[n-1], f(y[n]), beta)              # evaluation 2n-1
        fz = f(z[n]); record residual(z[n], fz)           # evaluation 2n

Backward with pre-scaled adjoints ``hz = beta * dL/dz[n]`` and ``hy = beta * dL/dy[n+1]`` (0 at first),
for n = steps .. 1, each evaluation of ``f`` replaying its forward RNG state::

    fy = f(y[n]);     z[n-1] = unrelax_(z[n], fy)         a = vjp(fy, hz);  hy = relax_(hy, a)
    fz = f(z[n-1]);   y[n-1] = unrelax_(y[n], fz)         b = vjp(fz, hy);  hz = relax_(hz, b)

after which ``dL/dz0 = (hz + (1 - beta) * hy) / beta``. Each vjp also yields this step's exact
contribution to dL/dparams and dL/dx. At the end ``y[0]`` and ``z[0]`` must equal ``z0``: their
difference is the reconstruction drift.

Host synchronisation: with ``tol=None`` none at all; the device keeps the evidence (the residual
after every step, NaN-propagating checks in the backward, the drift) and :class:`SolverInfo` reads it
once when asked. With a tolerance the forward reads the residuals back every ``check_every``
steps and the backward reads its evidence once at the end.

:class:`~revdeq_kernels.states.FloatStates` is the one place that knows how a state is stored,
relaxed, un-relaxed and shown to ``f``; the loops below only call it. Exact mode swaps in
:class:`~revdeq_kernels.fixed_states.FixedStates` (int64 fixed point, bit-reversible) and nothing else
changes: the adjoints stay floating point. :class:`~revdeq_kernels.rng.RngTape`
replays randomness; :class:`~revdeq_kernels.info.SolverInfo` reports.

Tuple states (z0 and f's output tuples of tensors) run the same loops: values of the state's
structure (``fz``, ``fy``, the vjps ``a`` and ``b``) are a tensor or a tuple of member tensors, the
states and the adjoints ``hy``, ``hz`` are one buffer each laid out by a
:class:`~revdeq_kernels.layout.StateLayout`, and every fused op is one multi-tensor call.
"""

import contextlib
import dataclasses
import math
import numbers

import torch

from . import backends, ops
from . import fixed_point as fxp
from .fixed_states import FixedStates
from .info import SolverInfo
from .layout import StateLayout
from .rng import RngTape
from .states import FloatStates

STATE_DTYPES = (torch.float64, torch.float32)
FIRST_EVALUATION = "forward pass, evaluating f(z0)"


@dataclasses.dataclass(frozen=True)
class SolverOptions:
    """Validated solver settings; build with :meth:`make`, which raises clear errors for bad values.

    In exact mode ``beta`` is the effective (dyadic) beta as a float, ``dyadic_beta`` its p / 2^m, and
    ``state_dtype`` the dtype of the adjoint states (the primal states are int64 fixed point).
    """

    beta: float = 0.8
    max_steps: int = 30
    tol: float | None = 1e-3
    check_every: int = 1
    state_dtype: torch.dtype = torch.float64
    max_drift: float | None = None
    backend: str | None = None
    exact: bool = False
    frac_bits: int | None = None  # exact mode only
    dyadic_beta: fxp.DyadicBeta | None = None  # exact mode only

    @classmethod
    def make(cls, caller: str, *, beta=0.8, max_steps=30, tol=1e-3, check_every=1,
             state_dtype=torch.float64, max_drift=None, backend=None, exact=False,
             frac_bits=None) -> "SolverOptions":
        if not isinstance(exact, bool):
            raise TypeError(f"{caller}: exact must be True or False, got {type(exact).__name__}")
        dyadic = None
        if exact:
            dyadic = _dyadic_beta(caller, beta)
            beta = dyadic.value
            frac_bits = fxp.check_frac_bits(caller, fxp.DEFAULT_FRAC_BITS if frac_bits is None else frac_bits)
        else:
            if frac_bits is not None:
                raise ValueError(f"{caller}: frac_bits={frac_bits!r} sets the fixed-point format of exact mode, but "
                                 "exact=False; pass exact=True with it, or leave frac_bits out")
            beta = ops.check_beta(caller, beta)
        max_steps = _positive_int(caller, "max_steps", max_steps)
        check_every = _positive_int(caller, "check_every", check_every)
        tol = _optional_nonnegative(caller, "tol", tol)
        max_drift = _optional_nonnegative(caller, "max_drift", max_drift)
        if state_dtype not in STATE_DTYPES:
            raise TypeError(f"{caller}: state_dtype must be torch.float64 or torch.float32, got {state_dtype!r} "
                            "(half-precision states lose everything to the inverse's rounding amplification)")
        if backend is not None and backend != "auto" and backend not in backends.NAMES:
            raise ValueError(f"{caller}: unknown backend {backend!r}; expected None, 'auto' or one of "
                             f"{', '.join(backends.NAMES)}")
        return cls(beta, max_steps, tol, check_every, state_dtype, max_drift, backend, exact, frac_bits, dyadic)


def _dyadic_beta(caller, beta) -> fxp.DyadicBeta:
    """Exact mode's beta: a (p, m) pair as given, or a float rounded to the nearest p / 2^m, m <= 8."""
    if isinstance(beta, tuple):
        return fxp.check_beta(caller, beta)
    beta = ops.check_beta(caller, beta)
    try:
        return fxp.dyadic_beta(beta)
    except ValueError as exc:
        reason = str(exc).removeprefix("dyadic_beta: ")
        raise ValueError(f"{caller}: exact mode rounds beta to the nearest p / 2^m with m <= "
                         f"{fxp.MAX_BETA_BITS}, but {reason}") from None


def _positive_int(caller, name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{caller}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{caller}: {name} must be at least 1, got {value}")
    return int(value)


def _optional_nonnegative(caller, name, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{caller}: {name} must be a real number or None, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{caller}: {name} must be a finite number >= 0 or None, got {value!r}")
    return value


class Problem:
    """One call's fixed function, its inputs' structure and its dtypes; checks every output of ``f``.

    Args:
        caller: the public name used in error messages.
        f: callable ``f(z, x)`` returning a tensor shaped like ``z``, or for a tuple state a tuple (or
            list) of tensors shaped like z's members.
        x_kind: ``"tensor"`` (x is one tensor) or the container type (tuple or list) x came in.
        n_x: how many tensors x holds.
        layout: the state's :class:`~revdeq_kernels.layout.StateLayout`: its members' shapes, the
            dtype f sees and is expected to return for each (it may return a less precise one under
            autocast), and the device.
        default_start: True when z0 was not given (zeros shaped like x's first tensor).
        options: :class:`SolverOptions`.
        check_closures: look at the graph of f's first evaluation for tensors that require grad but
            were not passed (see :func:`check_declared`).
    """

    def __init__(self, caller, f, x_kind, n_x, layout: StateLayout, default_start, options, check_closures=False):
        self.caller, self.f = caller, f
        self.x_kind, self.n_x = x_kind, n_x
        self.layout, self.device = layout, layout.device
        self.default_start = default_start
        self.options = options
        self.check_closures = check_closures

    def pack_x(self, x_tensors):
        """The x f receives, rebuilt from its tensors in the structure the caller passed."""
        if self.x_kind == "tensor":
            return x_tensors[0]
        return self.x_kind(x_tensors)

    def evaluate(self, z, x, where: str):
        """``f(z, x)`` with its output checked; ``where`` names the pass and step for errors.

        ``z`` is a tensor, or a tuple of members that f receives in the caller's container. Returns f's
        output as the solver passes structured values around: a tensor, or a tuple of members."""
        layout = self.layout
        try:
            out = self.f(layout.pack(z), x)
        except Exception as exc:
            if where == FIRST_EVALUATION and hasattr(exc, "add_note"):  # Python >= 3.11
                origin = ("the default z0: zeros shaped like x's first tensor; if f's state has another shape, "
                          "pass z0=" if self.default_start else "z0's shape")
                if layout.is_tuple and not self.default_start:
                    origin = "z0's shapes"
                exc.add_note(f"{self.caller}: raised by f on its first call, with {layout.describe()} ({origin})")
            raise
        name = f"{self.caller}: f ({where})"
        if not layout.is_tuple:
            if not isinstance(out, torch.Tensor):
                hint = ("; a tuple state needs z0 passed as a tuple of tensors shaped like f's outputs (z0=None "
                        "starts a single-tensor state)" if isinstance(out, (tuple, list)) else "")
                raise TypeError(f"{name} must return a torch.Tensor, got {type(out).__name__}{hint}")
            self._check_member(name, out, 0)
            return out
        if not isinstance(out, (tuple, list)):
            raise TypeError(f"{name} must return a tuple (or list) of {len(layout.shapes)} tensors like z0, got "
                            f"{type(out).__name__}")
        if len(out) != len(layout.shapes):
            raise ValueError(f"{name} returned {len(out)} tensors but z0 has {len(layout.shapes)}")
        for i, member in enumerate(out):
            if not isinstance(member, torch.Tensor):
                raise TypeError(f"{name} returned a {type(member).__name__} as output [{i}]; every output must "
                                "be a torch.Tensor")
            self._check_member(name, member, i)
        return tuple(out)

    def _check_member(self, name: str, out: torch.Tensor, i: int) -> None:
        """Member ``i`` of f's output against the state's member ``i`` (the whole state for one tensor)."""
        layout = self.layout
        shape, compute = layout.shapes[i], layout.compute_dtypes[i]
        if layout.is_tuple:
            returned, state, state_dtype, origin = f" as output [{i}]", f"z0[{i}]", f"z0[{i}]", f"z0[{i}]'s dtype"
        else:
            returned, state, state_dtype, origin = "", "the state (z0)", "the state", "z0's dtype, else x's"
        if tuple(out.shape) != shape:
            hint = (" z0 defaults to zeros shaped like x's first tensor; pass z0= shaped like f's output"
                    if self.default_start else "")
            raise ValueError(f"{name} returned shape {tuple(out.shape)}{returned} but {state} has shape {shape}.{hint}")
        if out.device != self.device:
            raise ValueError(f"{name} returned a tensor on {out.device}{returned} but {state} is on {self.device}")
        if out.dtype != compute and not self._autocast_allows(out.dtype):
            raise TypeError(f"{name} returned dtype {out.dtype}{returned} but {state_dtype} is computed in {compute} "
                            f"({origin}); f must return that dtype (or, under torch.autocast, a less precise one)")

    def _autocast_allows(self, dtype) -> bool:
        return (dtype.is_floating_point and torch.is_autocast_enabled(self.device.type)
                and torch.promote_types(self.options.state_dtype, dtype) == self.options.state_dtype)


def _walk(roots, stop):
    """The autograd nodes reachable from ``roots`` (not descending past nodes for which ``stop`` is True)."""
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        if not stop(node):
            stack.extend(next_node for next_node, _ in node.next_functions)


def _is_leaf_node(node) -> bool:
    return getattr(node, "variable", None) is not None  # AccumulateGrad: a leaf that requires grad


def _grad_fns(problem: Problem, out) -> list:
    """The autograd nodes of f's output members that require grad."""
    return [t.grad_fn for t in problem.layout.split(out) if t.requires_grad]


def check_declared(problem: Problem, out, declared) -> None:
    """Raise when the graph of ``out`` (f's output) reaches a leaf that requires grad other than through
    ``declared``.

    Such a tensor (a closure's weight, an encoder behind a closed-over activation) would get no
    gradient from the solver: the backward differentiates only with respect to x, z0 and params.
    """
    roots = _grad_fns(problem, out)
    if not roots:
        return
    stop = {torch.autograd.graph.get_gradient_edge(t).node for t in declared}
    hidden = [node.variable for node in _walk(roots, lambda n: n in stop or _is_leaf_node(n))
              if node not in stop and _is_leaf_node(node)]
    if hidden:
        shapes = ", ".join(str(tuple(t.shape)) for t in hidden[:4]) + (", ..." if len(hidden) > 4 else "")
        raise ValueError(
            f"{problem.caller}: f depends on {len(hidden)} tensor(s) that require grad but were passed neither as "
            f"x nor in params (shapes {shapes}); the solver would silently give them no gradient. Pass them "
            "(or the tensors f closes over) with params=[...], or detach them")


def check_partial(problem: Problem, out, inputs) -> None:
    """Raise when a vjp of ``out`` (f's output) with respect to ``inputs`` would not be a partial derivative.

    The backward differentiates each evaluation of f with respect to x and params separately, and
    autograd then carries the x gradient through x's own history. If f reaches a non-leaf input (a
    closure over x, a computed weight) whose history leads to another input, torch.autograd.grad
    would also follow that history: gradients would count twice and the outer graph would run early.
    """
    roots = _grad_fns(problem, out)
    if not roots:
        return
    targets = {torch.autograd.graph.get_gradient_edge(t).node for t in inputs}
    boundaries = {t.grad_fn for t in inputs if t.grad_fn is not None}
    reached = [n for n in _walk(roots, lambda n: n in boundaries or _is_leaf_node(n)) if n in boundaries]
    if not reached:
        return
    histories = [next_node for node in reached for next_node, _ in node.next_functions]
    for node in _walk(histories, lambda n: n in targets or _is_leaf_node(n)):
        if node in targets:
            raise ValueError(
                f"{problem.caller}: f uses a tensor it closes over (or a param) whose own history depends on another "
                "of the solve's inputs (x or params), e.g. a closure over the output of an earlier solve with the "
                "same parameters. The solver needs partial derivatives: let f use its x argument instead of the "
                "closure, or pass only the leaves in params")


# With a tolerance, exact mode allocates remainders for this many steps first and then doubles the
# capacity as the forward goes on (tol=None allocates all max_steps at once).
FIRST_REMAINDER_STEPS = 16


def start_states(problem: Problem, z0, keep_remainders: bool):
    """The two states at z0 (a tensor or tuple of tensors, or None: zeros): :class:`FloatStates`, or
    :class:`FixedStates` in exact mode.

    ``keep_remainders``: a backward will follow, so exact mode keeps every half-step's remainder bits."""
    o = problem.options
    if o.exact:
        first = o.max_steps if o.tol is None else min(o.max_steps, FIRST_REMAINDER_STEPS)
        return FixedStates.start(z0, problem.layout, o.dyadic_beta, o.frac_bits, o.backend, o.max_steps,
                                 first if keep_remainders else None)
    return FloatStates.start(z0, problem.layout, o.state_dtype, o.beta, o.backend)


def restore_states(problem: Problem, saved, steps: int):
    """The states again from what ``states.saved()`` returned after a forward of ``steps`` steps."""
    o = problem.options
    if o.exact:
        return FixedStates.from_saved(saved, problem.layout, o.dyadic_beta, o.frac_bits, o.backend, steps)
    return FloatStates.from_saved(saved, problem.layout, o.beta, o.backend)


@dataclasses.dataclass
class ForwardResult:
    states: FloatStates | FixedStates
    steps: int
    tape: RngTape


def forward(problem: Problem, info: SolverInfo, x, x_tensors, z0, declared=None, keep_rng=True) -> ForwardResult:
    """Run the forward iteration without keeping any graph of ``f``.

    Args:
        x: what f receives; x_tensors: its tensors (for the RNG devices).
        z0: the start (any floating dtype the state can hold; a tuple of members for a tuple state), or
            None for zeros.
        declared: when not None, the tensors that may carry gradients into f; the first evaluation then
            runs with grad enabled so :func:`check_declared` can look at its graph.
        keep_rng: a backward will follow: record the RNG state before each evaluation of f for it to
            replay (and, in exact mode, keep every half-step's remainder bits).
    """
    o = problem.options
    states = start_states(problem, z0, keep_rng)
    history = torch.empty(o.max_steps + 1, 2, dtype=states.residual_dtype, device=problem.device)
    info.start_forward(history, states.status)
    tape = RngTape([*x_tensors, states.z] if keep_rng else None)

    tape.record()
    if declared is None:
        fz = problem.evaluate(states.show("z"), x, FIRST_EVALUATION)
    else:
        with torch.enable_grad():
            fz = problem.evaluate(states.show("z"), x, FIRST_EVALUATION)
            check_declared(problem, fz, declared)
        fz = problem.layout.detach(fz)
    history[0] = states.residual(fz)
    steps = 0
    for n in range(1, o.max_steps + 1):
        where = f"forward pass, step {n}"
        states.relax_("y", fz)
        del fz
        tape.record()
        fy = problem.evaluate(states.show("y"), x, where)
        states.relax_("z", fy)
        del fy
        tape.record()
        fz = problem.evaluate(states.show("z"), x, where)
        history[n] = states.residual(fz)
        steps = n
        if o.tol is not None and (n % o.check_every == 0 or n == o.max_steps):
            if info.read_forward_rows(n) <= o.tol:
                break
    tape.finish()
    states.finish_forward()
    info.steps = steps
    info.add_facts(states.facts(steps))
    return ForwardResult(states, steps, tape)


class _GradSink:
    """Sums the per-evaluation gradients of the solve's inputs, in at least float32.

    ``tensors`` are what each vjp differentiates with respect to, ``slots[i]`` the output each one
    adds into: an x tensor can appear twice, as the detached argument f receives and as the
    original a closure may hold, both feeding x's gradient.
    """

    def __init__(self, tensors, slots, n_slots):
        self.tensors, self.slots = list(tensors), list(slots)
        self.sums = [None] * n_slots

    def add(self, grads) -> None:
        for slot, g in zip(self.slots, grads):
            if g is None:
                continue
            if self.sums[slot] is None:
                self.sums[slot] = g.to(torch.promote_types(g.dtype, torch.float32), copy=True)
            else:
                self.sums[slot] += g


def _vjp(layout: StateLayout, out, z_in, cotangent: torch.Tensor, sink: _GradSink):
    """cotangent^T df/dz at this evaluation; adds cotangent^T df/d(x, params) to ``sink``.

    ``out`` and ``z_in`` are structured like the state (a tensor, or a tuple of members: then one
    autograd.grad over all of them); ``cotangent`` is an adjoint buffer. Returns structured like z."""
    outs, ins = layout.split(out), layout.split(z_in)
    cotangents = layout.split(layout.cast(cotangent, [t.dtype for t in outs]))
    # Members f computes from nothing that requires grad have no graph and contribute nothing.
    live = [(t, c) for t, c in zip(outs, cotangents) if t.requires_grad]
    grads = [None] * len(ins)
    if live:
        found = torch.autograd.grad([t for t, _ in live], [*ins, *sink.tensors], [c for _, c in live],
                                    allow_unused=True)
        grads = found[:len(ins)]
        sink.add(found[len(ins):])
    return layout.join([torch.zeros_like(t) if g is None else g for g, t in zip(grads, ins)])


@contextlib.contextmanager
def _buffers_restored(f):
    """Put f's buffers (e.g. BatchNorm running statistics) back as they were: the backward re-evaluates
    f 2 * steps times and must not count as further training updates."""
    if not isinstance(f, torch.nn.Module):
        yield
        return
    saved = [(b, b.detach().clone()) for b in f.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def backward(problem: Problem, info: SolverInfo, states: FloatStates | FixedStates, steps: int, tape: RngTape,
             grad_z, z0, x_tensors, need_x, params, need_params, need_z0):
    """The reversible backward: reconstructs the states in place and returns the exact gradients.

    Args:
        states: the forward's final states (consumed: they end at the reconstructed start).
        grad_z: dL/dz structured like the state (a tensor, or a tuple of members), in the compute dtypes.
        z0: the given start (structured like the state) or None (zeros); need_z0: one flag per member
            of z0 (one for a single tensor). x_tensors, params: the tensors f uses, each flagged by
            need_x / need_params when its gradient is wanted.

    Returns:
        ([grad per z0 member or None], [grad per x tensor or None], [grad per param or None]).

    f receives x as detached leaves, so each vjp is a partial derivative that never runs x's own
    history (autograd does that once, with the gradient this returns). When f may close over the
    originals instead (``problem.check_closures``), they are differentiated too.
    """
    o, beta = problem.options, problem.options.beta
    x_args = [t.detach().requires_grad_(need) for t, need in zip(x_tensors, need_x)]
    x = problem.pack_x(x_args)
    wrt, slots = [], []
    for i, need in enumerate(need_x):
        if need:
            wrt.append(x_args[i])
            slots.append(i)
            if problem.check_closures:
                wrt.append(x_tensors[i])
                slots.append(i)
    for j, need in enumerate(need_params):
        if need:
            wrt.append(params[j])
            slots.append(len(x_tensors) + j)
    sink = _GradSink(wrt, slots, len(x_tensors) + len(params))

    layout = problem.layout
    # The adjoints, one buffer each like the states: the fused ops update their members in one call.
    hz = layout.gather(grad_z, o.state_dtype).mul_(beta)
    hy = torch.zeros_like(hz)
    hz_members, hy_members = layout.members(hz), layout.members(hy)
    # Row n: residual(z[n-1], f(z[n-1])) and residual(hz, b) at step n; row 0 holds the drift.
    # Both are NaN-propagating, so a non-finite f, vjp or reconstruction shows up at its step.
    evidence = torch.empty(steps + 1, 4, dtype=torch.float64, device=problem.device)
    scale = states.scale(z0)

    with tape.forked(), _buffers_restored(problem.f), torch.enable_grad():
        for n in range(steps, 0, -1):
            where = f"backward pass, step {n}"
            tape.replay(2 * n - 1)
            y_in = states.show_for_grad("y")
            fy = problem.evaluate(y_in, x, where)
            if n == steps and problem.check_closures:
                check_partial(problem, fy, sink.tensors)
            states.unrelax_("z", fy)  # z[n-1]
            a = _vjp(layout, fy, y_in, hz, sink)
            del fy, y_in
            ops.relax_(hy_members, a, beta, backend=o.backend)
            del a

            tape.replay(2 * n - 2)
            z_in = states.show_for_grad("z")
            fz = problem.evaluate(z_in, x, where)
            states.unrelax_("y", fz)  # y[n-1]
            evidence[n, :2] = states.residual(fz)
            b = _vjp(layout, fz, z_in, hy, sink)
            del fz, z_in
            evidence[n, 2:] = ops.residual(hz_members, b, backend=o.backend)
            ops.relax_(hz_members, b, beta, backend=o.backend)
            del b

    tiny = torch.finfo(scale.dtype).tiny
    evidence[0] = (states.distance_to(z0) / scale.clamp_min(tiny)).to(torch.float64)
    info.set_backward(evidence, states.status)
    if o.tol is not None:
        info.check()  # a tolerance allows syncs: report problems from inside backward

    grad_z0 = [None] * len(need_z0)
    if any(need_z0):
        grad_start = layout.split(layout.members(((1.0 - beta) * hy).add_(hz).div_(beta)))
        # Fresh tensors, not views of one buffer: autograd may keep each as a .grad of its own.
        grad_z0 = [g.to(t.dtype, copy=layout.is_tuple) if need else None
                   for g, t, need in zip(grad_start, layout.split(z0), need_z0)]
    targets = [*x_tensors, *params]
    grads = [None if g is None else g.to(t.dtype) for g, t in zip(sink.sums, targets)]
    return grad_z0, grads[:len(x_tensors)], grads[len(x_tensors):]
