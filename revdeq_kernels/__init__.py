"""revdeq_kernels: fused, exact and memory-flat kernels for Reversible Deep Equilibrium models."""

from . import fixed_point
from .autograd import reversible_fixed_point
from .fixed_point import FixedPointError
from .info import DriftError
from .jacobian import jacobian_penalty, spectral_radius
from .nn import RevDEQ
from .ops import available_backends, relax_, relax_fixed_, residual, unrelax_, unrelax_fixed_

__version__ = "0.1.0"

__all__ = [
    "DriftError",
    "FixedPointError",
    "RevDEQ",
    "available_backends",
    "fixed_point",
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
