"""FSDP2 (fully_shard) with f, or modules inside f, sharded: the gradients equal one process's on the whole batch.

Two CPU processes (gloo) each train on half of the batch; every configuration runs in one pair of processes
(one start-up for all), and the gradients of every parameter, gathered with ``full_tensor()``, must equal the
single-process float64 gradients of the same model on the concatenated batch (each rank's loss is the mean
over its half, and FSDP2 averages the ranks, as the mean over the whole batch). The reversible backward is
exact, so the tolerance is rounding (1e-12).
"""

import datetime

import pytest
import torch
import torch.distributed as dist

import revdeq_kernels as rk
from helpers.distributed import run_two_processes
from helpers.solver_cases import (
    TanhCell,
    randn,
    single_threaded,  # noqa: F401 (an autouse fixture)
)

pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed")

BATCH, DIM, STEPS = 8, 6, 5
GRAD_TOL = 1e-12


class TwoLayerCell(torch.nn.Module):
    """f(z, x) = tanh(B(tanh(A z)) + x): two submodules, each sharded on its own in the nested case."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a = torch.nn.Linear(DIM, DIM, dtype=torch.float64)
        self.b = torch.nn.Linear(DIM, DIM, dtype=torch.float64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=torch.float64) / DIM ** 0.5)

    def forward(self, z, x):
        return torch.tanh(self.b(torch.tanh(self.a(z))) + x)


class TwoScaleCell(torch.nn.Module):
    """A tuple state: a fine (DIM) and a coarse (DIM // 2) member driving each other."""

    def __init__(self):
        super().__init__()
        self.fine = TanhCell(dim=DIM, seed=4)
        self.coarse = torch.nn.Linear(DIM // 2, DIM // 2, dtype=torch.float64)

    def forward(self, z, x):
        fine, coarse = z
        return (self.fine(fine, x) + 0.3 * coarse.repeat_interleave(2, dim=1),
                torch.tanh(0.5 * self.coarse(coarse) + 0.3 * fine[:, ::2]))


class Model(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        kwargs = dict(beta=0.5, max_steps=STEPS, tol=None)
        if config == "exact":
            kwargs.update(exact=True, beta=0.8125)
        cells = {"nested": TwoLayerCell, "partial": TwoLayerCell, "tuple": TwoScaleCell}
        self.cell = cells.get(config, lambda: TanhCell(dim=DIM))()
        self.deq = rk.RevDEQ(self.cell, **kwargs)
        self.head = torch.nn.Linear(DIM, 2, dtype=torch.float64)
        self.config = config

    def forward(self, x):
        if self.config == "tuple":
            z0 = (torch.zeros_like(x), torch.zeros(x.shape[0], DIM // 2, dtype=x.dtype))
            fine, coarse = self.deq(x, z0=z0)
            return self.head(fine + coarse.repeat_interleave(2, dim=1))
        return self.head(self.deq(x))


# root: fully_shard on the model only; f: on f and the model; f_only: on f alone (f is its own FSDP2 root);
# nested: on two modules inside f and the model; partial: on one module inside f and the model (f's other
# parameters are in the model's group, unsharded while the model runs); no_reshard: f with
# reshard_after_forward=False; tuple: a two-member state; exact: exact mode.
CONFIGS = ("root", "f", "f_only", "nested", "partial", "no_reshard", "tuple", "exact")


def _shard(model, config, mesh):
    from torch.distributed.fsdp import fully_shard

    if config in ("nested", "partial"):
        fully_shard(model.cell.a, mesh=mesh)
    if config == "nested":
        fully_shard(model.cell.b, mesh=mesh)
    if config in ("f", "f_only", "tuple", "exact"):
        fully_shard(model.cell, mesh=mesh)
    if config == "no_reshard":
        fully_shard(model.cell, mesh=mesh, reshard_after_forward=False)
    if config != "f_only":
        fully_shard(model, mesh=mesh)


def _loss(model, x):
    return model(x).square().mean()


def _full(t):
    """A DTensor (parameter or gradient) gathered whole; None and plain tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worker(rank, world, store_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world,))
        x = randn(BATCH, DIM, seed=1).chunk(world)[rank]
        for config in CONFIGS:
            torch.manual_seed(0)
            model = Model(config)
            _shard(model, config, mesh)
            try:
                grads, moved = [], True
                optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
                for _ in range(2):  # a second iteration: FSDP2's state after the solver's backward trains on
                    optimizer.zero_grad()
                    _loss(model, x).backward()
                    grads.append({name: _full(p.grad) for name, p in model.named_parameters()})
                    # The step moves the sharded parameters of f (each rank updates its shard).
                    before = {n: _full(p).detach().clone() for n, p in model.cell.named_parameters()}
                    optimizer.step()
                    moved &= all(not torch.equal(before[n], _full(p)) for n, p in model.cell.named_parameters())
                results[config] = {"grads": grads, "moved": moved}
            except Exception as exc:  # reported by the test, with the configuration's name
                results[config] = f"{type(exc).__name__}: {exc}"
        # A closure f handing over FSDP2's sharded parameters is refused (the solver cannot see FSDP2's swap).
        cell = TanhCell(dim=DIM)
        from torch.distributed.fsdp import fully_shard
        fully_shard(cell, mesh=mesh)
        try:
            z, _ = rk.reversible_fixed_point(lambda z, x: cell(z, x), x, params=list(cell.parameters()),
                                             max_steps=3, tol=None)
            results["closure"] = "no error"
        except NotImplementedError as exc:
            results["closure"] = str(exc)
        # A closure calling a sharded module (torchdeq's func is one) while a backward will follow: refused in
        # the forward, since FSDP2's unsharded parameters cannot be mapped to their shards from there.
        try:
            xg = x.clone().requires_grad_()
            rk.reversible_fixed_point(lambda z, x: cell(z, x), xg, max_steps=3, tol=None)
            results["closure_call"] = "no error"
        except NotImplementedError as exc:
            results["closure_call"] = str(exc)
        try:  # torchdeq's core takes func as a closure too
            from torchdeq import get_deq

            from revdeq_kernels.integrations import torchdeq as _registers_core  # noqa: F401
            deq = get_deq(core="revdeq", f_max_iter=3, f_tol=None)
            deq(lambda z: cell(z, xg), torch.zeros_like(x))
            results["torchdeq"] = "no error"
        except ImportError:
            results["torchdeq"] = None
        except NotImplementedError as exc:
            results["torchdeq"] = str(exc)
        with torch.no_grad():  # inference through the same closure needs no gradient: it runs
            z, _ = rk.reversible_fixed_point(lambda z, x: cell(z, x), x, max_steps=3, tol=None)
        results["closure_inference"] = bool(torch.isfinite(z).all())
        if rank == 0:
            torch.save(results, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    out_file = str(tmp / "results.pt")
    run_two_processes(_worker, (2, str(tmp / "store"), out_file), "FSDP2", 300)
    return torch.load(out_file, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_fsdp2_gradients_equal_single_process_gradients(fsdp_results, config):
    result = fsdp_results[config]
    assert not isinstance(result, str), f"{config}: {result}"
    torch.manual_seed(0)
    model = Model(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # f_only: only f is sharded, the head is a plain module whose gradient (and so its update) is each rank's
    # own; only f's first gradients are comparable there.
    iterations = 1 if config == "f_only" else 2
    for iteration in range(iterations):
        optimizer.zero_grad()
        _loss(model, randn(BATCH, DIM, seed=1)).backward()
        for name, p in model.named_parameters():
            if config == "f_only" and not name.startswith("cell."):
                continue
            g = result["grads"][iteration][name]
            assert g is not None, f"{config}, iteration {iteration + 1}: {name} got no gradient under FSDP2"
            err = ((p.grad - g).abs().max() / p.grad.abs().max()).item()
            assert err < GRAD_TOL, (f"{config}, iteration {iteration + 1}: {name}: FSDP2 gradient differs from the "
                                    f"single-process one by {err:.2e}")
        optimizer.step()
    assert result["moved"], f"{config}: an optimizer step left a parameter of f unchanged"


@pytest.mark.slow
def test_a_closure_given_the_sharded_parameters_is_refused(fsdp_results):
    # Passing FSDP2's shards as params does not help a closure: f still computes with the unsharded copies.
    message = fsdp_results["closure"]
    assert "f calls FSDPTanhCell sharded with FSDP2" in message and "Pass the sharded module itself" in message, message


def test_single_process_reference_uses_every_parameter():
    # The comparison above is only as good as its reference: every parameter of every configuration's model
    # gets a nonzero gradient in one process.
    for config in CONFIGS:
        model = Model(config)
        _loss(model, randn(BATCH, DIM, seed=1)).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().max() > 0, (config, name)



@pytest.mark.slow
def test_a_closure_calling_a_sharded_module_is_refused_when_a_backward_follows(fsdp_results):
    message = fsdp_results["closure_call"]
    assert "f calls FSDPTanhCell sharded with FSDP2" in message and "Pass the sharded module itself" in message, message
    assert fsdp_results["closure_inference"] is True
    if fsdp_results["torchdeq"] is not None:  # torchdeq installed (the test extra has it)
        assert "f calls FSDPTanhCell sharded with FSDP2" in fsdp_results["torchdeq"], fsdp_results["torchdeq"]
