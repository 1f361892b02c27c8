"""Which backends exist, which device types each serves, and the order `auto` tries them in.

A backend module defines relax_(state, f_val, beta) -> None, unrelax_(...) -> None,
residual(z, fz) -> Tensor and unavailable_reason(device_type) -> str | None. It may also
implement exact mode: relax_fixed_ / unrelax_fixed_(state, f_val, remainder, status, p, m,
frac_bits) -> None and fixed_unavailable_reason(device_type) -> str | None, and tuple states:
multi_relax_ / multi_unrelax_(states: list, f_vals: list, beta) -> None, multi_residual(zs, fzs)
-> Tensor and multi_unavailable_reason(device_type) -> str | None (members may be empty; the
residual dtype rule is reference.multi_residual_dtype). Argument checks happen before, in
revdeq_kernels/ops.py; backends may assume valid, non-empty inputs.
"""

import importlib

import torch

# name -> (module in this package, device types it can serve; None means every device type)
_BACKENDS = {
    "cuda": ("extension", ("cuda",)),
    "triton": ("triton", ("cuda", "cpu")),
    "cpp": ("extension", ("cpu",)),
    "reference": ("reference", None),
}
NAMES = tuple(_BACKENDS)

# What `auto` tries, first available wins. Triton on CPU (its interpreter) is for tests only, so it
# is used there only when asked for by name.
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpp", "reference"),
}
DEFAULT_ORDER = ("reference",)


def load(name: str):
    """The backend's module, or a string saying why it cannot be imported."""
    module_name, _ = _BACKENDS[name]
    try:
        return importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:
        return f"its module revdeq_kernels.backends.{module_name} failed to import ({exc})"


def unavailable_reason(name: str, device_type: str, kind: str = "float") -> str | None:
    """None when backend `name` can run ops on tensors of `device_type` here, else why not.

    kind "float" asks for relax_/unrelax_/residual, "fixed" for the exact-mode ops, "multi" for the
    multi-tensor (tuple state) ops."""
    _, devices = _BACKENDS[name]
    if devices is not None and device_type not in devices:
        return f"it serves {' and '.join(devices)} tensors only"
    module = load(name)
    if isinstance(module, str):
        return module
    reason = module.unavailable_reason(device_type)
    if reason is None and kind == "fixed":
        fixed_reason = getattr(module, "fixed_unavailable_reason", None)
        reason = (fixed_reason(device_type) if fixed_reason is not None
                  else "it has no fixed-point (exact mode) kernels yet")
    if reason is None and kind == "multi":
        multi_reason = getattr(module, "multi_unavailable_reason", None)
        reason = multi_reason(device_type) if multi_reason is not None else "it has no multi-tensor kernels yet"
    if reason is None and device_type == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA device is visible"
    return reason


def auto_order(device_type: str) -> tuple:
    return AUTO_ORDER.get(device_type, DEFAULT_ORDER)
