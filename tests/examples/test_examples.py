"""Each example runs end to end in a tiny configuration (seconds), writing what it promises."""

import json
import math
import os
import sys

import pytest

from helpers import ROOT
from helpers.solver_cases import single_threaded  # noqa: F401 (an autouse fixture: the examples set the thread count)

EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)


def test_grad_check_passes_and_prints_its_table(tmp_path, capsys):
    import grad_check

    assert grad_check.main(["--json", str(tmp_path / "grad.json")]) == 0
    out = capsys.readouterr().out
    assert "gradient check OK" in out
    assert out.count("reversible_fixed_point") == 4
    rows = json.loads((tmp_path / "grad.json").read_text())["rows"]
    assert len(rows) >= 4 and all(r["relative_error"] <= 1e-9 for r in rows)


def test_train_digits_tiny_run_writes_history_and_plot(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the digits example needs scikit-learn")
    pytest.importorskip("matplotlib", reason="the digits example plots with matplotlib")
    import train_digits

    argv = ["--epochs", "2", "--limit", "300", "--hidden", "16", "--max-steps", "3", "--no-progress",
            "--out-dir", str(tmp_path)]
    results = train_digits.main(argv)
    saved = json.loads((tmp_path / "digits.json").read_text())
    assert saved["test_accuracy"] == results["test_accuracy"] and saved["train_size"] == 240
    assert [r["epoch"] for r in saved["history"]] == [1, 2]
    for record in saved["history"]:
        assert 1 <= record["mean_steps"] <= 3 and 0 <= record["test_accuracy"] <= 1
        assert math.isfinite(record["loss"]) and 0 <= record["max_drift"] < 1e-6
    assert saved["history"][1]["loss"] < saved["history"][0]["loss"]
    assert (tmp_path / "digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "epoch  2" in out and "drift" in out and "test accuracy" in out

    with pytest.raises(SystemExit) as exit_info:
        train_digits.main([*argv[:-2], "--epochs", "1", "--out-dir", str(tmp_path), "--min-accuracy", "1.01"])
    assert exit_info.value.code == 1


def test_demo_summary_reads_what_the_demo_wrote(tmp_path, capsys):
    import demo_summary
    import grad_check

    assert grad_check.main(["--json", str(tmp_path / "grad_check.json")]) == 0
    with pytest.raises(FileNotFoundError, match=r"no digits.json in .*did that step of the demo run"):
        demo_summary.main(str(tmp_path))
    (tmp_path / "digits.json").write_text(json.dumps({"test_accuracy": 0.97, "config": {"epochs": 20},
                                                      "seconds": 42.0}))
    # Result files as the quick benchmarks write them (the fields the summary reads, from the committed runs).
    for name in ("ops-cpu-amd-epyc.json", "memory-cpu-amd-epyc.json"):
        with open(os.path.join(ROOT, "benchmarks", "results", name)) as fh:
            (tmp_path / name.replace(".json", "-quick.json")).write_text(fh.read())
    capsys.readouterr()
    assert demo_summary.main(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "gradient check: worst relative error" in out and "(OK, tolerance" in out
    assert "digits: test accuracy 97.0% after 20 epochs" in out
    assert "relax_" in out and "naive PyTorch" in out and "saved for backward grows 1.0x" in out


def test_swap_into_torchdeq_runs_both_cores(capsys):
    pytest.importorskip("sklearn", reason="the swap example needs scikit-learn")
    pytest.importorskip("torchdeq", reason="the swap example needs torchdeq")
    import swap_into_torchdeq

    rows = swap_into_torchdeq.main(["--epochs", "1", "--limit", "200", "--hidden", "16", "--f-max-iter", "6"])
    assert [r["core"] for r in rows] == ["sliced", "revdeq"]
    for r in rows:
        assert 0 <= r["test_accuracy"] <= 1 and math.isfinite(r["loss"]) and 1 <= r["nstep"] <= 6
    assert rows[1]["nstep"] == 6  # three RevDEQ steps, two evaluations each
    assert "revdeq" in capsys.readouterr().out
