"""Adapters that put the reversible solver behind existing DEQ code.

- :mod:`revdeq_kernels.integrations.torchdeq`: a torchdeq core; importing it registers
  ``get_deq(core="revdeq")``. torchdeq is an optional dependency (``pip install torchdeq``), imported only
  by that module.
- :mod:`revdeq_kernels.integrations.closures`: finds the tensors a closure ``func(z)`` reads, for adapters
  whose convention closes over inputs and parameters instead of passing them.

Nothing here is imported by ``import revdeq_kernels``; these modules build on solver/ only.
"""
