"""The backends the op-family tests (tests/ops/) run every case on, and how.

A :class:`Target` is a backend on the device it runs on here: the reference and the C++ kernels on CPU
tensors, Triton on CUDA tensors or, without a GPU, on CPU tensors through its interpreter (which
tests/conftest.py turns on), the CUDA kernels on a GPU. ``params(...)`` gives them as pytest params
with the marks that skip, with the reason, what this machine cannot run: a GPU target without a GPU, the
C++ target of an install built without it, Triton where it does not import (tests/backends/test_triton.py
fails outright in that case, since the test extra installs it).
"""

import dataclasses
import os

import pytest
import torch

from helpers.cuda_cases import skip_if_cuda_build_skipped
from revdeq_kernels import backends

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass(frozen=True)
class Target:
    backend: str
    device: str
    op_prefix: str | None  # its ops are torch.ops.revdeq.<op_prefix><op>; None: plain functions (reference)
    interpreted: bool = False  # Triton's interpreter: slow, so its cases are sized smaller

    def __str__(self):
        return self.backend


def _triton_reason():
    reason = backends.REGISTRY["triton"].unavailable_reason(TRITON_DEVICE)
    return None if reason is None else f"triton cannot run here ({reason}); tests/backends/test_triton.py says why"


_MARKS = {
    "reference": (),
    "cpp": (pytest.mark.skipif(os.environ.get("REVDEQ_SKIP_BUILD") == "1",
                               reason="REVDEQ_SKIP_BUILD=1: installed without the C++ extension"),),
    "triton": (pytest.mark.skipif(_triton_reason() is not None, reason=str(_triton_reason())),),
    "cuda": (pytest.mark.gpu, skip_if_cuda_build_skipped),
}

TARGETS = {
    "reference": Target("reference", "cpu", None),
    "cpp": Target("cpp", "cpu", ""),
    "triton": Target("triton", TRITON_DEVICE, "triton_", interpreted=TRITON_DEVICE == "cpu"),
    "cuda": Target("cuda", "cuda", ""),
}
WITH_OPS = ("cpp", "triton", "cuda")  # targets whose kernels are registered torch ops


def params(names=tuple(TARGETS), per_target=lambda target: [()]):
    """pytest params of (target, *extra) for the named targets, with their marks. ``per_target(target)``
    lists the extra values each target runs with (e.g. its sizes), one param each."""
    out = []
    for name in names:
        target = TARGETS[name]
        for extra in per_target(target):
            extra = extra if isinstance(extra, tuple) else (extra,)
            ident = "-".join([name, *map(str, extra)])
            out.append(pytest.param(target, *extra, marks=_MARKS[name], id=ident))
    return out
