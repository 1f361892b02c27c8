"""Exact mode on the Triton backend: relax_fixed_ / unrelax_fixed_ launchers, registered as torch ops.

backends/triton.py imports this module the first time exact mode is asked of it; importing it
registers ``torch.ops.revdeq.triton_relax_fixed_`` and ``triton_unrelax_fixed_`` the way the float
Triton ops are registered: `torch.library.triton_op`s with compiled kernels (torch.compile traces
into the kernels), opaque custom ops with fake kernels under the interpreter. The kernels and the
arithmetic are in backends/_triton_fixed_kernels.py; the format in revdeq_kernels/fixed_point.py.

Layout: remainder bits belong to row-major element indices, so the kernels walk contiguous tensors.
A state laid out otherwise is updated in a contiguous copy that is copied back (nothing outside the
view is written); f_val is read through a contiguous copy when it is not contiguous.
"""

import torch
from triton.runtime.interpreter import InterpretedFunction

from .. import fixed_point as fxp
from . import _triton_fixed_kernels as fixed_kernels
from . import triton as triton_backend

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
INTERPRETED = isinstance(fixed_kernels.relax_fixed_kernel, InterpretedFunction)

# Below TUNE_MIN_ELEMENTS a launch costs a few microseconds whatever the config: one config, no
# benchmarking. Larger sizes are autotuned once per (size, f dtype).
if INTERPRETED:
    _CONFIGS_LARGE = _CONFIGS_SMALL = fixed_kernels.INTERPRETER_FIXED_CONFIGS
else:
    _CONFIGS_LARGE, _CONFIGS_SMALL = fixed_kernels.FIXED_CONFIGS, fixed_kernels.FIXED_CONFIGS[:1]
_KERNELS = {  # (inverse, large) -> autotuned kernel
    (inverse, large): fixed_kernels.autotuned(
        fixed_kernels.unrelax_fixed_kernel if inverse else fixed_kernels.relax_fixed_kernel,
        _CONFIGS_LARGE if large else _CONFIGS_SMALL)
    for inverse in (False, True) for large in (False, True)
}

# wrap_triton makes a launch visible to torch.compile; it cannot wrap interpreted kernels (and
# torch < 2.6 has no wrap_triton), so those launch directly.
_USE_TRITON_OP = not INTERPRETED and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
_wrap = torch.library.wrap_triton if _USE_TRITON_OP else (lambda kernel: kernel)


def _check_args(op: str, state, f_val, remainder, status, p: int, m: int, frac_bits: int) -> None:
    """What a direct call of torch.ops.revdeq.triton_*_fixed_ needs so no kernel reads or writes out of
    bounds (revdeq_kernels.ops checks all of this, and memory overlap, first). Works while tracing."""
    torch._check_type(state.dtype == torch.int64,
                      lambda: f"{op}: state must be int64 (fixed point), got {state.dtype}")
    torch._check_type(f_val.dtype in _FLOAT_DTYPES,
                      lambda: f"{op}: f_val must be float64, float32, float16 or bfloat16, got {f_val.dtype}")
    torch._check_value(f_val.shape == state.shape,
                       lambda: f"{op}: f_val has shape {tuple(f_val.shape)} but state has shape {tuple(state.shape)}")
    for name, t in (("f_val", f_val), ("remainder", remainder), ("status", status)):
        torch._check_value(t.device == state.device,
                           lambda name=name, t=t: f"{op}: {name} is on {t.device} but state is on {state.device}")
    torch._check_value(1 <= m <= fxp.MAX_BETA_BITS,
                       lambda: f"{op}: beta = p / 2^m needs m in [1, {fxp.MAX_BETA_BITS}], got m={m}")
    torch._check_value(p % 2 == 1 and 0 < p < (2 << m),
                       lambda: f"{op}: beta = p / 2^m needs p odd in (0, 2^(m+1)), got p={p}, m={m}")
    torch._check_value(0 <= frac_bits <= fxp.MAX_FRAC_BITS,
                       lambda: f"{op}: frac_bits must be in [0, {fxp.MAX_FRAC_BITS}], got {frac_bits}")
    want = fxp.remainder_shape(state.numel(), m)
    torch._check_value(remainder.dtype == torch.int32 and tuple(remainder.shape) == want and remainder.is_contiguous(),
                       lambda: f"{op}: remainder must be a contiguous int32 tensor of shape {want} (m, ceil(numel / "
                               f"32)), got {remainder.dtype} of shape {tuple(remainder.shape)} with strides "
                               f"{remainder.stride()}")
    torch._check_value(status.dtype == torch.int32 and status.numel() == 1,
                       lambda: f"{op}: status must be an int32 tensor with one element, got {status.dtype} of shape "
                               f"{tuple(status.shape)}")


