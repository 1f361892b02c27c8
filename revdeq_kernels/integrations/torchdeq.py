"""RevDEQ as a torchdeq core: ``get_deq(core="revdeq")`` after importing this module.

torchdeq (``pip install torchdeq``) builds DEQs as ``deq = get_deq(args)`` and
``z_out, info = deq(func, z_init)``, where ``func(z)`` closes over the injected input and the
model's parameters. Importing this module registers :class:`RevDEQCore` under the name ``"revdeq"``,
so switching an existing model is one line of config::

    import revdeq_kernels.integrations.torchdeq  # registers core="revdeq"
    deq = get_deq(core="revdeq", f_max_iter=24, f_tol=1e-4, beta=0.5)
    z_out, info = deq(func, z_init)              # z_out: [z], info: a torchdeq SolverStat

Multiscale (MDEQ-style) models keep their state as a list and pass it as torchdeq does,
``deq(func, [z1, z2])`` with ``func(z1, z2)`` returning both: ``z_out[-1]`` is then the list of members,
all of them updated by one fused op call per step.

The returned state carries the exact gradient of the reversible iteration (equal to autograd through
the unrolled steps) at activation memory that does not grow with the number of steps. The tensors
``func`` reads are found by evaluating it once (:mod:`~revdeq_kernels.integrations.closures`): every
parameter and closed-over activation gets its gradient with ``loss.backward()``.

How torchdeq's options map (options at torchdeq's default value are always accepted quietly: configs
from ``torchdeq.add_deq_args`` carry every option):

==========================================  ========================================================
option                                      with ``core="revdeq"``
==========================================  ========================================================
``f_max_iter``                              the budget of ``f`` evaluations, as in torchdeq: at most
                                            ``max(1, f_max_iter // 2)`` RevDEQ steps (two each);
                                            ``0`` (also per call in ``solver_kwargs``): torchdeq
                                            runs no solver iterations, then ``grad`` unrolled steps
                                            with gradient, so the reversible iteration spends that
                                            budget: ``max(1, grad // 2)`` steps
``f_tol``                                   stop once ``||z - f(z)|| / ||f(z)||`` over the whole
                                            batch is ``<= f_tol``; ``None`` runs every step with no
                                            host synchronisation
``f_solver``                                ``"fixed_point_iter"`` (default): the reversible
                                            iteration; ``"simple_fixed_point_iter"``: the same with
                                            ``f_tol`` ignored (every step, no sync, as torchdeq);
                                            ``"anderson"``, ``"broyden"``: replaced by the reversible
                                            iteration, with a warning naming it; others: ValueError
``f_stop_mode``                             ``"abs"`` (torchdeq's default): stop once ``||z - f(z)||``
                                            over the whole batch is ``<= f_tol`` (so is every
                                            sample's); ``"rel"``: the same relative to ``||f(z)||``
``eval_factor``, ``eval_f_max_iter``        as torchdeq: the evaluation budget in ``eval()`` mode
``n_states`` > 1, ``indexing``              ValueError: one state is returned (no fixed-point
                                            correction terms)
``grad``                                    the budget when ``f_max_iter`` is 0 (above); else unused
``ift``, ``hook_ift``, ``tau``,             warning when not torchdeq's default: the gradient is the
``sup_gap``, ``sup_loc``                    exact reversible backward, not IFT or phantom gradients
``b_solver``, ``b_max_iter``, ``b_tol``,    warning when not torchdeq's default: no backward solver
``b_stop_mode``                             runs
``no_stat``                                 accepted; statistics cost nothing extra here
``beta``, ``state_dtype``,                  RevDEQ's own: every keyword of ``reversible_fixed_point``
``check_every``, ``max_drift``,             but ``max_steps`` and ``tol``; ``state_dtype`` may be
``revdeq_backend``, ...                     ``"float64"``/``"float32"``; ``backend`` is spelled
                                            ``revdeq_backend`` (argparse configs often carry a
                                            distributed ``backend``); ``beta`` defaults to 0.5 here,
                                            not 0.8 (see below)
==========================================  ========================================================

Why beta defaults to 0.5: torchdeq's default budget (``f_max_iter=40``) is 20 RevDEQ steps, and the
backward's reconstruction amplifies rounding by ``1/|1-beta|`` per half-step. At 20 steps beta 0.5 keeps the
drift around 1e-10 (float32 ``f``, float64 states), where beta 0.8 measured a drift of 1e5: gradients lost.

Per call, ``solver_kwargs={"f_max_iter": n}`` overrides the budget (``"return_final": True`` is what
happens anyway; ``"tau"`` and other keys: ValueError), ``sradius_mode=True`` estimates the spectral
radius in ``eval()`` mode as torchdeq does, and ``backward_writer`` is called after the backward with
a SolverStat holding ``nstep`` and ``"drift"``.

Unlike torchdeq's cores, ``eval()`` mode keeps the output differentiable while grad mode is on (for
input gradients or forces); wrap inference in ``torch.no_grad()`` to skip all gradient bookkeeping.
"""

