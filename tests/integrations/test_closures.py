"""find_closure_tensors and substituted: what a closure func(z) reads, found by one evaluation."""

import torch

from helpers.solver_cases import randn, single_threaded  # noqa: F401 (an autouse fixture)
from revdeq_kernels.integrations.closures import find_closure_tensors, substituted


def _ids(tensors):
    return [id(t) for t in tensors]


def test_finds_parameters_and_closed_over_activations_in_first_use_order():
    lin = torch.nn.Linear(6, 6, dtype=torch.float64)
    encoder = torch.nn.Linear(4, 6, dtype=torch.float64)
    scale = randn(6, seed=2, requires_grad=True)
    frozen = randn(6, seed=3)  # does not require grad: nothing to find
    x = encoder(randn(3, 4, seed=1))
    calls = []

    def func(z):
        calls.append(torch.is_grad_enabled())
        return torch.tanh(lin(z) * scale + torch.cat([x[:, :3], x[:, 3:]], dim=1) + frozen)

    found = find_closure_tensors(func, torch.zeros(3, 6, dtype=torch.float64))
    assert calls == [False]  # evaluated once, without building a graph
    assert _ids(found.params) == _ids([lin.weight, lin.bias, scale])
    assert _ids(found.inputs) == [id(x)]  # not encoder's parameters: they are behind x
    assert not found.entangled and found.updated == []


def test_finds_the_tensors_func_updates_in_place():
    norm = torch.nn.BatchNorm1d(6, dtype=torch.float64)
    found = find_closure_tensors(lambda z: norm(z + 1.0), randn(4, 6, seed=1))
    assert set(_ids(found.updated)) == set(_ids([norm.running_mean, norm.running_var, norm.num_batches_tracked]))
    assert len(found.updated) == 3
    assert _ids(found.params) == _ids([norm.weight, norm.bias])
    norm.eval()  # eval mode reads the statistics without updating them
    assert find_closure_tensors(lambda z: norm(z + 1.0), randn(4, 6, seed=1)).updated == []


def test_tensors_func_makes_are_not_found_even_with_grad_enabled_inside():
    w = randn(6, 6, seed=1, requires_grad=True)
    state = randn(2, 6, seed=2)

    def func(z):
        with torch.enable_grad():  # e.g. a force computed with autograd inside f
            z = z.detach().requires_grad_()
            energy = (z @ w).square().sum()
            force = torch.autograd.grad(energy, z, create_graph=True)[0]
        return torch.tanh(force)

    found = find_closure_tensors(func, state)
    assert _ids(found.params) == [id(w)] and found.inputs == []


def test_entangled_when_an_inputs_history_reaches_another_found_tensor():
    w = randn(6, 6, seed=1, requires_grad=True)
    v = randn(6, 6, seed=3, requires_grad=True)
    x = randn(3, 6, seed=2) @ w
    state = torch.zeros(3, 6, dtype=torch.float64)
    assert not find_closure_tensors(lambda z: torch.tanh(z @ v + x), state).entangled
    assert find_closure_tensors(lambda z: torch.tanh(z @ w + x), state).entangled  # w: direct and behind x
    y = torch.sin(x)
    assert find_closure_tensors(lambda z: torch.tanh(z @ v + x + y), state).entangled  # x is behind y


def test_substituted_replaces_by_identity_in_methods_operators_and_nested_arguments():
    x = randn(3, 6, seed=1, requires_grad=True) * 2.0
    stand_in = x.detach().requires_grad_()

    def func(z):
        return torch.cat([x.sin(), z + x], dim=1).sum() + torch.stack((x, z)).sum()

    z = randn(3, 6, seed=2)
    with substituted([x], [stand_in]):
        out = func(z)
    grads = torch.autograd.grad(out, [stand_in, x], allow_unused=True)
    assert grads[1] is None  # func read the stand-in everywhere, never x itself
    torch.testing.assert_close(grads[0], x.detach().cos() + 2.0, rtol=1e-12, atol=1e-12)
