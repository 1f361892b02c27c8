"""The torch.autograd.Function that connects the reversible solver (loop.py) to autograd.

One Function runs the whole backward and returns every gradient (it never calls ``.backward()``
inside), so it composes with DistributedDataParallel, ``torch.autograd.grad`` and saved-tensor
hooks. What it saves: the two final states, z0 when given, and its inputs (x and params), never
a graph of ``f``; in exact mode also the remainder bits (m per element per half-step). A tuple state
is one input and one output per member, so each member of z0 and of z gets its own gradient.
"""

import contextlib

import torch

from . import loop
from .info import SolverInfo
from .problem import Problem, autocast_enabled


class _Autocast:
    """The autocast state of the forward, re-entered by the backward so f is evaluated alike."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.enabled = autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type) if self.enabled else None

    def __call__(self):
        if not self.enabled:
            return contextlib.nullcontext()  # also for devices autocast does not know (meta)
        return torch.autocast(self.device_type, dtype=self.dtype)


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
        result = loop.forward(problem, info, problem.pack_x(x_tensors), x_tensors, z0, declared)
        ctx.problem, ctx.info = problem, info
        ctx.steps, ctx.tape, ctx.last_fy = result.steps, result.tape, result.last_fy
        ctx.autocast = _Autocast(problem.device.type)
        ctx.consumed = False
        saved_states = result.states.saved()
        ctx.n_saved_states = len(saved_states)
        ctx.save_for_backward(*saved_states, *(layout.split(z0) if z0 is not None else [None]), *tensors)
        return result.states.output()

    @staticmethod
    def backward(ctx, *grad_z):
        problem = ctx.problem
        if torch.is_grad_enabled():  # autograd runs a Function's backward with grad mode = create_graph
            raise RuntimeError(
                f"{problem.caller}: create_graph=True (double backward, e.g. a gradient penalty or force matching "
                "through dL/dx) is not supported through the reversible solve: its backward reconstructs the states "
                "in place and returns gradients without a graph, so a penalty built on them would silently get no "
                "gradient. Instead differentiate one application of f at the returned fixed point (z = f(z.detach(), "
                "x) keeps the graph of that step), use revdeq_kernels.jacobian_penalty for a Jacobian regulariser, or "
                "call torch.autograd.grad without create_graph")
        with torch.no_grad():
            return ReversibleFixedPoint._backward(ctx, *grad_z)

    @staticmethod
    def _backward(ctx, *grad_z):
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
        states = loop.restore_states(problem, saved[:n], ctx.steps)
        with ctx.autocast():
            grad_z0, grad_x, grad_params = loop.backward(
                problem, ctx.info, states, ctx.steps, ctx.tape, layout.join(grad_z), z0,
                x_tensors, need_x, params, needs[n_start + problem.n_x:], needs[:n_start],
                ctx.last_fy)
        ctx.tape = None
        return (None, None, *grad_z0, *grad_x, *grad_params)
