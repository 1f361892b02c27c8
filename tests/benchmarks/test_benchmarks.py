"""The benchmark suite runs end to end on tiny sizes, writes sane numbers, and rejects bad input.

One quick ops run (all ops, dtypes and implementations at 2^12 elements, torch.compile through
dynamo's ``eager`` backend so no C++ compiler runs) is shared by the tests that inspect its output.
"""

import contextlib
import io
import json
import os
import time

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import bench_ops, common

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = 1 << 12
ITEMSIZE = {"float32": 4, "bfloat16": 2}


def _run_cli(argv):
    code = cli.main(argv)
    assert code == 0, f"python -m benchmarks {' '.join(argv)} exited with {code}"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["ops", "--quick", "--device", "cpu", "--sizes", str(TINY), "--out", str(out), "--min-time", "0",
            "--compile-backend", "eager"]
    buffer = io.StringIO()
    start = time.perf_counter()
    # Few buffer sets: at 2^12 elements the rotation cannot beat the cache anyway, and this keeps it fast.
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buffer):
        mp.setattr(common, "MAX_SETS", 8)
        _run_cli(argv)
    path = bench_ops.default_path(torch.device("cpu"), quick=True, out_dir=str(out))
    return {"dir": out, "json": path, "payload": common.read_json(path), "table": buffer.getvalue(),
            "seconds": time.perf_counter() - start}


def test_quick_run_writes_json_with_environment(quick_run):
    payload = quick_run["payload"]
    assert os.path.basename(quick_run["json"]) == f"ops-cpu-{common.slug(common.cpu_model())}-quick.json"
    assert payload["schema"] == bench_ops.SCHEMA and payload["benchmark"] == "ops"
    env = payload["env"]
    for key in ("commit", "torch", "triton", "cuda_runtime", "device_name", "cpu_model", "torch_threads",
                "last_level_cache_bytes", "backends", "date_utc"):
        assert key in env, f"env lacks {key}: {sorted(env)}"
    assert env["torch"] == torch.__version__ and env["device_type"] == "cpu" and env["torch_threads"] >= 1
    assert payload["config"]["quick"] is True and payload["config"]["sizes"] == [TINY]
    assert payload["copy"] and all(c["gbps"] > 0 and c["median_s"] > 0 for c in payload["copy"])


def test_quick_run_covers_every_op_dtype_and_implementation(quick_run):
    results = quick_run["payload"]["results"]
    for op in bench_ops.OPS:
        for dtype in bench_ops.DTYPES:
            impls = {r["impl"] for r in results if r["op"] == op and r["dtype"] == dtype}
            want = {"cpp", "reference", "naive"} | ({"lerp_"} if op == "relax_" else set()) | (
                {"inplace"} if op != "residual" else set()) | ({"compile"} if dtype == "float32" else set())
            assert impls == want, f"{op} {dtype}: measured {sorted(impls)}, expected {sorted(want)}"
    skipped = quick_run["payload"]["skipped"]
    assert any(s["impl"] == "triton" and "TRITON_INTERPRET" in s["reason"] for s in skipped), skipped
    not_compiled = {(s["op"], s["dtype"]) for s in skipped if s["impl"] == "compile" and "--quick" in s["reason"]}
    assert not_compiled == {(op, d) for op in bench_ops.OPS for d in ("bfloat16", "mixed")}, not_compiled


def test_quick_run_numbers_are_sane(quick_run):
    for r in quick_run["payload"]["results"]:
        what = f"{r['op']} {r['dtype']} {r['impl']}"
        s, f = ITEMSIZE[r["state_dtype"]], ITEMSIZE[r["f_dtype"]]
        # Each input read once, each output written once; residual writes two float32 sums.
        want_bytes = TINY * (s + f) + 8 if r["op"] == "residual" else TINY * (2 * s + f)
        assert r["bytes"] == want_bytes, f"{what}: bytes {r['bytes']} != {want_bytes}"
        assert 0 < r["p20_s"] <= r["median_s"] <= r["p80_s"] < 1.0, f"{what}: times {r}"
        assert r["samples"] >= 3 and r["calls_per_sample"] == r["n_sets"] >= 2, what
        assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9, rel=1e-5), what
        assert r["pct_of_copy"] == pytest.approx(100 * r["gbps"] / r["copy_gbps"], rel=1e-5), what
        naive = next(x for x in quick_run["payload"]["results"]
                     if (x["op"], x["dtype"], x["impl"]) == (r["op"], r["dtype"], "naive"))
        assert r["speedup_vs_naive"] == pytest.approx(naive["median_s"] / r["median_s"], rel=1e-5), what
        assert r["correct"] and 0 <= r["max_error"] <= r["error_bound"], f"{what}: error {r['max_error']}"
        if r["kind"] == "backend":  # our kernels round once: a few units of the state's precision
            assert r["max_error"] < 8 * torch.finfo(getattr(torch, r["state_dtype"])).eps, what


def test_quick_run_prints_table_and_draws_plots(quick_run):
    table = quick_run["table"]
    assert "GB/s" in table and "%copy" in table and "copy ceiling" in table
    for op in bench_ops.OPS:
        assert f"\n{op}" in table, f"no {op} rows in the table:\n{table}"
    for op in ("relax", "unrelax", "residual"):
        png = quick_run["json"][:-len(".json")] + f"-{op}.png"
        with open(png, "rb") as fh:
            assert fh.read(8) == PNG_MAGIC, f"{png} is not a PNG"
        assert os.path.getsize(png) > 10_000, f"{png} is suspiciously small"


