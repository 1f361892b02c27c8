"""The ``revdeq`` torch library: every op's schema and its fake (meta) kernel, defined together.

The C++ extension only implements these ops per dispatch key (``TORCH_LIBRARY_IMPL`` in
csrc/cpu/ and csrc/cuda/bindings/); the Triton backend defines its own ``triton_*`` ops with the
same fakes (backends/triton/). A fake runs the same argument checks as the public ops (checks.py),
so a direct call on meta tensors, or a trace by torch.compile, refuses what a real call refuses.

    relax_(Tensor(a!) state, Tensor f_val, float beta) -> ()        state = (1 - beta) state + beta f_val
    unrelax_(Tensor(a!) state, Tensor f_val, float beta) -> ()      its inverse
    residual(Tensor z, Tensor fz) -> Tensor                         [sum((z - fz)^2), sum(fz^2)]
    relax_fixed_ / unrelax_fixed_(state, f_val, remainder, status, p, m, frac_bits)   exact mode
    multi_relax_ / multi_unrelax_(Tensor(a!)[] states, Tensor[] f_vals, float beta)   tuple states
    multi_residual(Tensor[] zs, Tensor[] fzs) -> Tensor
    residual_out_ / multi_residual_out_(..., Tensor(a!) out)        the same into out, allocating nothing

Imports only torch and the leaf modules of ops/.
"""

import torch

from . import checks
from .dtypes import multi_residual_dtype, residual_dtype

NAMESPACE = "revdeq"

SCHEMAS = {
    # state = (1 - beta) * state + beta * f_val, in place.
    "relax_": "(Tensor(a!) state, Tensor f_val, float beta) -> ()",
    # state = (state - beta * f_val) / (1 - beta), in place: the inverse of relax_.
    "unrelax_": "(Tensor(a!) state, Tensor f_val, float beta) -> ()",
    # [sum((z - fz)^2), sum(fz^2)] in one pass; float64 for float64 z, float32 otherwise.
    "residual": "(Tensor z, Tensor fz) -> Tensor",
    # Exact mode (revdeq_kernels/exact): int64 fixed-point state with frac_bits fractional bits, beta =
    # p / 2^m. The forward stores the m bits it drops in remainder (bit planes, (m, ceil(numel / 32))
    # int32); elements it cannot represent are left unchanged and flagged in status (int32, one
    # element) without a host sync.
    "relax_fixed_": "(Tensor(a!) state, Tensor f_val, Tensor(b!) remainder, Tensor(c!) status, int p, int m, "
                    "int frac_bits) -> ()",
    # The exact inverse of relax_fixed_, given the same f_val and the remainder it wrote.
    "unrelax_fixed_": "(Tensor(a!) state, Tensor f_val, Tensor remainder, Tensor(c!) status, int p, int m, "
                      "int frac_bits) -> ()",
    # states[i] = (1 - beta) * states[i] + beta * f_vals[i] for every i, in place, in one op call.
    "multi_relax_": "(Tensor(a!)[] states, Tensor[] f_vals, float beta) -> ()",
    # The inverse of multi_relax_.
    "multi_unrelax_": "(Tensor(a!)[] states, Tensor[] f_vals, float beta) -> ()",
    # [sum_i sum((zs[i] - fzs[i])^2), sum_i sum(fzs[i]^2)]; float64 when any z is float64, else float32.
    "multi_residual": "(Tensor[] zs, Tensor[] fzs) -> Tensor",
    # residual and multi_residual into a given (2,) tensor (float64 or their result dtype), allocating nothing:
    # what the solver writes into its per-step rows. Only the C++ CPU kernels and the reference have them.
    "residual_out_": "(Tensor z, Tensor fz, Tensor(a!) out) -> ()",
    "multi_residual_out_": "(Tensor[] zs, Tensor[] fzs, Tensor(a!) out) -> ()",
}


# The fakes: the checks a real call makes, then outputs of the right shape and dtype. `op` is the name
# the messages use (an op of this library or a Triton op).

def pointwise_fake(op: str):
    def fake(state, f_val, beta):
        checks.check_pair(op, "state", state, "f_val", f_val)
        checks.check_beta(op, beta)
    return fake


def residual_fake(op: str):
    def fake(z, fz):
        checks.check_pair(op, "z", z, "fz", fz)
        return z.new_empty(2, dtype=residual_dtype(z.dtype))
    return fake


def multi_pointwise_fake(op: str):
    def fake(states, f_vals, beta):
        checks.check_lists(op, "states", states, "f_vals", f_vals)
        checks.check_beta(op, beta)
    return fake


def multi_residual_fake(op: str):
    def fake(zs, fzs):
        checks.check_lists(op, "zs", zs, "fzs", fzs)
        return zs[0].new_empty(2, dtype=multi_residual_dtype(zs))
    return fake


def _check_sums_out(op: str, out, dtype) -> None:
    if out.shape != (2,) or out.dtype not in (dtype, torch.float64):
        raise ValueError(f"{op}: out must have shape (2,) and dtype {dtype} or torch.float64, got shape "
                         f"{tuple(out.shape)} and dtype {out.dtype}")


def residual_out_fake(op: str):
    def fake(z, fz, out):
        checks.check_pair(op, "z", z, "fz", fz)
        _check_sums_out(op, out, residual_dtype(z.dtype))
    return fake


def multi_residual_out_fake(op: str):
    def fake(zs, fzs, out):
        checks.check_lists(op, "zs", zs, "fzs", fzs)
        _check_sums_out(op, out, multi_residual_dtype(zs))
    return fake


def fixed_fake(op: str):
    def fake(state, f_val, remainder, status, p, m, frac_bits):
        checks.check_fixed(op, state, f_val, remainder, status, (p, m), frac_bits)
    return fake


_FAKES = {
    "relax_": pointwise_fake, "unrelax_": pointwise_fake, "residual": residual_fake,
    "relax_fixed_": fixed_fake, "unrelax_fixed_": fixed_fake,
    "multi_relax_": multi_pointwise_fake, "multi_unrelax_": multi_pointwise_fake, "multi_residual": multi_residual_fake,
    "residual_out_": residual_out_fake, "multi_residual_out_": multi_residual_out_fake,
}

# Kept for the life of the process: the ops exist as long as this library object does.
_LIBRARY = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _LIBRARY.define(_name + _schema)
    torch.library.register_fake(f"{NAMESPACE}::{_name}", _FAKES[_name](_name), lib=_LIBRARY)
