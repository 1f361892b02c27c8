"""Small models written the way torchdeq's model zoo (deq-zoo) writes them, switched with ``core`` alone.

Each model takes a torchdeq config and runs with torchdeq's own core as it is; with ``core="revdeq"``
and nothing else changed its float64 gradients must equal autograd through the unrolled reversible
iteration (the same func, the same steps). The patterns: an MDEQ-style multiscale state of GroupNorm
conv blocks under torchdeq's weight norm (apply_norm / reset_norm); a DEQ transformer LM-style weight-tied
layer with memory tokens and causal attention, configured from argparse with f_max_iter=0 and grad steps;
an IGNN-style graph layer under torchdeq's spectral norm. (The INR warm-start loop with
solver_kwargs={'f_max_iter': 0} is in test_torchdeq.py.)
"""

import argparse
import warnings

import pytest
import torch

from helpers.solver_cases import assert_grads_close, single_threaded  # noqa: F401 (an autouse fixture)

torchdeq = pytest.importorskip("torchdeq", reason="torchdeq is in the test extra")
from torchdeq import get_deq  # noqa: E402
from torchdeq.norm import apply_norm, reset_norm  # noqa: E402

import revdeq_kernels.integrations.torchdeq  # noqa: E402, F401 (registers core="revdeq")

F64 = torch.float64


def unrolled(func, z_init, beta, steps):
    """z[steps] of the reversible iteration with autograd through every step; func takes the members."""
    multi = isinstance(z_init, (list, tuple))
    y = z = list(z_init) if multi else [z_init]
    for _ in range(steps):
        fz = func(*z)
        y = [(1 - beta) * a + beta * b for a, b in zip(y, fz if multi else [fz])]
        fy = func(*y)
        z = [(1 - beta) * a + beta * b for a, b in zip(z, fy if multi else [fy])]
    return z if multi else z[0]


def _grads(loss, module):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params), [n for n, p in module.named_parameters() if p.requires_grad]


# MDEQ-style: two resolutions, conv + GroupNorm + ReLU blocks, weight norm --------------------------------


class Branch(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False, dtype=F64)
        self.gn1 = torch.nn.GroupNorm(2, channels, affine=True, dtype=F64)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False, dtype=F64)
        self.gn2 = torch.nn.GroupNorm(2, channels, affine=True, dtype=F64)

    def forward(self, z, injection):
        h = torch.relu(self.gn1(self.conv1(z)))
        return torch.relu(self.gn2(self.conv2(h) + injection) + z * 0.1)


class MDEQ(torch.nn.Module):
    def __init__(self, deq, channels=4):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(1, channels, 3, padding=1, dtype=F64)
        self.fine, self.coarse = Branch(channels), Branch(channels)
        self.down = torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False, dtype=F64)
        self.up = torch.nn.Conv2d(channels, channels, 1, bias=False, dtype=F64)
        self.head = torch.nn.Linear(channels, 3, dtype=F64)
        self.deq = deq
        apply_norm(self, norm_type="weight_norm")  # as MDEQ does, on every conv of the model

    def func(self, x):
        def f(z_fine, z_coarse):
            up = torch.nn.functional.interpolate(self.up(z_coarse), scale_factor=2)
            return self.fine(z_fine, x + up), self.coarse(z_coarse, self.down(z_fine))
        return f

    def z_init(self, x):
        return [torch.zeros_like(x), torch.zeros(x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2,
                                                dtype=F64)]

    def forward(self, img):
        reset_norm(self)
        x = self.stem(img)
        z_out, info = self.deq(self.func(x), self.z_init(x))
        fine, coarse = z_out[-1]
        return self.head(fine.mean((2, 3)) + coarse.mean((2, 3))), info


def test_mdeq_style_multiscale_groupnorm_model_switches_core_alone():
    img = torch.randn(2, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        MDEQ(get_deq(f_max_iter=12, f_tol=1e-6))(img)  # the same model on torchdeq's own core
    model = MDEQ(get_deq(core="revdeq", f_max_iter=12, f_tol=None))
    logits, info = model(img)
    got, names = _grads(logits.square().sum(), model)
    reset_norm(model)
    x = model.stem(img)
    fine, coarse = unrolled(model.func(x), model.z_init(x), 0.5, 6)
    want, _ = _grads(model.head(fine.mean((2, 3)) + coarse.mean((2, 3))).square().sum(), model)
    assert_grads_close(got, want, 1e-8, names)
    assert info.solver_info["steps"] == 6


# DEQ transformer LM-style: a weight-tied layer with memory tokens, causal attention ------------------------


class TiedLayer(torch.nn.Module):
    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True, dtype=F64)
        self.ln1 = torch.nn.LayerNorm(dim, dtype=F64)
        self.ff = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim, dtype=F64), torch.nn.GELU(),
                                      torch.nn.Linear(2 * dim, dim, dtype=F64))
        self.ln2 = torch.nn.LayerNorm(dim, dtype=F64)

    def forward(self, z, injection, memory):
        keys = torch.cat([memory, z], dim=1)  # memory tokens from the previous segment, as in the DEQ LM
        t, m = z.shape[1], memory.shape[1]
        mask = torch.ones(t, m + t, dtype=torch.bool).triu(m + 1)  # causal over z, every memory token visible
        h = self.ln1(z + self.attn(z, keys, keys, attn_mask=mask, need_weights=False)[0] + injection)
        return self.ln2(h + 0.5 * self.ff(h))


