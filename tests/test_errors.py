"""One way errors leave: every error class is a ColoError, the command line
catches it once and exits with its status, and the system's reasons read
the same wherever they are quoted."""

from __future__ import annotations

import errno
import importlib
import inspect
import pkgutil

import pytest

import colo_cli
from colo_cli.errors import EXIT_TROUBLE, ColoError, os_error_text

#: Error classes allowed not to be ColoErrors (none)
CORE_PENDING: set = set()


def _package_modules():
    for info in pkgutil.walk_packages(colo_cli.__path__, "colo_cli."):
        if info.name in ("colo_cli.__main__",):
            continue
        yield importlib.import_module(info.name)


def test_every_error_class_of_the_package_is_a_colo_error():
    found = []
    for module in _package_modules():
        for name, cls in vars(module).items():
            if not (inspect.isclass(cls) and issubclass(cls, Exception)
                    and cls.__module__ == module.__name__):
                continue
            if name.startswith("_"):
                continue        # never leaves its module (capture's _Damage)
            qualname = f"{module.__name__}.{name}"
            found.append(qualname)
            if qualname in CORE_PENDING:
                continue
            assert issubclass(cls, ColoError), qualname
    # the walk did see the package's errors
    for expected in ("colo_cli.capture.base.CaptureError", "colo_cli.bpf.FilterError",
                     "colo_cli.core.noise.RuleError",
                     "colo_cli.control.ControlError", "colo_cli.config.ConfigError",
                     "colo_cli.metrics.ReportError", "colo_cli.serve.ServeError"):
        assert expected in found


@pytest.mark.parametrize("error,text", [
    (OSError(errno.EADDRINUSE, "Address already in use"), "address already in use"),
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "connection refused"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "x.pcap"),
     "no such file or directory"),
    # asyncio's own sentences in place of the system's text
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('127.0.0.1', 9)"),
     "connection refused"),
    (OSError(errno.EADDRINUSE, "error while attempting to bind on address ('::1', 9): "
                               "address already in use"), "address already in use"),
    (OSError("/run/ctl exists and is not a socket"), "/run/ctl exists and is not a socket"),
])
def test_os_error_text(error, text):
    assert os_error_text(error) == text


def test_the_command_line_exits_with_the_errors_status(monkeypatch, capsys):
    """main() catches a ColoError once: its message on one line, its exit
    status (not always 2)."""
    from colo_cli.cli import main

    class Particular(ColoError):
        exit_status = 3

    def fail(*_args, **_kwargs):
        raise Particular("something particular\nwent wrong")
    monkeypatch.setattr("colo_cli.metrics.read_report", fail)
    with pytest.raises(SystemExit) as e:
        main(["stats", "report.json"])
    assert e.value.code == 3
    assert capsys.readouterr().err == "colo-compare: something particular\\nwent wrong\n"
    assert ColoError("x").exit_status == EXIT_TROUBLE
