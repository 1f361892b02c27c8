"""Running a test's worker in two CPU processes (gloo): spawn, wait with a deadline, kill on a hang."""

import time

import pytest
import torch.multiprocessing as mp


def run_two_processes(worker, args: tuple, what: str, timeout_s: float) -> None:
    """``worker(rank, *args)`` in two spawned processes; fails the test naming ``what`` if they hang."""
    context = mp.start_processes(worker, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two {what} processes did not finish within {timeout_s:.0f} s")
