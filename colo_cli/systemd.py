"""Running under systemd: readiness and watchdog notifications, and log lines
that suit where they go.

* ``sd_notify``: when ``NOTIFY_SOCKET`` is set (a ``Type=notify`` unit),
  each state change is one datagram on that unix socket, as systemd's
  protocol has it: ``READY=1`` once serve listens, ``STOPPING=1`` when it
  begins to stop, ``WATCHDOG=1`` every half of ``WATCHDOG_USEC`` while its
  event loop runs (``WatchdogSec=``: systemd restarts a serve whose loop is
  stuck), ``STATUS=...`` lines for ``systemctl status``.  A name starting
  with ``@`` is in the abstract namespace.  No library: the protocol is one
  datagram.  Errors are ignored (systemd may have gone away; serve goes on).
* Log lines: on a terminal each line starts with the local time; under
  journald (``JOURNAL_STREAM`` names our stderr) none does, since the
  journal stamps every line itself; elsewhere (a file, a pipe) the lines are
  as they always were.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """sd_notify, or nothing when the service manager did not ask for it."""

    def __init__(self, environ=None) -> None:
        env = os.environ if environ is None else environ
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval_s = _watchdog_interval(env)
        self._sock = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``assignments`` (``"READY=1"``, ...) in one datagram; True if
        it was sent."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self.address)
            return True
        except OSError:
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _socket_address(value: str):
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]          # the abstract namespace
    if value.startswith("/"):
        return value
    return None                          # vsock or garbage: not ours to guess


def _watchdog_interval(env) -> float | None:
    """Half of WATCHDOG_USEC, when the watchdog is meant for this process
    (WATCHDOG_PID unset or ours), as sd_watchdog_enabled() decides."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    return usec / 2e6


def under_journald(stream) -> bool:
    """Whether ``stream`` is the journal stream systemd connected us to:
    ``JOURNAL_STREAM`` is ``DEVICE:INODE`` of that stream."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


def log_stamper(stream):
    """A function giving each log line's prefix: the local time on a
    terminal ("2026-11-27 10:04:05.123 "), nothing under journald or in a
    file or pipe."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty or under_journald(stream):
        return lambda: ""

    def stamp() -> str:
        now = time.time()
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + ".%03d " % (now % 1 * 1000)
    return stamp
