"""What the benchmark tests share: running the command line in-process, and the thread count they restore."""

import contextlib
import io

import pytest
import torch

from benchmarks import __main__ as cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(argv) -> str:
    """``python -m benchmarks ARGV`` in this process; asserts it succeeded and returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    assert code == 0, f"python -m benchmarks {' '.join(argv)} exited with {code}"
    return out.getvalue()


@pytest.fixture(scope="module")
def threads_restored():
    # The benchmarks pin CPU runs to one thread (tiny work); the rest of the suite keeps its setting.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
