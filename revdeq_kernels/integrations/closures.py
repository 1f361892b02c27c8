"""Find what a closure ``func(z)`` differentiates through, so the solver can be told.

torchdeq-style code calls ``deq(func, z_init)`` with ``func = lambda z: layer(z, x)``: the model's
parameters and the injected ``x = encoder(input)`` are closed over, not passed. The reversible
solver differentiates only with respect to what it is given (x, z0, params), so an adapter must
find those tensors first. :func:`find_closure_tensors` evaluates ``func`` once under
``torch.no_grad()`` inside a :class:`~torch.overrides.TorchFunctionMode` and records every tensor
argument of a torch function that requires grad. Under ``no_grad`` nothing ``func`` computes
requires grad, so what is recorded was made outside: the closure's leaves (parameters) and its
non-leaf tensors (``x = encoder(input)``, a weight computed by a normalisation hook). The non-leaf
ones are inputs: the solver returns their gradient once and autograd runs their history once,
instead of once per step.

When one found tensor's history reaches another (a weight both closed over directly and used by
the encoder that computed ``x``; a closure over an earlier solve's output with the same
parameters), a vector-Jacobian product of ``func`` with respect to both would count that path
twice. :func:`substituted` then lets ``func`` see detached stand-ins for the inputs, which keeps
every vector-Jacobian product partial.
"""

