"""Pure-PyTorch implementations of the three ops: the test oracle and the fallback on every device.

Arithmetic happens in float64 for float64 states and in float32 otherwise, then rounds once to
the state's dtype, which is what the compiled backends do too.
"""

import torch

NAME = "reference"


def unavailable_reason(device_type: str) -> str | None:
    return None  # runs wherever torch runs


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def relax_(state: torch.Tensor, f_val: torch.Tensor, beta: float) -> None:
    acc = compute_dtype(state.dtype)
    state.copy_((1.0 - beta) * state.to(acc) + beta * f_val.to(acc))


def unrelax_(state: torch.Tensor, f_val: torch.Tensor, beta: float) -> None:
    acc = compute_dtype(state.dtype)
    state.copy_((state.to(acc) - beta * f_val.to(acc)) / (1.0 - beta))


def residual(z: torch.Tensor, fz: torch.Tensor) -> torch.Tensor:
    acc = compute_dtype(z.dtype)
    f = fz.to(acc)
    diff = z.to(acc) - f
    return torch.stack([diff.square().sum(), f.square().sum()])
