"""bfloat16 conversions done on the bits, because Triton's interpreter gets them wrong.

The interpreter (how the tests run every Triton kernel on a CPU) truncates a float32 to bfloat16 (it
drops the low 16 bits: 1 ulp off in about half of all elements) and widens bfloat16 subnormals wrongly
(9.2e-41 became 0). Compiled kernels convert correctly, and these integer versions give the same bits
there in a few instructions beside a memory-bound update, so every mode computes the same answer.
"""

import triton
import triton.language as tl


@triton.jit
def widen(v, dtype: tl.constexpr):
    """v as dtype (float32 or float64), exactly."""
    if v.dtype == tl.bfloat16:
        # A bfloat16 is the high half of the float32 with the same value.
        bits = v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        return v.to(dtype)


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """v (float32 or float64) rounded to dtype, to nearest with ties to even."""
    if dtype == tl.bfloat16:
        v32 = v.to(tl.float32)  # exact from a float32; a float64 is never narrowed to bfloat16 here
        bits = v32.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(v32 != v32, 0x7FC0, rounded)  # NaN stays NaN (the carry could make it inf)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)