class DEQLM(torch.nn.Module):
    def __init__(self, deq, vocab=11, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, dim, dtype=F64)
        self.layer = TiedLayer(dim)
        self.out = torch.nn.Linear(dim, vocab, dtype=F64)
        self.deq = deq

    def forward(self, tokens, memory, z_init):
        u = self.embed(tokens)
        z_out, info = self.deq(lambda z: self.layer(z, u, memory), z_init)
        return self.out(z_out[-1]), info


def test_deq_lm_style_weight_tied_layer_from_argparse_with_f_max_iter_0_and_grad_steps():
    parser = argparse.ArgumentParser()
    torchdeq.add_deq_args(parser)
    flags = ["--f_max_iter", "0", "--grad", "6", "--f_tol", "0"]  # the LM's recipe: no solver, 6 grad steps
    g = torch.Generator().manual_seed(2)
    tokens, memory = torch.randint(0, 11, (2, 5), generator=g), torch.randn(2, 3, 8, dtype=F64, generator=g)
    z_init = torch.randn(2, 5, 8, dtype=F64, generator=g)  # warm-started from the previous segment
    with torch.no_grad():
        DEQLM(get_deq(parser.parse_args(flags)))(tokens, memory, z_init)  # torchdeq's own core
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every option at its default or meaningful: no warning
        model = DEQLM(get_deq(parser.parse_args(["--core", "revdeq", *flags])))
        logits, info = model(tokens, memory, z_init)
    assert info.solver_info["steps"] == 3  # grad=6 evaluations: 3 reversible steps
    got, names = _grads(logits.square().mean(), model)
    u = model.embed(tokens)
    want, _ = _grads(model.out(unrolled(lambda z: model.layer(z, u, memory), z_init, 0.5, 3)).square().mean(),
                     model)
    assert_grads_close(got, want, 1e-8, names)


# IGNN-style: a graph layer under torchdeq's spectral norm ----------------------------------------------------


class GraphDEQ(torch.nn.Module):
    def __init__(self, deq, nodes=12, features=4, hidden=8):
        super().__init__()
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(3)
        adjacency = (torch.rand(nodes, nodes, generator=g) < 0.3).to(F64)
        adjacency = adjacency + adjacency.T + torch.eye(nodes, dtype=F64)
        degree = adjacency.sum(1).rsqrt()
        self.register_buffer("A", degree[:, None] * adjacency * degree[None, :])
        self.W = torch.nn.Linear(hidden, hidden, bias=False, dtype=F64)
        self.U = torch.nn.Linear(features, hidden, dtype=F64)
        self.head = torch.nn.Linear(hidden, 2, dtype=F64)
        self.deq = deq
        apply_norm(self, norm_type="spectral_norm")

    def func(self, u):
        return lambda z: torch.relu(self.A @ self.W(z) + u)

    def forward(self, x):
        reset_norm(self)
        u = self.U(x)
        z_out, info = self.deq(self.func(u), torch.zeros(x.shape[0], self.W.in_features, dtype=F64))
        return self.head(z_out[-1]), info


def test_ignn_style_graph_layer_with_spectral_norm_switches_core_alone():
    x = torch.randn(12, 4, dtype=F64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        GraphDEQ(get_deq(f_max_iter=16, f_tol=1e-6))(x)
    model = GraphDEQ(get_deq(core="revdeq", f_max_iter=16, f_tol=None))
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchdeq's spectral norm keeps f fixed between forward and backward
        out, info = model(x)
        # The oracle on the same normalised weight: reset_norm computed it once, with its graph, for this
        # iteration (a second reset_norm would run the power iteration again).
        want_out = model.head(unrolled(model.func(model.U(x)), torch.zeros(12, 8, dtype=F64), 0.5, 8))
        got = torch.autograd.grad(out.square().sum(), params, retain_graph=True)
    want = torch.autograd.grad(want_out.square().sum(), params)
    assert_grads_close(got, want, 1e-8, names)
    assert info.solver_info["f_mismatch"] < 1e-12
