"""The torchdeq core (core="revdeq") against the real torchdeq package: gradients, eval mode, info, options."""

import argparse
import re
import sys
import warnings

import pytest
import torch

from helpers.solver_cases import (
    assert_grads_close,
    randn,
    rel_err,
    single_threaded,  # noqa: F401 (an autouse fixture)
    train_with_adam,
    unrolled,
)

torchdeq = pytest.importorskip("torchdeq", reason="the torchdeq tests need torchdeq (pip install torchdeq==0.1.0)")
from torchdeq import get_deq  # noqa: E402
from torchdeq.norm import apply_norm, reset_norm  # noqa: E402
from torchdeq.solver.stat import SolverStat  # noqa: E402

from revdeq_kernels.integrations import torchdeq as revdeq_torchdeq  # noqa: E402 (registers core="revdeq")

TorchDEQOptionWarning = revdeq_torchdeq.TorchDEQOptionWarning
F64 = torch.float64


class DEQClassifier(torch.nn.Module):
    """A torchdeq-style model: encoder -> deq(func, z_init) with func closing over x -> head."""

    def __init__(self, deq, dim=6, in_dim=4, classes=3, shared=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = torch.nn.Linear(in_dim, dim, dtype=F64)
        self.layer = torch.nn.Linear(dim, dim, dtype=F64)
        with torch.no_grad():
            self.layer.weight.mul_(0.5)
        self.head = torch.nn.Linear(dim, classes, dtype=F64)
        self.deq = deq
        self.shared = shared  # func also reads the encoder's weight: x's history meets a closed-over parameter

    def func(self, z, x):
        out = self.layer(z) + x
        if self.shared:
            out = out + 0.1 * torch.tanh(z[:, :4]) @ self.encoder.weight.T
        return torch.tanh(out)

    def forward(self, inp, z_init=None):
        x = self.encoder(inp)
        z_init = torch.zeros_like(x) if z_init is None else z_init
        z_out, info = self.deq(lambda z: self.func(z, x), z_init)
        return self.head(z_out[-1]), info

    def unrolled(self, inp, steps, beta, z_init=None):
        """The oracle: autograd through the same iteration."""
        x = self.encoder(inp)
        z_init = torch.zeros_like(x) if z_init is None else z_init
        return self.head(unrolled(lambda z, _: self.func(z, x), None, z_init, beta, steps))


def _grads(model, loss):
    params = [p for p in model.parameters()]
    return torch.autograd.grad(loss, params), [n for n, _ in model.named_parameters()]


def _inputs(seed=1):
    return randn(5, 4, seed=seed), torch.tensor([0, 2, 1, 1, 0])


@pytest.mark.parametrize("f_solver,f_tol", [("fixed_point_iter", 0.0), ("simple_fixed_point_iter", 1e-3)])
@pytest.mark.parametrize("beta", [0.5, 1.3])
def test_training_step_gradients_equal_unrolled_autograd(beta, f_solver, f_tol):
    model = DEQClassifier(get_deq(core="revdeq", f_max_iter=14, f_tol=f_tol, f_solver=f_solver, beta=beta))
    inp, labels = _inputs()
    logits, info = model(inp)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    got = [p.grad for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    want, _ = _grads(model, torch.nn.functional.cross_entropy(model.unrolled(inp, 7, beta), labels))
    assert info["nstep"].tolist() == [14.0] * 5  # 7 steps, two f evaluations each: every step ran
    assert_grads_close(got, want, 1e-10, names)
    assert info.solver_info["drift"] < 1e-9


def test_closure_over_a_normalised_weight_and_autograd_grad_wrt_the_raw_input():
    # torchdeq's weight norm computes layer.weight from weight_g, weight_v once per iteration (reset_norm),
    # outside func: func closes over a non-leaf weight, and over x = encoder(inp) whose input requires grad.
    model = DEQClassifier(get_deq(core="revdeq", f_max_iter=10, f_tol=None, beta=0.8))
    apply_norm(model.layer, "weight_norm")
    inp, labels = _inputs()
    inp.requires_grad_()
    wrt = [inp, *model.parameters()]
    names = ["input", *(n for n, _ in model.named_parameters())]
    assert "layer.weight_v" in names and "layer.weight_g" in names
    reset_norm(model)
    got = torch.autograd.grad(torch.nn.functional.cross_entropy(model(inp)[0], labels), wrt)
    reset_norm(model)
    want = torch.autograd.grad(torch.nn.functional.cross_entropy(model.unrolled(inp, 5, 0.8), labels), wrt)
    assert_grads_close(got, want, 1e-10, names)


def test_entangled_closure_gets_each_path_once():
    # func reads encoder.weight directly and through x = encoder(inp): a vjp with respect to both would count
    # the path through x twice; the core substitutes x in the backward and the gradients stay exact.
    model = DEQClassifier(get_deq(core="revdeq", f_max_iter=8, f_tol=None, beta=0.5), shared=True)
    inp, labels = _inputs()
    loss = torch.nn.functional.cross_entropy(model(inp)[0], labels)
    got, names = _grads(model, loss)
    want, _ = _grads(model, torch.nn.functional.cross_entropy(model.unrolled(inp, 4, 0.5), labels))
    assert_grads_close(got, want, 1e-10, names)


def test_z_init_that_requires_grad_gets_its_gradient():
    model = DEQClassifier(get_deq(core="revdeq", f_max_iter=6, f_tol=None, beta=0.5))
    inp, _ = _inputs()
    z_init = randn(5, 6, seed=3, requires_grad=True)
    got = torch.autograd.grad(model(inp, z_init)[0].square().sum(), [z_init, model.layer.weight])
    want = torch.autograd.grad(model.unrolled(inp, 3, 0.5, z_init).square().sum(), [z_init, model.layer.weight])
    assert_grads_close(got, want, 1e-10, ["z_init", "layer.weight"])


def test_a_tensor_func_reads_only_later_is_passed_with_params():
    # At z_init = 0 (the probe and the solver's first call) func does not read w_late; it must be passed.
    w_late = randn(6, seed=4, requires_grad=True)
    x = randn(5, 6, seed=5)

    def func(z):
        return torch.tanh(0.5 * z + x + (w_late * z if z.abs().sum() > 0 else 0.0))

    deq = get_deq(core="revdeq", f_max_iter=8, f_tol=None, beta=0.5)
    z_out, _ = deq(func, torch.zeros_like(x), params=[w_late])
    got = torch.autograd.grad(z_out[0].sum(), [w_late])
    want = torch.autograd.grad(unrolled(lambda z, _: func(z), None, torch.zeros_like(x), 0.5, 4).sum(), [w_late])
    assert_grads_close(got, want, 1e-10, ["w_late"])


def test_batchnorm_statistics_in_func_are_not_updated_by_the_backward():
    norm = torch.nn.BatchNorm1d(6, dtype=F64)
    layer = torch.nn.Linear(6, 6, dtype=F64)
    x = randn(5, 6, seed=1, requires_grad=True)
    deq = get_deq(core="revdeq", f_max_iter=8, f_tol=None, beta=0.5)
    z_out, _ = deq(lambda z: torch.tanh(norm(0.5 * layer(z)) + x), torch.zeros_like(x))
    after_forward = [b.clone() for b in norm.buffers()]
    assert norm.num_batches_tracked.item() == 1 + 9  # the probe, then 2 * 4 + 1 forward evaluations
    z_out[0].sum().backward()
    for name, before, now in zip(["running_mean", "running_var", "num_batches_tracked"], after_forward,
                                 norm.buffers()):
        assert torch.equal(before, now), f"{name} changed in the backward"
    assert layer.weight.grad is not None and x.grad is not None


def test_eval_mode_keeps_an_exact_input_gradient():
    model = DEQClassifier(get_deq(core="revdeq", f_max_iter=100, eval_f_max_iter=12, f_tol=None, beta=0.5)).eval()
    inp, _ = _inputs()
    inp.requires_grad_()
    logits, info = model(inp)
    assert logits.requires_grad and info["nstep"][0] == 12  # the eval budget, not f_max_iter
    assert info["sradius"].tolist() == [0.0]  # as torchdeq's eval without sradius_mode
    got = torch.autograd.grad(logits.sum(), inp)
    want = torch.autograd.grad(model.unrolled(inp, 6, 0.5).sum(), inp)
    assert_grads_close(got, want, 1e-10, ["input"])
    with torch.no_grad():
        logits, _ = model(inp)
    assert not logits.requires_grad


def test_info_is_a_torchdeq_solver_stat_with_the_batch_residuals():
    model = DEQClassifier(get_deq(core="revdeq", f_max_iter=60, f_tol=1e-6, beta=0.5))
    inp, _ = _inputs()
    x = model.encoder(inp)
    z_out, info = model.deq(lambda z: model.func(z, x), torch.zeros_like(x))
    z = z_out[0]
    assert isinstance(z_out, list) and len(z_out) == 1 and z.shape == x.shape and z.dtype == x.dtype
    assert isinstance(info, SolverStat)
    assert set(info) == {"abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep", "sradius"}
    steps = info.solver_info["steps"]
    assert 2 < steps < 30 and info["nstep"].tolist() == [2.0 * steps] * 5
    assert info["abs_trace"].shape == info["rel_trace"].shape == (5, steps + 1)
    fz = model.func(z, x)
    rel = ((z - fz).norm() / fz.norm()).item()
    rms = ((z - fz).square().sum() / 5).sqrt().item()
    assert abs(info["rel_lowest"][0].item() - rel) <= 1e-9 * rel and rel <= 1e-6
    assert abs(info["abs_lowest"][0].item() - rms) <= 1e-9 * rms
    assert torch.equal(info["rel_trace"][:, -1], info["rel_lowest"])
    assert info["rel_trace"][0, 0] == 1.0  # from z_init = 0: ||0 - f(0)|| / ||f(0)||
    assert info["sradius"].tolist() == [-1.0]  # torchdeq's training default


def test_eval_mode_sradius_and_per_call_budget():
    model = DEQClassifier(get_deq(core="revdeq", f_max_iter=20, f_tol=None, beta=0.5)).eval()
    inp, _ = _inputs()
    x = model.encoder(inp).detach()
    _, info = model.deq(lambda z: model.func(z, x), torch.zeros_like(x), sradius_mode=True,
                        solver_kwargs={"f_max_iter": 6})
    assert info["nstep"][0] == 6 and info["sradius"].shape == (5,)
    assert 0 < info["sradius"].max() < 1  # a contraction: tanh' <= 1 and ||0.5 W|| < 1


def test_backward_writer_gets_the_drift_after_the_backward():
    seen = []
    model = DEQClassifier(get_deq(core="revdeq", f_max_iter=8, f_tol=None, beta=0.5))
    x = model.encoder(_inputs()[0])
    z_out, _ = model.deq(lambda z: model.func(z, x), torch.zeros_like(x), backward_writer=seen.append)
    assert seen == []
    z_out[0].sum().backward()
    assert len(seen) == 1 and isinstance(seen[0], SolverStat)
    assert seen[0]["nstep"].item() == 8 and 0 <= seen[0]["drift"].item() < 1e-9


def test_the_same_script_runs_with_torchdeqs_default_core_and_revdeq():
    def train(core, **extra):
        torch.manual_seed(0)
        model = DEQClassifier(get_deq(core=core, f_max_iter=40, f_tol=1e-8, f_stop_mode="rel", **extra))
        inp, labels = _inputs()
        losses = train_with_adam(model, inp, labels, steps=15)
        x = model.encoder(inp)
        z_out, info = model.deq(lambda z: model.func(z, x), torch.zeros_like(x))
        return losses, z_out, info

    losses_torchdeq, z_torchdeq, info_torchdeq = train("sliced")
    losses_revdeq, z_revdeq, info_revdeq = train("revdeq", beta=0.5)
    assert set(info_revdeq) == set(info_torchdeq)
    assert [z.shape for z in z_revdeq] == [z.shape for z in z_torchdeq]
    assert losses_torchdeq[-1] < 0.5 * losses_torchdeq[0] and losses_revdeq[-1] < 0.5 * losses_revdeq[0]
    # The first step trains from the same weights: both cores find the same fixed point (to their tolerances).
    print("first losses:", losses_torchdeq[0], losses_revdeq[0])
    assert abs(losses_torchdeq[0] - losses_revdeq[0]) < 1e-6


# (config, exception, regex): options that would change what is computed are refused by name.
REFUSED = [
    (dict(f_solver="newton"), ValueError, r"RevDEQCore: f_solver='newton' is not a torchdeq solver"),
    (dict(n_states=2), ValueError, r"RevDEQCore: n_states=2 is not supported: the revdeq core returns one state"),
    (dict(indexing=[2, 4]), ValueError, r"RevDEQCore: indexing=\[2, 4\] is not supported"),
    (dict(f_stop_mode="max"), ValueError, r"f_stop_mode must be 'rel' or 'abs', got 'max'"),
    (dict(f_max_iter=-1), ValueError, r"RevDEQCore: f_max_iter must be a finite number of f evaluations >= 0, got -1"),
    (dict(f_max_iter=0, grad=0), ValueError, r"RevDEQCore: grad must be a finite number of f evaluations >= 1"),
    (dict(f_max_iter=float("inf")), ValueError, r"RevDEQCore: f_max_iter must be a finite number .*got inf"),
    (dict(beta=1.0), ValueError, r"RevDEQCore: beta must be a finite number in \(0, 2\) other than 1"),
    (dict(state_dtype="float16"), ValueError, r"state_dtype must be torch.float64, torch.float32, 'float64' or"),
    (dict(f_tol=-1.0), ValueError, r"RevDEQCore: tol must be a finite number >= 0 or None"),
]


@pytest.mark.parametrize("config,exc,match", REFUSED, ids=[next(iter(c)) + "-" + str(next(iter(c.values())))
                                                          for c, _, _ in REFUSED])
def test_options_without_meaning_are_refused_by_name(config, exc, match):
    with pytest.raises(exc, match=match):
        get_deq(core="revdeq", **config)


WARNED = [
    (dict(ift=True), r"ift=True has no effect: the revdeq core's gradient is the exact reversal"),
    (dict(hook_ift=True, b_max_iter=10), r"hook_ift=True, b_max_iter=10 have no effect"),
    (dict(ift=True, tau=0.5), r"ift=True, tau=0.5 have no effect"),
    (dict(b_solver="anderson", b_tol=1e-8, b_stop_mode="rel"), r"b_solver='anderson', b_tol=1e-08, b_stop_mode"),
    (dict(sup_gap=2, sup_loc=[1]), r"sup_gap=2, sup_loc=\[1\] have no effect"),
    (dict(f_solver="anderson"), r"f_solver='anderson' is replaced by RevDEQ's reversible fixed-point iteration"),
    (dict(f_solver="broyden"), r"f_solver='broyden' is replaced"),
]


@pytest.mark.parametrize("config,match", WARNED, ids=[next(iter(c)) for c, _ in WARNED])
def test_options_without_effect_are_warned_about_by_name(config, match):
    with pytest.warns(TorchDEQOptionWarning, match=match):
        get_deq(core="revdeq", **config)


def test_torchdeq_argparse_defaults_are_quiet_and_honoured():
    # Every option at torchdeq's default, as add_deq_args gives them: no warning at all.
    parser = argparse.ArgumentParser()
    torchdeq.add_deq_args(parser)
    args = parser.parse_args(["--core", "revdeq", "--f_max_iter", "12"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq = get_deq(args)
        get_deq(core="revdeq", f_stop_mode="abs", ift=False, grad=[1], n_states=1, indexing=[])  # all defaults
        x = randn(3, 6, seed=1)
        z_out, info = deq(lambda z: torch.tanh(0.5 * z + x), torch.zeros_like(x), writer=None)  # logging kwarg
    assert isinstance(deq, revdeq_torchdeq.RevDEQCore) and deq.f_max_iter == 12
    assert info.solver_info._options.stop_mode == "abs"  # torchdeq's default stop mode, honoured


@pytest.mark.parametrize("mode", ["abs", "rel"])
def test_f_stop_mode_stops_on_the_residual_it_names(mode):
    # Values of order 10: the absolute and relative residuals differ by that much.
    x = 10.0 * randn(3, 6, seed=1)
    deq = get_deq(core="revdeq", f_max_iter=200, f_tol=1e-4, f_stop_mode=mode)
    z_out, info = deq(lambda z: 0.5 * torch.tanh(z) + x, torch.zeros_like(x))
    z = z_out[-1]
    fz = 0.5 * torch.tanh(z) + x
    absolute, relative = (z - fz).norm().item(), ((z - fz).norm() / fz.norm()).item()
    steps = info.solver_info["steps"]
    assert (absolute if mode == "abs" else relative) <= 1e-4
    if mode == "rel":
        assert absolute > 1e-4  # it stopped before the absolute criterion was met
    # ... and not later than needed: one step fewer had not met it.
    history = info.solver_info.residual_history()[steps - 1].tolist()
    before = history[0] ** 0.5 if mode == "abs" else (history[0] / history[1]) ** 0.5
    assert before > 1e-4


def test_revdeq_options_come_from_the_config_and_a_distributed_backend_is_not_ours():
    parser = argparse.ArgumentParser()
    torchdeq.add_deq_args(parser)
    parser.add_argument("--backend", default="nccl")  # a DDP script's own option
    args = parser.parse_args(["--core", "revdeq", "--f_stop_mode", "rel"])
    deq = get_deq(args, beta=0.25, state_dtype="float32", max_drift=1e-3, revdeq_backend="reference", check_every=2)
    assert deq.revdeq_kwargs == dict(beta=0.25, state_dtype=torch.float32, max_drift=1e-3, backend="reference",
                                     check_every=2)
    x = randn(3, 6, seed=1, dtype=torch.float32)
    _, info = deq(lambda z: torch.tanh(0.5 * z + x), torch.zeros_like(x))
    o = info.solver_info._options
    assert (o.beta, o.state_dtype, o.max_drift, o.backend, o.check_every) == (0.25, torch.float32, 1e-3, "reference", 2)
    with pytest.raises(ValueError, match=r"RevDEQCore: unknown backend 'nccl'"):
        get_deq(core="revdeq", revdeq_backend="nccl")


def test_per_call_arguments_without_meaning_are_refused_or_warned():
    deq = get_deq(core="revdeq", f_max_iter=4, f_tol=None)
    x = randn(3, 6, seed=1)

    def func(z):
        return torch.tanh(0.5 * z + x)

    z0 = torch.zeros_like(x)
    with pytest.raises(ValueError, match=r"solver_kwargs keys \['tau'\] are not supported by the revdeq core"):
        deq(func, z0, solver_kwargs={"tau": 0.5})
    with pytest.warns(TorchDEQOptionWarning, match=r"return_final=False has no effect"):
        deq(func, z0, solver_kwargs={"return_final": False})
    with pytest.warns(TorchDEQOptionWarning, match=r"keyword arguments \['verbose'\] have no effect"):
        deq(func, z0, writer=None, verbose=True)  # writer, torchdeq's logging argument, is quiet
    with pytest.raises(TypeError, match=r"RevDEQCore: z_init must be a floating tensor, got dtype torch.int64"):
        deq(func, torch.zeros(3, 6, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"RevDEQCore: func must be callable"):
        deq("func", z0)


def test_func_with_the_wrong_shape_gets_the_solvers_error():
    deq = get_deq(core="revdeq", f_max_iter=4)
    x = randn(3, 6, seed=1)
    with pytest.raises(ValueError, match=r"RevDEQCore: f \(forward pass, evaluating f\(z0\)\) returned shape \(3, 3\)"):
        deq(lambda z: z[:, :3] + x[:, :3], torch.zeros_like(x))


def test_default_beta_keeps_torchdeqs_default_budget_exact():
    # torchdeq's default f_max_iter=40 is 20 steps: beta 0.5 (the core's default) keeps the drift at rounding level.
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    x = randn(4, 16, seed=1, dtype=torch.float32)
    deq = get_deq(core="revdeq", f_tol=None)
    assert deq.revdeq_kwargs["beta"] == 0.5 and deq.f_max_iter == 40
    z_out, info = deq(lambda z: torch.tanh(2.0 * lin(z) + x), torch.zeros_like(x))
    z_out[0].sum().backward()
    assert info.solver_info["steps"] == 20 and info.solver_info["drift"] < 1e-6


def test_float32_model_keeps_float64_states_and_returns_float32():
    x = randn(4, 8, seed=1, dtype=torch.float32)
    lin = torch.nn.Linear(8, 8)
    deq = get_deq(core="revdeq", f_max_iter=10, f_tol=None, beta=0.5)

    def func(z):
        return torch.tanh(0.5 * lin(z) + x)

    z_out, info = deq(func, torch.zeros_like(x))
    assert z_out[0].dtype == torch.float32 and info.solver_info["steps"] == 5
    got = torch.autograd.grad(z_out[0].sum(), [lin.weight])
    z = unrolled(lambda z, _: func(z), None, torch.zeros_like(x), 0.5, 5, state_dtype=F64)
    assert rel_err(z_out[0], z) < 1e-6
    want = torch.autograd.grad(z.sum(), [lin.weight])
    assert_grads_close(got, want, 1e-5, ["lin.weight"])


BAD_FIRST_CALLS = [
    ("z_init shape", lambda lin: (lambda z: torch.tanh(lin(z))), torch.zeros(2, 5, dtype=torch.float64),
     r"func\(z_init\): \(2, 5\) float64 on cpu"),
    ("z_init device", lambda lin: (lambda z: torch.tanh(lin(z))), torch.zeros(2, 4, dtype=torch.float64,
                                                                              device="meta"), r"on meta"),
    ("func arity", lambda lin: (lambda z, x: torch.tanh(lin(z) + x)), torch.zeros(2, 4, dtype=torch.float64),
     r"func must take the state as its only argument"),
]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes (add_note) need Python 3.11")
@pytest.mark.parametrize("name, make, z_init, says", BAD_FIRST_CALLS, ids=[c[0] for c in BAD_FIRST_CALLS])
def test_a_bad_z_init_or_func_names_the_core_and_what_it_passed(name, make, z_init, says):
    lin = torch.nn.Linear(4, 4, dtype=torch.float64)
    deq = get_deq(core="revdeq", f_max_iter=6, f_tol=None)
    with pytest.raises(Exception) as caught:
        deq(make(lin), z_init)
    notes = " ".join(getattr(caught.value, "__notes__", []))
    assert "RevDEQCore: raised by func on its first call" in notes and re.search(says, notes), notes


def test_f_max_iter_0_with_grad_steps_spends_the_gradient_budget_and_matches_autograd():
    # The DEQ transformer LM's recipe: no solver iterations (f_max_iter=0), then grad=12 unrolled steps
    # with gradient. The revdeq core runs 12 evaluations' worth of reversible steps (6) instead.
    lin = torch.nn.Linear(6, 6, dtype=torch.float64)
    x = randn(3, 6, seed=1, requires_grad=True)
    z_init = randn(3, 6, seed=2)
    deq = get_deq(core="revdeq", f_max_iter=0, grad=12, f_tol=None, beta=0.5)

    def func(z):
        return torch.tanh(0.5 * lin(z) + x)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # grad is meaningful here: no "has no effect" warning
        z_out, info = deq(func, z_init)
    assert info.solver_info["steps"] == 6 and info["nstep"][0].item() == 12
    params = [x, *lin.parameters()]
    got = torch.autograd.grad(z_out[-1].square().sum(), params)
    want = torch.autograd.grad(unrolled(lambda z, _: func(z), None, z_init, 0.5, 6).square().sum(), params)
    assert_grads_close(got, want, 1e-9, ["x", "weight", "bias"])


def test_a_warm_started_inr_loop_with_solver_kwargs_f_max_iter_0_trains():
    # deq-inr's loop: the first iteration solves from zeros, every later one warm-starts from the previous
    # state with solver_kwargs={'f_max_iter': 0}; that used to fail on the second iteration.
    torch.manual_seed(0)
    coords = torch.rand(64, 2, dtype=torch.float64) * 2 - 1
    target = torch.sin(3 * coords[:, :1]) * torch.cos(2 * coords[:, 1:])
    inject = torch.nn.Linear(2, 16, dtype=torch.float64)
    layer = torch.nn.Linear(16, 16, dtype=torch.float64)
    head = torch.nn.Linear(16, 1, dtype=torch.float64)
    deq = get_deq(core="revdeq", f_max_iter=16, f_tol=1e-6)
    opt = torch.optim.Adam([*inject.parameters(), *layer.parameters(), *head.parameters()], lr=1e-2)
    z_prev, losses, steps = None, [], []
    for _ in range(12):
        u = inject(coords)

        def func(z):  # a closure over this iteration's injection, used within the iteration
            return torch.sin(0.5 * layer(z) + u)  # noqa: B023

        solver_kwargs = None if z_prev is None else {"f_max_iter": 0}
        z_init = torch.zeros(64, 16, dtype=torch.float64) if z_prev is None else z_prev
        z_out, info = deq(func, z_init, solver_kwargs=solver_kwargs)
        loss = (head(z_out[-1]) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        z_prev = z_out[-1].detach()
        losses.append(loss.item())
        steps.append(info.solver_info["steps"])
    assert steps[0] > 1 and steps[1:] == [1] * 11  # warm starts: the gradient budget (grad=1), one step
    assert losses[-1] < 0.5 * losses[0], losses
    assert inject.weight.grad is not None and inject.weight.grad.abs().sum() > 0  # reached through the closure
