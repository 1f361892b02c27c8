"""The functions ``f(z, x)`` the memory benchmark trains: a pre-norm transformer block and a residual
conv block, at sizes for a GPU, a CPU and the tests.

In both, the residual stream carries the input injection ``x`` and the state ``z`` enters through the
sublayers only, as in a DEQ, whose identity path would otherwise give ``df/dz`` an eigenvalue near 1
and no fixed point to iterate to. The last layer of each sublayer is scaled by ``GAIN`` so that the
iteration contracts (the benchmark records the residual it reaches):

- ``transformer``: ``h = x + Attn(LN1(z)); f = h + MLP(LN2(h))`` with ``nn.MultiheadAttention``
  (``need_weights=False``, so PyTorch's fused attention) and ``MLP = Linear(d, 4d), GELU, Linear(4d, d)``;
  tensors ``(batch, seq, d)``.
- ``conv``: ``f = x + conv2(relu(GroupNorm(conv1(z))))`` with 3x3 convolutions, padding 1; tensors
  ``(batch, channels, size, size)``. GroupNorm, not BatchNorm: f is a pure function of (z, x), so every
  method evaluates the same f however often it calls it.

Example:
    >>> case = make_case("conv", "tiny", torch.device("cpu"), seed=0)
    >>> case.f(case.z0, case.x).shape == case.x.shape
    True
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("transformer", "conv")
GAIN = 0.5  # scale of each sublayer's last weight: keeps the iteration contracting at every size below
# Presets: "gpu" is the size (d=512, seq 256, batch 8; 64 channels at 32x32); "cpu" keeps the full run
# within minutes on two cores while compute, not Python overhead, sets the step time; "small" is --quick on a
# CPU (seconds); "tiny" is for the tests.
SIZES = {
    "gpu": {"transformer": {"width": 512, "heads": 8, "seq": 256, "batch": 8},
            "conv": {"channels": 64, "groups": 8, "size": 32, "batch": 32}},
    "cpu": {"transformer": {"width": 128, "heads": 4, "seq": 64, "batch": 8},
            "conv": {"channels": 32, "groups": 8, "size": 32, "batch": 8}},
    "small": {"transformer": {"width": 64, "heads": 4, "seq": 32, "batch": 8},
              "conv": {"channels": 16, "groups": 4, "size": 16, "batch": 8}},
    "tiny": {"transformer": {"width": 16, "heads": 2, "seq": 8, "batch": 2},
             "conv": {"channels": 4, "groups": 2, "size": 6, "batch": 2}},
}


class TransformerBlock(nn.Module):
    """``f(z, x) = h + MLP(LN2(h))`` with ``h = x + Attn(LN1(z))``; ``z``, ``x``: ``(batch, seq, width)``,
    the parameters' dtype.

    Example:
        >>> f = TransformerBlock(width=32, heads=4)
        >>> f(torch.randn(2, 8, 32), torch.randn(2, 8, 32)).shape
        torch.Size([2, 8, 32])
    """

    def __init__(self, width: int, heads: int, gain: float = GAIN):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        with torch.no_grad():
            self.attn.out_proj.weight.mul_(gain)
            self.mlp[2].weight.mul_(gain)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a = self.norm1(z)
        h = x + self.attn(a, a, a, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class ConvBlock(nn.Module):
    """``f(z, x) = x + conv2(relu(GroupNorm(conv1(z))))``; ``z``, ``x``: ``(batch, channels, H, W)``, the
    parameters' dtype.

    Example:
        >>> f = ConvBlock(channels=8, groups=2)
        >>> f(torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)).shape
        torch.Size([2, 8, 6, 6])
    """

    def __init__(self, channels: int, groups: int, gain: float = GAIN):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv2.weight.mul_(gain)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.norm(self.conv1(z))))


@dataclasses.dataclass
class Case:
    """One f with its inputs: ``f`` (float32 parameters), random ``x`` (the injection) and ``z0`` (the start),
    and ``w``, the weights of the loss ``(z * w).sum()``; all float32 on one device, shaped like the state."""

    kind: str
    f: nn.Module
    x: torch.Tensor
    z0: torch.Tensor
    w: torch.Tensor
    shape_info: dict

    def describe(self) -> dict:
        return {"f_kind": self.kind, **self.shape_info, "state_shape": list(self.x.shape),
                "parameters": sum(p.numel() for p in self.f.parameters()), "gain": GAIN}


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"--kinds: unknown f kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


def make_case(kind: str, preset: str, device: torch.device, seed: int = 0) -> Case:
    """The block ``kind`` at size ``preset`` with its inputs, from ``seed`` (same seed, same numbers).

    Example:
        >>> case = make_case("transformer", "tiny", torch.device("cpu"))
        >>> case.x.shape, case.describe()["parameters"]
        (torch.Size([2, 8, 16]), 3280)
    """
    check_kind(kind)
    if preset not in SIZES:
        raise ValueError(f"--size: unknown preset {preset!r}; expected one of {', '.join(SIZES)}")
    size = SIZES[preset][kind]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the layers' initialisation
    if kind == "transformer":
        f = TransformerBlock(size["width"], size["heads"])
        shape = (size["batch"], size["seq"], size["width"])
    else:
        f = ConvBlock(size["channels"], size["groups"])
        shape = (size["batch"], size["channels"], size["size"], size["size"])
    x, z0, w = (torch.randn(shape, generator=gen) for _ in range(3))
    w /= w.numel() ** 0.5  # a loss of order one whatever the size
    f = f.to(device)
    return Case(kind, f, x.to(device), z0.to(device), w.to(device), dict(size))
