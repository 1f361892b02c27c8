"""Problem: one solve's f, its inputs' structure and its dtypes; every output of f is checked here.

Also the checks on f's autograd graph that keep a gradient from going silently missing (tensors f
uses but the solver was not given) or counted twice (closures over tensors whose history leads back
to the solve's inputs), and the normalisation of the caller's arguments into a Problem.
"""

import torch

from ..ops.checks import check_dense
from ..ops.dtypes import FLOAT_DTYPES
from .layout import StateLayout

FIRST_EVALUATION = "forward pass, evaluating f(z0)"


class Problem:
    """One call's fixed function, its inputs' structure and its dtypes; checks every output of ``f``.

    Args:
        caller: the public name used in error messages.
        f: callable ``f(z, x)`` returning a tensor shaped like ``z``, or for a tuple state a tuple (or
            list) of tensors shaped like z's members.
        x_kind: ``"tensor"`` (x is one tensor) or the container type (tuple or list) x came in.
        n_x: how many tensors x holds.
        layout: the state's :class:`~revdeq_kernels.solver.layout.StateLayout`: its members' shapes, the
            dtype f sees and is expected to return for each (it may return a less precise one under
            autocast), and the device.
        default_start: True when z0 was not given (zeros shaped like x's first tensor).
        options: :class:`SolverOptions`.
        check_closures: look at the graph of f's first evaluation for tensors that require grad but
            were not passed (see :func:`check_declared`).
    """

    def __init__(self, caller, f, x_kind, n_x, layout: StateLayout, default_start, options, check_closures=False,
                 fsdp=None):
        self.caller, self.f = caller, f
        self.fsdp = fsdp  # solver/fsdp.py's FsdpBridge when f holds modules sharded with FSDP2
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
        watched = _watch([*layout.split(z), *([x] if isinstance(x, torch.Tensor) else x)])
        try:
            out = self.f(layout.pack(z), x)
        except RuntimeError as exc:
            if _LEAF_IN_PLACE in str(exc):  # the backward hands f leaves that require grad
                raise RuntimeError(self._mutation_message(where, "its input z")) from exc
            self._note_first_call(exc, where)
            raise
        except Exception as exc:
            self._note_first_call(exc, where)
            raise
        for i, t, version in watched:
            if t._version != version:
                raise RuntimeError(self._mutation_message(where, _input_name(layout, self.n_x, i)))
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

    def _note_first_call(self, exc: Exception, where: str) -> None:
        """Say, on an error f raised on its first call, what the solver gave it (often a default z0 of the
        wrong shape)."""
        if where != FIRST_EVALUATION or not hasattr(exc, "add_note"):  # add_note: Python >= 3.11
            return
        layout = self.layout
        origin = ("the default z0: zeros shaped like x's first tensor; if f's state has another shape, pass z0="
                  if self.default_start else "z0's shape")
        if layout.is_tuple and not self.default_start:
            origin = "z0's shapes"
        exc.add_note(f"{self.caller}: raised by f on its first call, with {layout.describe()} ({origin})")

    def _mutation_message(self, where: str, what: str) -> str:
        return (f"{self.caller}: f ({where}) modified {what} in place (e.g. nn.ReLU(inplace=True), relu_, += or "
                "copy_ applied to its argument). f receives the solver's own state, which an in-place change would "
                "corrupt, and the backward differentiates through its arguments: make that operation out of place, "
                "or clone the argument first (z = z.clone())")

    def _check_member(self, name: str, out: torch.Tensor, i: int) -> None:
        """Member ``i`` of f's output against the state's member ``i`` (the whole state for one tensor)."""
        layout = self.layout
        shape, compute = layout.shapes[i], layout.compute_dtypes[i]
        if out.shape == shape and out.dtype == compute and out.device == self.device:
            return  # every evaluation: the messages below are built only when one is needed
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
        return (dtype.is_floating_point and autocast_enabled(self.device.type)
                and torch.promote_types(self.options.state_dtype, dtype) == self.options.state_dtype)


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled for a device type, False for those autocast does not know (meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


# Autograd's error when an in-place operation hits a leaf that requires grad (the backward's f inputs).
_LEAF_IN_PLACE = "a leaf Variable that requires grad is being used in an in-place operation"


def _watch(tensors) -> list:
    """(position, tensor, version counter) for each tensor f receives, to detect f writing to its arguments.
    Inference tensors have no version counter; f cannot write to them under inference mode anyway."""
    return [(i, t, t._version) for i, t in enumerate(tensors) if isinstance(t, torch.Tensor) and not t.is_inference()]


def _input_name(layout: StateLayout, n_x: int, i: int) -> str:
    """The name of f's i-th watched argument: the state's members first, then x's tensors."""
    members = len(layout.shapes)
    if i < members:
        return f"its input z[{i}]" if layout.is_tuple else "its input z"
    return "its input x" if n_x == 1 else f"its input x[{i - members}]"


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
        if isinstance(problem.f, torch.nn.Module):
            fix = ("register them on f as nn.Parameter (or in a submodule); a tensor computed outside f (e.g. an "
                   "encoder's output stored as an attribute) belongs in x, which may be a tuple of tensors. Or detach "
                   "them")
            what = "f (an nn.Module) uses"
            where = "are neither its parameters nor in x"
        else:
            fix = "Pass them (or the tensors f closes over) with params=[...], or detach them"
            what = "f depends on"
            where = "were passed neither as x nor in params"
        raise ValueError(
            f"{problem.caller}: {what} {len(hidden)} tensor(s) that require grad but {where} (shapes {shapes}); the "
            f"solver would silently give them no gradient. {fix[0].upper() + fix[1:]}")


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


# The caller's arguments, normalised (solver/__init__.py builds a Problem from them).


def x_tensors(caller: str, x):
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


def params_of(caller: str, f, params, x_tensors):
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


def state_layout(caller, x_tensors, z0, options) -> StateLayout:
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
            check_dense(caller, name, t)
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
