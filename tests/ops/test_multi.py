"""Tuple states: relax_, unrelax_ and residual on sequences of tensors, on every backend.

Each backend is checked against float64 math on fresh random members of different shapes, sizes
(1, 7, odd, a large one, empty), layouts (misaligned, strided, transposed) and dtype pairs, mixed in
one call; plus the argument errors, the op registrations (opcheck, torch.compile), the claim that a
call is one op call and one kernel launch rather than one per member, and, with nvcc, how the CUDA
kernels split their members into chunks. Without a GPU the Triton kernels run in the interpreter
(tests/conftest.py) and the CUDA tests are skipped.
"""

import functools
import os
import subprocess

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import revdeq_kernels as rk
from helpers import ROOT
from helpers.backends import TARGETS, params
from helpers.cuda_cases import HOST_EXPECT, load_cuda_check, run_host_program
from helpers.op_cases import _indices_in_base, assert_close, expected_pointwise, expected_residual, make_pair, pair_id
from revdeq_kernels import ops
from revdeq_kernels.backends import compiled as extension
from revdeq_kernels.backends import triton_backend
from revdeq_kernels.ops import checks

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
HAVE_CPP = extension.loaded()
TRITON_REASON = triton_backend.unavailable_reason(DEVICE, "multi")

# (n, (state dtype, f dtype), layout): one call holds all of them. Sizes 1, 7 and odd ones, an empty
# member, misaligned (offset), strided, transposed and mismatched layouts, and every kind of pair.
MEMBERS = [
    (1, (F64, F64), "contiguous"),
    (7, (F32, BF16), "offset"),
    (1023, (F64, F32), "strided"),
    (0, (F32, F32), "contiguous"),
    (4097, (BF16, BF16), "transposed"),
    (33, (F16, F16), "f_strided"),
    (2049, (F32, F32), "state_strided"),
    (513, (F64, F16), "offset"),
    (301, (F32, F16), "contiguous"),
]
# The large member: past one chunk of every backend (cpp: 2^16 elements; the Triton interpreter's
# residual: 8 programs of 1024; CUDA: 1024 packs), kept small enough for the interpreter.
LARGE = {"cpp": (1 << 20) + 3, "reference": (1 << 16) + 5, "triton": 3 * 8192 + 5, "cuda": (1 << 22) + 3}


def _backends(names=tuple(TARGETS)):
    """Every backend by name, with the marks of helpers.backends (skipped, saying why, where it cannot run)."""
    return [pytest.param(p.values[0].backend, marks=p.marks, id=p.id) for p in params(names)]


def _device_for(backend):
    return TARGETS[backend].device


def make_members(backend, seed=0, members=None, large_pair=(F32, BF16)):
    """(states, fs, bases): a tuple of each; member i is state[i] = view into bases[i]."""
    device = _device_for(backend)
    spec = list(MEMBERS if members is None else members)
    if members is None:
        spec.append((LARGE[backend], large_pair, "contiguous"))
    states, fs, bases = [], [], []
    for i, (n, pair, layout) in enumerate(spec):
        if n == 0:
            state, f, base = torch.empty(0, 3, dtype=pair[0], device=device), torch.empty(0, 3, dtype=pair[1],
                                                                                           device=device), None
        else:
            state, f, base = make_pair(n, *pair, device, layout, seed=1000 * seed + i)
        states.append(state)
        fs.append(f)
        bases.append(base)
    return tuple(states), tuple(fs), bases


def _outside_mask(state, base):
    outside = torch.ones_like(base, dtype=torch.bool)
    outside.view(-1)[_indices_in_base(state, base)] = False
    return outside


def check_multi_pointwise(backend, op, beta, seed=0, members=None, as_list=False):
    states, fs, bases = make_members(backend, seed, members)
    if as_list:
        states, fs = list(states), list(fs)
    wants = [expected_pointwise(op, s, f, beta) for s, f in zip(states, fs)]
    fs_before = [f.clone() for f in fs]
    outside = [None if b is None else _outside_mask(s, b) for s, b in zip(states, bases)]
    bases_before = [None if b is None else b.clone() for b in bases]
    out = getattr(rk, op)(states, fs, beta, backend=backend)
    assert out is states, f"{backend} {op}: must return its state argument"
    amplification = 4.0 if op == "relax_" else 4.0 / abs(1.0 - beta)
    for i, (state, want) in enumerate(zip(states, wants)):
        what = f"{backend} {op} beta={beta} member {i} n={state.numel()} {pair_id((state.dtype, fs[i].dtype))}"
        assert_close(state, want, state.dtype, amplification=amplification, what=what)
        assert torch.equal(fs[i], fs_before[i]), f"{what}: f_val was modified"
        if bases[i] is not None:
            assert torch.equal(bases[i][outside[i]], bases_before[i][outside[i]]), f"{what}: wrote outside the view"


def _residual_rtol(zs):
    return 1e-12 if all(z.dtype == F64 for z in zs) else 1e-5