import inspect
import math
import numbers
import warnings

import torch
from torchdeq.core import DEQBase, register_deq
from torchdeq.solver.stat import SolverStat
from torchdeq.utils.config import DEQConfig
from torchdeq.utils.layer_utils import MDEQWrapper

from ..solver import SolverOptions, solve
from .closures import find_closure_tensors, substituted

CORE_NAME = "revdeq"
CALLER = "RevDEQCore"

# Not RevDEQ's 0.8: torchdeq's default budget is 20 steps, too many for beta 0.8 (module docstring).
DEFAULT_BETA = 0.5
FIXED_POINT_SOLVERS = ("fixed_point_iter", "simple_fixed_point_iter")
# torchdeq's other forward solvers: a config that names one switches to RevDEQ's iteration with a warning.
REPLACED_SOLVERS = ("anderson", "broyden")
# Keyword arguments torchdeq's cores accept for logging and ignore themselves: quiet here too.
LOGGING_KWARGS = ("writer",)
STATE_DTYPE_NAMES = {"float64": torch.float64, "float32": torch.float32}

# torchdeq options that choose a gradient method or configure a backward solver, with torchdeq's defaults.
# The reversible backward is exact and needs neither, so a value other than the default earns a warning.
GRADIENT_OPTIONS = {
    "ift": False, "hook_ift": False, "tau": 1.0, "sup_gap": -1, "sup_loc": (),
    "b_solver": "fixed_point_iter", "b_max_iter": 40, "b_tol": 1e-6, "b_stop_mode": "abs",
}
# torchdeq options that ask for more than one returned state, with their defaults.
STATE_SAMPLING_OPTIONS = {"n_states": 1, "indexing": ()}
SOLVER_KWARGS = ("f_max_iter", "return_final")
# RevDEQ's own options: the keywords of SolverOptions.make that torchdeq's f_max_iter/f_tol do not set, read
# from the config under these names.
REVDEQ_OPTIONS = {name: ("revdeq_backend" if name == "backend" else name)
                  for name in inspect.signature(SolverOptions.make).parameters
                  if name not in ("caller", "max_steps", "tol", "stop_mode")}


class TorchDEQOptionWarning(UserWarning):
    """A torchdeq option was given that has no effect with ``core="revdeq"``."""


def _is_default(value, default) -> bool:
    if isinstance(default, tuple):  # list-valued options: [] and None are their defaults
        return value is None or (isinstance(value, (list, tuple)) and tuple(value) == default)
    if isinstance(value, (list, tuple)) and len(value) == 1:  # grad=[1] from argparse's nargs="+"
        value = value[0]
    return value == default


