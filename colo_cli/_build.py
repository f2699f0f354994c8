"""Which build of the comparison core runs: compiled (mypyc) or pure Python.

``pip install .`` compiles the core's hot modules, and serve's per-read path
around them (``inputs``, ``outqueue``), with mypyc when it can (see
``setup.py``); the same modules' source is installed beside them and is what
runs when nothing was compiled.  ``COLO_COMPARE_PURE=1`` in the environment
makes a compiled install run the pure modules anyway: the test suite runs
once each way, and a user who suspects the compiled build can rule it out.
It is read once, when ``colo_cli`` is first imported (and inherited by the
processes the tests start).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

#: the modules setup.py compiles (a compiled build has all of them or none):
#: the core's, and serve's per-read glue around it
COMPILED_MODULES = tuple(f"colo_cli.core.{name}" for name in (
    "packet", "events", "compare", "conntrack", "reassembly", "stats", "framing",
    "comparator")) + ("colo_cli.outqueue", "colo_cli.inputs")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def pure_forced() -> bool:
    return os.environ.get("COLO_COMPARE_PURE", "") not in ("", "0")


class _PureCoreFinder:
    """A meta-path finder that loads the compiled modules from their
    ``.py`` source, so the extension modules beside them are never used."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in COMPILED_MODULES:
            return None
        source = os.path.join(_PACKAGE_DIR, *name.split(".")[1:]) + ".py"
        if not os.path.exists(source):
            return None
        loader = importlib.machinery.SourceFileLoader(name, source)
        return importlib.util.spec_from_file_location(name, source, loader=loader)


def install_pure_finder() -> None:
    if not any(isinstance(f, _PureCoreFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PureCoreFinder())


def describe() -> str:
    """One phrase for ``--version``: which build of the core runs."""
    if compiled():
        return "core compiled with mypyc"
    if pure_forced():
        return "core pure Python: COLO_COMPARE_PURE is set"
    return "core pure Python: no compiled build installed"


def compiled() -> bool:
    """Whether the compiled core runs."""
    from .core import comparator
    return not (comparator.__file__ or ".py").endswith(".py")
