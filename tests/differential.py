"""Differential testing: the same scripted input into QEMU 7.2's colo-compare
and into ``colo-compare serve``, side by side.

A *script* is a list of steps (:func:`P`, :func:`S`, :func:`Wait`,
:func:`Notify`, :func:`Raw`, :func:`Reconnect`, :func:`Mark`,
:func:`OpenOutdev`).  :class:`Differential` starts

* a fresh QEMU colo-compare through the harness (:class:`QemuReference`, a
  :class:`~qemu_harness.QemuColoCompare` with notify_dev), and
* a fresh ``colo-compare serve`` subprocess (:class:`ServeTarget`) that plays
  the same roles as QEMU's chardevs (a server on primary_in, secondary_in,
  outdev and ``--notify-dev``, so it runs the *hold* policy, as QEMU does),
  with the same compare_timeout / expired_scan_cycle / max_queue_size /
  vnet_hdr_support,

and applies every step to both in lock step (QEMU first, serve a few
microseconds later), on one clock.  Both outdev streams and both notify_dev
streams are read continuously by background threads; :meth:`Differential.finish`
waits for the expected output (a condition, with a bound), lets a short quiet
period pass, and returns one :class:`RunResult` per implementation: the
released records (bytes and times), the notify messages (and times), the
step marks, whether the process is alive, send errors, stderr, and serve's
control-socket counters.

:class:`ServeProcess` (``colo-compare serve`` on arbitrary endpoints, with a
control socket) is shared with the interop tests that put serve between the
harness's guest-less QEMU producers and consumers.

Every serve process is registered; :func:`live_serve_pids` lists those still
running and an ``atexit`` hook kills any left over.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from colo_cli.control import ControlError, query
from colo_cli.core.framing import encode, encode_notify

from qemu_harness import (KEEP_WORKDIRS, Endpoint, NotifyMessage, OutRecord, QemuColoCompare,
                          QemuError, _Collector, _notify_parser, _pdeathsig_prefix,
                          _record_parser, _short_tmpdir, _StreamReader, connect_unix)

DO_CHECKPOINT = b"DO_CHECKPOINT"
COLO_CHECKPOINT = b"COLO_CHECKPOINT"
PROXY_INIT = b"COLO_USERSPACE_PROXY_INIT"
GET_XEN_INIT = b"COLO_COMPARE_GET_XEN_INIT"

#: FAST timeouts of the observed experiments (compare_timeout, expired_scan_cycle)
FAST = {"compare_timeout": 500, "expired_scan_cycle": 100}

_LINK_NAMES = {"pri": "primary-in", "sec": "secondary-in", "out": "outdev", "ntf": "notify-dev"}
_ALIASES = {"primary": "pri", "pri": "pri", "p": "pri", "secondary": "sec", "sec": "sec",
            "s": "sec", "outdev": "out", "out": "out", "notify": "ntf", "ntf": "ntf",
            "notify_dev": "ntf"}


# --------------------------------------------------------------------------
# serve processes: registry
# --------------------------------------------------------------------------

_live_lock = threading.Lock()
_live: dict[int, subprocess.Popen] = {}


def live_serve_pids() -> list[int]:
    """Pids of ``colo-compare serve`` processes started here, still running."""
    with _live_lock:
        return [pid for pid, p in _live.items() if p.poll() is None]


def _kill_serves_at_exit() -> None:
    with _live_lock:
        procs = list(_live.values())
    for p in procs:
        if p.poll() is None:
            try:
                p.kill()
                p.wait(5)
            except Exception:
                pass


atexit.register(_kill_serves_at_exit)


def _ep_arg(ep: Endpoint, client_reconnect_s: float | None = 0.05) -> str:
    """An endpoint in serve's syntax; ``ep.role`` is serve's own role."""
    if ep.role == "server":
        return f"unix:{ep.path},server"
    if ep.role == "client":
        return f"unix:{ep.path}" + (f",reconnect={client_reconnect_s:g}"
                                    if client_reconnect_s else "")
    raise ValueError(f"role must be 'server' or 'client', not {ep.role!r}")


class ServeProcess:
    """``colo-compare serve`` as a subprocess, on unix-socket endpoints, with
    a control socket for readiness and counters.

    ``primary_in`` etc. are harness :class:`~qemu_harness.Endpoint` values
    whose ``role`` is *serve's* role.  Client endpoints get a fixed
    ``reconnect=`` interval so that serve finds a QEMU that starts after it
    quickly.
    """

    def __init__(self, *, primary_in: Endpoint, secondary_in: Endpoint, outdev: Endpoint,
                 notify_dev: Endpoint | None = None, vnet_hdr_support: bool = False,
                 compare_timeout: int | None = None, expired_scan_cycle: int | None = None,
                 max_queue_size: int | None = None, checkpoint_policy: str | None = None,
                 workdir: str | None = None, extra_args: Iterable[str] = (),
                 name: str = "serve") -> None:
        self.name = name
        self._own_workdir = workdir is None
        self.workdir = workdir or _short_tmpdir(f"colo-serve-{os.getpid()}-")
        self.endpoints = {"primary-in": primary_in, "secondary-in": secondary_in,
                          "outdev": outdev}
        if notify_dev is not None:
            self.endpoints["notify-dev"] = notify_dev
        self.control_path = os.path.join(self.workdir, f"{name}-ctl.sock")
        self.stderr_path = os.path.join(self.workdir, f"{name}-stderr.log")
        args = [sys.executable, "-m", "colo_cli", "serve",
                "--primary-in", _ep_arg(primary_in),
                "--secondary-in", _ep_arg(secondary_in),
                "--outdev", _ep_arg(outdev)]
        if notify_dev is not None:
            args += ["--notify-dev", _ep_arg(notify_dev)]
        if vnet_hdr_support:
            args.append("--vnet-hdr-support")
        for opt, value in (("--compare-timeout", compare_timeout),
                           ("--expired-scan-cycle", expired_scan_cycle),
                           ("--max-queue-size", max_queue_size),
                           ("--checkpoint-policy", checkpoint_policy)):
            if value is not None:
                args += [opt, str(value)]
        args += ["--control", self.control_path, "--drain-timeout", "0.5",
                 "--connect-timeout", "20", "-v"]
        self.argv = args + list(extra_args)
        self._proc: subprocess.Popen | None = None
        self._stderr_file = None
        self._stderr_cache: str | None = None
        self._closed = False

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        """Spawn (does not wait: see :meth:`wait_up`)."""
        self._stderr_file = open(self.stderr_path, "wb")
        self._proc = subprocess.Popen(_pdeathsig_prefix() + self.argv, stdin=subprocess.DEVNULL,
                                      stdout=self._stderr_file, stderr=subprocess.STDOUT,
                                      cwd=self.workdir)
        with _live_lock:
            _live[self._proc.pid] = self._proc

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def _check_alive(self) -> None:
        if not self.is_alive():
            raise QemuError(f"{self.name} exited rc={self.returncode}: {self.stderr_text()}")

    def wait_up(self, timeout_s: float = 10.0) -> None:
        """Until the control socket answers and every server endpoint listens."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive()
            listening = all(os.path.exists(ep.path) for ep in self.endpoints.values()
                            if ep.role == "server")
            if listening and os.path.exists(self.control_path):
                try:
                    query(self.control_path, {"cmd": "version"}, 2.0)
                    return
                except ControlError:
                    pass
            if time.monotonic() > deadline:
                raise QemuError(f"{self.name} not up after {timeout_s} s: {self.stderr_text()}")
            time.sleep(0.005)

    def stats(self) -> dict:
        return query(self.control_path, {"cmd": "stats"}, 5.0)["stats"]

    def links(self) -> dict:
        return self.stats()["serve"]["links"]

    def wait_links(self, pred: Callable[[dict], bool], names: Iterable[str] | None = None,
                   timeout_s: float = 10.0) -> dict:
        """Poll the control socket until ``pred(link)`` holds for each link."""
        names = list(names) if names is not None else list(self.endpoints)
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive()
            links = self.links()
            if all(pred(links[n]) for n in names):
                return links
            if time.monotonic() > deadline:
                raise QemuError(f"{self.name}: links {names} not ready after {timeout_s} s: "
                                f"{ {n: links[n] for n in names} }")
            time.sleep(0.005)

    def wait_connected(self, names: Iterable[str] | None = None, timeout_s: float = 10.0) -> dict:
        return self.wait_links(lambda l: l["connected"], names, timeout_s)

    def checkpoint(self) -> dict:
        return query(self.control_path, {"cmd": "checkpoint"}, 5.0)

    def stderr_text(self) -> str:
        if self._stderr_cache is not None:
            return self._stderr_cache
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM (serve flushes and exits 0), SIGKILL if it does not exit."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        return self._proc.returncode

    def close(self) -> int | None:
        if self._closed:
            return self.returncode
        self._closed = True
        try:
            rc = self.stop()
        finally:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait(5)
            if self._proc is not None:
                with _live_lock:
                    _live.pop(self._proc.pid, None)
            if self._stderr_file is not None:
                self._stderr_file.close()
            self._stderr_cache = self.stderr_text()
            if self._own_workdir and not KEEP_WORKDIRS:
                shutil.rmtree(self.workdir, ignore_errors=True)
        return rc