def _nfe(name: str, value, allow_zero: bool = False) -> int:
    """A budget of f evaluations as an int >= 1 (or 0 where torchdeq allows it: no solver iterations)."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= low or not math.isfinite(value):
        raise ValueError(f"{CALLER}: {name} must be a finite number of f evaluations >= {low}, got {value!r}")
    return int(value)


def _grad_nfe(value) -> int:
    """torchdeq's ``grad`` (an int, or a list from argparse's nargs="+"): the unrolled steps with gradient
    its recipes run after the solver, i.e. the evaluations of f they budget when f_max_iter is 0."""
    steps = max(value) if isinstance(value, (list, tuple)) and value else value
    return _nfe("grad", steps)


def steps_for(nfe: int) -> int:
    """RevDEQ steps for a budget of ``nfe`` evaluations of f: two per step, at least one step."""
    return max(1, nfe // 2)


def _state_dtype(value) -> torch.dtype:
    if isinstance(value, str):
        if value not in STATE_DTYPE_NAMES:
            raise ValueError(f"{CALLER}: state_dtype must be torch.float64, torch.float32, 'float64' or 'float32', "
                             f"got {value!r}")
        return STATE_DTYPE_NAMES[value]
    return value


def check_config(config: DEQConfig) -> None:
    """Refuse or warn about the torchdeq options ``core="revdeq"`` cannot honour (see the module docstring)."""
    f_solver = config.get("f_solver", "fixed_point_iter")
    if f_solver in REPLACED_SOLVERS:
        warnings.warn(
            f"{CALLER}: f_solver={f_solver!r} is replaced by RevDEQ's reversible fixed-point iteration (its exact "
            "reversible backward needs its own iteration); the budget f_max_iter and f_tol apply to it",
            TorchDEQOptionWarning, stacklevel=3)
    elif f_solver not in FIXED_POINT_SOLVERS:
        raise ValueError(
            f"{CALLER}: f_solver={f_solver!r} is not a torchdeq solver the revdeq core knows; use "
            f"'fixed_point_iter' (or 'simple_fixed_point_iter'; 'anderson' and 'broyden' are replaced by it)")
    stop_mode = config.get("f_stop_mode", "abs")
    if stop_mode not in ("rel", "abs"):
        raise ValueError(f"{CALLER}: f_stop_mode must be 'rel' or 'abs', got {stop_mode!r}")
    for name, default in STATE_SAMPLING_OPTIONS.items():
        value = config.get(name, default)
        if not _is_default(value, default):
            raise ValueError(
                f"{CALLER}: {name}={value!r} is not supported: the revdeq core returns one state, the solver's "
                f"last (fixed-point correction terms over sampled states need torchdeq's core='indexing'/'sliced'); "
                f"leave {name} at its default {default if default != () else None!r}")
    ignored = [f"{name}={config.get(name)!r}" for name, default in GRADIENT_OPTIONS.items()
               if not _is_default(config.get(name, default), default)]
    if ignored:
        warnings.warn(
            f"{CALLER}: {', '.join(ignored)} ha{'s' if len(ignored) == 1 else 've'} no effect: the revdeq core's "
            "gradient is the exact reversal of its forward iteration (no implicit differentiation, phantom "
            "gradient or backward solver)", TorchDEQOptionWarning, stacklevel=3)


class RevDEQStat(SolverStat):
    """torchdeq's :class:`~torchdeq.solver.stat.SolverStat` (a dict) for one revdeq solve.

    Keys, each a tensor on the state's device (the solver measures the residual over the whole batch, so every
    sample carries the batch's value; ``B`` is ``z_init.shape[0]``, or its size when 1-d):

    - ``"abs_lowest"``: ``(B,)``, the root mean square over samples of ``||z - f(z)||`` at the returned state.
    - ``"rel_lowest"``: ``(B,)``, ``||z - f(z)|| / ||f(z)||`` over the batch at the returned state.
    - ``"abs_trace"``, ``"rel_trace"``: ``(B, steps + 1)``, the same after each step (column 0: at ``z_init``).
    - ``"nstep"``: ``(B,)``, f evaluations the steps used (2 per step), the unit of ``f_max_iter``.
    - ``"sradius"``: ``(1,)``: -1 in training, 0 in eval, or ``(B,)`` with ``sradius_mode=True`` in eval.

    ``solver_info`` is the :class:`~revdeq_kernels.solver.info.SolverInfo`: ``"steps"``, ``"residual"`` and, after
    the backward, ``"drift"``.

    Example:
        >>> z_out, info = deq(func, z_init)
        >>> info["rel_lowest"].mean().item(), info["nstep"].mean().item(), info.solver_info["steps"]
    """

    def __init__(self, *args, solver_info=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.solver_info = solver_info

    @classmethod
    def from_solve(cls, solver_info, z) -> "RevDEQStat":
        """The statistics of a finished solve, computed on the device (no host synchronisation). ``z``: the
        returned state, or its list of tensors (the batch size is read from the first)."""
        z = z[0] if isinstance(z, (tuple, list)) else z
        batch = z.shape[0] if z.dim() >= 2 else z.numel()
        history = solver_info.residual_history()
        d2, f2 = history[:, 0], history[:, 1]
        abs_trace = (d2 / max(batch, 1)).sqrt()
        rel_trace = (d2 / f2.clamp_min(torch.finfo(f2.dtype).tiny)).sqrt()
        nstep = torch.full((batch,), 2.0 * solver_info.steps, dtype=history.dtype, device=history.device)
        return cls(abs_lowest=abs_trace[-1].expand(batch), rel_lowest=rel_trace[-1].expand(batch),
                   abs_trace=abs_trace.expand(batch, -1), rel_trace=rel_trace.expand(batch, -1), nstep=nstep,
                   solver_info=solver_info)


def _note_first_call(exc: Exception, members, multi: bool) -> None:
    """Name the core and what it passed when func fails on its first call (a z_init of the wrong shape,
    dtype or device, or a func that does not take the state as torchdeq passes it)."""
    if not hasattr(exc, "add_note"):  # Python < 3.11
        return
    shapes = ", ".join(f"{tuple(m.shape)} {str(m.dtype).replace('torch.', '')} on {m.device}" for m in members)
    call = f"func(*z_init) with {len(members)} tensors" if multi else "func(z_init)"
    exc.add_note(f"{CALLER}: raised by func on its first call, {call}: {shapes}. z_init must have the shape, "
                 "dtype and device of func's state, and func must take the state as its only argument (a list "
                 "state: one argument per member)")


def _state(z_init) -> list:
    """torchdeq's ``z_init`` as a list of its tensors: one, or the members of a list/tuple state (MDEQ)."""
    if isinstance(z_init, (tuple, list)):
        if not z_init:
            raise ValueError(f"{CALLER}: z_init is an empty {type(z_init).__name__}; pass at least one tensor")
        members, names = list(z_init), [f"z_init[{i}]" for i in range(len(z_init))]
    else:
        members, names = [z_init], ["z_init"]
    for name, t in zip(names, members):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{CALLER}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{CALLER}: {name} must be a floating tensor, got dtype {t.dtype}")
    return members


