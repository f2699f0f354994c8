"""Which build of the comparison core runs: compiled (mypyc) or pure Python.

``pip install .`` compiles the core's hot modules with mypyc when it can (see
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

#: the modules setup.py compiles (a compiled build has all of them or none)
COMPILED_MODULES = ("packet", "events", "compare", "conntrack", "reassembly", "stats",
                    "framing", "comparator")
_CORE = "colo_cli.core."
_CORE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "core")


def pure_forced() -> bool:
    return os.environ.get("COLO_COMPARE_PURE", "") not in ("", "0")


class _PureCoreFinder:
    """A meta-path finder that loads the core's compiled modules from their
    ``.py`` source, so the extension modules beside them are never used."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if not name.startswith(_CORE) or name[len(_CORE):] not in COMPILED_MODULES:
            return None
        source = os.path.join(_CORE_DIR, name[len(_CORE):] + ".py")
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
