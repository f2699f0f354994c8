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
        from colo_cli import inputs, outqueue
        assert not any(m.__file__.endswith(".py") for m in (inputs, outqueue))


def test_pure_forced_runs_every_compiled_module_from_source():
    r = _python("import colo_cli.core, colo_cli.inputs, sys\n"
                "from colo_cli._build import COMPILED_MODULES, describe\n"
                "mods = [m for n, m in sys.modules.items() if n.startswith('colo_cli.core.')]\n"
                "mods += [sys.modules[n] for n in COMPILED_MODULES]\n"
                "print(all(m.__file__.endswith('.py') for m in mods if hasattr(m, '__file__')))\n"
                "print(describe())",
                COLO_COMPARE_PURE="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["True", "core pure Python: COLO_COMPARE_PURE is set"]


def test_setup_compiles_the_modules_the_pure_switch_knows():
    """setup.py and _build name the same modules (a module compiled but
    unknown to the switch would stay compiled under COLO_COMPARE_PURE)."""
    import ast
    tree = ast.parse((ROOT / "setup.py").read_text())
    assign = next(n for n in tree.body if isinstance(n, ast.Assign)
                  and getattr(n.targets[0], "id", "") == "COMPILED")
    namespace: dict = {}
    exec(compile(ast.Module([assign], []), "setup.py", "exec"), namespace)
    paths = namespace["COMPILED"]
    assert sorted(p[:-3].replace("/", ".") for p in paths) == sorted(_build.COMPILED_MODULES)


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


def _modules_imported(*argv):
    """The modules a run of ``colo-compare ARGV`` imported (``-X importtime``)."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "colo_cli", *argv],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, {line.split("|")[-1].strip() for line in r.stderr.splitlines()
                      if line.startswith("import time:")}


def test_what_a_quiet_replay_and_version_do_not_import():
    """A start costs what it uses: importlib.metadata (~35 ms) only for
    ``--version``, rich (~40 ms, the report) only when something is shown;
    a quiet replay of a big capture pair pays neither."""
    _, quiet = _modules_imported("replay", "examples/match-primary.pcap",
                                 "examples/match-secondary.pcap", "--out", os.devnull, "--quiet")
    assert "colo_cli.replay" in quiet
    assert not {"rich", "colo_cli.render", "importlib.metadata"} & quiet
    out, version = _modules_imported("--version")
    assert out.startswith("colo-compare ")
    assert "importlib.metadata" in version
    out, shown = _modules_imported("replay", "examples/match-primary.pcap",
                                   "examples/match-secondary.pcap")
    assert "MATCH" in out.upper()
    assert {"rich", "colo_cli.render"} <= shown
