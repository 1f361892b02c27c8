"""revdeq_kernels: fused, exact and memory-flat kernels for Reversible Deep Equilibrium models."""

from .ops import available_backends, relax_, residual, unrelax_

__version__ = "0.1.0"

__all__ = ["available_backends", "relax_", "residual", "unrelax_", "__version__"]
