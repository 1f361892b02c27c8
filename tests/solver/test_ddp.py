"""DistributedDataParallel: one autograd Function returns every gradient, so DDP's hooks see them (FSDP2:
test_fsdp.py).

Two CPU processes (gloo) each solve on half of the batch; their averaged gradients must equal the
gradients of one process on the whole batch.
"""


import datetime

import torch
import torch.distributed as dist

import revdeq_kernels as rk
from helpers.distributed import run_two_processes
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
    run_two_processes(_worker, (2, str(tmp_path / "store"), out_file), "DDP", 240)
    ddp_grads = torch.load(out_file)

    model = _model()
    _loss(model, randn(BATCH, DIM, seed=1)).backward()
    for (name, p), g in zip(model.named_parameters(), ddp_grads):
        err = ((p.grad - g).abs().max() / p.grad.abs().max()).item()
        assert err < 1e-12, f"{name}: DDP gradient differs from the single-process one by {err:.2e}"
