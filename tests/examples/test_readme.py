"""The README's Python examples run as written (in order, in one namespace, as a reader would paste them)."""

import os
import re

import pytest

from helpers import ROOT

README = os.path.join(ROOT, "README.md")


def _python_blocks() -> list:
    with open(README, encoding="utf-8") as fh:
        return re.findall(r"```python\n(.*?)```", fh.read(), flags=re.DOTALL)


def test_readme_has_examples():
    assert len(_python_blocks()) >= 4


def test_readme_examples_run(capsys):
    pytest.importorskip("torchdeq", reason="the README's torchdeq example needs torchdeq (the [test] extra)")
    namespace = {"__name__": "readme"}
    for i, block in enumerate(_python_blocks()):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"README python block {i} failed: {type(exc).__name__}: {exc}\n{block}") from exc
    deq = namespace["deq"]  # the last block's torchdeq DEQ: its closure's weights got gradients
    assert namespace["layer"].weight.grad is not None and namespace["layer"].weight.grad.abs().sum() > 0
    assert deq is not None