class RevDEQCore(DEQBase):
    """A torchdeq DEQ core that solves with the reversible RevDEQ iteration and returns exact gradients.

    Made by ``torchdeq.get_deq(core="revdeq", ...)`` once this module is imported, or directly. Options are
    torchdeq's (``args`` as for any torchdeq core: a dict, ``argparse.Namespace`` or ``DEQConfig``, updated
    by keyword arguments) plus RevDEQ's: ``beta`` (0.5), ``state_dtype`` (float64), ``check_every`` (1),
    ``max_drift`` (None), ``revdeq_backend`` (None) and any further keyword of
    :func:`~revdeq_kernels.reversible_fixed_point`. The module docstring has the table of how each torchdeq option
    maps; options with no meaning here are refused (ValueError) or warned about
    (:class:`TorchDEQOptionWarning`), never silently dropped.

    ``forward(func, z_init, solver_kwargs=None, sradius_mode=False, backward_writer=None, params=None)``:

    - ``func(z)`` returns a tensor shaped and typed like ``z``; with a list state (torchdeq's multiscale,
      MDEQ-style ``deq(func, [z1, z2])``) it is called as ``func(z1, z2)`` and returns as many tensors,
      each shaped and typed like its member, as torchdeq's cores do. It is evaluated once more than the solver
      needs, under ``torch.no_grad()``, to find the tensors requiring grad it reads (see
      :func:`~revdeq_kernels.integrations.closures.find_closure_tensors`); it must read the same ones at every
      call. ``params``: tensors to differentiate besides those found (one ``func`` reads only on some calls).
    - ``z_init``: the start, one floating tensor of any shape, or a list (or tuple) of them: a tuple state
      that the fused ops update in one call per step for all members (see
      :func:`~revdeq_kernels.reversible_fixed_point`). The state is held in ``state_dtype`` and ``func`` sees
      a cast to each member's dtype. Each tensor gets a gradient when it requires grad.
    - Returns ``([z], info)``: ``z`` shaped and typed like ``z_init`` (for a list state, a list of tensors,
      so ``z_out[-1][i]`` is member ``i`` as with torchdeq's cores), differentiable when grad mode is on
      (in ``eval()`` mode too), and a :class:`RevDEQStat` (residuals over all members together).

    Gradients: ``loss.backward()`` reaches every tensor ``func`` reads and everything those were computed
    from. ``torch.autograd.grad(loss, inputs)`` works for the same tensors: ``inputs`` must be among those
    ``func`` reads at its first call, ``z_init``, tensors upstream of them (the encoder's weights and input),
    or tensors passed with ``params=``.

    Example:
        >>> import revdeq_kernels.integrations.torchdeq  # noqa: F401 (registers core="revdeq")
        >>> from torchdeq import get_deq
        >>> deq = get_deq(core="revdeq", f_max_iter=24, f_tol=1e-4, beta=0.5)
        >>> x = encoder(images)
        >>> z_out, info = deq(lambda z: layer(z, x), torch.zeros_like(x))
        >>> loss = criterion(head(z_out[-1]), labels); loss.backward()
    """

    def __init__(self, args=None, **kwargs):
        config = DEQConfig(args)
        config.update(**kwargs)
        check_config(config)
        _nfe("f_max_iter", config.get("f_max_iter", 40), allow_zero=True)  # before torchdeq derives the eval budget
        super().__init__(config)
        self.f_max_iter = int(self.f_max_iter)
        self.eval_f_max_iter = _nfe("eval_f_max_iter (else f_max_iter * eval_factor)", self.eval_f_max_iter,
                                    allow_zero=True)
        self.grad_nfe = _grad_nfe(self.args.get("grad", 1))
        self.fixed_steps = self.args.get("f_solver", "fixed_point_iter") == "simple_fixed_point_iter"
        missing = object()
        given = {name: self.args.get(key, missing) for name, key in REVDEQ_OPTIONS.items()}
        self.revdeq_kwargs = {name: value for name, value in given.items() if value is not missing}
        self.revdeq_kwargs.setdefault("beta", DEFAULT_BETA)
        if "state_dtype" in self.revdeq_kwargs:
            self.revdeq_kwargs["state_dtype"] = _state_dtype(self.revdeq_kwargs["state_dtype"])
        self._options(self.f_max_iter)  # validate now, not at the first call

    def _options(self, nfe: int) -> SolverOptions:
        # f_max_iter=0 (torchdeq: no solver iterations, then `grad` unrolled steps with gradient, as the DEQ
        # transformer LM trains and deq-inr warm-starts): the reversible iteration spends that budget.
        tol = None if self.fixed_steps else self.f_tol
        return SolverOptions.make(CALLER, max_steps=steps_for(nfe if nfe > 0 else self.grad_nfe), tol=tol,
                                  stop_mode=self.f_stop_mode, **self.revdeq_kwargs)

    def _budget(self, solver_kwargs) -> int:
        nfe = self.f_max_iter if self.training else self.eval_f_max_iter
        if solver_kwargs is None:
            return nfe
        if not isinstance(solver_kwargs, dict):
            raise TypeError(f"{CALLER}: solver_kwargs must be a dict or None, got {type(solver_kwargs).__name__}")
        unknown = sorted(set(solver_kwargs) - set(SOLVER_KWARGS))
        if unknown:
            raise ValueError(
                f"{CALLER}: solver_kwargs keys {unknown} are not supported by the revdeq core (it takes "
                f"{', '.join(SOLVER_KWARGS)}; for damping set beta= when making the core)")
        if not solver_kwargs.get("return_final", True):
            warnings.warn(f"{CALLER}: solver_kwargs return_final=False has no effect: the revdeq core returns the "
                          "last state, whose gradient it computes exactly", TorchDEQOptionWarning, stacklevel=3)
        return _nfe("solver_kwargs['f_max_iter']", solver_kwargs.get("f_max_iter", nfe), allow_zero=True)

    def forward(self, func, z_init, solver_kwargs=None, sradius_mode=False, backward_writer=None, params=None,
                **kwargs):
        """``([z], info)`` with ``z = func(z)`` solved by the reversible iteration; see the class docstring."""
        unused = sorted(set(kwargs) - set(LOGGING_KWARGS))
        if unused:
            warnings.warn(f"{CALLER}: keyword arguments {unused} have no effect", TorchDEQOptionWarning,
                          stacklevel=2)
        if not callable(func):
            raise TypeError(f"{CALLER}: func must be callable as func(z), got {type(func).__name__}")
        members = _state(z_init)
        multi = isinstance(z_init, (tuple, list))
        options = self._options(self._budget(solver_kwargs))

        try:
            found = (find_closure_tensors(func, *(m.detach() for m in members)) if torch.is_grad_enabled()
                     else None)
        except Exception as exc:
            _note_first_call(exc, members, multi)
            raise
        cell = _ClosureCell(func, found, multi)
        explicit = [] if params is None else list(params)
        z0 = list(members) if multi else members[0]  # a list state comes back as a list, as from torchdeq
        z, solver_info = solve(cell, tuple(cell.inputs), z0=z0, params=[*cell.params, *explicit], options=options,
                               caller=CALLER)
        first = z[0] if multi else z
        info = RevDEQStat.from_solve(solver_info, z)
        if backward_writer is not None and first.grad_fn is not None:  # one node: the members share it
            first.grad_fn.register_hook(
                lambda grad_inputs, grad_outputs: backward_writer(_backward_stat(solver_info)))
        if not self.training:
            info["sradius"] = (self._sradius(*_flat_func(func, z, multi)) if sradius_mode
                               else torch.zeros(1, device=first.device))
        return [z], info


