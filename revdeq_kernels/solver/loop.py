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

:class:`~revdeq_kernels.solver.states.FloatStates` is the one place that knows how a state is stored,
relaxed, un-relaxed and shown to ``f``; the loops below only call it. Exact mode swaps in
:class:`~revdeq_kernels.solver.exact_states.FixedStates` (int64 fixed point, bit-reversible) and nothing else
changes: the adjoints stay floating point. :class:`~revdeq_kernels.solver.rng.RngTape`
replays randomness; :class:`~revdeq_kernels.solver.info.SolverInfo` reports.

Tuple states (z0 and f's output tuples of tensors) run the same loops: values of the state's
structure (``fz``, ``fy``, the vjps ``a`` and ``b``) are a tensor or a tuple of member tensors, the
states and the adjoints ``hy``, ``hz`` are one buffer each laid out by a
:class:`~revdeq_kernels.solver.layout.StateLayout`, and every fused op is one multi-tensor call.
"""

import contextlib
import dataclasses

import torch

from ..ops.bound import BoundOps
from . import fsdp
from .exact_states import FixedStates
from .info import SolverInfo
from .layout import StateLayout
from .problem import FIRST_EVALUATION, Problem, check_declared, check_partial
from .rng import RngTape
from .states import FloatStates
from .step_rows import StepRows

# f_changed above this many ulps of f's dtype means f returned something else in the backward.
F_CHANGED_ULPS = 16

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
                                 first if keep_remainders else None, grow_status=o.tol is not None)
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
    last_fy: torch.Tensor | None = None  # f_signature of f(y) at the final y, which the backward evaluates first


def f_signature(layout: StateLayout, f_val) -> torch.Tensor:
    """[||f||, sum(f) / sqrt(numel)] over all members, float64, on the device: two numbers that change when
    f's output does (|difference| <= ||change|| for each), to compare one evaluation with another."""
    members = layout.split(f_val)
    numel = max(1, sum(m.numel() for m in members))
    sq = sum(torch.linalg.vector_norm(m, dtype=torch.float64).square() for m in members)
    total = sum(m.sum(dtype=torch.float64) for m in members)
    return torch.stack([sq.sqrt(), total / numel ** 0.5])


def _kept(t):
    return t


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
    last_fy = None
    # With a tolerance the rows grow with the steps taken (max_steps may be huge); without, all at once.
    history = StepRows(o.max_steps, (2,), states.residual_dtype, problem.device, grow=o.tol is not None)
    info.start_forward(history, states.status)
    tape = RngTape([*x_tensors, states.z] if keep_rng else None, problem.caller)

    tape.record()
    if declared is None:
        with _unbridged_calls_refused(problem, keep_rng):
            fz = problem.evaluate(states.show("z"), x, FIRST_EVALUATION)
    else:
        # The graph exists only for check_declared and is dropped right after: its saved tensors are
        # never used by a backward, so an outer saved-tensors hook (CPU offloading, a memory count) must
        # not see them; this inner hook takes them instead.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_kept, _kept), _capturing(problem):
            with _unbridged_calls_refused(problem, keep_rng):  # first: its error names the real cause
                fz = problem.evaluate(states.show("z"), x, FIRST_EVALUATION)
            # Under FSDP2 f computes with the unsharded parameters standing in for the declared shards.
            check_declared(problem, fz, declared + (problem.fsdp.unsharded() if problem.fsdp else []))
        fz = problem.layout.detach(fz)
    states.residual_into(fz, history.row(0))
    steps = 0
    for n in range(1, o.max_steps + 1):
        where = f"forward pass, step {n}"
        history.ensure(n)
        if states.status is not None:
            states.status.ensure(n)
        states.relax_("y", fz)
        del fz
        tape.record()
        fy = problem.evaluate(states.show("y"), x, where)
        states.relax_("z", fy)
        if keep_rng:  # a backward follows: it compares its first evaluation, f(y[steps]), with this one
            last_fy = fy
        del fy
        tape.record()
        fz = problem.evaluate(states.show("z"), x, where)
        states.residual_into(fz, history.row(n))
        steps = n
        if o.tol is not None and problem.device.type == "meta":
            break  # shape inference (meta tensors hold no values): one step shows f every shape it will see
        if o.tol is not None and (n % o.check_every == 0 or n == o.max_steps):
            if info.read_forward_rows(n, o.stop_mode) <= o.tol:
                break
    tape.finish()
    if last_fy is not None:  # summarised once, after the loop: no reductions per step
        last_fy = f_signature(problem.layout, problem.layout.detach(last_fy))
    states.finish_forward()
    info.steps = steps
    info.add_facts(states.facts(steps))
    return ForwardResult(states, steps, tape, last_fy)


class _GradSink:
    """Sums the per-evaluation gradients of the solve's inputs, in at least float32.

    ``tensors`` are what each vjp differentiates with respect to, ``slots[i]`` the output each one
    adds into: an x tensor can appear twice, as the detached argument f receives and as the
    original a closure may hold, both feeding x's gradient.
    """

    def __init__(self, tensors, slots, n_slots, fsdp=None):
        self.tensors, self.slots = list(tensors), list(slots)
        self.sums = [None] * n_slots
        self.fsdp = fsdp

    def wrt(self) -> list:
        """What the vjp of the latest evaluation differentiates: ``tensors``, with the unsharded parameter FSDP2
        swapped in for each sharded one (solver/fsdp.py)."""
        return self.tensors if self.fsdp is None else self.fsdp.substitute(self.tensors)

    def add(self, grads) -> None:
        for slot, g in zip(self.slots, grads):
            if g is None:
                continue
            if self.sums[slot] is None:
                self.sums[slot] = g.to(torch.promote_types(g.dtype, torch.float32), copy=True)
            else:
                self.sums[slot] += g


class _CotangentCasts:
    """The adjoints cast to f's output dtypes for autograd.grad, into buffers kept for the whole backward (no
    allocation per step when the members share one dtype). Each cast is read only by the vjp it is made for."""

    def __init__(self, layout: StateLayout):
        self.layout, self._kept = layout, {}

    def __call__(self, buffer: torch.Tensor, dtypes: list) -> tuple:
        layout = self.layout
        if len(set(dtypes)) != 1 or dtypes[0] == buffer.dtype:
            return layout.split(layout.cast(buffer, dtypes))
        cast, members = layout.kept_buffer(self._kept, (id(buffer), dtypes[0]), dtypes[0])
        cast.copy_(buffer)
        return layout.split(members)


def _vjp(layout: StateLayout, out, z_in, cotangent: torch.Tensor, sink: _GradSink, casts: _CotangentCasts):
    """cotangent^T df/dz at this evaluation; adds cotangent^T df/d(x, params) to ``sink``.

    ``out`` and ``z_in`` are structured like the state (a tensor, or a tuple of members: then one
    autograd.grad over all of them); ``cotangent`` is an adjoint buffer. Returns structured like z."""
    outs, ins = layout.split(out), layout.split(z_in)
    cotangents = casts(cotangent, [t.dtype for t in outs])
    # Members f computes from nothing that requires grad have no graph and contribute nothing.
    live = [(t, c) for t, c in zip(outs, cotangents) if t.requires_grad]
    grads = [None] * len(ins)
    if live:
        found = torch.autograd.grad([t for t, _ in live], [*ins, *sink.wrt()], [c for _, c in live],
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


def _capturing(problem: Problem):
    """Under FSDP2, note the unsharded parameters each evaluation of f computes with (solver/fsdp.py)."""
    return problem.fsdp.capturing() if problem.fsdp is not None else contextlib.nullcontext()


def _unbridged_calls_refused(problem: Problem, backward_follows: bool):
    """Refuse an f that calls FSDP2-sharded modules the solver cannot bridge, when a backward will follow."""
    if not backward_follows:
        return contextlib.nullcontext()
    return fsdp.unbridged_calls_refused(problem.caller, problem.fsdp)


def _gradient_for(problem: Problem, target: torch.Tensor, grad: torch.Tensor):
    """The summed gradient as ``target``'s gradient: its dtype, and for a parameter sharded by FSDP2 averaged
    over the ranks and sharded like it."""
    if problem.fsdp is not None and problem.fsdp.is_sharded(target):
        return problem.fsdp.sharded_grad(target, grad)
    return grad.to(target.dtype)


def f_mismatch(forward_rows: torch.Tensor, backward_rows: torch.Tensor) -> torch.Tensor:
    """How far f's outputs in the backward moved from the forward's at the same states, relative to |f|
    (a device scalar, no sync).

    Row n - 1 of the forward's history and row n of the backward's evidence are both
    ``[||z - f(z)||^2, ||f(z)||^2]`` at z[n-1], the forward's true state and the backward's reconstruction
    of it. By the triangle inequality the largest change of either norm over ``||f(z)||`` is a lower bound
    on ``max_n ||f_backward - f_forward|| / ||f||`` (plus the reconstruction error of z itself, which the
    drift bounds). For smooth f it is about the drift; much more means the backward differentiated f at
    inputs where f behaves differently (a kink or a zero-variance normalisation hit by the tiny
    reconstruction error) or f itself changed between forward and backward."""
    fwd = forward_rows.to(torch.float64).clamp_min(0.0).sqrt()
    bwd = backward_rows.clamp_min(0.0).sqrt()
    scale = fwd[:, 1].clamp_min(torch.finfo(torch.float64).tiny)
    return ((bwd - fwd).abs().amax(dim=1) / scale).amax()


def _relative_change(now: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """max |now - then| / |then[0]| of two f_signature values (a lower bound on ||f_now - f_then|| / ||f||)."""
    return (now - then).abs().amax() / then[0].clamp_min(torch.finfo(torch.float64).tiny)


def backward(problem: Problem, info: SolverInfo, states: FloatStates | FixedStates, steps: int, tape: RngTape,
             grad_z, z0, x_tensors, need_x, params, need_params, need_z0, last_fy=None):
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
    sink = _GradSink(wrt, slots, len(x_tensors) + len(params), problem.fsdp)

    layout = problem.layout
    # The adjoints, one buffer each like the states: the fused ops update their members in one call.
    hz = layout.gather(grad_z, o.state_dtype).mul_(beta)
    hy = torch.zeros_like(hz)
    hz_members, hy_members = layout.members(hz), layout.members(hy)
    kernels = BoundOps(problem.device, o.backend)
    casts = _CotangentCasts(layout)
    # Row n: residual(z[n-1], f(z[n-1])) and residual(hz, b) at step n; row 0 holds the drift.
    # Both are NaN-propagating, so a non-finite f, vjp or reconstruction shows up at its step.
    evidence = torch.empty(steps + 1, 4, dtype=torch.float64, device=problem.device)
    # Row views made once: writing through them costs half of indexing evidence[n, :2] at every step.
    state_rows, adjoint_rows = evidence[:, :2].unbind(0), evidence[:, 2:].unbind(0)
    scale = states.scale(z0)

    with tape.forked(), _buffers_restored(problem.f), torch.enable_grad(), _capturing(problem):
        for n in range(steps, 0, -1):
            where = f"backward pass, step {n}"
            # Float states recompute step 1 forward from the true start instead of using its reconstruction:
            # a start like z0 = 0 puts f's ReLUs exactly on their kinks, and parts of y[1] may stay exactly 0
            # (a multiscale branch the others have not reached yet); a reconstruction error of 1e-16 there
            # flips derivatives between 0 and 1 (gradients 20x off at a drift of 1e-8). The price: f(z0)'s
            # graph is alive while f(y[1]) is differentiated. (Exact mode reconstructs every bit anyway.)
            first = n == 1 and states.recomputes_first_step
            if first:
                tape.replay(0)
                z_in = states.show_start_for_grad(z0)
                fz = problem.evaluate(z_in, x, where)
                y_in = states.first_y_for_grad(z0, fz)
            else:
                y_in = states.show_for_grad("y")
            tape.replay(2 * n - 1)
            fy = problem.evaluate(y_in, x, where)
            if n == steps:
                if last_fy is not None:  # y[steps] is the forward's own state: f must return what it did then
                    f_changed = _relative_change(f_signature(layout, layout.detach(fy)), last_fy)
                f_eps = max(torch.finfo(t.dtype).eps for t in layout.split(fy))
                if problem.check_closures:
                    check_partial(problem, fy, sink.wrt())
            states.unrelax_("z", fy)  # z[n-1]
            a = _vjp(layout, fy, y_in, hz, sink, casts)
            del fy, y_in
            kernels.relax_(hy_members, a, beta)
            del a

            if not first:
                tape.replay(2 * n - 2)
                z_in = states.show_for_grad("z")
                fz = problem.evaluate(z_in, x, where)
            states.unrelax_("y", fz)  # y[n-1] (at n = 1 only for the drift)
            states.residual_into(fz, state_rows[n])
            b = _vjp(layout, fz, z_in, hy, sink, casts)
            del fz, z_in
            kernels.residual_into(hz_members, b, adjoint_rows[n])
            kernels.relax_(hz_members, b, beta)
            del b

    if problem.fsdp is not None:
        problem.fsdp.reshard()
    tiny = torch.finfo(scale.dtype).tiny
    evidence[0] = (states.distance_to(z0) / scale.clamp_min(tiny)).to(torch.float64)
    evidence[0, 1] = f_mismatch(info.residual_history()[:steps], evidence[1:, :2])
    evidence[0, 2] = f_changed if last_fy is not None else 0.0
    # What f_changed may reach by rounding alone (nondeterministic kernels), for f's least precise output.
    evidence[0, 3] = F_CHANGED_ULPS * f_eps
    info.set_backward(evidence, states.status)
    if o.tol is not None or o.max_drift is not None:
        info.check()  # a tolerance allows syncs, and an explicit max_drift asks for one: raise inside backward

    grad_z0 = [None] * len(need_z0)
    if any(need_z0):
        grad_start = layout.split(layout.members(((1.0 - beta) * hy).add_(hz).div_(beta)))
        # Fresh tensors, not views of one buffer: autograd may keep each as a .grad of its own.
        grad_z0 = [g.to(t.dtype, copy=layout.is_tuple) if need else None
                   for g, t, need in zip(grad_start, layout.split(z0), need_z0)]
    targets = [*x_tensors, *params]
    grads = [None if g is None else _gradient_for(problem, t, g) for g, t in zip(sink.sums, targets)]
    return grad_z0, grads[:len(x_tensors)], grads[len(x_tensors):]