import dataclasses
import inspect

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Functions that update running statistics in place without bumping their version counters (aten's
# batch_norm schema does not mark them as mutated): the running_mean/running_var they get are updated when
# the flag named here is true.
_RUNNING_STATS_FLAG = {F.batch_norm: "training", F.instance_norm: "use_input_stats"}


def _tensors_in(obj):
    """The tensors inside nested tuples, lists and dict values (how torch functions take them)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors_in(item)


def _replace_tensors(obj, replace):
    """``obj`` with each tensor ``t`` in it replaced by ``replace(t)``; the same object when nothing changed."""
    if isinstance(obj, torch.Tensor):
        return replace(obj)
    if isinstance(obj, (tuple, list)):
        items = [_replace_tensors(item, replace) for item in obj]
        if all(new is old for new, old in zip(items, obj)):
            return obj
        if isinstance(obj, list):
            return items
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuples take fields
    if isinstance(obj, dict):
        items = {key: _replace_tensors(value, replace) for key, value in obj.items()}
        if all(items[key] is value for key, value in obj.items()):
            return obj
        return type(obj)(items)
    return obj


class _Recorder(TorchFunctionMode):
    """Records the tensor arguments not produced during the recording: those that require grad, and the
    others that the evaluation updates in place (seen through version counters, and for running statistics,
    which have none, through the functions that update them)."""

    def __init__(self):
        super().__init__()
        self.found = {}  # id -> tensor requiring grad, in first-use order
        self.versions = {}  # id -> (tensor, version at first use), for tensors that do not require grad
        self.running_stats = {}  # id -> tensor, running statistics given to a function that updates them
        # ids of tensors made while recording (a func that re-enables grad inside may make some that
        # require grad). Ids are safe: a closed-over tensor lives throughout, so none of these shares its id.
        self.produced = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in _tensors_in((args, kwargs)):
            if id(t) in self.produced:
                continue
            if t.requires_grad:
                self.found.setdefault(id(t), t)
            elif id(t) not in self.versions:
                self.versions[id(t)] = (t, t._version)
        if func in _RUNNING_STATS_FLAG:
            bound = inspect.signature(func).bind(*args, **kwargs)
            bound.apply_defaults()
            if bound.arguments[_RUNNING_STATS_FLAG[func]]:
                for name in ("running_mean", "running_var"):
                    t = bound.arguments[name]
                    if isinstance(t, torch.Tensor) and id(t) not in self.produced:
                        self.running_stats.setdefault(id(t), t)
        out = func(*args, **kwargs)
        self.produced.update(id(t) for t in _tensors_in(out))
        return out

    def updated(self) -> list:
        """The recorded tensors that do not require grad and were modified in place since their first use."""
        changed = {id(t): t for t, version in self.versions.values() if t._version != version}
        changed.update(self.running_stats)
        return list(changed.values())


class _Substitute(TorchFunctionMode):
    """Replaces given tensors (by identity) in the arguments of every torch function call."""

    def __init__(self, mapping):
        super().__init__()
        self.mapping = mapping  # id(original) -> replacement

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args, kwargs = _replace_tensors((args, kwargs or {}), lambda t: self.mapping.get(id(t), t))
        return func(*args, **kwargs)


@dataclasses.dataclass
class ClosureTensors:
    """What :func:`find_closure_tensors` found.

    Attributes:
        params: leaf tensors requiring grad that ``func`` reads (e.g. module parameters), first use first.
        inputs: non-leaf tensors requiring grad that ``func`` reads but did not compute (``x = encoder(input)``,
            a normalised weight computed before the call).
        entangled: True when the history of one of ``inputs`` reaches another found tensor; ``func`` must then
            be evaluated under :func:`substituted` for its vector-Jacobian products to be partial derivatives.
        updated: tensors not requiring grad that ``func`` read and modified in place (BatchNorm running
            statistics): state a backward's re-evaluations must put back.
    """

    params: list
    inputs: list
    entangled: bool
    updated: list


def _gradient_node(t: torch.Tensor):
    return torch.autograd.graph.get_gradient_edge(t).node


def _histories_reach(inputs, targets) -> bool:
    """True when the autograd history of some tensor in ``inputs`` reaches the gradient node of a tensor in
    ``targets`` (walking each node once, not past leaves)."""
    goal = {_gradient_node(t) for t in targets}
    seen = set()
    stack = [next_node for t in inputs for next_node, _ in t.grad_fn.next_functions]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in goal:
            return True
        if getattr(node, "variable", None) is None:  # not a leaf's AccumulateGrad: keep walking
            stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def find_closure_tensors(func, *state) -> ClosureTensors:
    """Evaluate ``func(*state)`` once under ``torch.no_grad()`` and return the tensors requiring grad it reads.

    Args:
        func: the closure, called as ``func(*state)``; its output is discarded. It runs once more than the
            solver runs it: randomness it draws and buffers it updates (BatchNorm statistics) see one more call.
        state: the tensor(s) ``func`` is called with (no grad needed; they are not recorded themselves).

    Returns:
        :class:`ClosureTensors`. A tensor ``func`` reads only on some calls (a data-dependent branch) is missed;
        pass such tensors explicitly. Tensors that are read first and updated in place by the same call
        (running statistics) are found through their version counters.

    Example:
        >>> lin = torch.nn.Linear(8, 8); x = torch.nn.Linear(4, 8)(torch.randn(2, 4))
        >>> found = find_closure_tensors(lambda z: torch.tanh(lin(z) + x), torch.zeros(2, 8))
        >>> [tuple(p.shape) for p in found.params], [tuple(t.shape) for t in found.inputs]
        ([(8, 8), (8,)], [(2, 8)])
    """
    recorder = _Recorder()
    recorder.produced.update(id(t) for t in state)
    with torch.no_grad(), recorder:
        func(*state)
    params = [t for t in recorder.found.values() if t.grad_fn is None]
    inputs = [t for t in recorder.found.values() if t.grad_fn is not None]
    entangled = bool(inputs) and _histories_reach(inputs, [*inputs, *params])
    return ClosureTensors(params, inputs, entangled, recorder.updated())


def substituted(originals, replacements):
    """A context in which torch functions see ``replacements[i]`` wherever they are given ``originals[i]``.

    Example:
        >>> with substituted([x], [x.detach().requires_grad_()]):
        ...     out = func(z)    # func's closure over x now reads the detached stand-in
    """
    return _Substitute({id(o): r for o, r in zip(originals, replacements)})
