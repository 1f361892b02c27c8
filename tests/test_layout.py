"""The package's architecture, checked from its source: imports point downward only.

Every import statement in revdeq_kernels/ (at module level or inside a function, relative or absolute) is
an edge of the import graph. Each module belongs to one layer; an edge may only point to the same layer or
a lower one, and the graph has no cycles. CONTRIBUTING.md draws the same picture for people.
"""
import ast
import pathlib
import re

import pytest

from helpers import ROOT as _ROOT

PACKAGE = "revdeq_kernels"
ROOT = pathlib.Path(_ROOT)
SOURCE = ROOT / PACKAGE

# Lowest first. A module is in the layer of the longest prefix listed here.
LAYERS = [
    ("exact", {f"{PACKAGE}.exact"}),
    ("op rules", {f"{PACKAGE}.ops.dtypes", f"{PACKAGE}.ops.arithmetic", f"{PACKAGE}.ops.checks",
                  f"{PACKAGE}.ops.library"}),
    ("backends", {f"{PACKAGE}.backends", f"{PACKAGE}._C"}),
    ("ops", {f"{PACKAGE}.ops"}),
    ("solver", {f"{PACKAGE}.solver"}),
    ("users of the solver", {f"{PACKAGE}.nn", f"{PACKAGE}.diagnostics", f"{PACKAGE}.integrations"}),
    ("public API", {PACKAGE, f"{PACKAGE}._aliases"}),
]
SOLVER = [name for name, _ in LAYERS].index("solver")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: pathlib.Path) -> bool:
    return path.name == "__init__.py"


MODULES = {module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    assert best is not None, f"{module} is in no layer of tests/test_layout.py: add it to LAYERS"
    return best


def _resolve(importer: str, importer_is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = importer.split(".") if importer_is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str) -> set[str]:
    """The revdeq_kernels modules ``module`` imports. ``from pkg import name`` counts as importing
    pkg.name when that is a module, else pkg itself; ``import a.b.c`` counts as importing a.b.c only
    (the parents it also runs are its ancestors, which the layering allows)."""
    path = MODULES[module]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package(path), node.level, node.module)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES or candidate == f"{PACKAGE}._C" else base)
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")} - {module}


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_is_seen():
    # If the walk found nothing, every later test here would pass vacuously.
    assert len(MODULES) > 20
    assert f"{PACKAGE}.solver.loop" in MODULES and f"{PACKAGE}.ops.checks" in MODULES
    assert f"{PACKAGE}.ops.bound" in GRAPH[f"{PACKAGE}.solver.loop"]
    assert f"{PACKAGE}.exact" in GRAPH[f"{PACKAGE}.ops.checks"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_downward(module):
    rank = layer_of(module)
    upward = sorted(t for t in GRAPH[module] if layer_of(t) > rank and not module.startswith(t + "."))
    assert not upward, (f"{module} (layer {LAYERS[rank][0]!r}) imports {upward}, from a higher layer; "
                        "see CONTRIBUTING.md for what may import what")


def test_no_import_cycles():
    # A package's __init__ importing its own submodules is how packages work; the cycle this looks for
    # is two modules needing each other, which breaks as soon as one is imported first.
    edges = {m: {t for t in targets if t in MODULES and not m.startswith(t + ".")} for m, targets in GRAPH.items()}
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_exact_format_imports_nothing_of_ours():
    # The number format is shared by every backend and the solver; it must be readable on its own.
    for module in MODULES:
        if layer_of(module) == 0:
            assert not {t for t in GRAPH[module] if not t.startswith(f"{PACKAGE}.exact")}, module


def test_the_solver_reaches_kernels_only_through_ops():
    for module in MODULES:
        if layer_of(module) in (SOLVER, SOLVER + 1):
            direct = sorted(t for t in GRAPH[module] if t.startswith(f"{PACKAGE}.backends") or t.endswith("._C"))
            assert not direct, f"{module} imports {direct}; the solver layer calls only the public ops"


def test_the_public_api_module_only_reexports():
    tree = ast.parse(MODULES[PACKAGE].read_text())
    defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
    assert defined == [], f"revdeq_kernels/__init__.py defines {defined}; it should only re-export"


def test_only_the_package_is_installed():
    # benchmarks/ and tests/ are repository tools; installing them would put top-level packages named
    # `benchmarks` and `helpers` into every user's site-packages. (A regex, not tomllib: Python 3.10 lacks it.)
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[tool\.setuptools\.packages\.find\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert section, "pyproject.toml has no [tool.setuptools.packages.find]"
    assert re.search(r'^include\s*=\s*\["revdeq_kernels\*"\]\s*$', section.group(1), re.M), section.group(1)


def test_layer_rule_would_catch_an_upward_import():
    # The checker itself: a made-up ops module importing the solver must be reported.
    fake = SOURCE / "ops" / "checks.py"
    tree = ast.parse("from ..solver import loop\n")
    node = tree.body[0]
    assert isinstance(node, ast.ImportFrom)
    target = _resolve(module_name(fake), False, node.level, node.module)
    assert target == f"{PACKAGE}.solver"
    assert layer_of(target) > layer_of(module_name(fake))
