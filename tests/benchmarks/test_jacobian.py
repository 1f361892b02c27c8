"""The Jacobian-regularisation and explicit-depth benchmarks run end to end on tiny settings, write
sane numbers, and reject bad options. Synthetic data: CI has no scikit-learn."""

import json

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import bench_depth, bench_jacobian, classify
from helpers.bench_cases import PNG_MAGIC, run_cli, threads_restored  # noqa: F401 (threads_restored: a fixture)

TINY = ["--device", "cpu", "--data", "synthetic", "--width", "16", "--train-limit", "96", "--batch", "32"]


pytestmark = pytest.mark.usefixtures("threads_restored")  # imported from bench_cases


@pytest.fixture(scope="module")
def jacobian_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "jacobian.json"
    table = run_cli(["jacobian", *TINY, "--epochs", "2", "--gammas", "0,2", "--max-steps", "15", "--radius-iters", "8",
                  "--output", str(path)])
    return path, json.loads(path.read_text()), table


def test_jacobian_benchmark_writes_json_table_and_plot(jacobian_run):
    path, payload, table = jacobian_run
    assert payload["schema"] == bench_jacobian.SCHEMA and payload["benchmark"] == "jacobian"
    assert payload["env"]["torch"] == torch.__version__ and payload["env"]["torch_threads"] == 1
    cfg = payload["config"]
    assert cfg["data"]["name"] == "synthetic" and cfg["data"]["train"] == 96 and cfg["gammas"] == [0.0, 2.0]
    assert "| gamma |" in table and "\n| 2 |" in table
    assert path.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC


def test_jacobian_benchmark_records_are_consistent(jacobian_run):
    _, payload, _ = jacobian_run
    rows = payload["results"]
    assert [(r["gamma"], r["epoch"]) for r in rows] == [(g, e) for g in (0.0, 2.0) for e in range(3)]
    for r in rows:
        trace = r["residual_trace"]
        assert len(trace) == r["test_steps"] + 1 and trace[0] == 1.0 and trace[-1] == r["test_residual"]
        assert r["test_residual"] <= 1e-3 or r["test_steps"] == 15
        assert 0 <= r["test_acc"] <= 1 and r["test_jac_frob2_per_dim"] > 0 and r["test_spectral_radius"] > 0
        if r["epoch"] > 0:
            assert 1 <= r["train_steps_mean"] <= r["train_steps_max"] <= 15 and r["train_seconds"] > 0
            assert (r["train_penalty"] is None) == (r["gamma"] == 0)
            assert r["train_penalty"] is None or r["train_penalty"] > 0
    # Same seed, same initial model: epoch 0 is identical whatever gamma.
    assert rows[0]["residual_trace"] == rows[3]["residual_trace"]


@pytest.fixture(scope="module")
def depth_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "depth.json"
    table = run_cli(["depth", *TINY, "--epochs", "1", "--steps", "1,2,3", "--output", str(path)])
    return json.loads(path.read_text()), table


def test_depth_benchmark_memory_is_flat_for_revdeq_and_linear_for_the_stack(depth_run):
    payload, table = depth_run
    assert payload["schema"] == bench_depth.SCHEMA and payload["config"]["steps"] == [1, 2, 3]
    by = {(r["model"], r["steps"]): r for r in payload["results"]}
    assert sorted(by) == sorted((m, n) for m in bench_depth.MODELS for n in (1, 2, 3))
    rev = [by["revdeq", n]["saved_bytes"] for n in (1, 2, 3)]
    stack = [by["explicit", n]["saved_bytes"] for n in (1, 2, 3)]
    print("saved bytes: revdeq", rev, "explicit", stack)
    assert rev[0] == rev[1] == rev[2] > 0
    assert stack[2] - stack[1] == stack[1] - stack[0] > 0, "each extra pair of blocks saves the same activations"
    assert by["revdeq", 3]["parameters"] < by["explicit", 1]["parameters"]
    for r in payload["results"]:
        assert r["cuda_peak_bytes"] is None and r["step_time"]["median_s"] > 0 and 0 <= r["test_acc"] <= 1
        assert r["blocks"] == (1 if r["model"] == "revdeq" else 2 * r["steps"])
        assert (r["drift_max"] is None) == (r["model"] == "explicit")
    assert "| 3 | RevDEQ, 3 steps |" in table and "| 3 | explicit, 6 blocks |" in table


@pytest.mark.parametrize("argv, message", [
    (["jacobian", "--gammas", "0,-1"], "--gammas: expected one or more numbers >= 0"),
    (["jacobian", "--gammas", "a"], "--gammas: expected comma-separated numbers"),
    (["jacobian", "--epochs", "0"], "--epochs: expected a positive integer, got 0"),
    (["depth", "--steps", "0,2"], "--steps: expected comma-separated positive integers"),
    (["depth", "--train-limit", "0"], "--train-limit: expected a positive number of examples"),
])
def test_bad_options_are_named(argv, message, capsys):
    assert cli.main([*argv, "--device", "cpu", "--data", "synthetic", "--out", "/nonexistent"]) == 2
    assert message in capsys.readouterr().err


def test_digits_without_scikit_learn_says_what_to_do(monkeypatch):
    monkeypatch.setattr(classify, "_have_sklearn", lambda: False)
    with pytest.raises(ValueError, match=r"--data digits needs scikit-learn \(pip install scikit-learn\)"):
        classify.load_data("digits", torch.device("cpu"))
    assert classify.load_data("auto", torch.device("cpu"), train_limit=8).name == "synthetic"


def test_synthetic_data_is_deterministic_and_split():
    a, b = (classify.load_data("synthetic", torch.device("cpu")) for _ in range(2))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert (len(a.y_train), len(a.y_test), a.n_features, a.n_classes) == (1500, 500, 64, 10)
    assert len(torch.unique(a.y_train)) == 10, "every class appears"


@pytest.mark.gpu
def test_depth_benchmark_on_cuda_measures_peak_memory(tmp_path):
    path = tmp_path / "depth.json"
    run_cli(["depth", "--device", "cuda", "--data", "synthetic", "--width", "256", "--batch", "256", "--train-limit",
          "512", "--epochs", "1", "--steps", "2,8", "--output", str(path)])
    by = {(r["model"], r["steps"]): r for r in json.loads(path.read_text())["results"]}
    print({k: v["cuda_peak_bytes"] for k, v in by.items()})
    assert by["explicit", 8]["cuda_peak_bytes"] > 2 * by["explicit", 2]["cuda_peak_bytes"]
    assert by["revdeq", 8]["cuda_peak_bytes"] <= 1.25 * by["revdeq", 2]["cuda_peak_bytes"]
