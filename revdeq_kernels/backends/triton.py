"""The Triton backend: relax_, unrelax_ and residual as Triton kernels, registered as torch ops.

`auto` uses it for CUDA tensors when the compiled CUDA extension is absent; ask for it by name with
``backend="triton"``. On CPU tensors it runs only under Triton's interpreter (TRITON_INTERPRET=1
set before triton is first imported), which is how the tests exercise the kernels without a GPU.

The ops are ``torch.ops.revdeq.triton_relax_``, ``triton_unrelax_`` and ``triton_residual``, and for
exact mode ``triton_relax_fixed_`` and ``triton_unrelax_fixed_`` (backends/_triton_fixed.py). With
compiled kernels they are `torch.library.triton_op`s, so `torch.compile` sees (and may fuse around)
the kernels instead of breaking the graph; under the interpreter, which `wrap_triton` cannot trace,
they are opaque custom ops with fake kernels, which compile without graph breaks as well.

Layouts: tensors that fill one block of memory (contiguous, or a permutation of it) are walked as
flat arrays in place; an f_val laid out differently from a dense state is first copied into the
state's layout; a state with gaps (a strided slice) is updated through a contiguous copy that is
copied back, so nothing outside the view is written.
"""

import contextlib
import importlib.util
import math
import struct

import torch

NAME = "triton"

kernels = None
INTERPRETED = False
if importlib.util.find_spec("triton") is None:
    _MISSING = "triton is not installed; install it with: pip install triton"
else:
    try:
        from triton.runtime.interpreter import InterpretedFunction

        from . import _triton_kernels as kernels
    except Exception as exc:  # e.g. a triton built for another torch/CUDA: report it, keep the package usable
        _MISSING = f"triton is installed but failed to import ({type(exc).__name__}: {exc})"
    else:
        # triton.jit chose compiled or interpreted kernels when _triton_kernels was imported.
        INTERPRETED = isinstance(kernels.affine_kernel, InterpretedFunction)
        _MISSING = None

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def unavailable_reason(device_type: str) -> str | None:
    """None when these kernels can run on `device_type` tensors here, else why not."""
    if _MISSING is not None:
        return _MISSING
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if INTERPRETED:
            return None
        return ("Triton runs on CPU tensors only through its interpreter, which is meant for tests: "
                "set TRITON_INTERPRET=1 before triton is first imported")
    return f"Triton kernels run on cuda tensors (or cpu under TRITON_INTERPRET=1), not {device_type}"


# The backend contract (revdeq_kernels.ops has checked the arguments and skipped empty tensors).


def relax_(state: torch.Tensor, f_val: torch.Tensor, beta: float) -> None:
    """state = (1 - beta) * state + beta * f_val, in place; see _triton_relax_."""
    torch.ops.revdeq.triton_relax_(state, f_val, beta)


def unrelax_(state: torch.Tensor, f_val: torch.Tensor, beta: float) -> None:
    """state = (state - beta * f_val) / (1 - beta), in place; see _triton_unrelax_."""
    torch.ops.revdeq.triton_unrelax_(state, f_val, beta)


def residual(z: torch.Tensor, fz: torch.Tensor) -> torch.Tensor:
    """[sum((z - fz)^2), sum(fz^2)], shape (2,); see _triton_residual."""
    return torch.ops.revdeq.triton_residual(z, fz)


# Exact mode lives in backends/_triton_fixed.py, imported (and its ops registered) on first use.
_fixed_error = None


def fixed_unavailable_reason(device_type: str) -> str | None:
    """None when the exact-mode kernels can run on `device_type` tensors here, else why not."""
    global _fixed_error
    reason = unavailable_reason(device_type)
    if reason is not None:
        return reason
    if _fixed_error is None:
        try:
            from . import _triton_fixed  # noqa: F401  (registers torch.ops.revdeq.triton_*_fixed_)
        except Exception as exc:  # e.g. an older Triton without an API the kernels use: report, not raise
            _fixed_error = f"the exact-mode Triton kernels failed to load ({type(exc).__name__}: {exc})"
        else:
            _fixed_error = ""
    return _fixed_error or None


def relax_fixed_(state, f_val, remainder, status, p: int, m: int, frac_bits: int) -> None:
    """Exact-mode forward half-step; see backends/_triton_fixed.py."""
    torch.ops.revdeq.triton_relax_fixed_(state, f_val, remainder, status, p, m, frac_bits)


def unrelax_fixed_(state, f_val, remainder, status, p: int, m: int, frac_bits: int) -> None:
    """Exact-mode inverse half-step; see backends/_triton_fixed.py."""
    torch.ops.revdeq.triton_unrelax_fixed_(state, f_val, remainder, status, p, m, frac_bits)


# ---------------------------------------------------------------------------------------------------
# Argument checks for direct calls of torch.ops.revdeq.triton_* (revdeq_kernels.ops checks first and
# more thoroughly; these keep a direct call from reading out of bounds). torch._check* work while
# tracing, too.