def test_quick_run_is_quick(quick_run):
    assert quick_run["seconds"] < 60, f"the tiny quick run took {quick_run['seconds']:.0f} s"


def test_plot_redraws_from_json(quick_run, tmp_path):
    copy = tmp_path / "copy.json"
    copy.write_text(json.dumps(quick_run["payload"]))
    _run_cli(["plot", str(copy)])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["copy-relax.png", "copy-residual.png",
                                                               "copy-unrelax.png"]


def test_readme_section_quotes_the_json(quick_run, capsys):
    _run_cli(["readme", quick_run["json"]])
    text = capsys.readouterr().out
    assert text.startswith("## Performance")
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == len(bench_ops.OPS) * len(bench_ops.DTYPES), text
    relax = next(r for r in quick_run["payload"]["results"] if (r["op"], r["dtype"], r["impl"]) ==
                 ("relax_", "float32", "cpp"))
    assert f"{relax['speedup_vs_naive']:.2f}x" in text and quick_run["payload"]["env"]["commit"][:10] in text


def test_top_level_runs_every_benchmark_with_common_options(monkeypatch, tmp_path):
    seen = []
    for name, module in cli.BENCHMARKS.items():
        monkeypatch.setattr(module, "run", lambda args, name=name: seen.append((name, args)))
    _run_cli(["--quick", "--out", str(tmp_path), "--no-plots"])
    assert [name for name, _ in seen] == list(cli.BENCHMARKS)
    for _, args in seen:
        assert args.quick and args.no_plots and args.out == str(tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["ops", "--sizes", "lots"], "--sizes"),
    (["ops", "--dtypes", "float16"], "--dtypes"),
    (["--sizes", "2^10"], "unrecognized arguments"),
])
def test_bad_options_are_rejected_by_name(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_unknown_command_and_missing_gpu_are_clear_errors(capsys):
    assert cli.main(["opz"]) == 2
    assert "unknown command 'opz'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["ops", "--device", "cuda", "--sizes", "2^10"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_a_failing_torch_compile_is_recorded_and_skipped(tmp_path, capsys):
    out = tmp_path / "r.json"
    _run_cli(["ops", "--device", "cpu", "--sizes", "2^10", "--ops", "relax_", "--dtypes", "float32,mixed",
              "--impls", "naive,compile", "--compile-backend", "no-such-backend", "--min-time", "0",
              "--output", str(out), "--no-plots"])
    payload = common.read_json(str(out))
    assert {r["impl"] for r in payload["results"]} == {"naive"}
    failed = [s for s in payload["skipped"] if s["impl"] == "compile"]
    assert [s["dtype"] for s in failed] == ["float32", "mixed"], failed
    assert all("no-such-backend" in s["reason"] for s in failed)
    assert "skipped compile (relax_ float32, relax_ mixed)" in capsys.readouterr().out


def test_parse_sizes():
    assert common.parse_sizes("2^16:2^18, 1000,1<<3") == [65536, 131072, 262144, 1000, 8]
    for bad in ("", "2^18:2^16", "3:8", "0", "x"):
        with pytest.raises(ValueError, match="--sizes"):
            common.parse_sizes(bad)


def test_rotation_defeats_the_cache():
    cache = 32 << 20
    for set_bytes in (1 << 16, 1 << 20, 1 << 24, 1 << 28):
        n = common.rotation_count(set_bytes, cache)
        assert n >= 2 and (n * set_bytes >= common.CACHE_MULTIPLE * cache or n == common.MAX_SETS)


def test_time_calls_measures_known_work():
    calls, restores = [], []

    def call(i):
        calls.append(i)
        time.sleep(0.002)

    stats = common.time_calls(call, 3, torch.device("cpu"), restore=lambda: restores.append(len(calls)),
                              min_time=0.0, min_samples=4)
    assert 0.0019 < stats["median_s"] < 0.05, stats
    assert stats["samples"] == 4 and len(restores) == 4 and stats["calls_per_sample"] == 3
    assert set(calls) == {0, 1, 2}, "every buffer set must be used"


def test_a_wrong_implementation_is_flagged():
    case = bench_ops.Case("relax_", "float32", 1000, torch.device("cpu"), cache_bytes=1 << 16)
    impls = [("reference", "backend", bench_ops._backend_impl("relax_", "reference")),
             ("broken", "backend", lambda s, f: s.mul_(0.2).add_(f, alpha=0.79))]
    (right, wrong), copy = bench_ops.measure_case(case, impls, 1 << 16, {"min_time": 0.0, "min_samples": 3})
    assert right["correct"] and not wrong["correct"] and wrong["max_error"] > 1e-3
    assert copy["gbps"] > 0 and right["copy_gbps"] == copy["gbps"]


@pytest.mark.gpu
def test_quick_run_on_gpu(tmp_path):
    out = tmp_path / "gpu.json"
    _run_cli(["ops", "--quick", "--device", "cuda", "--sizes", "2^12,2^20", "--output", str(out),
              "--min-time", "0", "--compile-backend", "eager"])
    payload = common.read_json(str(out))
    assert payload["env"]["device_type"] == "cuda" and payload["env"]["gpu_capability"]
    ours = [r for r in payload["results"] if r["kind"] == "backend"]
    assert ours and all(r["correct"] and r["median_s"] > 0 for r in payload["results"])
    assert {r["impl"] for r in ours} >= {"reference"}
