"""FSDP2 (``fully_shard``) on f or on modules inside it.

FSDP2 keeps each parameter sharded (a DTensor) and, for every call of a sharded module, swaps in the
unsharded parameter it all-gathers. The solver evaluates f many times inside its own backward, where
FSDP2's gradient hooks do not apply: after the first re-evaluation FSDP2 treats the module as being
recomputed (its activation-checkpointing path) and would never reduce-scatter gradients that arrive in the
unsharded ``.grad``. So the solver does FSDP2's part itself, through public API only:

- before the solve, ``FSDPModule.reshard()``: f's parameters are the sharded DTensors, which become the
  inputs of the solver's autograd Function (the tensors whose gradients it returns);
- during each evaluation, a forward pre-hook on every sharded module (it runs after FSDP2's own, which
  unshards) notes the unsharded parameter standing in for each sharded one; the vector-Jacobian products
  differentiate those (``torch.autograd.grad``, so nothing lands in ``.grad`` for FSDP2 to see);
- after the backward, the summed gradient of each parameter is averaged over the ranks and sharded like the
  parameter (a ``Partial("avg")`` DTensor redistributed to the parameter's placements: the reduce-scatter
  FSDP2 would do), and returned; autograd accumulates it into the sharded parameter's ``.grad``.
"""

import contextlib

import torch


def fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6, where FSDP2 is public
    except ImportError:
        return None
    return FSDPModule


def sharded_modules(f) -> list:
    """(name, module) for f and each module inside it that is sharded with FSDP2 (f itself is named '').
    Without an initialised process group there are none, and f's modules are not walked."""
    fsdp_module = fsdp_module_type()
    if fsdp_module is None or not isinstance(f, torch.nn.Module) or not _distributed():
        return []
    return [(name, m) for name, m in f.named_modules() if isinstance(m, fsdp_module)]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


class FsdpBridge:
    """The sharded parameters of an f under FSDP2 and the unsharded ones its evaluations compute with.

    Args:
        f: the Module passed as f.
        modules: :func:`sharded_modules` of f (non-empty).
    """

    def __init__(self, f: torch.nn.Module, modules: list):
        self.modules = modules
        self.reshard()  # every sharded parameter of f is registered in its sharded form from here on
        self.sharded = {name: p for name, p in f.named_parameters() if _is_dtensor(p)}
        self._name_of = {id(p): name for name, p in self.sharded.items()}
        self.current = {}  # name -> the unsharded parameter of the latest evaluation

    @contextlib.contextmanager
    def capturing(self):
        """Note, at every call of a sharded module, the unsharded parameters FSDP2 has just swapped in."""
        def hook_for(prefix):
            def hook(module, args):
                for name, p in module.named_parameters():
                    full = prefix + name
                    if full in self.sharded and not _is_dtensor(p):
                        self.current[full] = p
            return hook

        handles = [m.register_forward_pre_hook(hook_for(f"{name}." if name else "")) for name, m in self.modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def reshard(self) -> None:
        """After the backward: the re-evaluations leave the modules unsharded (FSDP2 counts them as recomputation
        and its post-backward has run already), so shard them again, as FSDP2's own backward ends."""
        for _, module in self.modules:
            module.reshard()

    def substitute(self, tensors) -> list:
        """``tensors`` with each sharded parameter replaced by the unsharded one the last evaluation used."""
        return [self.current.get(self._name_of.get(id(t)), t) for t in tensors]

    def unsharded(self) -> list:
        return list(self.current.values())

    def sharded_grad(self, param, full_grad: torch.Tensor):
        """The gradient of a sharded parameter from this rank's gradient of its unsharded form: averaged over
        the ranks and sharded like the parameter (what FSDP2's reduce-scatter gives)."""
        from torch.distributed.tensor import DTensor, Partial

        mesh = param.device_mesh
        partial = DTensor.from_local(full_grad.to(torch.promote_types(full_grad.dtype, torch.float32)), mesh,
                                     [Partial("avg")] * mesh.ndim, run_check=False)
        return partial.redistribute(mesh, param.placements).to(param.dtype)

    def is_sharded(self, t) -> bool:
        return id(t) in self._name_of


@contextlib.contextmanager
def unbridged_calls_refused(caller: str, bridge: "FsdpBridge | None"):
    """Around f's first evaluation in a solve that will be differentiated: raise if f calls a module sharded
    with FSDP2 that the solver does not bridge (a closure over it, torchdeq's ``func``, a Module f calling a
    sharded module it does not own). FSDP2 would compute with unsharded parameters the solver cannot map to
    their shards, and their gradients would be lost. Costs nothing unless torch.distributed is initialised."""
    fsdp_module = fsdp_module_type()
    if fsdp_module is None or not _distributed():
        yield
        return
    bridged = {id(m) for _, m in bridge.modules} if bridge is not None else set()
    called = []

    def hook(module, args):
        if isinstance(module, fsdp_module) and id(module) not in bridged:
            called.append(type(module).__name__)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
    if called:
        raise NotImplementedError(
            f"{caller}: f calls {', '.join(sorted(set(called)))} sharded with FSDP2 (fully_shard) from outside f's own "
            "modules (a closure over it, or torchdeq's func): FSDP2 computes with unsharded parameters the solver "
            "cannot map to their shards there, so their gradients would be lost. Pass the sharded module itself as "
            "f (RevDEQ(cell), or reversible_fixed_point(cell, x) with cell(z, x)): the solver then differentiates "
            "FSDP2's unsharded parameters and reduce-scatters their gradients")