def _check_pair(op: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    for name, t in ((a_name, a), (b_name, b)):
        torch._check_type(t.dtype in _FLOAT_DTYPES,
                          lambda name=name, t=t: f"{op}: {name} must be float64, float32, float16 or bfloat16, "
                                                 f"got {t.dtype}")
    torch._check_type(torch.promote_types(a.dtype, b.dtype) == a.dtype,
                      lambda: f"{op}: {b_name} has dtype {b.dtype}, which {a_name} ({a.dtype}) cannot hold "
                              f"without losing precision")
    torch._check_value(b.shape == a.shape, lambda: f"{op}: {b_name} has shape {tuple(b.shape)} but {a_name} "
                                                   f"has shape {tuple(a.shape)}")
    torch._check_value(b.device == a.device, lambda: f"{op}: {b_name} is on {b.device} but {a_name} is on "
                                                     f"{a.device}")


def _check_beta(op: str, beta: float) -> None:
    torch._check_value(math.isfinite(beta) and 0.0 < beta < 2.0 and beta != 1.0,
                       lambda: f"{op}: beta must be a finite number in (0, 2) other than 1, got {beta!r}")


# ---------------------------------------------------------------------------------------------------
# Layouts


def _is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill one gap-free, non-overlapping block of memory, in any dim order."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_order(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride()) if size != 1)


def _flat_pair(primary: torch.Tensor, secondary: torch.Tensor):
    """(primary', secondary'): dense tensors whose memory, read as flat arrays, pairs element k of
    one with element k of the other. primary' is primary itself whenever primary is dense."""
    if _is_dense(primary):
        if not (_is_dense(secondary) and _same_order(primary, secondary)):
            # empty_like keeps a dense tensor's strides, so the copy is laid out like primary.
            secondary = torch.empty_like(primary, dtype=secondary.dtype).copy_(secondary)
        return primary, secondary
    return primary.contiguous(), secondary.contiguous()


# ---------------------------------------------------------------------------------------------------
# Launchers


def _float64_bits(x: float) -> int:
    """x's IEEE-754 bit pattern as a signed int64: how a scalar reaches a kernel without rounding."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _coefficients(beta: float, inverse: bool) -> tuple:
    """(a, b) with relax_ = a * state + b * f (inverse=False) or unrelax_ (inverse=True)."""
    if not inverse:
        return 1.0 - beta, beta
    inv = 1.0 / (1.0 - beta)
    return inv, -beta * inv


# The launch choices. Pointwise: sizes below TUNE_MIN_ELEMENTS use one config without benchmarking,
# larger ones are autotuned once per (size, dtypes). residual: (block, max programs, warps), fixed.
if kernels is not None and INTERPRETED:
    _AFFINE_LARGE = _AFFINE_SMALL = kernels.autotuned_affine(kernels.INTERPRETER_POINTWISE_CONFIGS)
    _RESIDUAL_LAUNCH = (kernels.INTERPRETER_RESIDUAL_BLOCK, kernels.INTERPRETER_RESIDUAL_MAX_PROGRAMS, 4)
elif kernels is not None:
    _AFFINE_LARGE = kernels.autotuned_affine(kernels.POINTWISE_CONFIGS)
    _AFFINE_SMALL = kernels.autotuned_affine(kernels.POINTWISE_CONFIGS[:1])
    _RESIDUAL_LAUNCH = (kernels.RESIDUAL_BLOCK, kernels.RESIDUAL_MAX_PROGRAMS, kernels.RESIDUAL_WARPS)

# wrap_triton makes a launch visible to torch.compile; it cannot wrap interpreted kernels (and
# torch < 2.6 has no wrap_triton), so those launch directly.
if INTERPRETED or not hasattr(torch.library, "wrap_triton"):
    def _wrap(kernel):
        return kernel
else:
    _wrap = torch.library.wrap_triton


def _launch_affine(kernel, state: torch.Tensor, f: torch.Tensor, a: float, b: float) -> None:
    """state = a * state + b * f on flat, paired, non-empty tensors, with `kernel` (affine_kernel
    behind an autotuner)."""
    n = state.numel()

    def grid(meta):
        return (-(-n // meta["BLOCK"]),)

    _wrap(kernel)[grid](state, f, n, _float64_bits(a), _float64_bits(b), FP64=state.dtype == torch.float64)


def _on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device, so make it t's (a no-op without CUDA)."""
    if t.device.type == "cuda" and torch.cuda.is_available() and t.device.index is not None \
            and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device.index)
    return contextlib.nullcontext()


def _affine_update(op: str, state: torch.Tensor, f_val: torch.Tensor, beta: float, inverse: bool) -> None:
    _check_pair(op, "state", state, "f_val", f_val)
    _check_beta(op, beta)
    if state.numel() == 0:
        return
    work, f = _flat_pair(state, f_val)
    kernel = _AFFINE_LARGE if state.numel() >= kernels.TUNE_MIN_ELEMENTS else _AFFINE_SMALL
    with _on_device_of(state):
        _launch_affine(kernel, work, f, *_coefficients(beta, inverse))
    if work is not state:
        state.copy_(work)


