"""DistributedDataParallel: one autograd Function returns every gradient, so DDP's hooks see them.

Two CPU processes (gloo) each solve on half of the batch; their averaged gradients must equal the
gradients of one process on the whole batch.
"""


import datetime
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import revdeq_kernels as rk
from helpers.solver_cases import (
    TanhCell,
    randn,
    single_threaded,  # noqa: F401 (an autouse fixture)
)

BATCH, DIM, STEPS = 8, 6, 5


def _model():
    return rk.RevDEQ(TanhCell(dim=DIM), beta=0.5, max_steps=STEPS, tol=None)


def _loss(model, x):
    return model(x).square().mean()


def _worker(rank, world, store_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        x = randn(BATCH, DIM, seed=1).chunk(world)[rank]
        _loss(model, x).backward()
        if rank == 0:
            torch.save([p.grad for p in model.parameters()], out_file)
        # Free DDP's reducer while the peer is still there: tearing it down after the other rank has
        # left can block forever in gloo.
        del model
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_single_process_gradients(tmp_path):
    out_file = str(tmp_path / "grads.pt")
    context = mp.start_processes(_worker, args=(2, str(tmp_path / "store"), out_file), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 240
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two DDP processes did not finish within 240 s")
    ddp_grads = torch.load(out_file)

    model = _model()
    _loss(model, randn(BATCH, DIM, seed=1)).backward()
    for (name, p), g in zip(model.named_parameters(), ddp_grads):
        err = ((p.grad - g).abs().max() / p.grad.abs().max()).item()
        assert err < 1e-12, f"{name}: DDP gradient differs from the single-process one by {err:.2e}"


# FSDP2 (fully_shard). Sharding the model around the RevDEQ works; sharding f itself would leave every
# parameter of f without a gradient (its sharded DTensors are not what the re-evaluations compute with),
# so it is refused by name until the solver drives FSDP2's unshard/reduce-scatter itself.


def _fsdp_model():
    cell = TanhCell(dim=DIM)
    return torch.nn.Sequential(rk.RevDEQ(cell, beta=0.5, max_steps=STEPS, tol=None),
                               torch.nn.Linear(DIM, 2, dtype=torch.float64)), cell


def _fsdp_worker(rank, world, store_file, out_file, shard_f):
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model, cell = _fsdp_model()
        mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world,))
        if shard_f:
            fully_shard(cell, mesh=mesh)
        fully_shard(model, mesh=mesh)
        x = randn(BATCH, DIM, seed=1).chunk(world)[rank]
        try:
            model(x).square().mean().backward()
            result = [p.grad.full_tensor() if p.grad is not None else None for p in model.parameters()]
        except NotImplementedError as exc:
            result = str(exc)
        if rank == 0:
            torch.save(result, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_fsdp(tmp_path, shard_f):
    out_file = str(tmp_path / "fsdp.pt")
    context = mp.start_processes(_fsdp_worker, args=(2, str(tmp_path / "store"), out_file, shard_f), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two FSDP2 processes did not finish within 240 s")
    return torch.load(out_file)


@pytest.mark.slow
def test_fsdp2_around_the_revdeq_gives_the_single_process_gradients(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed")
    grads = _run_fsdp(tmp_path, shard_f=False)
    torch.manual_seed(0)
    model, _ = _fsdp_model()
    model(randn(BATCH, DIM, seed=1)).square().mean().backward()
    for (name, p), g in zip(model.named_parameters(), grads):
        assert g is not None, f"{name}: no gradient under FSDP2"
        # Each rank's loss is the mean over its half: FSDP2 averages the two, as the full batch's mean.
        err = ((p.grad - g).abs().max() / p.grad.abs().max()).item()
        assert err < 1e-12, f"{name}: FSDP2 gradient differs from the single-process one by {err:.2e}"


@pytest.mark.slow
def test_fsdp2_sharding_f_itself_is_refused_instead_of_dropping_its_gradients(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed")
    message = _run_fsdp(tmp_path, shard_f=True)
    assert isinstance(message, str) and "RevDEQ: f is sharded with FSDP2 (fully_shard on f itself)" in message, message
    assert "would silently get no gradient" in message
