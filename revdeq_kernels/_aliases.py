"""The previous release's names, kept importable for one release with a DeprecationWarning.

    revdeq_kernels.FixedPointError   -> revdeq_kernels.ExactModeError
    revdeq_kernels.fixed_point       -> revdeq_kernels.exact
    revdeq_kernels.info              -> revdeq_kernels.solver.info
    revdeq_kernels.jacobian          -> revdeq_kernels.diagnostics

"Fixed point" in the old names meant exact mode's number format, which read like the DEQ fixed point
this library solves for; the modules moved when the package took its two-layer layout.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MODULES = {"fixed_point": "exact", "info": "solver.info", "jacobian": "diagnostics"}
NAMES = {"FixedPointError": ("exact", "ExactModeError")}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"revdeq_kernels.{old} is deprecated and will be removed in the next release; use "
                  f"revdeq_kernels.{new}", DeprecationWarning, stacklevel=3)


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import revdeq_kernels.fixed_point` (and the others) give the new module, with a warning."""

    def __init__(self, package: str):
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.rpartition(".")
        if prefix == self.package and name in MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        name = spec.name.rpartition(".")[2]
        _warn(name, MODULES[name])
        return importlib.import_module(f"{self.package}.{MODULES[name]}")

    def exec_module(self, module):
        pass


def install(package: str):
    """Adds the import hook and returns the package's module-level ``__getattr__`` for the old names."""
    if not any(isinstance(f, _AliasFinder) and f.package == package for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder(package))

    def __getattr__(name):
        if name in NAMES:
            module, attribute = NAMES[name]
            _warn(name, attribute)
            return getattr(importlib.import_module(f"{package}.{module}"), attribute)
        if name in MODULES:
            _warn(name, MODULES[name])
            return importlib.import_module(f"{package}.{MODULES[name]}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
