"""Shared cases for testing a backend of relax_, unrelax_ and residual against float64 math.

Each backend's test file (test_cpp.py, test_triton.py, test_cuda.py, ...) parametrizes over these
cases; they compare with float64 math computed from the very inputs the backend saw, and check
that nothing outside the tensor being updated was written.
"""

import math

import torch

import revdeq_kernels as rk

# (state dtype, f dtype): equal dtypes, and f less precise than the state.
DTYPE_PAIRS = [
    (torch.float64, torch.float64),
    (torch.float64, torch.float32),
    (torch.float64, torch.float16),
    (torch.float64, torch.bfloat16),
    (torch.float32, torch.float32),
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
]
SIZES = [1, 7, 1023, (1 << 20) + 3]
BETAS = [0.8, 1.3]
POINTWISE_OPS = ["relax_", "unrelax_"]

# Layouts a caller may hand us: misaligned (offset by one element), strided, dense but permuted,
# and mismatched layouts between the two arguments.
LAYOUTS = ["contiguous", "offset", "strided", "transposed", "f_strided", "state_strided"]

# (atol, rtol) by state dtype, for values of order one. Half states are rounded to 8 or 11 bits,
# so they are held to the float32 reference at 1e-2 (the house tolerance table).
TOLERANCE = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (1e-2, 1e-2),
}


def pair_id(pair):
    return "-".join(str(d).replace("torch.", "") for d in pair)


def _random(shape, dtype, device, generator):
    # Fresh N(0, 1) values, never zeros; drawn in float64 so every dtype sees the same numbers.
    return torch.randn(shape, dtype=torch.float64, generator=generator).to(device=device, dtype=dtype)


def make_pair(n, state_dtype, f_dtype, device, layout="contiguous", seed=0):
    """(state, f, state_base): state and f hold n random elements laid out as `layout` says.

    state is a view into state_base, which also holds a sentinel pattern around it so a kernel
    that writes outside the view is caught.
    """
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        rows = max(1, int(math.sqrt(n)))
        cols = -(-n // rows)
        state_base = _random((cols, rows), state_dtype, device, g)
        f = _random((cols, rows), f_dtype, device, g).t()
        return state_base.t(), f, state_base
    state_strided = layout in ("strided", "state_strided")
    f_strided = layout in ("strided", "f_strided")
    offset = 1 if layout == "offset" else 0
    state_base = _random(2 * n + 1, state_dtype, device, g)
    f_base = _random(2 * n + 1, f_dtype, device, g)
    state = state_base[offset::2][:n] if state_strided else state_base[offset:offset + n]
    f = f_base[offset::2][:n] if f_strided else f_base[offset:offset + n]
    return state, f, state_base


def expected_pointwise(op, state, f, beta):
    s, fv = state.double(), f.double()
    return (1 - beta) * s + beta * fv if op == "relax_" else (s - beta * fv) / (1 - beta)


def expected_residual(z, fz):
    d, f = z.double() - fz.double(), fz.double()
    return torch.stack([(d * d).sum(), (f * f).sum()])


def assert_close(got, want, dtype, *, amplification=1.0, what=""):
    """|got - want| <= atol * amplification + rtol * |want| elementwise, with the max and mean
    difference printed on failure."""
    atol, rtol = TOLERANCE[dtype]
    got, want = got.double().cpu(), want.double().cpu()
    diff = (got - want).abs()
    bound = atol * amplification + rtol * want.abs()
    bad = ~(diff <= bound)  # NaN counts as bad
    if bad.any():
        idx = int(bad.nonzero()[0][0]) if bad.dim() == 1 else tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements off; max diff {diff.max().item():.3e}, "
            f"mean diff {diff.mean().item():.3e}; first at {idx}: got {got[idx].item()!r}, "
            f"want {want[idx].item()!r}"
        )


def check_pointwise(backend, op, n, pair, beta, device, layout="contiguous", seed=0):
    state, f, base = make_pair(n, *pair, device, layout, seed)
    want = expected_pointwise(op, state, f, beta)
    f_before = f.clone()
    outside = torch.ones_like(base, dtype=torch.bool)
    outside.view(-1)[_indices_in_base(state, base)] = False
    base_before = base.clone()
    out = getattr(rk, op)(state, f, beta, backend=backend)
    what = f"{backend} {op} n={n} {pair_id(pair)} beta={beta} layout={layout}"
    assert out is state, f"{what}: must return its state argument"
    # unrelax_ divides by (1 - beta): rounding in the inputs' scale is amplified by 1/|1 - beta|.
    amplification = 1.0 if op == "relax_" else 1.0 / abs(1.0 - beta)
    assert_close(state, want, pair[0], amplification=amplification * 4, what=what)
    assert torch.equal(f, f_before), f"{what}: f_val was modified"
    assert torch.equal(base[outside], base_before[outside]), f"{what}: wrote outside the state view"


def check_residual(backend, n, pair, device, layout="contiguous", seed=0):
    z, fz, _ = make_pair(n, *pair, device, layout, seed)
    got = rk.residual(z, fz, backend=backend)
    what = f"{backend} residual n={n} {pair_id(pair)} layout={layout}"
    want_dtype = torch.float64 if pair[0] == torch.float64 else torch.float32
    assert got.shape == (2,) and got.dtype == want_dtype and got.device == z.device, (
        f"{what}: got shape {tuple(got.shape)} dtype {got.dtype} device {got.device}")
    # Sums of n squares: relative accuracy of the accumulation type, a little looser for
    # half inputs whose products are formed in float32.
    rtol = 1e-12 if pair[0] == torch.float64 else 1e-5
    want = expected_residual(z, fz)
    rel = ((got.double().cpu() - want.cpu()).abs() / want.cpu()).max().item()
    assert rel <= rtol, f"{what}: relative error {rel:.3e} > {rtol:.0e} (got {got.tolist()}, want {want.tolist()})"
    again = rk.residual(z, fz, backend=backend)
    assert torch.equal(got, again), f"{what}: two runs differ ({got.tolist()} vs {again.tolist()})"


def check_layouts(backend, layout, pair, device, sizes):
    """check_pointwise for both ops (beta 0.8) and check_residual, on `layout` views of each size in sizes."""
    for n in sizes:
        for op in POINTWISE_OPS:
            check_pointwise(backend, op, n, pair, 0.8, device, layout)
        check_residual(backend, n, pair, device, layout)


def opcheck_ops(prefix, pair, device):
    """torch.library.opcheck on torch.ops.revdeq.<prefix>relax_, <prefix>unrelax_ and <prefix>residual
    (prefix "" for the compiled extension's ops, "triton_" for Triton's) with a (37, 5) state and f of
    the (state dtype, f dtype) pair."""
    g = torch.Generator().manual_seed(3)
    state = torch.randn(37, 5, generator=g).to(device, pair[0])
    f = torch.randn(37, 5, generator=g).to(device, pair[1])
    ops = torch.ops.revdeq
    for op in (getattr(ops, f"{prefix}relax_").default, getattr(ops, f"{prefix}unrelax_").default):
        torch.library.opcheck(op, (state.clone(), f, 0.8))
    torch.library.opcheck(getattr(ops, f"{prefix}residual").default, (state, f))


def _indices_in_base(view, base):
    """Flat indices of base's storage that `view` covers (view and base share one storage)."""
    idx = torch.arange(base.numel(), device=base.device).view(base.shape)
    flat = torch.as_strided(idx.reshape(-1), view.shape, view.stride(), view.storage_offset()
                            - base.storage_offset())
    return flat.reshape(-1)