# --------------------------------------------------------------------------
# Readers whose start can be held back (outdev backpressure, observed m1)
# --------------------------------------------------------------------------

class _GatedReader(_StreamReader):
    """A harness stream reader that does not read until ``gate`` is set."""

    def __init__(self, sock, parse, collector, name, gate: threading.Event) -> None:
        self._gate = gate
        super().__init__(sock, parse, collector, name)

    def _run(self) -> None:
        self._gate.wait()
        super()._run()

    def stop(self) -> None:
        self._gate.set()
        super().stop()


class QemuReference(QemuColoCompare):
    """The harness's QEMU colo-compare; with ``gate_outdev`` its outdev is
    not read until :meth:`open_outdev` (the reader is "stalled")."""

    name = "colo"

    def __init__(self, *, gate_outdev: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gate = threading.Event()
        if not gate_outdev:
            self.gate.set()
        self.send_errors: list[tuple[float, str, str]] = []

    def _attach(self, label: str, sock: socket.socket) -> None:
        if label == "out" and not self.gate.is_set():
            sock.settimeout(None)
            self._socks[label] = sock
            self._readers[label] = _GatedReader(
                sock, _record_parser(self.vnet_hdr_support, self.now), self._out,
                "colo-outdev", self.gate)
            return
        super()._attach(label, sock)

    def open_outdev(self) -> None:
        self.gate.set()

    def process_alive(self) -> bool:
        return self.is_alive()


class ServeTarget:
    """``colo-compare serve`` driven like :class:`~qemu_harness.QemuColoCompare`:
    serve is the server on every socket (as QEMU's chardevs are), the driver
    connects outdev and notify_dev first, then the inputs, and waits until
    serve's control socket shows all four connected."""

    name = "serve"

    def __init__(self, *, notify: bool = True, vnet_hdr_support: bool = False,
                 compare_timeout: int | None = None, expired_scan_cycle: int | None = None,
                 max_queue_size: int | None = None, gate_outdev: bool = False,
                 extra_args: Iterable[str] = ()) -> None:
        self.workdir = _short_tmpdir(f"colo-serve-{os.getpid()}-")
        self.vnet_hdr_support = bool(vnet_hdr_support)
        self.notify_enabled = notify
        self.paths = {lb: os.path.join(self.workdir, f"{lb}.sock")
                      for lb in ("pri", "sec", "out", "ntf")}
        self.proc = ServeProcess(
            primary_in=Endpoint(self.paths["pri"], "server"),
            secondary_in=Endpoint(self.paths["sec"], "server"),
            outdev=Endpoint(self.paths["out"], "server"),
            notify_dev=Endpoint(self.paths["ntf"], "server") if notify else None,
            vnet_hdr_support=vnet_hdr_support, compare_timeout=compare_timeout,
            expired_scan_cycle=expired_scan_cycle, max_queue_size=max_queue_size,
            workdir=self.workdir, extra_args=extra_args)
        self.t0 = time.monotonic()
        self.gate = threading.Event()
        if not gate_outdev:
            self.gate.set()
        self._socks: dict[str, socket.socket] = {}
        self._readers: dict[str, _StreamReader] = {}
        self._out = _Collector()
        self._notify = _Collector()
        self._lock = threading.Lock()
        self.sent: list[tuple[float, str, bytes]] = []
        self.send_errors: list[tuple[float, str, str]] = []
        self._closed = False

    # -- clock ----------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- lifecycle --------------------------------------------------------------
    def spawn(self) -> None:
        self.proc.start()

    def _labels(self) -> list[str]:
        return [lb for lb in ("out", "ntf", "pri", "sec") if lb != "ntf" or self.notify_enabled]

    def connect(self, timeout_s: float = 10.0) -> None:
        self.proc.wait_up(timeout_s)
        for label in self._labels():
            self._attach(label, connect_unix(self.paths[label], timeout_s, self.proc.is_alive))
        self.proc.wait_connected([_LINK_NAMES[lb] for lb in self._labels()], timeout_s)

    def _attach(self, label: str, sock: socket.socket) -> None:
        sock.settimeout(None)
        self._socks[label] = sock
        if label == "out":
            self._readers[label] = _GatedReader(
                sock, _record_parser(self.vnet_hdr_support, self.now), self._out,
                "serve-outdev", self.gate)
        elif label == "ntf":
            self._readers[label] = _StreamReader(sock, _notify_parser(self.now), self._notify,
                                                 "serve-notify")
        else:
            sock.settimeout(10.0)

    def open_outdev(self) -> None:
        self.gate.set()

    def process_alive(self) -> bool:
        return self.proc.is_alive()

    def close(self) -> int | None:
        if self._closed:
            return self.proc.returncode
        self._closed = True
        self.gate.set()          # serve flushes at SIGTERM: let it drain
        try:
            rc = self.proc.close()
        finally:
            for reader in self._readers.values():
                reader.stop()
            for sock in self._socks.values():
                try:
                    sock.close()
                except OSError:
                    pass
            if not KEEP_WORKDIRS:
                shutil.rmtree(self.workdir, ignore_errors=True)
        return rc

    # -- input (the QemuColoCompare interface) ------------------------------------
    def _write(self, label: str, data: bytes) -> None:
        with self._lock:
            self.sent.append((self.now(), label, bytes(data)))
            self._socks[label].sendall(data)

    def send(self, side: str, frame: bytes, vnet_hdr: bytes | None = None) -> bytes:
        if self.vnet_hdr_support and vnet_hdr is None:
            vnet_hdr = b""
        wire = encode(frame, vnet_hdr if self.vnet_hdr_support else None)
        self._write(_ALIASES[side.lower()], wire)
        return wire

    def send_raw(self, side: str, data: bytes) -> None:
        self._write(_ALIASES[side.lower()], data)

    def send_notify(self, message: bytes, vnet_word: bool | None = None) -> bytes:
        if vnet_word is None:
            vnet_word = self.vnet_hdr_support
        wire = encode(message, b"") if vnet_word else encode_notify(message)
        self._write("ntf", wire)
        return wire

    def reconnect(self, side: str, timeout_s: float = 5.0) -> None:
        """Close one connection, wait until serve saw it go, connect anew and
        wait until serve shows the new connection."""
        label = _ALIASES[side.lower()]
        name = _LINK_NAMES[label]
        before = self.proc.links()[name]["connections"]
        reader = self._readers.pop(label, None)
        if reader is not None:
            reader.stop()
        else:
            self._socks[label].close()
        self.proc.wait_links(lambda l: not l["connected"], [name], timeout_s)
        self._attach(label, connect_unix(self.paths[label], timeout_s, self.proc.is_alive))
        self.proc.wait_links(lambda l: l["connected"] and l["connections"] > before, [name],
                             timeout_s)

    # -- output ---------------------------------------------------------------------
    @property
    def outdev(self) -> list[OutRecord]:
        return self._out.items()

    @property
    def notifications(self) -> list[NotifyMessage]:
        return self._notify.items()

    def wait_outdev(self, n: int, timeout_s: float = 5.0) -> list[OutRecord]:
        return self._out.wait(n, timeout_s)

    def wait_notify(self, n: int, timeout_s: float = 5.0) -> list[NotifyMessage]:
        return self._notify.wait(n, timeout_s)

    def stderr_text(self) -> str:
        return self.proc.stderr_text()


# --------------------------------------------------------------------------
# Scripts
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    kind: str                      # send, raw, wait, notify, reconnect, mark, open_outdev
    side: str = ""
    data: bytes = b""
    vnet_hdr: bytes | None = None
    ms: float = 0.0
    label: str = ""


def P(frame: bytes, vnet_hdr: bytes | None = None, label: str = "") -> Step:
    """A record on primary_in."""
    return Step("send", "primary", frame, vnet_hdr, label=label)


def S(frame: bytes, vnet_hdr: bytes | None = None, label: str = "") -> Step:
    """A record on secondary_in."""
    return Step("send", "secondary", frame, vnet_hdr, label=label)


def Wait(ms: float) -> Step:
    return Step("wait", ms=ms)


def Notify(message: bytes, label: str = "") -> Step:
    """A notify_dev message into the comparator (with a zero vnet word when
    vnet_hdr_support is on: QEMU needs it, serve accepts both forms)."""
    return Step("notify", data=message, label=label)


def Raw(side: str, data: bytes, label: str = "") -> Step:
    """Bytes as they are on primary_in / secondary_in (malformed input)."""
    return Step("raw", side, data, label=label)


def Reconnect(side: str, label: str = "") -> Step:
    return Step("reconnect", side, label=label)


def Mark(label: str) -> Step:
    """Record the time (``RunResult.marks[label]``)."""
    return Step("mark", label=label)


def OpenOutdev(label: str = "") -> Step:
    """Start reading outdev (after ``gate_outdev=True``)."""
    return Step("open_outdev", label=label)


def paced(steps: Iterable[Step], ms: float = 20.0) -> list[Step]:
    """Steps with ``Wait(ms)`` between them (the experiments' 20 ms pacing)."""
    out: list[Step] = []
    for step in steps:
        if out:
            out.append(Wait(ms))
        out.append(step)
    return out


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------

@dataclass
class RunResult:
    name: str
    outdev: list[OutRecord]
    notify: list[NotifyMessage]
    marks: dict[str, float]
    alive: bool
    send_errors: list[tuple[float, str, str]]
    stderr: str = ""
    stats: dict | None = None          # serve: control-socket stats before stopping
    returncode: int | None = None      # filled in after the process was stopped
    target: object = None

    @property
    def wires(self) -> list[bytes]:
        return [r.wire for r in self.outdev]

    @property
    def frames(self) -> list[bytes]:
        return [r.frame for r in self.outdev]

    @property
    def messages(self) -> list[bytes]:
        return [m.message for m in self.notify]

    @property
    def checkpoints(self) -> list[float]:
        """Times of the DO_CHECKPOINT messages."""
        return [m.t for m in self.notify if m.message == DO_CHECKPOINT]

    def released_between(self, t_from: float, t_to: float = float("inf")) -> list[bytes]:
        return [r.frame for r in self.outdev if t_from <= r.t < t_to]

    def checkpoints_between(self, t_from: float, t_to: float = float("inf")) -> list[float]:
        return [t for t in self.checkpoints if t_from <= t < t_to]

    def summary(self) -> str:
        cps = ", ".join(f"{t:.3f}" for t in self.checkpoints)
        return (f"{self.name}: {len(self.outdev)} released at "
                f"{[round(r.t, 3) for r in self.outdev][:20]}; "
                f"notify {[m.message for m in self.notify if m.message != DO_CHECKPOINT]} "
                f"DO_CHECKPOINT at [{cps}]; alive={self.alive}; "
                f"send errors={self.send_errors[:3]}")


# --------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------

class Differential:
    """One QEMU colo-compare and one serve, same settings, same clock."""

    def __init__(self, *, vnet_hdr_support: bool = False, compare_timeout: int | None = None,
                 expired_scan_cycle: int | None = None, max_queue_size: int | None = None,
                 gate_outdev: bool = False, trace: bool = True) -> None:
        cfg = dict(vnet_hdr_support=vnet_hdr_support, compare_timeout=compare_timeout,
                   expired_scan_cycle=expired_scan_cycle, max_queue_size=max_queue_size)
        self.qemu = QemuReference(notify=True, gate_outdev=gate_outdev, trace=trace, **cfg)
        self.serve = ServeTarget(notify=True, gate_outdev=gate_outdev, **cfg)
        self.targets = (self.qemu, self.serve)
        self.marks: dict[str, float] = {}
        self.started = False

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "Differential":
        try:
            self.serve.spawn()          # Python's start-up overlaps QEMU's
            self.qemu.start()
            self.serve.connect()
        except BaseException:
            self.close()
            raise
        self.qemu.mark_t0()
        self.serve.t0 = self.qemu.t0
        self.started = True
        return self

    def close(self) -> tuple[int | None, int | None]:
        rc_serve = None
        try:
            rc_serve = self.serve.close()
        finally:
            self.qemu.close()
        return self.qemu.returncode, rc_serve

    def __enter__(self) -> "Differential":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def now(self) -> float:
        return self.qemu.now()

    # -- running a script --------------------------------------------------------
    def _each(self, what: str, fn: Callable) -> None:
        for t in self.targets:
            try:
                fn(t)
            except OSError as exc:           # a dead or cut-off peer: recorded, not fatal
                t.send_errors.append((t.now(), what, repr(exc)))
            except QemuError as exc:
                t.send_errors.append((t.now(), what, repr(exc)))

    def run(self, script: Iterable[Step]) -> None:
        for i, step in enumerate(script):
            if step.label:
                self.marks[step.label] = self.now()
            k = step.kind
            if k == "send":
                self._each(f"{i}:{step.side}",
                           lambda t: t.send(step.side, step.data, step.vnet_hdr))
            elif k == "raw":
                self._each(f"{i}:raw-{step.side}", lambda t: t.send_raw(step.side, step.data))
            elif k == "notify":
                self._each(f"{i}:notify", lambda t: t.send_notify(step.data))
            elif k == "wait":
                time.sleep(step.ms / 1000.0)
            elif k == "reconnect":
                self._each(f"{i}:reconnect-{step.side}", lambda t: t.reconnect(step.side))
            elif k == "mark":
                pass
            elif k == "open_outdev":
                for t in self.targets:
                    t.open_outdev()
            else:
                raise ValueError(f"unknown step {step!r}")

    def finish(self, expect_out=None, expect_notify=None, settle_ms: float = 150,
               timeout_s: float = 5.0) -> tuple[RunResult, RunResult]:
        """Wait until each side has released ``expect_out`` records and sent
        ``expect_notify`` notify messages (an int for both, or a pair
        ``(qemu, serve)``), each bounded by ``timeout_s``; then wait
        ``settle_ms`` for anything unexpected; then take the results."""
        def pair(v):
            if v is None:
                return (0, 0)
            return (v, v) if isinstance(v, int) else tuple(v)

        deadline = time.monotonic() + timeout_s
        for t, n_out, n_ntf in zip(self.targets, pair(expect_out), pair(expect_notify)):
            t.wait_outdev(n_out, max(0.0, deadline - time.monotonic()))
            t.wait_notify(n_ntf, max(0.0, deadline - time.monotonic()))
        time.sleep(settle_ms / 1000.0)
        stats = None
        try:
            stats = self.serve.proc.stats() if self.serve.proc.is_alive() else None
        except ControlError:
            stats = None
        results = []
        for t in self.targets:
            results.append(RunResult(
                name=t.name, outdev=list(t.outdev), notify=list(t.notifications),
                marks=dict(self.marks), alive=t.process_alive(),
                send_errors=list(t.send_errors), stderr=t.stderr_text(),
                stats=stats if t is self.serve else None, target=t))
        return results[0], results[1]


def run_both(script: Iterable[Step], *, expect_out=None, expect_notify=None,
             settle_ms: float = 150, timeout_s: float = 5.0,
             **config) -> tuple[RunResult, RunResult]:
    """Run ``script`` against a fresh QEMU and a fresh serve; returns
    ``(qemu, serve)`` results (both processes are stopped by then)."""
    d = Differential(**config)
    with d:
        d.run(script)
        q, s = d.finish(expect_out, expect_notify, settle_ms, timeout_s)
    q.returncode = d.qemu.returncode
    s.returncode = d.serve.proc.returncode
    return q, s


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------

def timeout_problem(times: list[float], t_start: float, timeout_ms: float, cycle_ms: float,
                    until: float | None = None, jitter_scans: int = 1) -> str | None:
    """None when ``times`` (DO_CHECKPOINT times, s) follow the old-packet
    timer for a frame queued at ``t_start``: the first between timeout and
    timeout + cycle (plus ``jitter_scans`` scans: QEMU phases its ticks from
    object creation, serve from its first frame), then about one per cycle;
    with ``until``, none missing up to then (within the jitter).  Otherwise
    a description of what is wrong."""
    timeout, cycle = timeout_ms / 1000, cycle_ms / 1000
    if not times:
        return "no timeout DO_CHECKPOINT"
    first = times[0] - t_start
    hi = timeout + cycle * (1 + jitter_scans) + 0.03
    if not timeout - 0.01 <= first <= hi:
        return (f"first timeout DO_CHECKPOINT {first:.3f} s after the frame, "
                f"expected {timeout:.3f}..{hi:.3f}")
    for a, b in zip(times, times[1:]):
        if not 0.5 * cycle - 0.01 <= b - a <= 1.5 * cycle + 0.05:
            return f"{b - a:.3f} s between DO_CHECKPOINTs, expected about {cycle:.3f}"
    if until is not None:
        expected = int((until - times[0]) / cycle) + 1
        if abs(len(times) - expected) > 1 + jitter_scans:
            return (f"{len(times)} timeout DO_CHECKPOINTs until {until - t_start:.3f} s, "
                    f"expected about {expected}")
    return None


class NotifyPeer:
    """The Xen side of serve's ``--notify-dev`` (serve listens, this
    connects): reads what serve sends, sends COLO_CHECKPOINT and friends."""

    def __init__(self, path: str, timeout_s: float = 10.0,
                 alive: Callable[[], bool] | None = None) -> None:
        self.t0 = time.monotonic()
        self._coll = _Collector()
        self.sock = connect_unix(path, timeout_s, alive)
        self.sock.settimeout(None)
        self._reader = _StreamReader(self.sock, _notify_parser(self.now), self._coll,
                                     "notify-peer")

    def now(self) -> float:
        return time.monotonic() - self.t0

    def send(self, message: bytes) -> None:
        self.sock.sendall(encode_notify(message))

    @property
    def messages(self) -> list[bytes]:
        return [m.message for m in self._coll.items()]

    def wait(self, n: int, timeout_s: float = 5.0) -> list[bytes]:
        return [m.message for m in self._coll.wait(n, timeout_s)]

    def close(self) -> None:
        self._reader.stop()
