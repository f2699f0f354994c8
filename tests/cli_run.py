"""The ``cli`` fixture: ``colo-compare ARGV...`` run in-process through
``colo_cli.cli.main(argv)`` (which always ends in ``SystemExit``), its exit
status and output captured.  Test modules import the fixture by name."""

from __future__ import annotations

import json

import pytest

from colo_cli.cli import main


class Run:
    """One run: exit status, stdout, stderr; ``doc`` is stdout as JSON."""

    def __init__(self, rc, out, err):
        self.rc, self.out, self.err = rc, out, err

    @property
    def doc(self):
        return json.loads(self.out)

    def __repr__(self):
        return f"Run(rc={self.rc!r}, out={self.out[-2000:]!r}, err={self.err!r})"


@pytest.fixture
def cli(capsys):
    """Run ``colo-compare ARGV...`` in-process; returns Run(rc, stdout, stderr)."""
    def run(*argv):
        capsys.readouterr()
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
        else:  # pragma: no cover - main() always exits
            pytest.fail("main() returned instead of exiting")
        out, err = capsys.readouterr()
        return Run(rc, out, err)
    return run
