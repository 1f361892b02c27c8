"""The Triton backend: every op family as Triton kernels, registered as ``torch.ops.revdeq.triton_*`` ops.

`auto` uses it for CUDA tensors when the compiled CUDA extension is absent; ask for it by name with
``backend="triton"``. On CPU tensors it runs only under Triton's interpreter (TRITON_INTERPRET=1 set
before triton is first imported), which is how the tests exercise the kernels without a GPU.

The ops are ``torch.ops.revdeq.triton_<op>`` (the registry's op_prefix). One module per op family,
kernels beside their launchers: pointwise.py (relax_, unrelax_, residual),
multi.py (tuple states), exact.py (exact mode, imported on first use); common.py holds what they
share. With compiled kernels the ops are `torch.library.triton_op`s, so torch.compile sees (and may
fuse around) the kernels; under the interpreter, which `wrap_triton` cannot trace, they are opaque
custom ops with the fakes of ops/library.py. (The package is not called `triton`, which would shadow
the triton package for anything that puts this folder on sys.path.) Imports: triton, the leaves of ops/, exact/.
"""

import importlib.util

if importlib.util.find_spec("triton") is None:
    _MISSING = "triton is not installed; install it with: pip install triton"
else:
    try:
        from . import common, multi, pointwise  # noqa: F401  (registers the float and multi-tensor ops)
    except Exception as exc:  # e.g. a triton built for another torch/CUDA: report it, keep the package usable
        _MISSING = f"triton is installed but failed to import ({type(exc).__name__}: {exc})"
    else:
        _MISSING = None

_exact_error = None  # why the exact-mode kernels cannot load, "" once they have


def _exact_unavailable() -> str | None:
    global _exact_error
    if _exact_error is None:
        try:
            from . import exact  # noqa: F401  (registers torch.ops.revdeq.triton_*_fixed_)
        except Exception as exc:  # e.g. an older Triton without an API the kernels use: report, not raise
            _exact_error = f"the exact-mode Triton kernels failed to load ({type(exc).__name__}: {exc})"
        else:
            _exact_error = ""
    return _exact_error or None


def unavailable_reason(device_type: str, family: str) -> str | None:
    """None when these kernels can run ``family`` ops on ``device_type`` tensors here, else why not."""
    if _MISSING is not None:
        return _MISSING
    if device_type == "cpu" and not common.INTERPRETED:
        return ("Triton runs on CPU tensors only through its interpreter, which is meant for tests: "
                "set TRITON_INTERPRET=1 before triton is first imported")
    if device_type not in ("cuda", "cpu"):
        return f"Triton kernels run on cuda tensors (or cpu under TRITON_INTERPRET=1), not {device_type}"
    return _exact_unavailable() if family == "exact" else None
