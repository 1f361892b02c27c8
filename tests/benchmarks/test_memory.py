"""The memory-against-depth benchmark runs end to end on tiny blocks, measures what it claims (RevDEQ's saved
bytes flat in N, unrolled autograd's growing by the same amount per step), records what it could not run,
and rejects bad options by name."""

import json
import math

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import bench_memory, blocks, common, readme
from helpers.bench_cases import PNG_MAGIC, run_cli, threads_restored  # noqa: F401 (threads_restored: a fixture)

STEPS = (1, 2, 3)
TINY = ["--device", "cpu", "--size", "tiny", "--repeats", "1"]
ROW_FIELDS = ("f_kind", "steps", "method", "f_calls_forward", "f_calls_backward", "saved_bytes", "saved_tensors",
              "cuda_peak_bytes", "memory_bytes", "time", "time_vs_unrolled", "grad_rel_error", "grad_worst_parameter",
              "residual", "solver_residual", "drift")


pytestmark = pytest.mark.usefixtures("threads_restored")  # imported from bench_cases


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "memory.json"
    table = run_cli(["memory", "--quick", *TINY, "--steps", ",".join(map(str, STEPS)), "--output", str(path)])
    return path, json.loads(path.read_text()), table


def _by(payload) -> dict:
    return {(r["f_kind"], r["method"], r["steps"]): r for r in payload["results"]}


def test_quick_run_writes_every_row_with_its_fields(quick_run):
    path, payload, table = quick_run
    assert payload["schema"] == bench_memory.SCHEMA and payload["benchmark"] == "memory"
    assert payload["env"]["torch"] == torch.__version__ and payload["env"]["torch_threads"] == 1
    cfg = payload["config"]
    assert cfg["quick"] is True and cfg["size"] == "tiny" and cfg["steps"] == list(STEPS)
    assert cfg["memory_headline"] == "saved_bytes" and set(cfg["methods"]) == set(bench_memory.METHODS)
    assert [f["f_kind"] for f in cfg["f"]] == list(blocks.KINDS) and all(f["f_graph_saved_bytes"] > 0 for f in cfg["f"])
    by = _by(payload)
    assert sorted(by) == sorted((k, m, n) for k in blocks.KINDS for m in bench_memory.METHODS for n in STEPS)
    for key, r in by.items():
        assert set(ROW_FIELDS) <= set(r), f"{key} lacks {set(ROW_FIELDS) - set(r)}"
        assert r["cuda_peak_bytes"] is None and r["memory_bytes"] == r["saved_bytes"] > 0, key
        assert 0 < r["time"]["median_s"] < 10 and r["time"]["samples"] == 1, key
        assert math.isfinite(r["grad_rel_error"]) and r["grad_rel_error"] >= 0, key
        assert (r["drift"] is None) == (r["method"] not in bench_memory.REVERSIBLE), key
    for kind in blocks.KINDS:
        for n in STEPS:
            assert by[kind, "unrolled", n]["time_vs_unrolled"] == 1.0
    assert payload["skipped"] == [] and all(ref["how"] == "unrolled, float64" for ref in payload["references"])
    assert "| transformer | 3 | revdeq |" in table and "| conv | 3 | torchdeq |" in table
    for name in ("memory", "time"):
        png = str(path)[:-len(".json")] + f"-{name}.png"
        with open(png, "rb") as fh:
            assert fh.read(8) == PNG_MAGIC, png


def test_every_method_calls_f_as_described(quick_run):
    by = _by(quick_run[1])
    for kind in blocks.KINDS:
        for n in STEPS:
            calls = {m: (by[kind, m, n]["f_calls_forward"], by[kind, m, n]["f_calls_backward"])
                     for m in bench_memory.METHODS}
            assert calls == {"revdeq": (2 * n + 1, 2 * n), "revdeq_exact": (2 * n + 1, 2 * n), "unrolled": (2 * n, 0),
                             "checkpoint": (2 * n, 2 * n), "torchdeq": (2 * n + 1, 0)}, (kind, n)


def test_revdeq_saves_the_same_bytes_at_any_depth_while_unrolled_grows_per_step(quick_run):
    by = _by(quick_run[1])
    for kind in blocks.KINDS:
        saved = {m: [by[kind, m, n]["saved_bytes"] for n in STEPS] for m in bench_memory.METHODS}
        print(kind, saved)
        assert saved["revdeq"][0] == saved["revdeq"][1] == saved["revdeq"][2] > 0
        # What RevDEQ keeps: its two float64 states, z0 and x (float32), nothing per step.
        numel = math.prod(next(f for f in quick_run[1]["config"]["f"] if f["f_kind"] == kind)["state_shape"])
        assert saved["revdeq"][0] == 2 * 8 * numel + 2 * 4 * numel, (kind, numel)
        assert saved["torchdeq"][0] == saved["torchdeq"][2]
        for m in ("unrolled", "checkpoint"):  # each step keeps the same tensors: linear growth
            s = saved[m]
            assert s[2] - s[1] == s[1] - s[0] > 0, (kind, m, s)
        assert saved["checkpoint"][2] - saved["checkpoint"][0] < saved["unrolled"][2] - saved["unrolled"][0]
        # Exact mode keeps 1 bit per element per half-step at beta 1/2: growth, but far below unrolled's.
        exact = saved["revdeq_exact"]
        assert 0 < exact[2] - exact[0] < (saved["unrolled"][2] - saved["unrolled"][0]) / 8, (kind, exact)
        summary = {s["method"]: s for s in quick_run[1]["summary"] if s["f_kind"] == kind}
        assert summary["revdeq"]["memory_ratio"] == 1.0 and summary["unrolled"]["memory_ratio"] > 2


