"""Train a RevDEQ classifier on scikit-learn's bundled digits (8x8 images, 10 classes; no download).

The model is ``encoder -> RevDEQ(cell) -> head``: the cell ``f(z, x) = tanh(W z + x)`` is iterated to its
fixed point by the reversible solver, and the backward rebuilds the iterates instead of storing them.
Each epoch prints the loss, train and test accuracy, the mean solver steps and residual, and the largest
reconstruction drift the backward measured. The run ends with a JSON of the history and a loss/accuracy
plot in ``--out-dir``.

    python examples/train_digits.py                         # the full run: >= 95% test accuracy
    python examples/train_digits.py --epochs 1 --limit 200  # a smoke test
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import revdeq_kernels as rk

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is optional
    tqdm = None


class Cell(torch.nn.Module):
    """f(z, x) = tanh(W z + x): W starts small so the iteration contracts."""

    def __init__(self, hidden: int):
        super().__init__()
        self.lin = torch.nn.Linear(hidden, hidden)
        with torch.no_grad():
            self.lin.weight.mul_(0.5)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


class DEQClassifier(torch.nn.Module):
    def __init__(self, hidden: int, beta: float, max_steps: int, tol: float):
        super().__init__()
        self.encoder = torch.nn.Linear(64, hidden)
        self.deq = rk.RevDEQ(Cell(hidden), beta=beta, max_steps=max_steps, tol=tol)
        self.head = torch.nn.Linear(hidden, 10)

    def forward(self, images):
        return self.head(self.deq(self.encoder(images)))


def load_digits(limit, seed):
    """(train_x, train_y, test_x, test_y): 80/20 stratified split, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    images, labels = sklearn_digits(return_X_y=True)
    if limit:
        images, labels = images[:limit], labels[:limit]
    train_x, test_x, train_y, test_y = train_test_split(images / 16.0, labels, test_size=0.2, random_state=seed,
                                                        stratify=labels)
    as_tensor = torch.as_tensor
    return (as_tensor(train_x, dtype=torch.float32), as_tensor(train_y), as_tensor(test_x, dtype=torch.float32),
            as_tensor(test_y))


def accuracy(model, images, labels) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(images).argmax(dim=1) == labels).sum().item()
    model.train()
    return correct / len(labels)


def train(args) -> dict:
    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = load_digits(args.limit, args.seed)
    model = DEQClassifier(args.hidden, args.beta, args.max_steps, args.tol)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(train_y), generator=generator)
        batches = order.split(args.batch_size)
        if tqdm is not None and not args.no_progress and sys.stdout.isatty():  # a log file gets no bar
            batches = tqdm(batches, desc=f"epoch {epoch:2d}/{args.epochs}", leave=False, file=sys.stdout)
        loss_sum, steps, residuals, drift = 0.0, [], [], 0.0
        for batch in batches:
            loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            info = model.deq.info
            loss_sum += loss.item() * len(batch)
            steps.append(info["steps"])
            residuals.append(info["residual"])
            drift = max(drift, info["drift"])
        schedule.step()
        record = {
            "epoch": epoch, "loss": loss_sum / len(train_y), "train_accuracy": accuracy(model, train_x, train_y),
            "test_accuracy": accuracy(model, test_x, test_y), "mean_steps": sum(steps) / len(steps),
            "mean_residual": sum(residuals) / len(residuals), "max_drift": drift,
            "seconds": time.perf_counter() - start,
        }
        history.append(record)
        print(f"epoch {epoch:2d}  loss {record['loss']:.4f}  train {record['train_accuracy']:.3f}  "
              f"test {record['test_accuracy']:.3f}  steps {record['mean_steps']:4.1f}  "
              f"residual {record['mean_residual']:.1e}  drift {drift:.1e}  {record['seconds']:5.1f}s", flush=True)
    return {
        "example": "train_digits", "config": vars(args), "history": history,
        "test_accuracy": history[-1]["test_accuracy"], "seconds": time.perf_counter() - start,
        "train_size": len(train_y), "test_size": len(test_y), "environment": environment(),
    }


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # others' work on a shared machine
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average_1min": load,
            "commit": commit, "backend": rk.available_backends()["cpu"][0]}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = results["history"]
    epochs = [r["epoch"] for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(epochs, [r["loss"] for r in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", yscale="log", title="loss")
    right.plot(epochs, [r["train_accuracy"] for r in history], marker="o", label="train")
    right.plot(epochs, [r["test_accuracy"] for r in history], marker="o", label="test")
    right.set(xlabel="epoch", ylabel="accuracy", title=f"accuracy (test {results['test_accuracy']:.1%})")
    right.legend()
    cfg = results["config"]
    fig.suptitle(f"RevDEQ on digits: hidden {cfg['hidden']}, beta {cfg['beta']}, <= {cfg['max_steps']} steps, "
                 f"{results['seconds']:.0f} s, {results['environment']['torch_threads']} thread(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--beta", type=float, default=0.5)
    # beta 0.5 keeps the backward's reconstruction exact to rounding (drift ~0); 16 steps reach a relative
    # residual of about 1e-2 on the trained cell.
    parser.add_argument("--max-steps", type=int, default=16, help="RevDEQ steps (two evaluations of f each)")
    parser.add_argument("--tol", type=float, default=1e-3, help="relative residual at which the solver stops")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all 1797)")
    # The tensors are tiny (64 x 128): intra-op threads only add synchronisation, and on a loaded machine
    # two threads ran a training step 10x slower than one.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out-dir", default=os.path.join("runs", "digits"))
    parser.add_argument("--min-accuracy", type=float, default=None, help="exit with status 1 below this")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (none when not on a terminal)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = train(args)
    os.makedirs(args.out_dir, exist_ok=True)
    json_path, plot_path = os.path.join(args.out_dir, "digits.json"), os.path.join(args.out_dir, "digits.png")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    plot(results, plot_path)
    print(f"test accuracy {results['test_accuracy']:.2%} after {args.epochs} epochs in {results['seconds']:.1f} s; "
          f"wrote {json_path} and {plot_path}")
    if args.min_accuracy is not None and results["test_accuracy"] < args.min_accuracy:
        print(f"test accuracy {results['test_accuracy']:.2%} is below --min-accuracy {args.min_accuracy:.2%}")
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
