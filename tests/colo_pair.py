"""A real QEMU 7.2 COLO pair with no guest, for the tests of ``serve --qmp``
(and ``benchmarks/qmp_latency.py``).

Two ``qemu-system-x86_64 -machine none`` processes (``shared/spec/
qemu-colo-qmp.md``): the secondary waits with ``-incoming``, the primary
gets the ``x-colo`` and ``events`` migration capabilities and ``migrate``s
to it; the pair reaches COLO state in milliseconds and then checkpoints for
real (STOP ... MIGRATION_PASS ... RESUME on every monitor of the primary)
whenever ``x-checkpoint-delay`` is set or its period elapses.

The primary has three QMP monitors:

* the harness's own (a socketpair, ``QemuProcess.qmp``), for setup;
* ``serve_qmp_path``, a unix socket for ``colo-compare serve --qmp`` alone;
* ``watch_qmp_path``, read continuously by :class:`QmpWatcher`, which
  records every event with its arrival time and QEMU's timestamp, so a
  test sees each STOP and RESUME as serve does.

The two QEMUs may carry the guest-less filter wiring of
``shared/spec/qemu-filter-interop.md`` section 4b (``build_colo_wiring``),
so that serve's inputs and outdev are QEMU's own filters as well.  Every
process is tracked by the harness and killed by PID at ``close()``;
migration runs over a unix socket in the group's directory (no ports).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass

from qemu_harness import QemuError, QemuProcess, QmpError, connect_unix

CAPABILITIES = [{"capability": "x-colo", "state": True},
                {"capability": "events", "state": True}]


@dataclass(frozen=True)
class SeenEvent:
    name: str
    data: dict
    t: float            #: time.monotonic() when the watcher read it
    wall: float         #: time.time() when the watcher read it
    qemu_ts: float      #: QEMU's own timestamp (host real-time clock), or nan


class QmpWatcher:
    """A QMP client that reads its socket in a thread: events are recorded
    as they come, commands wait for their reply (bounded)."""

    def __init__(self, path: str, alive=None, timeout_s: float = 10.0) -> None:
        self.sock = connect_unix(path, timeout_s, alive)
        self.sock.settimeout(None)
        self._file = self.sock.makefile("rb")
        self._cv = threading.Condition()
        self._replies: dict = {}
        self._events: list[SeenEvent] = []
        self._next_id = 1
        self._closed = False
        greeting = json.loads(self._file.readline() or b"{}")
        if "QMP" not in greeting:
            raise QemuError(f"{path}: not a QMP greeting: {greeting!r}")
        self._thread = threading.Thread(target=self._run, name="qmp-watcher", daemon=True)
        self._thread.start()
        self.execute("qmp_capabilities")

    def _run(self) -> None:
        try:
            for line in self._file:
                msg = json.loads(line)
                with self._cv:
                    if "event" in msg:
                        ts = msg.get("timestamp") or {}
                        qemu_ts = (ts.get("seconds", -1) + ts.get("microseconds", 0) / 1e6
                                   if ts.get("seconds", -1) >= 0 else float("nan"))
                        self._events.append(SeenEvent(msg["event"], msg.get("data", {}),
                                                      time.monotonic(), time.time(), qemu_ts))
                    else:
                        self._replies[msg.get("id")] = msg
                    self._cv.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cv:
                self._closed = True
                self._cv.notify_all()

    def execute(self, command: str, timeout_s: float = 10.0, **arguments):
        with self._cv:
            ident = self._next_id
            self._next_id += 1
        msg = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        with self._cv:
            if not self._cv.wait_for(lambda: ident in self._replies or self._closed, timeout_s):
                raise QemuError(f"watcher: no reply to {command} in {timeout_s} s")
            if ident not in self._replies:
                raise QemuError(f"watcher: connection closed before the reply to {command}")
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise QmpError(f"{command}: {reply['error']}")
        return reply.get("return")

    def events(self, name: str | None = None, since: float = 0.0) -> list[SeenEvent]:
        with self._cv:
            return [e for e in self._events if (name is None or e.name == name) and e.t >= since]

    def wait_event(self, name: str, since: float = 0.0, count: int = 1,
                   timeout_s: float = 10.0, pred=None) -> list[SeenEvent]:
        """Until ``count`` events ``name`` (matching ``pred``) arrived at or
        after ``since``; QemuError after ``timeout_s``."""
        def found():
            return [e for e in self._events if e.name == name and e.t >= since
                    and (pred is None or pred(e))]
        with self._cv:
            if not self._cv.wait_for(lambda: len(found()) >= count, timeout_s):
                raise QemuError(f"watcher: {count} {name} event(s) not seen in {timeout_s} s; "
                                f"saw {[e.name for e in self._events if e.t >= since]}")
            return found()

    def close(self) -> None:
        # shut the socket down first: that ends the reader's blocked read
        # (closing the buffered file would wait for the lock that read holds)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)
        for obj in (self._file, self.sock):
            try:
                obj.close()
            except OSError:
                pass


class ColoPair:
    """The guest-less COLO pair (see the module docstring).

    ``primary_args`` / ``secondary_args`` are extra QEMU arguments (the
    filter wiring, for example); ``workdir`` holds every socket.  Use::

        pair = ColoPair(workdir)
        pair.start()                      # both QEMUs up, the watcher reading
        ...start serve --qmp unix:<pair.serve_qmp_path>...
        pair.enter_colo()                 # migrate; returns once in COLO state
        pair.request_checkpoint()         # what serve does, from the test's side
        pair.close()
    """

    def __init__(self, workdir: str, *, checkpoint_delay_ms: int = 60_000,
                 primary: QemuProcess | None = None, secondary: QemuProcess | None = None,
                 tag: str = "", migration_uri: str | None = None) -> None:
        """``primary`` / ``secondary``: processes built by the caller (the
        filter wiring, say), whose extra arguments include
        ``primary_args(workdir, tag)`` / ``secondary_args(workdir, tag)``;
        by default plain ``-machine none`` QEMUs.  ``migration_uri``: the
        migration channel (default a unix socket in ``workdir``;
        ``tcp:127.0.0.1:PORT`` is what two hosts use)."""
        self.workdir = workdir
        self.tag = tag
        self.checkpoint_delay_ms = checkpoint_delay_ms
        self.serve_qmp_path, self.watch_qmp_path, self.migration_path = self.paths(workdir, tag)
        self.migration_uri = migration_uri or f"unix:{self.migration_path}"
        self.secondary = secondary or QemuProcess(
            name=f"{tag}colo-sec", workdir=workdir,
            extra_args=self.secondary_args(workdir, tag, self.migration_uri))
        self.primary = primary or QemuProcess(
            name=f"{tag}colo-pri", workdir=workdir, extra_args=self.primary_args(workdir, tag))
        self.watcher: QmpWatcher | None = None

    @staticmethod
    def paths(workdir: str, tag: str = "") -> tuple[str, str, str]:
        """serve's QMP socket, the watcher's, the migration channel."""
        return (os.path.join(workdir, f"{tag}serve-qmp.sock"),
                os.path.join(workdir, f"{tag}watch-qmp.sock"),
                os.path.join(workdir, f"{tag}migrate.sock"))

    @classmethod
    def primary_args(cls, workdir: str, tag: str = "") -> list[str]:
        serve_qmp, watch_qmp, _ = cls.paths(workdir, tag)
        return ["-accel", "tcg",
                "-qmp", f"unix:{serve_qmp},server=on,wait=off",
                "-qmp", f"unix:{watch_qmp},server=on,wait=off"]

    @classmethod
    def secondary_args(cls, workdir: str, tag: str = "", migration_uri: str | None = None) -> list[str]:
        return ["-accel", "tcg", "-incoming",
                migration_uri or f"unix:{cls.paths(workdir, tag)[2]}"]

    @property
    def processes(self) -> list[QemuProcess]:
        return [self.primary, self.secondary]

    def start(self) -> None:
        """Start both QEMUs (their harness monitors answering) and the
        watcher.  The unix QMP listeners are connected to only once the
        harness's monitor has answered: QEMU 7.2 hands a -qmp listener to its
        monitor thread from the main loop, and a client connecting before
        that can hang QEMU's main thread (see qemu_harness.QemuProcess.spawn)."""
        try:
            self.secondary.start()
            self.primary.start()
            for proc in (self.secondary, self.primary):
                proc.qmp("query-status")
            self.watcher = QmpWatcher(self.watch_qmp_path, self.primary.is_alive)
        except BaseException:
            self.close()
            raise

    def enter_colo(self, timeout_s: float = 20.0) -> float:
        """Set the capabilities, migrate, and wait until the primary's
        migration is in COLO state and its first RESUME came; returns the
        watcher's time of that RESUME."""
        since = time.monotonic()
        self.secondary.qmp("migrate-set-capabilities", capabilities=CAPABILITIES)
        self.primary.qmp("migrate-set-capabilities", capabilities=CAPABILITIES)
        self.primary.qmp("migrate-set-parameters", **{"x-checkpoint-delay": self.checkpoint_delay_ms})
        self.primary.qmp("migrate", uri=self.migration_uri)
        self.watcher.wait_event("MIGRATION", since, timeout_s=timeout_s,
                                pred=lambda e: e.data.get("status") == "colo")
        resumed = self.watcher.wait_event("RESUME", since, timeout_s=timeout_s)[-1]
        deadline = time.monotonic() + timeout_s
        while self.primary.qmp("query-migrate").get("status") != "colo":
            if time.monotonic() > deadline:
                raise QemuError(f"not in COLO state after {timeout_s} s")
            time.sleep(0.005)
        return resumed.t

    def request_checkpoint(self) -> float:
        """Ask for a checkpoint from the harness's monitor (as serve would);
        returns the time it was asked."""
        t = time.monotonic()
        self.primary.qmp("migrate-set-parameters",
                         **{"x-checkpoint-delay": self.checkpoint_delay_ms})
        return t

    def set_checkpoint_delay(self, delay_ms: int) -> None:
        self.checkpoint_delay_ms = delay_ms
        self.primary.qmp("migrate-set-parameters", **{"x-checkpoint-delay": delay_ms})

    def checkpoints(self, since: float = 0.0) -> list[tuple[SeenEvent, SeenEvent]]:
        """(STOP, RESUME) pairs the watcher saw after ``since`` that were
        checkpoints (a MIGRATION_PASS between them)."""
        out = []
        stop = None
        passed = False
        for e in self.watcher.events(since=since):
            if e.name == "STOP":
                stop, passed = e, False
            elif e.name == "MIGRATION_PASS" and stop is not None:
                passed = True
            elif e.name == "RESUME" and stop is not None:
                if passed:
                    out.append((stop, e))
                stop = None
        return out

    def lost_heartbeat(self) -> None:
        """Failover on the primary: COLO ends (COLO_EXIT), the primary runs on."""
        self.primary.qmp("x-colo-lost-heartbeat")

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        errors = []
        for proc in (self.primary, self.secondary):
            try:
                proc.close()
            except Exception as exc:        # keep closing the other
                errors.append(exc)
        for path in (self.serve_qmp_path, self.watch_qmp_path, self.migration_path):
            try:
                os.unlink(path)
            except OSError:
                pass
        if errors:
            raise errors[0]


def unix_socket_listening(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