def test_gradients_match_float64(quick_run):
    by = _by(quick_run[1])
    for (kind, method, n), r in by.items():
        if method != "torchdeq":
            assert r["grad_rel_error"] < 1e-5, (kind, method, n, r["grad_rel_error"], r["grad_worst_parameter"])
        else:  # the phantom gradient approximates; at N = 1 it is far from the gradient of the loop
            assert r["grad_rel_error"] > 1e-3, (kind, n, r["grad_rel_error"])
        # Checkpointing recomputes the same float32 operations: the same gradient.
        if method == "checkpoint":
            assert r["grad_rel_error"] == pytest.approx(by[kind, "unrolled", n]["grad_rel_error"], rel=1e-3)


def test_iteration_contracts(quick_run):
    by = _by(quick_run[1])
    for kind in blocks.KINDS:
        residuals = [by[kind, "unrolled", n]["residual"] for n in STEPS]
        assert residuals[0] > residuals[1] > residuals[2], (kind, residuals)
        assert by[kind, "revdeq", 3]["residual"] == pytest.approx(residuals[2], rel=1e-3)


def test_readme_section_from_the_json(quick_run):
    path, payload, _ = quick_run
    text = readme.markdown([str(path)])
    assert text.startswith("## Performance") and payload["env"]["commit"][:10] in text
    rows = [line for line in text.splitlines() if line.startswith("| transformer |") or line.startswith("| conv |")]
    assert len(rows) == len(blocks.KINDS) * len(bench_memory.METHODS)
    assert "| transformer | revdeq | " in text and "1.00x" in text and "phantom gradient" in text
    assert "drift" not in text, "no drift at 3 steps: no drift note"
    drifting = json.loads(json.dumps(payload))
    next(r for r in drifting["results"] if (r["method"], r["steps"]) == ("revdeq", 3))["drift"] = 2.5e4
    assert "reconstruct the start with a relative drift up to 2e+04" in readme.memory_markdown(drifting, str(path))


def test_missing_torchdeq_is_recorded_as_skipped(monkeypatch, tmp_path):
    def no_torchdeq():
        raise ImportError("No module named 'torchdeq'")

    monkeypatch.setattr(bench_memory, "import_torchdeq", no_torchdeq)
    path = tmp_path / "memory.json"
    table = run_cli(["memory", *TINY, "--kinds", "conv", "--steps", "1", "--methods", "unrolled,torchdeq",
                  "--output", str(path), "--no-plots"])
    payload = json.loads(path.read_text())
    assert [r["method"] for r in payload["results"]] == ["unrolled"]
    assert list(payload["config"]["methods"]) == ["unrolled"]
    (skip,) = payload["skipped"]
    assert skip["method"] == "torchdeq" and "No module named 'torchdeq'" in skip["reason"]
    assert "pip install torchdeq" in skip["reason"] and "skipped torchdeq: torchdeq is not importable" in table


def test_out_of_memory_falls_back_or_is_recorded(monkeypatch, tmp_path):
    # What a GPU does at depth: the float64 reference falls back to checkpointing; a method that runs out is
    # recorded as skipped for that N, and the rest of the run goes on.
    real = bench_memory.unrolled

    def short_of_memory(f, x, z0, beta, steps, checkpointed=False):
        if not checkpointed and (x.dtype == torch.float64 or steps == 2):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n(details)")
        return real(f, x, z0, beta, steps, checkpointed)

    monkeypatch.setattr(bench_memory, "unrolled", short_of_memory)
    path = tmp_path / "memory.json"
    table = run_cli(["memory", *TINY, "--kinds", "conv", "--steps", "1,2", "--methods", "revdeq,unrolled,checkpoint",
                  "--output", str(path), "--no-plots"])
    payload = json.loads(path.read_text())
    assert {ref["how"] for ref in payload["references"]} == {"unrolled, float64, checkpoint per step"}
    assert sorted((r["method"], r["steps"]) for r in payload["results"]) == [
        ("checkpoint", 1), ("checkpoint", 2), ("revdeq", 1), ("revdeq", 2), ("unrolled", 1)]
    assert all(r["grad_rel_error"] < 1e-5 for r in payload["results"])
    assert [r["time_vs_unrolled"] is None for r in payload["results"] if r["steps"] == 2] == [True, True]
    assert payload["skipped"] == [{"method": "unrolled", "f_kind": "conv", "steps": 2,
                                   "reason": "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"}]
    assert "skipped unrolled (conv, N=2): out of memory" in table


