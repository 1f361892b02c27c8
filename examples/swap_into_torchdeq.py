"""Swap RevDEQ into an existing torchdeq model by changing one line of config.

The model below is written the torchdeq way: ``get_deq``, torchdeq's weight normalisation
(``apply_norm`` / ``reset_norm``) and ``z_out, info = deq(func, z_init)`` with ``func`` closing over the
encoded input. Only two lines concern RevDEQ:

    import revdeq_kernels.integrations.torchdeq      # registers core="revdeq"
    deq = get_deq(core="revdeq", f_max_iter=32, ...)  # was core="sliced" (torchdeq's default)

torchdeq's own cores ignore ``beta``, so the same ``get_deq`` call serves both. The script trains the
model on scikit-learn's digits with each core and prints what each reports.

    python examples/swap_into_torchdeq.py                       # both cores, 4 epochs each
    python examples/swap_into_torchdeq.py --cores revdeq --epochs 10
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torchdeq import get_deq
from torchdeq.norm import apply_norm, reset_norm
from train_digits import load_digits

import revdeq_kernels.integrations.torchdeq  # noqa: F401 (registers core="revdeq")


class TorchDEQClassifier(torch.nn.Module):
    """encoder -> torchdeq DEQ over tanh(W z + x) with a weight-normalised W -> head."""

    def __init__(self, core: str, hidden: int, f_max_iter: int):
        super().__init__()
        self.encoder = torch.nn.Linear(64, hidden)
        self.layer = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, 10)
        apply_norm(self.layer, "weight_norm")
        # The one line: core="sliced" (torchdeq's default) or core="revdeq".
        self.deq = get_deq(core=core, f_max_iter=f_max_iter, f_tol=1e-3, f_stop_mode="rel", beta=0.5)

    def forward(self, images):
        reset_norm(self)  # torchdeq recomputes normalised weights once per call, outside func
        x = self.encoder(images)
        z_out, info = self.deq(lambda z: torch.tanh(self.layer(z) + x), torch.zeros_like(x))
        return self.head(z_out[-1]), info


def run(core: str, args, data) -> dict:
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(args.seed)
    model = TorchDEQClassifier(core, args.hidden, args.f_max_iter)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for _ in range(args.epochs):
        for batch in torch.randperm(len(train_y), generator=generator).split(args.batch_size):
            logits, info = model(train_x[batch])
            loss = F.cross_entropy(logits, train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        logits, info = model(test_x)
    return {"core": core, "loss": loss.item(), "test_accuracy": (logits.argmax(1) == test_y).float().mean().item(),
            "nstep": info["nstep"].mean().item(), "rel_residual": info["rel_lowest"].mean().item(),
            "seconds": seconds}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cores", nargs="+", default=["sliced", "revdeq"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--f-max-iter", type=int, default=32, help="f evaluations (revdeq: two per step)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny tensors: 1 is fastest)")
    return parser.parse_args(argv)


def main(argv=None) -> list:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_digits(args.limit, args.seed)
    rows = [run(core, args, data) for core in args.cores]
    print(f"{'core':8s} {'last loss':>9s} {'test acc':>8s} {'nstep':>6s} {'rel residual':>12s} {'train s':>8s}")
    for r in rows:
        print(f"{r['core']:8s} {r['loss']:9.4f} {r['test_accuracy']:8.3f} {r['nstep']:6.1f} {r['rel_residual']:12.2e} "
              f"{r['seconds']:8.1f}")
    print("nstep counts f evaluations for both cores; revdeq's gradient is exact for the steps taken, torchdeq's "
          "default (sliced, grad=1) is a one-step phantom gradient.")
    return rows


if __name__ == "__main__":
    main()
