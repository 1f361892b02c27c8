"""The small classification task and the models that the Jacobian and depth benchmarks train.

Data (no download in either case):

- ``digits``: scikit-learn's 8x8 handwritten digits (1797 images, 64 features, 10 classes), which
  ships inside the scikit-learn package; features scaled to [0, 1] and centred on the training mean.
- ``synthetic``: 2000 Gaussian points in 64 dimensions labelled by a fixed random two-layer tanh
  teacher (10 classes), for machines without scikit-learn.
- ``auto``: digits when scikit-learn imports, else synthetic (the result file records which).

Both are split 75/25 into training and test sets with a fixed permutation.

Models, all ``encoder -> core -> head`` with ``encoder = Linear(features, width)`` (its output is the
input injection ``x``) and ``head = Linear(width, classes)``:

- :class:`DEQNet`: the core is ``RevDEQ(Cell(width))``;
- :class:`StackNet`: the core is ``depth`` untied copies of ``Cell(width)`` applied in turn from
  ``z = 0``, the explicit network of the same block.
"""

import dataclasses

import torch
import torch.nn.functional as F

import revdeq_kernels as rk

DATASETS = ("auto", "digits", "synthetic")
TEST_FRACTION = 0.25


@dataclasses.dataclass
class Data:
    name: str
    description: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def summary(self) -> dict:
        return {"name": self.name, "description": self.description, "train": len(self.y_train),
                "test": len(self.y_test), "features": self.n_features, "classes": self.n_classes}


def _have_sklearn() -> bool:
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


def load_data(name: str, device: torch.device, *, seed: int = 0, train_limit: int | None = None) -> Data:
    """The dataset ``name`` (one of :data:`DATASETS`) on ``device``, float32 features, int64 labels.

    ``train_limit`` keeps only that many training examples (smoke tests); the test set is unchanged.

    Example:
        >>> data = load_data("synthetic", torch.device("cpu"))
        >>> data.x_train.shape, data.n_classes
        (torch.Size([1500, 64]), 10)
    """
    if name == "auto":
        name = "digits" if _have_sklearn() else "synthetic"
    if name == "digits":
        if not _have_sklearn():
            raise ValueError("--data digits needs scikit-learn (pip install scikit-learn); or pass --data synthetic")
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.int64)
        description = "scikit-learn digits: 8x8 images, 64 features in [0, 1], 10 classes"
    elif name == "synthetic":
        x, y = _teacher_task(seed)
        description = "N(0, I) points in 64 dimensions labelled by a random two-layer tanh teacher, 10 classes"
    else:
        raise ValueError(f"--data: expected one of {', '.join(DATASETS)}, got {name!r}")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(TEST_FRACTION * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    if train_limit is not None:
        if train_limit < 1:
            raise ValueError(f"--train-limit: expected a positive number of examples, got {train_limit}")
        train = train[:train_limit]
    mean = x[train].mean(0)
    return Data(name, description, (x[train] - mean).to(device), y[train].to(device), (x[test] - mean).to(device),
                y[test].to(device))


def _teacher_task(seed: int, n: int = 2000, features: int = 64, hidden: int = 32, classes: int = 10):
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, features, generator=g)
    w1 = torch.randn(features, hidden, generator=g) * (2.0 / features) ** 0.5
    w2 = torch.randn(hidden, classes, generator=g)
    return x, torch.tanh(x @ w1).matmul(w2).argmax(1)


class Cell(torch.nn.Module):
    """The block ``f(z, x) = tanh(z W^T + b + x)``: ``z`` and ``x`` of shape ``(batch, width)``."""

    def __init__(self, width: int):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


class DEQNet(torch.nn.Module):
    """``head(RevDEQ(Cell)(encoder(x)))``; ``deq_options`` go to :class:`revdeq_kernels.RevDEQ`."""

    def __init__(self, n_features: int, width: int, n_classes: int, **deq_options):
        super().__init__()
        self.encoder = torch.nn.Linear(n_features, width)
        self.deq = rk.RevDEQ(Cell(width), **deq_options)
        self.head = torch.nn.Linear(width, n_classes)

    def forward(self, x):
        return self.head(self.deq(self.encoder(x)))


class StackNet(torch.nn.Module):
    """``head(cell_depth(... cell_1(0, e) ..., e))`` with ``e = encoder(x)``: ``depth`` untied cells."""

    def __init__(self, n_features: int, width: int, n_classes: int, depth: int):
        super().__init__()
        self.encoder = torch.nn.Linear(n_features, width)
        self.blocks = torch.nn.ModuleList(Cell(width) for _ in range(depth))
        self.head = torch.nn.Linear(width, n_classes)

    def forward(self, x):
        e = self.encoder(x)
        z = torch.zeros_like(e)
        for block in self.blocks:
            z = block(z, e)
        return self.head(z)


def batches(n: int, batch: int, generator: torch.Generator) -> list:
    """Shuffled index tensors covering ``range(n)`` in batches of ``batch`` (the last may be smaller)."""
    return list(torch.randperm(n, generator=generator).split(batch))


def task_loss(logits, labels):
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified correctly, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        return (model(x).argmax(1) == y).float().mean().item()
    finally:
        model.train(was_training)


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
