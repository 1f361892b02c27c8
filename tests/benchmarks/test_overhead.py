"""The overhead benchmark runs end to end on a tiny width and its minimal baseline is a correct reversible loop."""

import contextlib
import io
import json

import torch

from benchmarks import __main__ as cli
from benchmarks import bench_overhead, common


def test_minimal_reversible_loop_gives_the_gradient_of_the_unrolled_loop():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 6, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    def f(z, x):
        return torch.tanh(0.5 * lin(z) + x)

    params = [x, *lin.parameters()]
    got = torch.autograd.grad(bench_overhead.minimal_reversible(f, x, list(lin.parameters()), 5, 0.5).sum(), params)
    y = z = torch.zeros_like(x)
    for _ in range(5):
        y = 0.5 * y + 0.5 * f(z, x)
        z = 0.5 * z + 0.5 * f(y, x)
    want = torch.autograd.grad(z.sum(), params)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_quick_run_writes_every_method_with_ratios(tmp_path):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli.main(["overhead", "--quick", "--device", "cpu", "--dims", "8", "--steps", "3", "--min-time", "0",
                         "--out", str(tmp_path), "--no-plots"])
    assert code == 0
    path = common.result_path("overhead", torch.device("cpu"), True, str(tmp_path))
    with open(path) as fh:
        payload = json.load(fh)
    rows = {r["method"]: r for r in payload["results"]}
    assert set(rows) == set(bench_overhead.METHODS)
    assert rows["minimal"]["vs_minimal"] == 1.0 and rows["unrolled"]["vs_unrolled"] == 1.0
    assert all(r["median_s"] > 0 and r["per_step_us"] > 0 for r in rows.values())
    assert payload["gradient_check"]["8"] < 1e-5  # the library and the minimal loop agree (float32 f)
    assert "| 8 |" in buffer.getvalue() and "minimal" in buffer.getvalue()
