"""The backend registry: each backend as an object that declares the device types and op families it
serves, and the order ``auto`` tries them in.

A backend is a module (imported on first use) with ``unavailable_reason(device_type, family) -> str |
None`` (None when it can run ``family`` ops here) and the ops of its families::

    relax_(state, f_val, beta), unrelax_(state, f_val, beta)   family "float" (in place, return None)
    residual(z, fz) -> Tensor
    relax_fixed_ / unrelax_fixed_(state, f_val, remainder, status, p, m, frac_bits)   family "exact"
    multi_relax_ / multi_unrelax_(states: list, f_vals: list, beta)                      family "multi"
    multi_residual(zs: list, fzs: list) -> Tensor

A backend whose kernels are registered torch ops declares ``op_prefix`` instead of defining the ops:
they are then ``torch.ops.revdeq.<op_prefix><op>`` (the compiled extension's ``relax_``, Triton's
``triton_relax_``, ...).

revdeq_kernels.ops checks every argument first (ops/checks.py) and skips empty tensors, so a backend
may assume valid, non-empty input (list members may be empty). Adding a backend: write that module,
add one :class:`Backend` to ``BACKENDS`` and, if ``auto`` should pick it, its name to ``AUTO_ORDER``.
A backend asked for by name never falls back: the choice point (ops/__init__.py) raises with
:meth:`Backend.unavailable_reason`, which ``available_backends()`` reports too.

Backends import only the leaves of ops/ (checks.py, dtypes.py, library.py) and exact/; never ops/__init__.py
(whose choice point imports them) nor the solver.
"""

import dataclasses
import importlib

import torch

FAMILIES = {"float": "relax_/unrelax_/residual", "exact": "fixed-point (exact mode)", "multi": "multi-tensor"}


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the fused ops.

    Attributes:
        name: what ``backend=`` and ``REVDEQ_BACKEND`` call it.
        module: the module implementing it, relative to this package.
        devices: the device types it can ever serve; None for every device type.
        families: the op families it implements (keys of ``FAMILIES``).
    """

    name: str
    module: str
    devices: tuple | None
    families: tuple = tuple(FAMILIES)
    op_prefix: str | None = None

    def can_serve(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices

    def load(self):
        """The backend's module (ImportError when it cannot be imported)."""
        return importlib.import_module(f"{__name__}.{self.module}")

    def implementation(self):
        """What serves the ops: the module, or its registered torch ops (op_prefix)."""
        module = self.load()
        return module if self.op_prefix is None else _TorchOps(self.op_prefix)

    def unavailable_reason(self, device_type: str, family: str = "float") -> str | None:
        """None when this backend can run ``family`` ops on ``device_type`` tensors here, else why not."""
        if not self.can_serve(device_type):
            return f"it serves {' and '.join(self.devices)} tensors only"
        if family not in self.families:
            return f"it has no {FAMILIES[family]} kernels"
        try:
            module = self.load()
        except ImportError as exc:
            return f"its module revdeq_kernels.backends.{self.module} failed to import ({exc})"
        reason = module.unavailable_reason(device_type, family)
        if reason is None and device_type == "cuda" and not torch.cuda.is_available():
            reason = "no CUDA device is visible"
        return reason


class _TorchOps:
    """A backend's ops as ``torch.ops.revdeq.<prefix><op>``, looked up when first used (Triton registers
    its exact-mode ops only when exact mode is first asked for)."""

    def __init__(self, prefix: str):
        self._prefix = prefix

    def __getattr__(self, op: str):
        return getattr(torch.ops.revdeq, self._prefix + op)


BACKENDS = (
    Backend("cuda", "compiled", ("cuda",), op_prefix=""),
    Backend("triton", "triton_backend", ("cuda", "cpu"), op_prefix="triton_"),
    Backend("cpp", "compiled", ("cpu",), op_prefix=""),
    Backend("reference", "reference", None),
)
REGISTRY = {b.name: b for b in BACKENDS}
NAMES = tuple(REGISTRY)

# What `auto` tries, first available wins. Triton on CPU (its interpreter) is for tests only, so it is
# used there only when asked for by name; other device types get the reference.
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpp", "reference"),
}
DEFAULT_ORDER = ("reference",)


def auto_order(device_type: str) -> tuple:
    return AUTO_ORDER.get(device_type, DEFAULT_ORDER)
