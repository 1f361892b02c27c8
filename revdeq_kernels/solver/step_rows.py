"""StepRows: a device buffer with one row per forward step, grown as the steps are taken.

With a tolerance the forward usually stops long before ``max_steps`` (``max_steps=10**9`` with a
tolerance met in 10 steps is legitimate), so the rows start small and double when the loop reaches
the end. With ``tol=None`` every step runs: all rows are allocated at once and never reallocated, so
the loop allocates nothing per step.
"""

import torch

FIRST_ROWS = 64  # with a tolerance: rows allocated before the first doubling


class StepRows:
    """Rows 0..max_steps of shape ``tail``, allocated ``FIRST_ROWS`` (or all, ``grow=False``) at a time.

    Read and written through ``rows[...]`` like a tensor; :meth:`ensure` before writing row ``n``."""

    def __init__(self, max_steps: int, tail: tuple, dtype: torch.dtype, device, grow: bool, zeros: bool = False):
        self.max_rows = max_steps + 1
        self._new = torch.zeros if zeros else torch.empty
        self.tail, self.dtype, self.device = tuple(tail), dtype, device
        self.data = self._alloc(min(self.max_rows, FIRST_ROWS) if grow else self.max_rows)

    def _alloc(self, rows: int) -> torch.Tensor:
        return self._new((rows, *self.tail), dtype=self.dtype, device=self.device)

    def ensure(self, row: int) -> None:
        """Make row ``row`` writable (doubling the capacity, up to max_steps + 1 rows)."""
        if row >= len(self.data):
            grown = self._alloc(min(self.max_rows, max(2 * len(self.data), row + 1)))
            grown[:len(self.data)] = self.data
            self.data = grown

    def row(self, index: int) -> torch.Tensor:
        """Row ``index`` as a view, for an op to write into (after :meth:`ensure`)."""
        return self.data.select(0, index)

    def __getitem__(self, index):
        return self.data[index]

    def __setitem__(self, index, value):
        self.data[index] = value

    def __len__(self) -> int:
        return len(self.data)