@pytest.mark.parametrize("argv, message", [
    (["--kinds", "mlp"], "--kinds: unknown f kind 'mlp'; expected a comma-separated list from transformer, conv"),
    (["--steps", "0,4"], "--steps: expected comma-separated positive integers, got '0,4'"),
    (["--steps", "-4"], "--steps: expected comma-separated positive integers, got '-4'"),
    (["--steps", "four"], "--steps: expected comma-separated positive integers, got 'four'"),
    (["--methods", "revdeq,adjoint"], "--methods: unknown method 'adjoint'"),
    (["--repeats", "0"], "--repeats: expected a positive number of timed steps, got 0"),
    (["--beta", "1.0"], "--beta: expected a relaxation in (0, 1), got 1.0"),
])
def test_bad_options_are_named(argv, message, capsys):
    assert cli.main(["memory", "--device", "cpu", "--out", "/nonexistent", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_size_preset_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["memory", "--size", "huge"])
    assert info.value.code == 2 and "--size: invalid choice: 'huge'" in capsys.readouterr().err


def test_make_case_is_deterministic_and_never_zero():
    a, b = (blocks.make_case("conv", "tiny", torch.device("cpu"), seed=3) for _ in range(2))
    assert torch.equal(a.x, b.x) and torch.equal(a.z0, b.z0) and torch.equal(a.f.conv1.weight, b.f.conv1.weight)
    assert a.x.abs().min() > 0 and a.z0.abs().min() > 0 and not torch.equal(a.x, a.z0)
    with pytest.raises(ValueError, match="--kinds: unknown f kind 'mlp'"):
        blocks.make_case("mlp", "tiny", torch.device("cpu"))


def test_unrolled_matches_the_solver_forward():
    case = blocks.make_case("transformer", "tiny", torch.device("cpu"), seed=1)
    import revdeq_kernels as rk

    with torch.no_grad():
        want, _ = rk.reversible_fixed_point(case.f, case.x, z0=case.z0, beta=0.5, max_steps=5, tol=None)
        got = bench_memory.unrolled(case.f, case.x, case.z0, 0.5, 5)
    print("max difference", (got - want).abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_peak_memory_is_flat_for_revdeq_and_grows_for_unrolled(tmp_path):
    path = tmp_path / "memory.json"
    run_cli(["memory", "--device", "cuda", "--size", "cpu", "--repeats", "1", "--steps", "2,8",
          "--methods", "revdeq,unrolled", "--output", str(path), "--no-plots"])
    payload = common.read_json(str(path))
    assert payload["config"]["memory_headline"] == "cuda_peak_bytes"
    by = {(r["f_kind"], r["method"], r["steps"]): r["cuda_peak_bytes"] for r in payload["results"]}
    print(by)
    for kind in blocks.KINDS:
        assert by[kind, "unrolled", 8] > 2 * by[kind, "unrolled", 2]
        assert by[kind, "revdeq", 8] <= 1.1 * by[kind, "revdeq", 2]


class _Flaky(torch.nn.Module):
    """f plus a perturbation that grows from call to call: not bitwise repeatable, as a GPU kernel using atomics
    can be."""

    def __init__(self, f):
        super().__init__()
        self.f, self.calls = f, 0

    def forward(self, z, x):
        self.calls += 1
        return self.f(z, x) + 1e-3 * self.calls


def test_exact_mode_on_a_nondeterministic_f_is_recorded(monkeypatch, tmp_path):
    make_case = blocks.make_case

    def flaky_case(*args, **kwargs):
        case = make_case(*args, **kwargs)
        case.f = _Flaky(case.f)
        return case

    monkeypatch.setattr(blocks, "make_case", flaky_case)
    path = tmp_path / "memory.json"
    # beta = 1/4 (p / 2^m = 1/4): 2^m - p = 3 lets the inverse detect a mismatch; at beta = 1/2 it cannot (2^m - p = 1)
    # and a nondeterministic f shows as a drift above 0 instead (the drift column).
    run_cli(["memory", *TINY, "--kinds", "conv", "--steps", "2", "--methods", "revdeq_exact,checkpoint",
             "--beta", "0.25", "--output", str(path), "--no-plots"])
    payload = json.loads(path.read_text())
    assert [r["method"] for r in payload["results"]] == ["checkpoint"]
    (skip,) = payload["skipped"]
    assert (skip["method"], skip["f_kind"], skip["steps"]) == ("revdeq_exact", "conv", 2)
    assert "exact mode" in skip["reason"] and "did not return the bits" in skip["reason"], skip["reason"]
