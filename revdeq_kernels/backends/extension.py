"""The compiled module revdeq_kernels._C: C++ CPU kernels, and CUDA kernels when it was built with them.

Importing _C registers torch.ops.revdeq.{relax_, unrelax_, residual, relax_fixed_, unrelax_fixed_,
multi_relax_, multi_unrelax_, multi_residual}; this file adds their fake
(meta) kernels so they trace under torch.compile. When _C is missing, the package still works on
the reference backend and this module explains how to build it.
"""

import torch

from .reference import multi_residual_dtype

BUILD_COMMAND = "pip install --no-build-isolation -e .  (from the revdeq_kernels source tree)"

try:
    from revdeq_kernels import _C
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _LOAD_ERROR = f"revdeq_kernels._C is not importable ({exc}); build it with: {BUILD_COMMAND}"
else:
    _LOAD_ERROR = None


def loaded() -> bool:
    return _C is not None


def built_with_cuda() -> bool:
    return _C is not None and _C.built_with_cuda()


def unavailable_reason(device_type: str) -> str | None:
    if _C is None:
        return _LOAD_ERROR
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if not _C.built_with_cuda():
            return (
                "revdeq_kernels._C was built without CUDA kernels (CPU-only torch, no nvcc, or "
                f"REVDEQ_SKIP_CUDA_BUILD); rebuild with CUDA torch and nvcc: {BUILD_COMMAND}"
            )
        return None
    return f"revdeq_kernels._C has no kernels for {device_type} tensors"


def fixed_unavailable_reason(device_type: str) -> str | None:
    """None when _C has the exact-mode kernels for `device_type` tensors, else why not."""
    reason = unavailable_reason(device_type)
    if reason is not None:
        return reason
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    if not all(torch._C._dispatch_has_kernel_for_dispatch_key(f"revdeq::{op}", key)
               for op in ("relax_fixed_", "unrelax_fixed_")):
        return f"revdeq_kernels._C has no fixed-point (exact mode) kernels for {device_type} tensors"
    return None


_MULTI_OPS = ("multi_relax_", "multi_unrelax_", "multi_residual")


def _has_kernel(op: str, dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"revdeq::{op}", dispatch_key)
    except RuntimeError:  # the op is not defined at all: a _C built before it existed
        return False


def multi_unavailable_reason(device_type: str) -> str | None:
    """None when _C has the multi-tensor (tuple state) kernels for `device_type` tensors, else why not."""
    reason = unavailable_reason(device_type)
    if reason is not None:
        return reason
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    if not all(_has_kernel(op, key) for op in _MULTI_OPS):
        return (f"revdeq_kernels._C has no multi-tensor kernels for {device_type} tensors; rebuild it with: "
                f"{BUILD_COMMAND}")
    return None


def relax_(state: torch.Tensor, f_val: torch.Tensor, beta: float) -> None:
    torch.ops.revdeq.relax_(state, f_val, beta)


def unrelax_(state: torch.Tensor, f_val: torch.Tensor, beta: float) -> None:
    torch.ops.revdeq.unrelax_(state, f_val, beta)


def residual(z: torch.Tensor, fz: torch.Tensor) -> torch.Tensor:
    return torch.ops.revdeq.residual(z, fz)


def multi_relax_(states: list, f_vals: list, beta: float) -> None:
    torch.ops.revdeq.multi_relax_(states, f_vals, beta)


def multi_unrelax_(states: list, f_vals: list, beta: float) -> None:
    torch.ops.revdeq.multi_unrelax_(states, f_vals, beta)


def multi_residual(zs: list, fzs: list) -> torch.Tensor:
    return torch.ops.revdeq.multi_residual(zs, fzs)


def relax_fixed_(state, f_val, remainder, status, p: int, m: int, frac_bits: int) -> None:
    torch.ops.revdeq.relax_fixed_(state, f_val, remainder, status, p, m, frac_bits)


def unrelax_fixed_(state, f_val, remainder, status, p: int, m: int, frac_bits: int) -> None:
    torch.ops.revdeq.unrelax_fixed_(state, f_val, remainder, status, p, m, frac_bits)


if _C is not None:

    @torch.library.register_fake("revdeq::relax_")
    def _relax_fake(state, f_val, beta):
        return None

    @torch.library.register_fake("revdeq::unrelax_")
    def _unrelax_fake(state, f_val, beta):
        return None

    @torch.library.register_fake("revdeq::residual")
    def _residual_fake(z, fz):
        return z.new_empty(2, dtype=torch.float64 if z.dtype == torch.float64 else torch.float32)

    @torch.library.register_fake("revdeq::relax_fixed_")
    def _relax_fixed_fake(state, f_val, remainder, status, p, m, frac_bits):
        return None

    @torch.library.register_fake("revdeq::unrelax_fixed_")
    def _unrelax_fixed_fake(state, f_val, remainder, status, p, m, frac_bits):
        return None


def _check_multi_fake(op: str, a_name: str, a_list, b_name: str, b_list) -> None:
    """The list checks of csrc/multi.cpp, for fake tensors (a direct call on meta tensors lands here)."""
    torch._check_value(len(b_list) == len(a_list),
                       lambda: f"{op}: {b_name} has {len(b_list)} tensors but {a_name} has {len(a_list)}")
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        torch._check_value(a.device == a_list[0].device and b.device == a.device,
                           lambda i=i: f"{op}: the tensors of {a_name} and {b_name} must all be on one device, but "
                                       f"{a_name}[{i}] is on {a_list[i].device}, {b_name}[{i}] on {b_list[i].device} "
                                       f"and {a_name}[0] on {a_list[0].device}")
        torch._check_value(a.shape == b.shape, lambda i=i: f"{op}: {b_name}[{i}] has shape {list(b_list[i].shape)} "
                                                           f"but {a_name}[{i}] has shape {list(a_list[i].shape)}")


if _C is not None and all(hasattr(torch.ops.revdeq, op) for op in _MULTI_OPS):

    @torch.library.register_fake("revdeq::multi_relax_")
    def _multi_relax_fake(states, f_vals, beta):
        _check_multi_fake("multi_relax_", "states", states, "f_vals", f_vals)

    @torch.library.register_fake("revdeq::multi_unrelax_")
    def _multi_unrelax_fake(states, f_vals, beta):
        _check_multi_fake("multi_unrelax_", "states", states, "f_vals", f_vals)

    @torch.library.register_fake("revdeq::multi_residual")
    def _multi_residual_fake(zs, fzs):
        _check_multi_fake("multi_residual", "zs", zs, "fzs", fzs)
        return zs[0].new_empty(2, dtype=multi_residual_dtype(zs))
