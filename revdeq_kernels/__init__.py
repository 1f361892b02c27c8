"""revdeq_kernels: fused, exact and memory-flat kernels for Reversible Deep Equilibrium models."""

from . import fixed_point
from .ops import available_backends, relax_, relax_fixed_, residual, unrelax_, unrelax_fixed_

__version__ = "0.1.0"

__all__ = ["available_backends", "fixed_point", "relax_", "relax_fixed_", "residual", "unrelax_", "unrelax_fixed_",
           "__version__"]
