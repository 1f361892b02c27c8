"""revdeq_kernels benchmarks: ``python -m benchmarks --help``.

- ``bench_ops``: relax_, unrelax_, residual on every backend against naive PyTorch, ``lerp_``,
  ``torch.compile`` and the copy bandwidth of the same bytes.
- ``bench_memory``: memory and time of one training step against solver steps (RevDEQ, exact mode,
  unrolled autograd, checkpoint per step, torchdeq) for the blocks in ``blocks``.
- ``common``: timing, cache rotation, environment stamp, JSON, progress.
- ``plots`` / ``readme``: PNGs and the README's Performance section, drawn from the JSON files.

Results land in ``benchmarks/results/`` named by device; ``--quick`` runs carry a ``-quick`` suffix
and are not committed.
"""