def check_multi_residual(backend, seed=0, members=None):
    zs, fzs, _ = make_members(backend, seed, members)
    got = rk.residual(zs, fzs, backend=backend)
    want_dtype = F64 if any(z.dtype == F64 for z in zs) else F32
    what = f"{backend} residual over {len(zs)} members"
    assert got.shape == (2,) and got.dtype == want_dtype and got.device == zs[0].device, (
        f"{what}: got shape {tuple(got.shape)} dtype {got.dtype} device {got.device}")
    want = sum(expected_residual(z, f).cpu() for z, f in zip(zs, fzs) if z.numel() > 0)
    rel = ((got.double().cpu() - want).abs() / want).max().item()
    assert rel <= _residual_rtol(zs), f"{what}: relative error {rel:.3e} (got {got.tolist()}, want {want.tolist()})"
    again = rk.residual(zs, fzs, backend=backend)
    assert torch.equal(got, again), f"{what}: two runs differ ({got.tolist()} vs {again.tolist()})"
    return zs, fzs, got


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("op", ["relax_", "unrelax_"])
def test_pointwise_against_float64(backend, op):
    for beta in (0.8, 1.3):
        check_multi_pointwise(backend, op, beta, seed=int(beta * 10))


@pytest.mark.parametrize("backend", _backends())
def test_residual_against_float64(backend):
    check_multi_residual(backend)


@pytest.mark.parametrize("backend", _backends())
def test_residual_is_the_sum_of_the_per_tensor_residuals(backend):
    zs, fzs, got = check_multi_residual(backend, seed=3)
    singles = [rk.residual(z, f, backend=backend).double().cpu() for z, f in zip(zs, fzs)]
    total = functools.reduce(torch.add, singles)
    rel = ((got.double().cpu() - total).abs() / total).max().item()
    assert rel <= 1e-6, f"multi {got.tolist()} vs sum of singles {total.tolist()}"
    if backend in ("cpp", "reference"):
        # All-float64 members: each pair is summed exactly as the single op sums it, and the pairs
        # are added in order in float64, so the two agree to the bit.
        members = [(n, (F64, pair[1]), layout) for n, pair, layout in MEMBERS if n > 0]
        zs, fzs, _ = make_members(backend, seed=4, members=members + [(LARGE[backend], (F64, F32), "contiguous")])
        got = rk.residual(zs, fzs, backend=backend)
        total = functools.reduce(torch.add, [rk.residual(z, f, backend=backend) for z, f in zip(zs, fzs)])
        assert torch.equal(got, total), f"{got.tolist()} vs {total.tolist()}"


@pytest.mark.parametrize("backend", _backends())
def test_many_members_and_lists(backend):
    # More members than one Triton launch takes (8), as lists; a single member; all members empty.
    members = [(n, pair, "contiguous") for n, pair in zip([3, 1, 17, 1024, 1025, 5, 2, 9, 40, 1, 77],
                                                          [(F32, F32), (F64, F64)] * 6)]
    for op in ("relax_", "unrelax_"):
        check_multi_pointwise(backend, op, 0.6, seed=7, members=members, as_list=True)
        check_multi_pointwise(backend, op, 0.6, seed=8, members=[(257, (F32, BF16), "offset")])
    check_multi_residual(backend, seed=9, members=members)
    check_multi_residual(backend, seed=10, members=[(1, (F32, F32), "contiguous")])
    device = _device_for(backend)
    empty = (torch.empty(0, device=device), torch.empty(2, 0, device=device, dtype=F64))
    assert rk.relax_(empty, (torch.empty(0, device=device), torch.empty(2, 0, device=device)), 0.5,
                     backend=backend) is empty
    out = rk.residual(empty, (torch.empty(0, device=device), torch.empty(2, 0, device=device)), backend=backend)
    assert out.dtype == F64 and torch.equal(out.cpu(), torch.zeros(2, dtype=F64))


def test_single_tensor_calls_are_unchanged():
    # The tensor path neither wraps nor copies: same object back, same result as before.
    state, f = torch.randn(100), torch.randn(100)
    want = 0.25 * state + 0.75 * f
    assert rk.relax_(state, f, 0.75) is state
    torch.testing.assert_close(state, want)
    out = rk.residual(state, f)
    assert out.shape == (2,) and out.dtype == F32


# ---------------------------------------------------------------------------------------------------
# Bad input: every message names the op, the argument (with its index), what was expected and what
# was given.

t = torch.randn
_shared = torch.randn(30)
_other = torch.randn(8)

