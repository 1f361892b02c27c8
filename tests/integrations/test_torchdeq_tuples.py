"""The torchdeq core with list states (torchdeq's multiscale, MDEQ-style ``deq(func, [z1, z2])``), against the
real torchdeq package: exact gradients, the same script on torchdeq's default core, statistics and errors."""

import pytest
import torch

from helpers.solver_cases import (
    assert_grads_close,
    randn,
    single_threaded,  # noqa: F401 (an autouse fixture)
    train_with_adam,
)

torchdeq = pytest.importorskip("torchdeq", reason="the torchdeq tests need torchdeq (pip install torchdeq==0.1.0)")
from torchdeq import get_deq  # noqa: E402

import revdeq_kernels.integrations.torchdeq  # noqa: E402, F401 (registers core="revdeq")

F64 = torch.float64
BATCH, FINE, COARSE = 5, (4, 6), (2, 3)  # (positions, channels) of the fine and the coarse resolution


class MultiscaleClassifier(torch.nn.Module):
    """encoder -> deq(func, [fine, coarse]) with func(fine, coarse) closing over x -> head on both.

    The fine state is driven by x and the upsampled coarse state; the coarse one by the pooled fine state."""

    def __init__(self, deq, in_dim=4, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        (fp, fc), (cp, cc) = FINE, COARSE
        self.encoder = torch.nn.Linear(in_dim, fp * fc, dtype=F64)
        self.fine = torch.nn.Linear(fc, fc, dtype=F64)
        self.up = torch.nn.Linear(cc, fc, bias=False, dtype=F64)
        self.coarse = torch.nn.Linear(cc, cc, dtype=F64)
        self.down = torch.nn.Linear(fc, cc, bias=False, dtype=F64)
        with torch.no_grad():
            for layer in (self.fine, self.up, self.coarse, self.down):
                layer.weight.mul_(0.4)
        self.head = torch.nn.Linear(fp * fc + cp * cc, classes, dtype=F64)
        self.deq = deq

    def func(self, fine, coarse, x):
        up = coarse.repeat_interleave(FINE[0] // COARSE[0], dim=1)
        pooled = fine.view(fine.shape[0], COARSE[0], -1, FINE[1]).mean(2)
        return [torch.tanh(self.fine(fine) + self.up(up) + x), torch.tanh(self.coarse(coarse) + self.down(pooled))]

    def z_init(self, x):
        return [torch.zeros_like(x), x.new_zeros(x.shape[0], *COARSE)]

    def logits(self, z):
        return self.head(torch.cat([m.flatten(1) for m in z], dim=1))

    def forward(self, inp):
        x = self.encoder(inp).view(-1, *FINE)
        z_out, info = self.deq(lambda fine, coarse: self.func(fine, coarse, x), self.z_init(x))
        return self.logits(z_out[-1]), info

    def unrolled(self, inp, steps, beta):
        """The oracle: autograd through the same iteration on both members."""
        x = self.encoder(inp).view(-1, *FINE)
        y = z = self.z_init(x)
        for _ in range(steps):
            y = [(1 - beta) * a + beta * b for a, b in zip(y, self.func(*z, x))]
            z = [(1 - beta) * a + beta * b for a, b in zip(z, self.func(*y, x))]
        return self.logits(z)


def _inputs():
    return randn(BATCH, 4, seed=1), torch.tensor([0, 2, 1, 1, 0])


@pytest.mark.parametrize("beta", [0.5, 1.3])
def test_training_step_gradients_equal_unrolled_autograd(beta):
    model = MultiscaleClassifier(get_deq(core="revdeq", f_max_iter=14, f_tol=None, beta=beta))
    inp, labels = _inputs()
    logits, info = model(inp)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    names = [n for n, _ in model.named_parameters()]
    got = [p.grad for p in model.parameters()]
    want = torch.autograd.grad(torch.nn.functional.cross_entropy(model.unrolled(inp, 7, beta), labels),
                               list(model.parameters()))
    assert_grads_close(got, want, 1e-10, names)
    assert info["nstep"].tolist() == [14.0] * BATCH and info.solver_info["drift"] < 1e-9


def test_the_same_multiscale_script_runs_with_torchdeqs_default_core_and_revdeq():
    def train(core, **extra):
        model = MultiscaleClassifier(get_deq(core=core, f_max_iter=40, f_tol=1e-8, f_stop_mode="rel", **extra))
        inp, labels = _inputs()
        losses = train_with_adam(model, inp, labels, steps=10)
        x = model.encoder(inp).view(-1, *FINE)
        z_out, info = model.deq(lambda fine, coarse: model.func(fine, coarse, x), model.z_init(x))
        return losses, z_out, info

    losses_torchdeq, z_torchdeq, info_torchdeq = train("sliced")
    losses_revdeq, z_revdeq, info_revdeq = train("revdeq", beta=0.5)
    assert set(info_revdeq) == set(info_torchdeq)
    # Both return [state] with the state a list of the members, shaped like z_init.
    assert [[m.shape for m in z] for z in z_revdeq] == [[m.shape for m in z] for z in z_torchdeq]
    assert isinstance(z_revdeq[-1], list) and len(z_revdeq[-1]) == 2
    assert losses_torchdeq[-1] < 0.5 * losses_torchdeq[0] and losses_revdeq[-1] < 0.5 * losses_revdeq[0]
    print("first losses:", losses_torchdeq[0], losses_revdeq[0])
    assert abs(losses_torchdeq[0] - losses_revdeq[0]) < 1e-6  # the same fixed point from the same weights


def test_statistics_backward_writer_and_eval_sradius_with_a_list_state():
    model = MultiscaleClassifier(get_deq(core="revdeq", f_max_iter=60, f_tol=1e-6, beta=0.5))
    inp, _ = _inputs()
    x = model.encoder(inp).view(-1, *FINE)
    seen = []
    z_out, info = model.deq(lambda f, c: model.func(f, c, x), model.z_init(x), backward_writer=seen.append)
    fine, coarse = z_out[-1]
    steps = info.solver_info["steps"]
    assert 2 < steps < 30 and info["rel_trace"].shape == (BATCH, steps + 1)
    f_fine, f_coarse = model.func(fine, coarse, x)
    d2 = (fine - f_fine).square().sum() + (coarse - f_coarse).square().sum()
    rel = (d2 / (f_fine.square().sum() + f_coarse.square().sum())).sqrt().item()
    assert abs(info["rel_lowest"][0].item() - rel) <= 1e-9 * rel and rel <= 1e-6  # over both members
    (fine.sum() + coarse.sum()).backward()
    assert len(seen) == 1 and seen[0]["drift"].item() < 1e-6 and seen[0]["nstep"].item() == 2 * steps

    model.eval()
    with torch.no_grad():
        x = x.detach()
        _, info = model.deq(lambda f, c: model.func(f, c, x), model.z_init(x), sradius_mode=True)
    assert info["sradius"].shape == (BATCH,) and 0 < info["sradius"].max() < 1


def test_bad_list_states_get_clear_errors():
    deq = get_deq(core="revdeq", f_max_iter=4)
    x = randn(3, 6, seed=1)
    with pytest.raises(ValueError, match=r"RevDEQCore: z_init is an empty list; pass at least one tensor"):
        deq(lambda: [], [])
    with pytest.raises(TypeError, match=r"RevDEQCore: z_init\[1\] must be a torch.Tensor, got float"):
        deq(lambda a, b: [a, b], [x, 0.0])
    with pytest.raises(TypeError, match=r"RevDEQCore: z_init\[0\] must be a floating tensor, got dtype torch.int64"):
        deq(lambda a, b: [a, b], [x.long(), x])
    with pytest.raises(ValueError, match=r"RevDEQCore: f \(forward pass, evaluating f\(z0\)\) returned 1 tensors but "
                                         r"z0 has 2"):
        deq(lambda a, b: [torch.tanh(a + x)], [x, x])
