"""The dtype rules of the fused ops, once: which dtypes they take, which pairs, what they compute in.

    FLOAT_DTYPES                  the dtypes of states and f values
    PAIRS                         (state dtype, f dtype) pairs: f as precise as the state or less
    compute_dtype(state dtype)    float64 for float64 states, float32 otherwise (never a half type)
    residual_dtype(z dtype)       what residual returns: the same rule
    multi_residual_dtype(zs)      a tuple state's residual: float64 when any member is float64

Every backend, the checks, the fakes and the solver read these; the C++ and CUDA kernels implement the
same rules (csrc/common/dispatch.h, csrc/cuda/kernels/common.cuh). Imports only torch.
"""

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = "float64, float32, float16 or bfloat16"
PAIRS = frozenset((s, f) for s in FLOAT_DTYPES for f in FLOAT_DTYPES if torch.promote_types(s, f) == s)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype of a state: float64 for float64 states, float32 for every other."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def residual_dtype(dtype: torch.dtype) -> torch.dtype:
    """residual's result dtype for z of ``dtype`` (its accumulation dtype, as for compute_dtype)."""
    return compute_dtype(dtype)


def multi_residual_dtype(zs) -> torch.dtype:
    """residual's dtype for a sequence of z: float64 when any member is float64, float32 otherwise."""
    return torch.float64 if any(z.dtype == torch.float64 for z in zs) else torch.float32