BAD_INPUTS = [
    ("pair shape", lambda: rk.relax_((t(3), t(2), t(4, 9)), (t(3), t(2), t(4, 8)), 0.5), ValueError,
     r"relax_: f_val\[2\] has shape \(4, 8\) but state\[2\] has shape \(4, 9\)"),
    ("pair dtype", lambda: rk.unrelax_((t(3), t(2)), (t(3), t(2, dtype=F64)), 0.5), TypeError,
     r"unrelax_: f_val\[1\] has dtype torch.float64, which state\[1\] \(torch.float32\) cannot hold"),
    ("int member", lambda: rk.relax_((t(3), torch.ones(2, dtype=torch.int32)), (t(3), t(2)), 0.5), TypeError,
     r"relax_: state\[1\] must have dtype float64, float32, float16 or bfloat16, got torch.int32"),
    ("non-tensor member", lambda: rk.relax_((t(3), [1.0]), (t(3), t(1)), 0.5), TypeError,
     r"relax_: state\[1\] must be a torch.Tensor, got list"),
    ("pair device", lambda: rk.relax_((t(3), t(2)), (t(3), t(2, device="meta")), 0.5), ValueError,
     r"relax_: f_val\[1\] is on meta but state\[1\] is on cpu"),
    ("mixed devices", lambda: rk.relax_((t(3), t(2, device="meta")), (t(3), t(2, device="meta")), 0.5), ValueError,
     r"relax_: state\[1\] is on meta but state\[0\] is on cpu; all tensors of one call must be on one device"),
    ("lengths", lambda: rk.relax_((t(3), t(2)), (t(3),), 0.5), ValueError,
     r"relax_: f_val has 1 tensors but state has 2"),
    ("empty tuple", lambda: rk.relax_((), (), 0.5), ValueError,
     r"relax_: state is an empty tuple; pass at least one tensor"),
    ("empty list residual", lambda: rk.residual([], []), ValueError,
     r"residual: z is an empty list; pass at least one tensor"),
    ("tuple state, tensor f", lambda: rk.relax_((t(3), t(2)), t(3), 0.5), TypeError,
     r"relax_: state must be a torch.Tensor, got tuple; as a tuple state \(tuple of tensors\) it needs f_val to be "
     r"a tuple or list of as many tensors, got Tensor"),
    ("tensor state, tuple f", lambda: rk.relax_(t(3), (t(3),), 0.5), TypeError,
     r"relax_: f_val must be a torch.Tensor, got tuple"),
    ("residual lengths", lambda: rk.residual([t(3)], [t(3), t(3)]), ValueError,
     r"residual: fz has 2 tensors but z has 1"),
    ("residual pair shape", lambda: rk.residual((t(3), t(5)), (t(3), t(4))), ValueError,
     r"residual: fz\[1\] has shape \(4,\) but z\[1\] has shape \(5,\)"),
    ("state is an f value", lambda: rk.relax_((_shared[:10], t(4)), (t(10), _shared[5:9]), 0.5), ValueError,
     r"relax_: f_val\[1\] shares memory with state\[0\]; the in-place update would read values it has already "
     r"overwritten \(pass f_val\[1\].clone\(\)\)"),
    ("same state twice", lambda: rk.relax_((_other, t(2), _other), (t(8), t(2), t(8)), 0.5), ValueError,
     r"relax_: state\[2\] shares memory with state\[0\]; the in-place updates would write the same memory twice"),
    ("overlapping states", lambda: rk.unrelax_((_shared[:10], _shared[9:12]), (t(10), t(3)), 0.5), ValueError,
     r"unrelax_: state\[1\] shares memory with state\[0\]"),
    ("expanded member", lambda: rk.relax_((t(2), t(1).expand(6)), (t(2), t(6)), 0.5), ValueError,
     r"relax_: state\[1\] has internal overlap"),
    ("beta", lambda: rk.relax_((t(2),), (t(2),), 1.0), ValueError,
     r"relax_: beta must be a finite number in \(0, 2\) other than 1, got 1.0"),
    ("requires grad", lambda: rk.relax_((t(2), t(2, requires_grad=True)), (t(2), t(2)), 0.5), RuntimeError,
     r"relax_: state\[1\] requires grad and grad mode is on"),
    ("unknown backend", lambda: rk.relax_((t(2),), (t(2),), 0.5, backend="cudnn"), ValueError,
     r"relax_: unknown backend 'cudnn'"),
    ("wrong device backend", lambda: rk.residual((t(2),), (t(2),), backend="cuda"), RuntimeError,
     r"residual: backend 'cuda' is not available for cpu tensors: it serves cuda tensors only"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(case):
    _, call, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        call()


def test_f_values_may_share_memory_and_errors_leave_states_untouched():
    f = torch.randn(10)
    states = (torch.randn(10), torch.randn(10))
    want = [0.5 * s + 0.5 * f for s in states]
    rk.relax_(states, (f, f), 0.5)  # f values are only read: sharing is fine
    for s, w in zip(states, want):
        torch.testing.assert_close(s, w)
    before = [s.clone() for s in states]
    with pytest.raises(ValueError, match="shape"):
        rk.relax_(states, (torch.randn(10), torch.randn(9)), 0.5)
    assert all(torch.equal(s, b) for s, b in zip(states, before)), "a failed call must not update any member"


def test_shared_memory_check_agrees_with_pairwise_comparison():
    # The sort-and-sweep check against comparing every (state, other tensor) pair, on random slices of
    # two buffers: contiguous and strided, states and f values overlapping or not, nested or adjacent.
    g = torch.Generator().manual_seed(5)
    buffers = (torch.randn(64), torch.randn(64))

    def random_view(n):
        buf = buffers[int(torch.randint(2, (1,), generator=g))]
        step = int(torch.randint(1, 3, (1,), generator=g))
        start = int(torch.randint(0, 64 - step * (n - 1), (1,), generator=g))
        return buf[start:start + step * (n - 1) + 1:step]

    raised = 0
    for _ in range(300):
        count = int(torch.randint(1, 5, (1,), generator=g))
        sizes = [int(torch.randint(1, 12, (1,), generator=g)) for _ in range(count)]
        states = tuple(random_view(n) for n in sizes)
        fs = tuple(random_view(n) if torch.rand(1, generator=g) < 0.7 else torch.randn(n) for n in sizes)
        pairwise = any(checks.may_share_memory(a, b) for i, a in enumerate(states)
                       for b in states[i + 1:] + fs)
        try:
            checks.check_multi_memory("relax_", states, fs)
        except ValueError as exc:
            raised += 1
            assert pairwise, f"flagged without a shared byte: {exc}"
            assert "shares memory with state[" in str(exc), exc
        else:
            assert not pairwise, "missed a state sharing memory"
        if HAVE_CPP:  # the C++ op's own check (it updates the states when it accepts them; they are random)
            try:
                torch.ops.revdeq.multi_relax_(list(states), list(fs), 0.5)
            except ValueError as exc:
                assert pairwise and "shares memory with states[" in str(exc), exc
            else:
                assert not pairwise, "the C++ check missed a state sharing memory"
    assert 30 < raised < 270, f"{raised} of 300 random calls shared memory: the cases are not mixed enough"


@pytest.mark.skipif(not HAVE_CPP, reason="the C++ extension is not built")
def test_direct_cpp_op_calls_check_their_arguments():
    op = torch.ops.revdeq
    with pytest.raises(ValueError, match=r"multi_relax_: f_vals\[1\] has shape \[4\] but states\[1\] has shape \[5\]"):
        op.multi_relax_([t(2), t(5)], [t(2), t(4)], 0.5)
    with pytest.raises(ValueError, match=r"multi_unrelax_: f_vals has 1 tensors but states has 2"):
        op.multi_unrelax_([t(2), t(5)], [t(2)], 0.5)
    # (An empty list never reaches the kernels: with no tensor to dispatch on, torch itself refuses it.)
    with pytest.raises(ValueError, match=r"multi_relax_: states\[2\] shares memory with states\[0\]"):
        op.multi_relax_([_other, t(2), _other], [t(8), t(2), t(8)], 0.5)
    with pytest.raises(ValueError, match=r"multi_relax_: f_vals\[0\] shares memory with states\[1\]"):
        op.multi_relax_([t(3), _shared[:10]], [_shared[2:5], t(10)], 0.5)
    with pytest.raises(ValueError, match=r"multi_relax_: states\[0\] has internal overlap"):
        op.multi_relax_([t(1).expand(4)], [t(4)], 0.5)
    with pytest.raises(ValueError, match=r"multi_relax_: beta must be a finite number"):
        op.multi_relax_([t(2)], [t(2)], float("nan"))
    with pytest.raises(TypeError, match=r"multi_residual: fzs\[0\] has dtype Double, which zs\[0\] \(Float\)"):
        op.multi_residual([t(2)], [t(2, dtype=F64)])
    # Mixed cpu and meta tensors dispatch to the fake kernel, which checks the lists too.
    with pytest.raises(ValueError, match=r"multi_residual: zs\[1\] is on meta but zs\[0\] is on cpu; all tensors of "
                                         r"one call must be on one device"):
        op.multi_residual([t(2), t(2, device="meta")], [t(2), t(2, device="meta")])
    with pytest.raises(ValueError, match=r"multi_relax_: f_vals\[0\] has shape \(3,\) but states\[0\] has shape "
                                         r"\(2,\)"):
        op.multi_relax_([t(2, device="meta")], [t(3, device="meta")], 0.5)


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton unavailable: {TRITON_REASON}")
def test_direct_triton_op_calls_check_their_arguments():
    op = torch.ops.revdeq
    with pytest.raises(ValueError, match=r"triton_multi_relax_: f_vals\[1\] has shape \(4,\) but states\[1\] has "
                                         r"shape \(5,\)"):
        op.triton_multi_relax_([t(2, device=DEVICE), t(5, device=DEVICE)], [t(2, device=DEVICE), t(4, device=DEVICE)],
                               0.5)
    with pytest.raises(ValueError, match=r"triton_multi_residual: fzs has 1 tensors but zs has 2"):
        op.triton_multi_residual([t(2, device=DEVICE), t(2, device=DEVICE)], [t(2, device=DEVICE)])
    with pytest.raises(ValueError, match=r"triton_multi_unrelax_: beta must be a finite number"):
        op.triton_multi_unrelax_([t(2, device=DEVICE)], [t(2, device=DEVICE)], 1.0)


# ---------------------------------------------------------------------------------------------------
# Backend choice


@pytest.fixture
def fresh_choice(monkeypatch):
    monkeypatch.setattr(ops, "_resolved", {})


def test_auto_uses_the_compiled_multi_kernels_on_cpu(fresh_choice):
    if not HAVE_CPP:
        pytest.skip("the C++ extension is not built")
    assert extension.unavailable_reason("cpu", "multi") is None
    assert ops._backend_name("relax_", "cpu", "auto", "multi") == "cpp"


def test_a_backend_without_multi_kernels_raises_by_name_and_is_skipped_by_auto(fresh_choice, monkeypatch):
    # As with a _C built before the multi-tensor ops existed.
    monkeypatch.setitem(extension._FAMILY_OPS, "multi", ("no_such_op",))
    if not HAVE_CPP:
        pytest.skip("the C++ extension is not built")
    with pytest.raises(RuntimeError, match=r"relax_: backend 'cpp' is not available for cpu tensors: "
                                           r"revdeq_kernels._C has no multi-tensor kernels for cpu tensors; rebuild"):
        rk.relax_((t(3),), (t(3),), 0.5, backend="cpp")
    states, fs = (t(3), t(2)), (t(3), t(2))
    want = [0.5 * s + 0.5 * f for s, f in zip(states, fs)]
    rk.relax_(states, fs, 0.5)  # auto: the next backend that has them
    assert ops._resolved[("cpu", "auto", "multi")] == "reference"
    for s, w in zip(states, want):
        torch.testing.assert_close(s, w)
    # Single tensors still get the C++ kernels.
    assert ops._backend_name("relax_", "cpu", "auto") == "cpp"


def test_env_var_selects_the_multi_backend(monkeypatch):
    monkeypatch.setenv("REVDEQ_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="relax_: backend 'cuda' is not available for cpu tensors"):
        rk.relax_((t(3),), (t(3),), 0.5)


# ---------------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile


def _opcheck_members(device, pairs):
    g = torch.Generator().manual_seed(3)
    shapes = [(37, 5), (7,), (2, 3, 4)]
    states = [torch.randn(shape, generator=g).to(device, pair[0]) for shape, pair in zip(shapes, pairs)]
    fs = [torch.randn(shape, generator=g).to(device, pair[1]) for shape, pair in zip(shapes, pairs)]
    return states, fs


@pytest.mark.parametrize("prefix", [pytest.param("", marks=pytest.mark.skipif(not HAVE_CPP, reason="no C++ extension")),
                                    pytest.param("triton_", marks=pytest.mark.skipif(
                                        TRITON_REASON is not None, reason=f"triton unavailable: {TRITON_REASON}"))])
def test_opcheck(prefix):
    device = "cpu" if prefix == "" else DEVICE
    for pairs in ([(F32, F32), (F64, BF16), (BF16, BF16)], [(F64, F64)] * 3):
        states, fs = _opcheck_members(device, pairs)
        for name in ("multi_relax_", "multi_unrelax_"):
            op = getattr(torch.ops.revdeq, prefix + name).default
            torch.library.opcheck(op, ([s.clone() for s in states], fs, 0.8))
        torch.library.opcheck(getattr(torch.ops.revdeq, prefix + "multi_residual").default, (states, fs))


@pytest.mark.parametrize("backend", _backends())
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    device = _device_for(backend)

    @torch.compile(fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    def step(ys, zs, fzs, beta):
        rk.relax_(ys, fzs, beta, backend=backend)
        rk.unrelax_(zs, fzs, beta, backend=backend)
        return rk.residual(zs, fzs, backend=backend).sqrt()

    g = torch.Generator().manual_seed(11)
    shapes = [(33, 31), (7,), (5, 2, 3)]
    ys = tuple(torch.randn(s, generator=g, dtype=F64).to(device) for s in shapes)
    zs = tuple(torch.randn(s, generator=g, dtype=F64).to(device) for s in shapes)
    fzs = (torch.randn(31, 33, generator=g).to(device).t(), torch.randn(7, generator=g, dtype=F64).to(device),
           torch.randn(5, 2, 3, generator=g).to(device, BF16))
    y_want = [expected_pointwise("relax_", y, f, 0.8) for y, f in zip(ys, fzs)]
    z_want = [expected_pointwise("unrelax_", z, f, 0.8) for z, f in zip(zs, fzs)]
    out = step(ys, zs, fzs, 0.8)
    for i in range(len(shapes)):
        assert_close(ys[i], y_want[i], F64, amplification=4, what=f"compiled relax_ member {i} ({backend})")
        assert_close(zs[i], z_want[i], F64, amplification=20, what=f"compiled unrelax_ member {i} ({backend})")
    want = sum(expected_residual(z, f) for z, f in zip(z_want, fzs)).sqrt()
    assert_close(out, want, F64, what=f"compiled residual ({backend})")


# ---------------------------------------------------------------------------------------------------
# One op call, one launch


class _RevdeqOpLog(TorchDispatchMode):
    """Records every torch.ops.revdeq.* call that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "revdeq":
            self.calls.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _ten_members(device):
    states = tuple(torch.randn(n, device=device) for n in (3, 100, 1, 4097, 7, 2, 9, 64, 5, 1000))
    return states, tuple(torch.randn_like(s) for s in states)


@pytest.mark.skipif(not HAVE_CPP, reason="the C++ extension is not built")
def test_cpp_is_one_op_call_per_op():
    states, fs = _ten_members("cpu")
    with _RevdeqOpLog() as log:
        rk.relax_(states, fs, 0.8)
        rk.unrelax_(states, fs, 0.8)
        rk.residual(states, fs)
    assert log.calls == ["multi_relax_", "multi_unrelax_", "multi_residual"], log.calls


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton unavailable: {TRITON_REASON}")
def test_triton_is_one_op_call_and_one_launch_per_8_members(monkeypatch):
    from revdeq_kernels.backends.triton_backend import common

    launches = []

    def counting(kernel):
        return _CountingKernel(kernel, launches)

    monkeypatch.setattr(common, "wrap", counting)
    states, fs = _ten_members(DEVICE)
    with _RevdeqOpLog() as log:
        rk.relax_(states[:8], fs[:8], 0.8, backend="triton")
        relax_launches = list(launches)
        rk.relax_(states, fs, 0.8, backend="triton")
        rk.residual(states[:8], fs[:8], backend="triton")
    assert log.calls == ["triton_multi_relax_"] * 2 + ["triton_multi_residual"], log.calls
    assert relax_launches == ["multi_affine_kernel"], relax_launches
    assert launches == ["multi_affine_kernel"] * 3 + ["multi_residual_partials_kernel", "multi_residual_finish_kernel"]


class _CountingKernel:
    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        fn = getattr(self.kernel, "fn", self.kernel)  # an Autotuner wraps the JITFunction
        self.log.append(getattr(fn, "__name__", None) or fn.fn.__name__)
        return self.kernel[grid]


@pytest.mark.gpu
def test_cuda_is_one_kernel_launch_per_op():
    states, fs = _ten_members("cuda")
    rk.relax_(states, fs, 0.8, backend="cuda")  # warm up: resident-block queries, allocator
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        rk.relax_(states, fs, 0.8, backend="cuda")
        rk.residual(states, fs, backend="cuda")
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "Memset" not in e.name and "memset" not in e.name]
    assert len([k for k in kernels if "multi_affine_kernel" in k]) == 1, kernels
    assert len([k for k in kernels if "multi_residual_kernel" in k]) == 1, kernels
    assert len(kernels) == 2, kernels


_COMPILED_TRITON_CHECK = """
    import sys
    import torch, triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        triton.runtime.driver.set_active
    except (ImportError, AttributeError) as exc:
        print("NO-OFFLINE-COMPILE", exc); sys.exit(0)

    class Sm90:  # stands in for a GPU: torch asks the active driver which target to lower for
        def get_current_target(self): return GPUTarget("cuda", 90, 32)
        def get_active_torch_device(self): return torch.device("cuda", 0)
        def get_current_device(self): return 0

    triton.runtime.driver.set_active(Sm90())
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from revdeq_kernels.backends.triton_backend import common, multi as K
    assert not common.INTERPRETED

    # 1. What torch.compile's functionalization sees: the kernels themselves, and only the states
    #    (then the scratch buffers) as written, so nothing else gets cloned.
    def step(states, fs):
        torch.ops.revdeq.triton_multi_relax_(states, fs, 0.8)
        return torch.ops.revdeq.triton_multi_residual(states, fs)
    with FakeTensorMode():
        states = [torch.empty(n, device="cuda") for n in (5000, 7, 300)]
        fs = [torch.empty(n, device="cuda", dtype=torch.bfloat16) for n in (5000, 7, 300)]
        graph = make_fx(dispatch_functionalize(step), tracing_mode="fake")(states, fs).graph
    for node in graph.nodes:
        if node.op == "call_function":
            if "kernel_idx" in node.kwargs:
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                name = getattr(getattr(kernel, "base_fn", getattr(kernel, "fn", None)), "__name__", "-")
                print("KERNEL", name, ",".join(node.kwargs["tensors_to_clone"]))
            elif "revdeq" in str(node.target):
                print("OPAQUE", node.target)

    # 2. The sm_90 code: 16-byte accesses on aligned members, no atomics in residual.
    def ptx(fn, signature, constexprs, aligned, num_warps):
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]

    dtypes = ["fp32", "fp64", "bf16", "fp32", "fp64", "bf16", "fp32", "fp32"]
    fdtypes = ["bf16", "fp64", "bf16", "fp32", "fp32", "bf16", "fp16", "fp32"]
    sig, aligned = {}, []
    for k in range(8):
        sig.update({f"s{k}": "*" + dtypes[k], f"f{k}": "*" + fdtypes[k], f"n{k}": "i64"})
        aligned += [3 * k, 3 * k + 1]
    sig.update({"a_bits": "i64", "b_bits": "i64", "c_bits": "i64", "total": "i64", "COUNT": "constexpr",
                "BLOCK": "constexpr"})
    code = ptx(K.multi_affine_kernel, sig, {"COUNT": 8, "BLOCK": 4096}, aligned, 8)
    print("AFFINE", "ld.global.v4.b32" in code, "st.global.v4.b32" in code, "ld.global.v2.b64" in code)
    sig = {}
    for k in range(8):
        sig.update({f"z{k}": "*" + dtypes[k], f"f{k}": "*" + fdtypes[k], f"n{k}": "i32"})
    sig.update({"partials_ptr": "*fp64", "tiles": "i32", "offset": "i32", "stride": "i32", "COUNT": "constexpr",
                "BLOCK": "constexpr"})
    code = ptx(K.multi_residual_partials_kernel, sig, {"COUNT": 8, "BLOCK": 4096}, aligned + [24], 8)
    print("RESIDUAL", "ld.global.v4.b32" in code, "ld.global.v2.b64" in code, "atom" not in code)
    ptx(K.multi_residual_finish_kernel, {"partials_ptr": "*fp64", "out_ptr": "*fp32", "count": "i32",
                                         "BLOCK": "constexpr"}, {"BLOCK": 1024}, [0, 1], 4)
    print("FINISH ok")
"""


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton unavailable: {TRITON_REASON}")
def test_compiled_triton_kernels_trace_write_only_states_and_vectorize_for_sm90():
    # Without the interpreter, in a fresh process, with sm_90 as the (offline) target: no GPU needed.
    import sys
    import textwrap

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_COMPILED_TRITON_CHECK)], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=300)
    if "NO-OFFLINE-COMPILE" in out.stdout:
        pytest.skip(f"this triton cannot compile offline: {out.stdout.strip()}")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert not [line for line in lines if line.startswith("OPAQUE")], lines
    assert [line for line in lines if line.startswith("KERNEL")] == [
        "KERNEL multi_affine_kernel s0,s1,s2", "KERNEL multi_residual_partials_kernel partials_ptr",
        "KERNEL multi_residual_finish_kernel out_ptr"], lines
    assert "AFFINE True True True" in lines and "RESIDUAL True True True" in lines and "FINISH ok" in lines, lines


# ---------------------------------------------------------------------------------------------------
# GPU only: sizes and member counts past one launch


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_more_members_than_one_launch_takes(backend):
    # 70 members: past the CUDA kernels' 64 per launch; two dtype pairs, so two groups.
    members = [(n, (F32, F32) if i % 3 else (F64, F32), "offset" if i % 5 == 0 else "contiguous")
               for i, n in enumerate([1, 7, 300, 4096, 33] * 14)]
    for op in ("relax_", "unrelax_"):
        check_multi_pointwise(backend, op, 0.7, seed=20, members=members)
    check_multi_residual(backend, seed=21, members=members)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_large_members(backend):
    members = [(1 << 24, (F32, BF16), "contiguous"), ((1 << 22) + 1, (F64, F64), "offset"),
               ((1 << 23) + 7, (BF16, BF16), "contiguous")]
    for op in ("relax_", "unrelax_"):
        check_multi_pointwise(backend, op, 0.8, seed=30, members=members)
    check_multi_residual(backend, seed=31, members=members)


# ---------------------------------------------------------------------------------------------------
# CUDA chunk geometry, checked on the host (nvcc, no GPU)

GEOMETRY_CHECK = r"""
// Host check of csrc/cuda/kernels/multi.cuh and multi.cu's launch planning: the chunks of a member cover each
// of its elements exactly once (packs by chunk_packs, scalars by chunk_scalars through scalar_index),
// a thread's kChunkSteps packs cover a chunk's packs, residual's index-ordered chunks (indexed_chunk) cover
// every virtual pack once, member_of finds the owner of every global chunk, and for_each_launch puts every
// non-empty member in exactly one launch of its own dtype pair, counting chunks of the kind asked for.
#include <cstdio>
#include <vector>

#include "cuda/kernels/multi.cu"

using namespace revdeq::cuda;
""" + HOST_EXPECT + r"""

template <typename S, typename F>
void check(const char* name) {
  constexpr int P = kPackElems<S>;
  static_assert(multi::kChunkPacks == int64_t(kThreads) * multi::kChunkSteps, "a thread's packs cover a chunk");
  const int64_t sizes[] = {1, 2, P - 1, P, P + 1, 1023, multi::kChunkPacks * P - 1, multi::kChunkPacks * P + 3,
                           5 * multi::kChunkPacks * P + 2 * P + 1};
  for (int s_off = 0; s_off < P + 1; ++s_off) {
    for (int f_off : {0, s_off, s_off + 1}) {
      const S* s = reinterpret_cast<const S*>(uintptr_t(1) << 20) + s_off;
      const F* f = reinterpret_cast<const F*>(uintptr_t(1) << 24) + f_off;
      for (int64_t n : sizes) {
        if (n < 1) continue;
        const Span sp = plan_span(s, f, n);
        const int64_t chunks = multi::chunk_count<S>(sp);
        std::vector<int> seen(n, 0);
        for (int64_t c = 0; c < chunks; ++c) {
          const multi::Range packs = multi::chunk_packs(sp, c);
          const multi::Range scalars = multi::chunk_scalars<S>(sp, c);
          EXPECT(packs.end - packs.begin <= multi::kChunkPacks && scalars.end - scalars.begin <=
                 multi::kChunkScalars<S>, "%s n %lld chunk %lld too big", name, (long long)n, (long long)c);
          EXPECT(packs.end > packs.begin || scalars.end > scalars.begin, "%s n %lld: chunk %lld has no work",
                 name, (long long)n, (long long)c);
          for (int t = 0; t < kThreads; ++t)  // the kernel's loops, thread by thread
            for (int u = 0; u < multi::kChunkSteps; ++u) {
              const int64_t q = packs.begin + t + u * kThreads;
              if (q < packs.end)
                for (int k = 0; k < P; ++k) ++seen[sp.head + q * P + k];
            }
          for (int64_t j = scalars.begin; j < scalars.end; ++j) {
            const int64_t i = scalar_index<P>(sp, j);
            EXPECT(i >= 0 && i < n, "%s n %lld: scalar %lld out of range", name, (long long)n, (long long)i);
            if (i >= 0 && i < n) ++seen[i];
          }
        }
        for (int64_t i = 0; i < n; ++i)
          EXPECT(seen[i] == 1, "%s off %d/%d n %lld: element %lld visited %d times", name, s_off, f_off,
                 (long long)n, (long long)i, seen[i]);
      }
    }
  }
  for (int64_t n : sizes) {  // residual's chunks: virtual packs by index, whatever the addresses
    const int64_t packs = (n + P - 1) / P, chunks = multi::indexed_chunk_count<S>(n);
    std::vector<int> seen(packs, 0);
    for (int64_t c = 0; c < chunks; ++c) {
      const multi::Range r = multi::indexed_chunk<S>(n, c);
      EXPECT(r.end > r.begin && r.end - r.begin <= multi::kChunkPacks, "%s n %lld: indexed chunk %lld", name,
             (long long)n, (long long)c);
      for (int t = 0; t < kThreads; ++t)
        for (int u = 0; u < multi::kChunkSteps; ++u) {
          const int64_t q = r.begin + t + u * kThreads;
          if (q < r.end) ++seen[q];
        }
    }
    for (int64_t q = 0; q < packs; ++q)
      EXPECT(seen[q] == 1, "%s n %lld: virtual pack %lld visited %d times", name, (long long)n, (long long)q, seen[q]);
  }
}

void check_launches() {
  // 150 members, three dtype pairs, some empty: 64 + 36 of the first pair, one launch of each other.
  const DType pairs[3][2] = {{DType::kFloat32, DType::kFloat32}, {DType::kFloat64, DType::kBFloat16},
                             {DType::kBFloat16, DType::kBFloat16}};
  std::vector<MemberPair> members;
  std::vector<int> pair_of;
  for (int i = 0; i < 150; ++i) {
    const int p = i < 110 ? 0 : (i < 130 ? 1 : 2);
    const int64_t n = i % 10 == 3 ? 0 : 1 + (i * 977) % 70000;
    members.push_back({reinterpret_cast<void*>(uintptr_t(1) << 30 | uintptr_t(i) << 20),
                       reinterpret_cast<const void*>(uintptr_t(1) << 40 | uintptr_t(i) << 20), n, pairs[p][0],
                       pairs[p][1]});
    pair_of.push_back(p);
  }
  std::vector<int> seen(members.size(), 0);
  std::vector<int> sizes;
  const cudaError_t err = for_each_launch<false>(members.data(), 150, [&](auto s_tag, auto,
                                                                          const MemberTable& table, int64_t chunks) {
    using S = typename decltype(s_tag)::type;
    sizes.push_back(table.count);
    EXPECT(table.count >= 1 && table.count <= kMultiMaxMembers, "launch with %d members", table.count);
    EXPECT(table.chunk_end[table.count - 1] == chunks, "chunk total %lld vs %lld",
           (long long)table.chunk_end[table.count - 1], (long long)chunks);
    int64_t previous = 0;
    for (int k = 0; k < table.count; ++k) {
      int found = -1;
      for (size_t i = 0; i < members.size(); ++i)
        if (members[i].state == table.state[k]) found = static_cast<int>(i);
      EXPECT(found >= 0 && members[found].f == table.f[k] && members[found].n == table.span[k].n,
             "launch member %d is not a call member", k);
      if (found < 0) continue;
      ++seen[found];
      EXPECT(table.chunk_end[k] - previous == multi::chunk_count<S>(table.span[k]), "member %d chunk count", found);
      previous = table.chunk_end[k];
      const int first = static_cast<int>((reinterpret_cast<uintptr_t>(table.state[0]) >> 20) & 0x3ff);
      EXPECT(pair_of[found] == pair_of[first], "members %d and %d of different pairs share a launch", first, found);
    }
    return cudaSuccess;
  });
  EXPECT(err == cudaSuccess, "for_each_launch returned %d", int(err));
  // The same launches for residual, each member with its index-ordered chunk count.
  int indexed_launches = 0;
  for_each_launch<true>(members.data(), 150, [&](auto s_tag, auto, const MemberTable& table, int64_t) {
    using S = typename decltype(s_tag)::type;
    ++indexed_launches;
    int64_t previous = 0;
    for (int k = 0; k < table.count; ++k) {
      EXPECT(table.chunk_end[k] - previous == multi::indexed_chunk_count<S>(table.span[k].n), "indexed chunk count");
      previous = table.chunk_end[k];
    }
    return cudaSuccess;
  });
  EXPECT(indexed_launches == 4, "%d residual launches", indexed_launches);
  for (size_t i = 0; i < members.size(); ++i)
    EXPECT(seen[i] == (members[i].n > 0 ? 1 : 0), "member %d launched %d times", int(i), seen[i]);
  EXPECT(sizes.size() == 4 && static_cast<int>(sizes.size()) <= max_launches(150), "%d launches",
         int(sizes.size()));

  // A bad member anywhere launches nothing.
  for (const auto& [bad, want] : {std::pair<int, cudaError_t>{0, cudaErrorInvalidValue},
                                  {1, cudaErrorMisalignedAddress}}) {
    std::vector<MemberPair> copy(members.begin(), members.end());
    if (bad == 0) copy[140].f_dtype = DType::kFloat64;  // bf16 state with a float64 f: unsupported
    if (bad == 1) copy[140].f = static_cast<const char*>(copy[140].f) + 1;
    int launched = 0;
    const cudaError_t got = for_each_launch<false>(copy.data(), 150, [&](auto, auto, const MemberTable&, int64_t) {
      ++launched;
      return cudaSuccess;
    });
    EXPECT(got == want && launched == 0, "bad member %d: error %d, %d launches", bad, int(got), launched);
  }
}

int main() {
  check<double, double>("double/double");
  check<double, __half>("double/half");
  check<float, float>("float/float");
  check<float, __nv_bfloat16>("float/bf16");
  check<__half, __half>("half/half");
  // member_of over chunk counts 3, 1, 5, 1 (running totals 3, 4, 9, 10).
  const int64_t ends[] = {3, 4, 9, 10};
  const int owner[] = {0, 0, 0, 1, 2, 2, 2, 2, 2, 3};
  for (int c = 0; c < 10; ++c)
    EXPECT(multi::member_of(ends, 4, c) == owner[c], "member_of(%d) = %d, want %d", c, multi::member_of(ends, 4, c),
           owner[c]);
  EXPECT(multi::member_of(ends, 1, 2) == 0, "member_of with one member");
  check_launches();
  if (failures == 0) std::printf("geometry check OK\n");
  return failures == 0 ? 0 : 1;
}
"""


NVCC = load_cuda_check().find_nvcc()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): the CUDA chunk "
                    "geometry cannot be compiled on this machine")
def test_cuda_chunks_cover_every_element_once(tmp_path):
    # multi.cu itself is included (for its launch planning), device code and all: one arch is enough.
    rc, output = run_host_program(NVCC, str(tmp_path), "geometry", GEOMETRY_CHECK,
                                  flags=("-gencode=arch=compute_90,code=sm_90",))
    assert rc == 0 and "geometry check OK" in output, output
