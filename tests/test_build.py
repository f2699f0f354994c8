"""Which build of the core runs, and the switch to the pure-Python one.

The suite runs twice in CI (README's test command): once with
``COLO_COMPARE_EXPECT_COMPILED=1`` against the compiled core, once with
``COLO_COMPARE_PURE=1``.  These tests make sure each run tests what it says.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from colo_cli import _build
from colo_cli.core import comparator, compare, packet

ROOT = Path(__file__).resolve().parents[1]


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **env}, timeout=60)


def test_the_run_tests_the_build_it_names():
    if _build.pure_forced():
        assert not _build.compiled()
        assert all(m.__file__.endswith(".py") for m in (comparator, compare, packet))
    elif os.environ.get("COLO_COMPARE_EXPECT_COMPILED", "") not in ("", "0"):
        assert _build.compiled(), "the compiled core was expected but is not what runs"
        assert not any(m.__file__.endswith(".py") for m in (comparator, compare, packet))


def test_pure_forced_runs_every_core_module_from_source():
    r = _python("import colo_cli.core, sys\n"
                "mods = [m for n, m in sys.modules.items() if n.startswith('colo_cli.core.')]\n"
                "print(all(m.__file__.endswith('.py') for m in mods if hasattr(m, '__file__')))\n"
                "from colo_cli._build import describe; print(describe())",
                COLO_COMPARE_PURE="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["True", "core pure Python: COLO_COMPARE_PURE is set"]


def test_version_names_the_build():
    r = subprocess.run([sys.executable, "-m", "colo_cli", "--version"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0
    # the child inherits this process's environment, so it runs the same build
    assert ("core compiled with mypyc" in r.stdout) == _build.compiled()


@pytest.mark.skipif(not any(Path(ROOT, "colo_cli", "core").glob("*.so")),
                    reason="no compiled build beside the sources")
def test_the_compiled_build_is_the_same_program():
    """A compiled and a pure process decide the same for the example pair."""
    args = ["-m", "colo_cli", "replay", "--json", "examples/diverge-primary.pcap",
            "examples/diverge-secondary.pcap"]
    env = {k: v for k, v in os.environ.items() if k != "COLO_COMPARE_PURE"}
    compiled = subprocess.run([sys.executable, *args], capture_output=True, cwd=ROOT, env=env,
                              timeout=60)
    pure = subprocess.run([sys.executable, *args], capture_output=True, cwd=ROOT,
                          env={**env, "COLO_COMPARE_PURE": "1"}, timeout=60)
    assert compiled.returncode == pure.returncode == 1
    assert compiled.stdout == pure.stdout
