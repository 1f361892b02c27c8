"""revdeq_kernels: fused, exact and memory-flat kernels for Reversible Deep Equilibrium models.

The public API, and nothing else. Two layers below it (imports point downward only):

    nn.py, diagnostics.py, integrations/   what users put in their models
    solver/      the reversible solver (forward iteration, reversible backward, states, info)
    ops/         the fused ops: checks, dtype rules, op schemas, the one backend choice point
    backends/    the registry and the implementations: reference, compiled (C++/CUDA), triton_backend
    exact/       exact mode's int64 fixed-point number format

Names of the previous release stay importable for one more: ``FixedPointError`` (now
``ExactModeError``), and the modules ``revdeq_kernels.fixed_point`` (now ``exact``), ``.info``
(``solver.info``) and ``.jacobian`` (``diagnostics``); using them warns (_aliases.py).
"""

from . import exact
from ._aliases import install as _install_aliases
from .diagnostics import jacobian_penalty, spectral_radius
from .exact import ExactModeError
from .nn import RevDEQ
from .ops import available_backends, relax_, relax_fixed_, residual, unrelax_, unrelax_fixed_
from .solver import DriftError, SolverInfo, reversible_fixed_point

__version__ = "0.1.0"

__all__ = [
    "DriftError",
    "ExactModeError",
    "RevDEQ",
    "SolverInfo",
    "available_backends",
    "exact",
    "jacobian_penalty",
    "relax_",
    "relax_fixed_",
    "residual",
    "reversible_fixed_point",
    "spectral_radius",
    "unrelax_",
    "unrelax_fixed_",
    "__version__",
]

__getattr__ = _install_aliases(__name__)