def _launch_residual(z: torch.Tensor, fz: torch.Tensor, block: int, max_programs: int, num_warps: int):
    """[sum((z - fz)^2), sum(fz^2)] of flat, paired, non-empty tensors, in two deterministic stages.

    max_programs must be a power of two: it is also the width of the final reduction.
    """
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    n = z.numel()
    programs = min(-(-n // block), max_programs)
    partials = torch.empty(2 * programs, dtype=acc, device=z.device)
    out = torch.empty(2, dtype=acc, device=z.device)
    _wrap(kernels.residual_partials_kernel)[(programs,)](
        z, fz, partials, n, BLOCK=block, FP64=acc == torch.float64, num_warps=num_warps)
    _wrap(kernels.residual_finish_kernel)[(1,)](partials, out, programs, BLOCK=max_programs, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------------
# The ops


def _triton_relax_(state: torch.Tensor, f_val: torch.Tensor, beta: float) -> None:
    """In place: state = (1 - beta) * state + beta * f_val. See revdeq_kernels.relax_ for the rules.

    state: float64/32/16 or bfloat16, any shape and strides. f_val: state's shape and device, dtype as
    precise as state's or less. beta: float in (0, 2), not 1.

    Example:
        >>> torch.ops.revdeq.triton_relax_(y, fz, 0.8)  # y, fz: CUDA tensors
    """
    _affine_update("triton_relax_", state, f_val, beta, inverse=False)


def _triton_unrelax_(state: torch.Tensor, f_val: torch.Tensor, beta: float) -> None:
    """In place: state = (state - beta * f_val) / (1 - beta), the inverse of triton_relax_.

    Same argument rules as triton_relax_.

    Example:
        >>> torch.ops.revdeq.triton_unrelax_(y, fz, 0.8)  # undoes triton_relax_(y, fz, 0.8)
    """
    _affine_update("triton_unrelax_", state, f_val, beta, inverse=True)


def _triton_residual(z: torch.Tensor, fz: torch.Tensor) -> torch.Tensor:
    """[sum((z - fz)^2), sum(fz^2)] in one pass over memory, without a host synchronisation.

    z: float64/32/16 or bfloat16, any shape and strides; fz: z's shape and device, dtype as precise
    as z's or less. Returns shape (2,) on z's device: float64 (float64 z, float64 sums) or float32
    (float32 sums). Bitwise reproducible for given inputs on a given GPU model and Triton version:
    fixed launch, fixed reduction order, no atomics.

    Example:
        >>> d2, f2 = torch.ops.revdeq.triton_residual(z, fz)
    """
    _check_pair("triton_residual", "z", z, "fz", fz)
    if z.numel() == 0:
        return torch.zeros(2, dtype=torch.float64 if z.dtype == torch.float64 else torch.float32, device=z.device)
    z, fz = _flat_pair(z, fz)
    with _on_device_of(z):
        return _launch_residual(z, fz, *_RESIDUAL_LAUNCH)


def _register_ops() -> None:
    for fn, mutates in ((_triton_relax_, {"state"}), (_triton_unrelax_, {"state"}), (_triton_residual, ())):
        name = f"revdeq::{fn.__name__.lstrip('_')}"
        if INTERPRETED or not hasattr(torch.library, "triton_op"):
            op = torch.library.custom_op(name, fn, mutates_args=mutates)
            op.register_fake(_residual_fake if fn is _triton_residual else _pointwise_fake)
        else:
            # triton_op derives the fake kernel by running fn on fake tensors.
            torch.library.triton_op(name, fn, mutates_args=mutates)


def _pointwise_fake(state, f_val, beta):
    return None


def _residual_fake(z, fz):
    return z.new_empty(2, dtype=torch.float64 if z.dtype == torch.float64 else torch.float32)


if kernels is not None:
    _register_ops()


# ---------------------------------------------------------------------------------------------------
# Tuple states: the multi-tensor ops live in _triton_multi.py (kernels in _triton_multi_kernels.py).


def multi_unavailable_reason(device_type: str) -> str | None:
    return unavailable_reason(device_type)


def multi_relax_(states: list, f_vals: list, beta: float) -> None:
    """states[i] = (1 - beta) * states[i] + beta * f_vals[i] for every i, one launch per 8 members."""
    torch.ops.revdeq.triton_multi_relax_(states, f_vals, beta)


def multi_unrelax_(states: list, f_vals: list, beta: float) -> None:
    """The inverse of multi_relax_, one launch per 8 members."""
    torch.ops.revdeq.triton_multi_unrelax_(states, f_vals, beta)


def multi_residual(zs: list, fzs: list) -> torch.Tensor:
    """[sum((z - fz)^2), sum(fz^2)] over all pairs, shape (2,); see _triton_multi._triton_multi_residual."""
    return torch.ops.revdeq.triton_multi_residual(zs, fzs)


if kernels is not None:
    from . import _triton_multi  # noqa: E402, F401  (registers torch.ops.revdeq.triton_multi_*)