class _ClosureCell(torch.nn.Module):
    """``func(z)`` as the solver's ``f(z, xs)``, with what :func:`find_closure_tensors` found (None: nothing).

    The tensors ``func`` updates in place (BatchNorm statistics) are registered as this module's buffers, not
    copied, so the solver puts them back after its backward's re-evaluations as it does for a module ``f``.
    """

    def __init__(self, func, found, multi=False):
        super().__init__()
        self.func = func
        self.multi = multi  # a list state: func takes the members as arguments, torchdeq's MDEQ convention
        self.params = found.params if found else []
        self.inputs = found.inputs if found else []
        self.entangled = found.entangled if found else False
        for i, t in enumerate(found.updated if found else ()):
            self.register_buffer(f"updated_{i}", t)

    def forward(self, z, xs):
        # In the backward the solver passes detached stand-ins for the inputs; when their histories are
        # entangled, func must read those so each vector-Jacobian product stays a partial derivative.
        args = z if self.multi else (z,)
        if self.entangled and any(a is not b for a, b in zip(xs, self.inputs)):
            with substituted(self.inputs, xs):
                return self.func(*args)
        return self.func(*args)


def _flat_func(func, z, multi):
    """``(func, z)`` as torchdeq's spectral radius estimate takes them: one tensor in, one out (a list state
    flattened per sample with torchdeq's own wrapper), ``z`` detached."""
    if not multi:
        return func, z.detach()
    wrapper = MDEQWrapper(func, z)
    return wrapper, wrapper.list2vec([m.detach() for m in z])


def _backward_stat(solver_info) -> SolverStat:
    """What ``backward_writer`` receives: f evaluations the backward used and the reconstruction drift."""
    steps = solver_info["steps"]
    return SolverStat(nstep=torch.tensor([2.0 * steps]), drift=torch.tensor([solver_info["drift"]]))


register_deq(CORE_NAME, RevDEQCore)