def _fixed_update(op: str, inverse: bool, state, f_val, remainder, status, p: int, m: int, frac_bits: int) -> None:
    _check_args(op, state, f_val, remainder, status, p, m, frac_bits)
    n = state.numel()
    if n == 0:
        return
    work = state if state.is_contiguous() else state.contiguous()
    f = f_val.contiguous()
    words = -(-n // fxp.WORD_BITS)
    kernel = _KERNELS[(inverse, n >= triton_backend.kernels.TUNE_MIN_ELEMENTS)]
    # The state's coefficient 2^m - p for the forward, its inverse modulo 2^64 for the inverse.
    coefficient = fxp.inverse_mod_2_64((1 << m) - p) if inverse else (1 << m) - p

    def grid(meta):
        return (-(-words // meta["WORDS"]),)

    with triton_backend._on_device_of(state):
        if inverse:
            _wrap(kernel)[grid](work, f, remainder, status, n, words, p, m, coefficient, frac_bits)
        else:
            _wrap(kernel)[grid](work, f, remainder, status, n, words, p, coefficient, m, frac_bits)
    if work is not state:
        state.copy_(work)


def _triton_relax_fixed_(state: torch.Tensor, f_val: torch.Tensor, remainder: torch.Tensor, status: torch.Tensor,
                         p: int, m: int, frac_bits: int) -> None:
    """In place, exactly: state = ((2^m - p) * state + p * round(f_val * 2^frac_bits)) >> m.

    See revdeq_kernels.relax_fixed_ for the rules. state: int64, any shape and strides. f_val: float64,
    float32, float16 or bfloat16, state's shape and device. remainder: int32, contiguous, shape
    (m, ceil(numel / 32)), overwritten with the dropped bits as bit planes. status: int32, one
    element; FixedStatus flags are ORed into it.

    Example:
        >>> torch.ops.revdeq.triton_relax_fixed_(y, fz, rem, status, 13, 4, 32)  # beta = 13/16
    """
    _fixed_update("triton_relax_fixed_", False, state, f_val, remainder, status, p, m, frac_bits)


def _triton_unrelax_fixed_(state: torch.Tensor, f_val: torch.Tensor, remainder: torch.Tensor, status: torch.Tensor,
                           p: int, m: int, frac_bits: int) -> None:
    """In place, exactly: the inverse of triton_relax_fixed_, given its f_val and remainder (read only).

    Same argument rules as triton_relax_fixed_.

    Example:
        >>> torch.ops.revdeq.triton_unrelax_fixed_(y, fz, rem, status, 13, 4, 32)  # undoes the relax
    """
    _fixed_update("triton_unrelax_fixed_", True, state, f_val, remainder, status, p, m, frac_bits)


def _fixed_fake(state, f_val, remainder, status, p, m, frac_bits):
    return None


def _register_ops() -> None:
    for fn, mutates in ((_triton_relax_fixed_, {"state", "remainder", "status"}),
                        (_triton_unrelax_fixed_, {"state", "status"})):
        name = f"revdeq::{fn.__name__.lstrip('_')}"
        if _USE_TRITON_OP:
            torch.library.triton_op(name, fn, mutates_args=mutates)  # derives its fake by running fn on fakes
        else:
            torch.library.custom_op(name, fn, mutates_args=mutates).register_fake(_fixed_fake)


_register_ops()


def relax_fixed_(state, f_val, remainder, status, p: int, m: int, frac_bits: int) -> None:
    torch.ops.revdeq.triton_relax_fixed_(state, f_val, remainder, status, p, m, frac_bits)


def unrelax_fixed_(state, f_val, remainder, status, p: int, m: int, frac_bits: int) -> None:
    torch.ops.revdeq.triton_unrelax_fixed_(state, f_val, remainder, status, p, m, frac_bits)
