"""revdeq_kernels: fused, exact and memory-flat kernels for Reversible Deep Equilibrium models."""

from . import fixed_point
from .autograd import reversible_fixed_point
from .info import DriftError
from .nn import RevDEQ
from .ops import available_backends, relax_, relax_fixed_, residual, unrelax_, unrelax_fixed_

__version__ = "0.1.0"

__all__ = [
    "DriftError",
    "RevDEQ",
    "available_backends",
    "fixed_point",
    "relax_",
    "relax_fixed_",
    "residual",
    "reversible_fixed_point",
    "unrelax_",
    "unrelax_fixed_",
    "__version__",
]
