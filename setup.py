"""Build of colo-compare: the comparison core compiled with mypyc when it can
be, pure Python otherwise.

The metadata is in pyproject.toml; this file only adds the compiled core.
``pip install .`` type-checks and compiles the modules in ``COMPILED`` with
mypyc (a build requirement) and the C compiler it finds.  If there is no
compiler, or the build fails for any reason, the extension modules are left
out and the package installs as pure Python: the same source, interpreted.
``COLO_COMPARE_PURE=1 pip install .`` skips compiling altogether (and at run
time, ``COLO_COMPARE_PURE=1`` makes an installed compiled build run the pure
modules instead: see ``colo_cli/_build.py``).  ``colo-compare --version`` says
which build runs.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

#: the modules of the hot path: everything a frame goes through in the
#: core, and serve's per-read glue around it (the same list as _build's)
COMPILED = [f"colo_cli/core/{name}.py" for name in
            ("packet", "events", "compare", "conntrack", "reassembly", "stats", "framing",
             "comparator")] + ["colo_cli/outqueue.py", "colo_cli/inputs.py"]


def _say(msg: str) -> None:
    print(f"colo-compare build: {msg}", file=sys.stderr)


def _pure_forced() -> bool:
    return os.environ.get("COLO_COMPARE_PURE", "") not in ("", "0")


def _remove_stale_in_place_builds() -> None:
    """Compiled modules an earlier in-place (editable) build left beside the
    sources would shadow them: a pure build removes them."""
    import glob
    here = os.path.dirname(os.path.abspath(__file__))
    for path in (glob.glob(os.path.join(here, "colo_cli", "core", "*.so"))
                 + glob.glob(os.path.join(here, "colo_cli", "*.so"))):
        _say(f"removing {os.path.relpath(path, here)} (an earlier compiled build)")
        os.remove(path)


def _ext_modules() -> list:
    if _pure_forced():
        _say("COLO_COMPARE_PURE is set: pure Python")
        _remove_stale_in_place_builds()
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as e:
        _say(f"mypyc is not available ({e}): pure Python")
        _remove_stale_in_place_builds()
        return []
    try:
        # the shared library goes inside the package, beside the modules
        return mypycify(COMPILED, opt_level="3", debug_level="0",
                        group_name="colo_cli.core._native")
    except BaseException as e:  # noqa: BLE001 - mypyc exits on type errors
        _say(f"mypyc could not translate the core ({e!r}): pure Python")
        _remove_stale_in_place_builds()
        return []


class OptionalBuildExt(build_ext):
    """Compile the core if possible; on any failure leave every compiled
    module out (a partial set would not import), so the pure modules run."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - no compiler, a compiler error, ...
            _say(f"compiling the core failed ({e}): installing pure Python")
            self._remove_outputs()

    def _remove_outputs(self) -> None:
        for ext in self.extensions:
            for inplace in (False, True):
                saved = self.inplace
                self.inplace = inplace
                try:
                    path = self.get_ext_fullpath(ext.name)
                finally:
                    self.inplace = saved
                if os.path.exists(path):
                    os.remove(path)
        self.extensions = []

    def get_outputs(self) -> list:
        return [p for p in super().get_outputs() if os.path.exists(p)]


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
