"""The compiled module revdeq_kernels._C: C++ CPU kernels, and CUDA kernels when it was built with them.

Serves the ``cpp`` (CPU tensors) and ``cuda`` (CUDA tensors) backends. Importing _C registers its
kernels for the ``revdeq`` ops that ops/library.py defines (schemas and fakes), per dispatch key; the
ops are then ``torch.ops.revdeq.*`` themselves (the registry's op_prefix ""), and this module only says
whether _C has them.
When _C is missing the package still works on the reference backend, and this module says how to build
it.
"""

import torch

from ..ops import library  # noqa: F401  (the op definitions, before _C registers kernels for them)

BUILD_COMMAND = "pip install --no-build-isolation -e .  (from the revdeq_kernels source tree)"

try:
    from revdeq_kernels import _C
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _LOAD_ERROR = f"revdeq_kernels._C is not importable ({exc}); build it with: {BUILD_COMMAND}"
else:
    _LOAD_ERROR = None

# The ops of each family, and the dispatch key of each device type.
_FAMILY_OPS = {
    "float": ("relax_", "unrelax_", "residual"),
    "exact": ("relax_fixed_", "unrelax_fixed_"),
    "multi": ("multi_relax_", "multi_unrelax_", "multi_residual"),
}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_FAMILY_WORDS = {"float": "", "exact": "fixed-point (exact mode) ", "multi": "multi-tensor "}


def loaded() -> bool:
    return _C is not None


def built_with_cuda() -> bool:
    return _C is not None and _C.built_with_cuda()


def _has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{library.NAMESPACE}::{op}", key)
    except RuntimeError:  # no such op at all: a library.py older or newer than the family list
        return False


def has_kernel(op: str, device_type: str) -> bool:
    """Whether _C registered a kernel for ``revdeq::<op>`` for ``device_type`` tensors (ops outside the families,
    such as residual_out_, which only the C++ CPU kernels have)."""
    return _C is not None and device_type in _DISPATCH_KEYS and _has_kernel(op, _DISPATCH_KEYS[device_type])


def _has_kernels(family: str, device_type: str) -> bool:
    key = _DISPATCH_KEYS[device_type]
    return all(_has_kernel(op, key) for op in _FAMILY_OPS[family])


def unavailable_reason(device_type: str, family: str = "float") -> str | None:
    """None when _C has ``family`` kernels for ``device_type`` tensors, else why not (with the fix)."""
    if _C is None:
        return _LOAD_ERROR
    if device_type not in _DISPATCH_KEYS:
        return f"revdeq_kernels._C has no kernels for {device_type} tensors"
    if device_type == "cuda" and not _C.built_with_cuda():
        return ("revdeq_kernels._C was built without CUDA kernels (CPU-only torch, no nvcc, or "
                f"REVDEQ_SKIP_CUDA_BUILD); rebuild with CUDA torch and nvcc: {BUILD_COMMAND}")
    if not _has_kernels(family, device_type):
        return (f"revdeq_kernels._C has no {_FAMILY_WORDS[family]}kernels for {device_type} tensors; rebuild it "
                f"with: {BUILD_COMMAND}")
    return None
