"""Drive Debian's QEMU 7.2 from tests, with no guest OS.

Two uses (facts behind every choice: ``shared/spec/qemu-7.2-observed.md`` and
``shared/spec/qemu-filter-interop.md``):

1. **QEMU's own colo-compare as a reference comparator** -- :class:`QemuColoCompare`.
   A ``-machine none`` QEMU runs an iothread and a ``colo-compare`` object
   whose primary_in, secondary_in, outdev and (optionally) notify_dev are
   socket chardevs (QEMU is the server, ``wait=off``).  The harness connects
   to all of them, waits until QMP ``query-chardev`` shows them connected,
   then lets a test send records and collects what QEMU writes back::

       with QemuColoCompare(compare_timeout=500, expired_scan_cycle=100) as q:
           q.send("primary", frame)
           q.send("secondary", frame)
           assert [r.wire for r in q.wait_outdev(1)] == [encode(frame)]
           assert q.wait_notify(0) == []

2. **Guest-less QEMU as producer and consumer of a comparator's sockets** --
   :class:`QemuProducer` (netdev -> ``filter-mirror`` -> chardev),
   :class:`QemuConsumer` (chardev -> ``filter-redirector`` -> netdev),
   :func:`build_chain` (interop doc section 4) and :func:`build_colo_wiring`
   (section 4b, the documented COLO wiring with the guests replaced by
   sockets).  Each returns the socket paths and the *roles the comparator
   plays* on them, so that a test can put a stub or ``colo-compare serve``
   in the middle.

Reliability rules that the harness enforces:

* Every socket QEMU writes to is read continuously by a background thread
  (interop pitfall 7: a reader that stops blocks the whole QEMU main loop).
* Readiness is a condition, never a sleep: QMP must answer, then
  ``query-chardev`` must show no ``disconnected:`` filename for the chardevs
  that matter (observed section 2, interop pitfall 3).
* Every QEMU is started under ``setpriv --pdeathsig KILL`` when available (so
  it dies with the test process), is tracked in a registry, is stopped by QMP
  ``quit`` or SIGKILL in ``close()``, and an ``atexit`` hook kills whatever is
  left.  Temporary directories are removed in ``close()``.

Nothing here is copied from QEMU; the command lines follow the observed docs.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import pytest

from colo_cli.core.framing import FrameDecoder, encode, encode_notify

__all__ = [
    "QEMU_BINARY", "QEMU_MISSING_REASON", "qemu_available", "requires_qemu",
    "skip_unless_qemu", "qemu_colo", "live_qemu_pids",
    "QemuError", "QmpError", "QmpClient", "QemuProcess", "QemuColoCompare",
    "OutRecord", "NotifyMessage", "TraceLine", "Datagram",
    "GuestlessQemu", "QemuProducer", "QemuConsumer", "QemuGroup",
    "Endpoint", "ComparatorEndpoints", "Chain", "build_chain",
    "ColoWiring", "build_colo_wiring",
    "connect_unix", "listen_unix",
]

#: The binary the harness runs; ``COLO_QEMU_BINARY`` overrides it.
QEMU_BINARY = os.environ.get("COLO_QEMU_BINARY", "qemu-system-x86_64")
QEMU_MISSING_REASON = "qemu-system-x86_64 not installed; apt-get install qemu-system-x86"

#: Set ``COLO_QEMU_KEEP=1`` to keep the temp directories (sockets, stderr,
#: trace files) of every QEMU for debugging.
KEEP_WORKDIRS = os.environ.get("COLO_QEMU_KEEP", "") not in ("", "0")

PRIMARY = "primary"
SECONDARY = "secondary"
_SIDES = {"primary": PRIMARY, "pri": PRIMARY, "p": PRIMARY,
          "secondary": SECONDARY, "sec": SECONDARY, "s": SECONDARY}

TRACE_PATTERNS = ("colo_compare_*", "colo_old_packet_check_found", "colo_proxy_*")


# --------------------------------------------------------------------------
# Availability and pytest helpers
# --------------------------------------------------------------------------

_available_cache: dict[str, bool] = {}


def qemu_available(binary: str | None = None) -> bool:
    """True when the QEMU binary exists and answers ``--version``."""
    binary = binary or QEMU_BINARY
    if binary not in _available_cache:
        path = shutil.which(binary)
        ok = False
        if path:
            try:
                ok = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    timeout=10).returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
        _available_cache[binary] = ok
    return _available_cache[binary]


#: Decorator / ``pytestmark`` entry: skip when QEMU is missing.
requires_qemu = pytest.mark.skipif(not qemu_available(), reason=QEMU_MISSING_REASON)


def skip_unless_qemu() -> None:
    """Call inside a test or fixture: ``pytest.skip`` with a clear reason."""
    if not qemu_available():
        pytest.skip(QEMU_MISSING_REASON)


@pytest.fixture
def qemu_colo():
    """Factory fixture: ``q = qemu_colo(**QemuColoCompare kwargs)`` returns a
    started instance; every instance is closed at teardown, pass or fail."""
    skip_unless_qemu()
    made: list[QemuColoCompare] = []

    def factory(**kwargs) -> QemuColoCompare:
        q = QemuColoCompare(**kwargs)
        made.append(q)
        q.start()
        return q

    try:
        yield factory
    finally:
        for q in reversed(made):
            q.close()


# --------------------------------------------------------------------------
# Process registry and spawning
# --------------------------------------------------------------------------

_live_lock = threading.Lock()
_live: dict[int, subprocess.Popen] = {}


def live_qemu_pids() -> list[int]:
    """Pids of QEMUs started by this harness that are still running."""
    with _live_lock:
        return [pid for pid, p in _live.items() if p.poll() is None]


def _kill_all_at_exit() -> None:
    with _live_lock:
        procs = list(_live.values())
    for p in procs:
        if p.poll() is None:
            try:
                p.kill()
                p.wait(timeout=5)
            except Exception:
                pass


atexit.register(_kill_all_at_exit)

_setpriv_ok: bool | None = None


def _pdeathsig_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL`` makes QEMU die with the test process even
    if pytest itself is killed (setpriv execs QEMU: the pid stays QEMU's)."""
    global _setpriv_ok
    if _setpriv_ok is None:
        path = shutil.which("setpriv")
        _setpriv_ok = False
        if path:
            try:
                _setpriv_ok = subprocess.run(
                    [path, "--pdeathsig", "KILL", "true"], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    timeout=5).returncode == 0
            except (OSError, subprocess.SubprocessError):
                _setpriv_ok = False
    return ["setpriv", "--pdeathsig", "KILL"] if _setpriv_ok else []


class QemuError(RuntimeError):
    """QEMU did not start, died, or did not become ready."""


class QmpError(QemuError):
    """A QMP command returned an error."""


def _short_tmpdir(prefix: str) -> str:
    """A private temp dir short enough for unix socket paths (108 bytes)."""
    base = tempfile.gettempdir()
    if len(base) > 40:
        base = "/tmp"
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def connect_unix(path: str, timeout_s: float = 10.0,
                 alive: Callable[[], bool] | None = None,
                 kind: int = socket.SOCK_STREAM) -> socket.socket:
    """Connect to a unix socket, retrying until it exists and accepts."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = socket.socket(socket.AF_UNIX, kind)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            s.close()
            if alive is not None and not alive():
                raise QemuError(f"peer died before {path} accepted a connection") from exc
            if time.monotonic() > deadline:
                raise QemuError(f"could not connect to {path} in {timeout_s} s") from exc
            time.sleep(0.005)


def listen_unix(path: str, backlog: int = 4) -> socket.socket:
    """A listening unix stream socket (for the comparator side of a socket on
    which QEMU is the ``reconnect=1`` client)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(backlog)
    return s


# --------------------------------------------------------------------------
# QMP
# --------------------------------------------------------------------------

class QmpClient:
    """Minimal synchronous QMP client over a connected stream socket."""

    def __init__(self, sock: socket.socket, timeout_s: float = 10.0) -> None:
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._sock = sock
        self._sock.settimeout(timeout_s)
        self._file = self._sock.makefile("rb")
        greeting = self._read_message()
        if "QMP" not in greeting:
            raise QemuError(f"unexpected QMP greeting {greeting!r}")
        self.execute("qmp_capabilities")

    def _read_message(self) -> dict:
        while True:
            line = self._file.readline()
            if not line:
                raise QemuError("QMP connection closed")
            msg = json.loads(line)
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def execute(self, command: str, timeout_s: float | None = None, **arguments):
        """Run one command; returns its ``return`` value, raises QmpError."""
        req = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        with self._lock:
            if timeout_s is not None:
                self._sock.settimeout(timeout_s)
            self._sock.sendall(json.dumps(req).encode() + b"\n")
            reply = self._read_message()
        if "error" in reply:
            raise QmpError(f"{command}: {reply['error']}")
        return reply.get("return")

    def close(self) -> None:
        for obj in (self._file, self._sock):
            try:
                obj.close()
            except OSError:
                pass


# --------------------------------------------------------------------------
# Collected items and background readers
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class OutRecord:
    """One record QEMU wrote (outdev, a mirror's chardev, a guest_out)."""
    t: float            #: seconds since the harness's t0, when it was read
    wire: bytes         #: the whole record as on the wire (length word(s) included)
    vnet_hdr_len: int   #: 0 when vnet_hdr_support is off
    header_len: int     #: 4 (vnet off) or 8 (vnet on)

    @property
    def vnet_hdr(self) -> bytes:
        return self.wire[self.header_len:self.header_len + self.vnet_hdr_len]

    @property
    def frame(self) -> bytes:
        return self.wire[self.header_len + self.vnet_hdr_len:]


@dataclass(frozen=True)
class NotifyMessage:
    """One message QEMU wrote on notify_dev (``be32 len`` + ASCII)."""
    t: float
    message: bytes


@dataclass(frozen=True)
class Datagram:
    """One frame that left a guest-less QEMU's dgram netdev."""
    t: float
    frame: bytes


@dataclass(frozen=True)
class TraceLine:
    """One trace line from ``-D trace.log -msg timestamp=on``."""
    t: float        #: seconds since the harness's t0 (QEMU's wall clock vs ours)
    pid: int
    event: str      #: e.g. ``colo_compare_main``
    message: str    #: the whole line without the ``pid@time:`` prefix

    def __str__(self) -> str:
        return self.message


_TRACE_RE = re.compile(r"^(\d+)@(\d+\.\d+):(.*)$")


class _Collector:
    """A list of items appended by reader threads, with a condition to wait on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list = []
        self._eof = False
        self.raw = bytearray()       # every byte read, across reconnects

    def extend(self, items: Iterable, raw: bytes = b"") -> None:
        with self._cond:
            self._items.extend(items)
            self.raw += raw
            self._cond.notify_all()

    def set_eof(self, eof: bool = True) -> None:
        with self._cond:
            self._eof = eof
            self._cond.notify_all()

    @property
    def eof(self) -> bool:
        with self._cond:
            return self._eof

    def items(self) -> list:
        with self._cond:
            return list(self._items)

    def wait(self, n: int, timeout_s: float) -> list:
        """Return as soon as ``n`` items are there, the source hit EOF
        (QEMU died or the connection closed), or the timeout passed."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._items) >= n or self._eof, timeout_s)
            return list(self._items)


class _StreamReader:
    """A thread that reads a stream socket until EOF, feeding a parser."""

    def __init__(self, sock: socket.socket, parse: Callable[[bytes], list],
                 collector: _Collector, name: str) -> None:
        self.sock = sock
        self._parse = parse
        self._collector = collector
        collector.set_eof(False)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    break
                self._collector.extend(self._parse(data), data)
        except OSError:
            pass
        finally:
            self._collector.set_eof(True)

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)
        self.sock.close()


class _DatagramReader:
    """A thread that reads a bound unix datagram socket until stopped."""

    def __init__(self, sock: socket.socket, collector: _Collector, clock: Callable[[], float],
                 name: str) -> None:
        self.sock = sock
        self.sock.settimeout(0.05)
        self._collector = collector
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(1 << 17)
            except socket.timeout:
                continue
            except OSError:
                break
            if self._stop.is_set():
                break
            # an empty datagram is recorded too (QEMU emits one for a
            # zero-length indev record, interop pitfall 10)
            self._collector.extend([Datagram(self._clock(), data)])

    def stop(self) -> None:
        self._stop.set()
        try:        # wake the blocked recv at once instead of at its timeout
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.setblocking(False)
                s.sendto(b"", self.sock.getsockname())
        except OSError:
            pass
        self._thread.join(5)
        self.sock.close()


def _record_parser(vnet_hdr_support: bool, clock: Callable[[], float]) -> Callable[[bytes], list]:
    dec = FrameDecoder(vnet_hdr_support)
    hdr = dec.header_len

    def parse(data: bytes) -> list:
        t = clock()
        return [OutRecord(t, bytes(w), v, hdr) for w, v in dec.feed(data)]
    return parse


def _notify_parser(clock: Callable[[], float]) -> Callable[[bytes], list]:
    # QEMU never puts a vnet word on notify_dev output (observed section 3), so
    # parse strictly with the plain data framing: a stray vnet word would show.
    dec = FrameDecoder(False)

    def parse(data: bytes) -> list:
        t = clock()
        return [NotifyMessage(t, bytes(w[4:])) for w, _ in dec.feed(data)]
    return parse


# --------------------------------------------------------------------------
# One QEMU process
# --------------------------------------------------------------------------

class QemuProcess:
    """One ``qemu-system-x86_64`` process, QMP on a socketpair, its stderr
    (and trace, if any) captured in files in ``workdir``.

    Subclasses add their own arguments; this class owns the lifecycle:
    spawn, QMP handshake, chardev readiness, stderr/trace capture, exit status
    and cleanup.  ``workdir=None`` makes (and later removes) a private dir.
    """

    name = "qemu"

    def __init__(self, *, name: str | None = None, workdir: str | None = None,
                 binary: str | None = None, trace: Iterable[str] = (),
                 start_timeout_s: float = 10.0, extra_args: Iterable[str] = ()) -> None:
        if name:
            self.name = name
        self.binary = binary or QEMU_BINARY
        self._own_workdir = workdir is None
        self.workdir = workdir or _short_tmpdir(f"colo-{self.name}-{os.getpid()}-")
        self.trace_patterns = tuple(trace)
        self.start_timeout_s = start_timeout_s
        self.extra_args = list(extra_args)
        self.stderr_path = self._path("stderr.log")
        self.trace_path = self._path("trace.log")
        self.argv: list[str] = []
        self.qmp_client: QmpClient | None = None
        self._proc: subprocess.Popen | None = None
        self._stderr_file = None
        self._closed = False
        self._stderr_cache: str | None = None
        self._trace_cache: str | None = None
        self.t0 = time.monotonic()
        self.t0_wall = time.time()

    # -- helpers for subclasses --------------------------------------------
    def _path(self, leaf: str) -> str:
        return os.path.join(self.workdir, f"{self.name}-{leaf}")

    def qemu_args(self) -> list[str]:
        """Device/object arguments; subclasses override."""
        return []

    def now(self) -> float:
        """Seconds since t0 (set when the instance became ready)."""
        return time.monotonic() - self.t0

    def mark_t0(self) -> None:
        self.t0 = time.monotonic()
        self.t0_wall = time.time()

    # -- lifecycle ---------------------------------------------------------
    def spawn(self) -> None:
        """Start the process and complete the QMP handshake."""
        argv = [self.binary, "-machine", "none", "-nodefaults", "-display", "none",
                "-no-user-config", "-name", f"{self.name},debug-threads=on"]
        # QMP over a socketpair handed to QEMU as an already connected client
        # chardev.  Not a listening socket: QEMU 7.2 moves a QMP monitor's
        # listener to its "mon_iothread" from a bottom half, and a client
        # that connects in that window can be accepted by that thread while
        # the main thread, woken too, blocks for good in accept() on the
        # blocking listener.  QMP then never answers: greeting received,
        # qmp_capabilities unanswered, main thread in accept4 (measured: 6
        # hangs in 3000 starts when connecting as early as possible; 0 in
        # 3000 with the socketpair).  A pre-connected socket has no listener.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv += ["-chardev", f"socket,id=qmp0,fd={theirs.fileno()}",
                 "-mon", "chardev=qmp0,mode=control"]
        for pattern in self.trace_patterns:
            argv += ["-trace", f"enable={pattern}"]
        if self.trace_patterns:
            argv += ["-D", self.trace_path]
        argv += ["-msg", "timestamp=on"]
        argv += self.qemu_args() + self.extra_args
        self.argv = argv
        self._stderr_file = open(self.stderr_path, "wb")
        try:
            self._proc = subprocess.Popen(_pdeathsig_prefix() + argv, stdin=subprocess.DEVNULL,
                                          stdout=self._stderr_file, stderr=subprocess.STDOUT,
                                          cwd=self.workdir, pass_fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        with _live_lock:
            _live[self._proc.pid] = self._proc
        try:
            self.qmp_client = QmpClient(ours, self.start_timeout_s)
        except (QemuError, OSError, ValueError) as exc:
            ours.close()
            time.sleep(0.05)
            raise QemuError(f"{self.name}: QEMU did not start (rc={self.returncode}): "
                            f"{exc!r}; stderr: {self.stderr_text().strip()}\n"
                            f"argv: {' '.join(argv)}\n{self.diagnose()}") from exc

    def diagnose(self) -> str:
        """What every QEMU thread is doing (for hang reports): name, state
        and kernel wait channel, plus a gdb backtrace when gdb is installed."""
        if not self.is_alive():
            return f"process exited rc={self.returncode}"
        lines = []
        task_dir = f"/proc/{self.pid}/task"
        try:
            for tid in sorted(os.listdir(task_dir), key=int):
                try:
                    with open(f"{task_dir}/{tid}/stat") as f:
                        stat = f.read()
                    with open(f"{task_dir}/{tid}/wchan") as f:
                        wchan = f.read()
                except OSError:
                    continue
                comm = stat[stat.index("(") + 1:stat.rindex(")")]
                state = stat[stat.rindex(")") + 2]
                lines.append(f"  thread {tid} {comm!r} state={state} wchan={wchan}")
        except OSError as exc:
            lines.append(f"  cannot list threads: {exc}")
        gdb = shutil.which("gdb")
        if gdb:
            try:
                out = subprocess.run([gdb, "-p", str(self.pid), "-batch", "-ex",
                                      "thread apply all bt"], stdin=subprocess.DEVNULL,
                                     capture_output=True, text=True, timeout=60)
                lines.append(out.stdout[-20000:])
            except (OSError, subprocess.SubprocessError) as exc:
                lines.append(f"  gdb failed: {exc}")
        return "threads:\n" + "\n".join(lines)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """None while running; QEMU's exit status afterwards (-6 = SIGABRT)."""
        return self._proc.poll() if self._proc else None

    def wait_exit(self, timeout_s: float = 5.0) -> int | None:
        try:
            return self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def qmp(self, command: str, **arguments):
        if self.qmp_client is None:
            raise QemuError("QMP is not connected")
        return self.qmp_client.execute(command, **arguments)

    def chardevs(self) -> dict[str, str]:
        """label -> filename from ``query-chardev``."""
        return {c["label"]: c["filename"] for c in self.qmp("query-chardev")}

    def wait_chardevs(self, labels: Iterable[str], connected: bool = True,
                      timeout_s: float = 10.0) -> dict[str, str]:
        """Poll ``query-chardev`` until every label is connected (or every
        label is disconnected, with ``connected=False``)."""
        labels = list(labels)
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.is_alive():
                raise QemuError(f"{self.name} died (rc={self.returncode}): {self.stderr_text()}")
            state = self.chardevs()
            missing = [lb for lb in labels if lb not in state]
            if missing:
                raise QemuError(f"{self.name}: no chardev {missing}")
            pending = [lb for lb in labels
                       if state[lb].startswith("disconnected:") == connected]
            if not pending:
                return state
            if time.monotonic() > deadline:
                raise QemuError(f"{self.name}: chardevs not "
                                f"{'connected' if connected else 'disconnected'} "
                                f"after {timeout_s} s: {state}")
            time.sleep(0.005)

    def stderr_text(self) -> str:
        """Everything QEMU wrote to stdout/stderr so far."""
        if self._stderr_cache is not None:
            return self._stderr_cache
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def wait_stderr(self, text: str, timeout_s: float = 5.0) -> bool:
        """Poll stderr until ``text`` appears (stderr has no other signal)."""
        return self._poll(lambda: text in self.stderr_text(), timeout_s)

    def _trace_text(self) -> str:
        if self._trace_cache is not None:
            return self._trace_cache
        try:
            with open(self.trace_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def trace_lines(self) -> list[TraceLine]:
        """Parsed trace lines; times relative to t0 (QEMU's wall clock)."""
        out = []
        for line in self._trace_text().splitlines():
            m = _TRACE_RE.match(line)
            if m is None:
                if line.strip():
                    out.append(TraceLine(float("nan"), 0, line.split(" ", 1)[0], line))
                continue
            msg = m.group(3)
            out.append(TraceLine(float(m.group(2)) - self.t0_wall, int(m.group(1)),
                                 msg.split(" ", 1)[0], msg))
        return out

    def trace_count(self, text: str) -> int:
        return sum(text in t.message for t in self.trace_lines())

    def wait_trace(self, text: str, count: int = 1, timeout_s: float = 5.0) -> bool:
        """Poll the trace file until ``text`` occurs ``count`` times."""
        return self._poll(lambda: self.trace_count(text) >= count, timeout_s)

    @staticmethod
    def _poll(pred: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not pred():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def settle(self, seconds: float) -> None:
        """Wait for *nothing* to happen (the only fixed sleep in the harness)."""
        time.sleep(seconds)

    def _stop_io(self) -> None:
        """Subclasses stop their readers and close their sockets here."""

    def close(self) -> None:
        """Stop QEMU (QMP quit, then SIGKILL), stop readers, remove files.
        Safe to call more than once and after QEMU died."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._proc is not None and self._proc.poll() is None:
                try:
                    if self.qmp_client is not None:
                        self.qmp_client.execute("quit", timeout_s=2.0)
                except Exception:
                    pass
                try:
                    self._proc.wait(3.0)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(5.0)
        finally:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait(5.0)
            if self._proc is not None:
                with _live_lock:
                    _live.pop(self._proc.pid, None)
            if self.qmp_client is not None:
                self.qmp_client.close()
            self._stop_io()
            if self._stderr_file is not None:
                self._stderr_file.close()
            self._stderr_cache = self.stderr_text()
            self._trace_cache = self._trace_text()
            if self._own_workdir and not KEEP_WORKDIRS:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        try:
            self.spawn()
            self.mark_t0()
        except BaseException:
            self.close()
            raise


# --------------------------------------------------------------------------
# Part 1: QEMU's colo-compare as a reference comparator
# --------------------------------------------------------------------------

class QemuColoCompare(QemuProcess):
    """QEMU 7.2's ``colo-compare`` object, driven over its sockets.

    QEMU is the server on every chardev (``server=on,wait=off``); the harness
    connects outdev and notify_dev first, then primary_in and secondary_in,
    and waits until ``query-chardev`` shows all of them connected.  ``t0``
    (the zero of every timestamp) is the moment it became ready.

    ``transport="unix"`` (default) uses unix sockets in the private temp dir;
    ``"tcp"`` uses 127.0.0.1 ports picked by the kernel.

    Numeric properties left as ``None`` keep QEMU's defaults
    (compare_timeout 3000 ms, expired_scan_cycle 1000 ms, max_queue_size
    1024).  Note that 0 for any of them aborts QEMU (observed section 1).
    """

    name = "colo"
    CHARDEVS = ("pri", "sec", "out", "ntf")

    def __init__(self, *, notify: bool = True, vnet_hdr_support: bool = False,
                 compare_timeout: int | None = None, expired_scan_cycle: int | None = None,
                 max_queue_size: int | None = None, transport: str = "unix",
                 trace: bool = True, **kwargs) -> None:
        super().__init__(trace=TRACE_PATTERNS if trace else (), **kwargs)
        if transport not in ("unix", "tcp"):
            raise ValueError(f"transport must be 'unix' or 'tcp', not {transport!r}")
        self.notify_enabled = notify
        self.vnet_hdr_support = bool(vnet_hdr_support)
        self.compare_timeout = compare_timeout
        self.expired_scan_cycle = expired_scan_cycle
        self.max_queue_size = max_queue_size
        self.transport = transport
        self._addr: dict[str, object] = {}
        self._socks: dict[str, socket.socket] = {}
        self._readers: dict[str, _StreamReader] = {}
        self._out = _Collector()
        self._notify = _Collector()
        self._send_lock = threading.Lock()
        #: every send: (t, channel, bytes on the wire)
        self.sent: list[tuple[float, str, bytes]] = []

    # -- command line ------------------------------------------------------
    def _labels(self) -> list[str]:
        return [lb for lb in self.CHARDEVS if lb != "ntf" or self.notify_enabled]

    def _pick_addresses(self) -> None:
        for lb in self._labels():
            if self.transport == "unix":
                self._addr[lb] = self._path(f"{lb}.sock")
            else:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", 0))
                    self._addr[lb] = ("127.0.0.1", s.getsockname()[1])

    def qemu_args(self) -> list[str]:
        args = []
        for lb in self._labels():
            addr = self._addr[lb]
            where = f"path={addr}" if self.transport == "unix" else f"host={addr[0]},port={addr[1]}"
            args += ["-chardev", f"socket,id={lb},{where},server=on,wait=off"]
        props = ["colo-compare", "id=comp0", "primary_in=pri", "secondary_in=sec",
                 "outdev=out", "iothread=iothread1"]
        if self.notify_enabled:
            props.append("notify_dev=ntf")
        for key in ("compare_timeout", "expired_scan_cycle", "max_queue_size"):
            value = getattr(self, key)
            if value is not None:
                props.append(f"{key}={int(value)}")
        if self.vnet_hdr_support:
            props.append("vnet_hdr_support=on")
        args += ["-object", "iothread,id=iothread1", "-object", ",".join(props)]
        return args

    # -- connections -------------------------------------------------------
    def _connect(self, label: str, timeout_s: float) -> socket.socket:
        addr = self._addr[label]
        if self.transport == "unix":
            return connect_unix(addr, timeout_s, self.is_alive)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return socket.create_connection(addr, timeout=timeout_s)
            except ConnectionRefusedError:
                if not self.is_alive() or time.monotonic() > deadline:
                    raise QemuError(f"cannot connect to {label} at {addr}")
                time.sleep(0.005)

    def _attach(self, label: str, sock: socket.socket) -> None:
        sock.settimeout(None)
        self._socks[label] = sock
        if label == "out":
            self._readers[label] = _StreamReader(
                sock, _record_parser(self.vnet_hdr_support, self.now), self._out, "colo-outdev")
        elif label == "ntf":
            self._readers[label] = _StreamReader(
                sock, _notify_parser(self.now), self._notify, "colo-notify")
        else:
            sock.settimeout(10.0)   # QEMU reads its inputs; a stuck send fails

    def spawn(self) -> None:
        last: Exception | None = None
        for _attempt in range(3):       # a TCP port may be taken between pick and bind
            self._pick_addresses()
            try:
                super().spawn()
                break
            except QemuError as exc:
                last = exc
                if self.transport != "tcp" or "in use" not in str(exc):
                    raise
                if self._stderr_file is not None:
                    self._stderr_file.close()
                if self._proc is not None:
                    self._proc.wait(5.0)
                    with _live_lock:
                        _live.pop(self._proc.pid, None)
                if self.qmp_client is not None:
                    self.qmp_client.close()
                    self.qmp_client = None
                self._proc = None
        else:
            raise last  # type: ignore[misc]
        # Outputs first: a release to an unconnected outdev is lost (observed §2).
        order = ["out", "ntf", "pri", "sec"]
        for label in order:
            if label in self._addr:
                self._attach(label, self._connect(label, self.start_timeout_s))
        self.wait_chardevs(self._labels(), True, self.start_timeout_s)

    # -- input -------------------------------------------------------------
    def _side_label(self, side: str) -> str:
        try:
            return "pri" if _SIDES[side.lower()] == PRIMARY else "sec"
        except KeyError:
            raise ValueError(f"side must be primary or secondary, not {side!r}") from None

    def _write(self, label: str, data: bytes) -> None:
        with self._send_lock:
            self.sent.append((self.now(), label, bytes(data)))
            self._socks[label].sendall(data)

    def send(self, side: str, frame: bytes, vnet_hdr: bytes | None = None) -> bytes:
        """Send one framed record.  With vnet_hdr_support on, ``vnet_hdr=None``
        sends a zero vnet_hdr_len word.  Returns the bytes sent."""
        if self.vnet_hdr_support and vnet_hdr is None:
            vnet_hdr = b""
        if not self.vnet_hdr_support and vnet_hdr is not None:
            raise ValueError("vnet_hdr given but vnet_hdr_support is off (use send_raw)")
        wire = encode(frame, vnet_hdr)
        self._write(self._side_label(side), wire)
        return wire

    def send_raw(self, side: str, data: bytes) -> None:
        """Send bytes as they are on primary_in/secondary_in (malformed input)."""
        self._write(self._side_label(side), data)

    def send_notify(self, message: bytes, vnet_word: bool | None = None) -> bytes:
        """Send a notify_dev message.  QEMU parses notify input with the data
        framing, so with vnet_hdr_support on it needs a vnet word (observed
        section 3); ``vnet_word=None`` adds one exactly then."""
        if not self.notify_enabled:
            raise QemuError("started without notify_dev")
        if vnet_word is None:
            vnet_word = self.vnet_hdr_support
        wire = encode(message, b"") if vnet_word else encode_notify(message)
        self._write("ntf", wire)
        return wire

    def send_notify_raw(self, data: bytes) -> None:
        self._write("ntf", data)

    def reconnect(self, side: str, timeout_s: float = 5.0) -> None:
        """Close one connection, wait until QEMU sees it gone, connect anew and
        wait until QEMU shows it connected.  ``side``: primary, secondary,
        outdev or notify.  Parser state inside QEMU survives (observed j5)."""
        alias = {"outdev": "out", "out": "out", "notify": "ntf", "ntf": "ntf",
                 "notify_dev": "ntf"}
        label = alias.get(side.lower()) or self._side_label(side)
        reader = self._readers.pop(label, None)
        if reader is not None:
            reader.stop()
        else:
            self._socks[label].close()
        self.wait_chardevs([label], connected=False, timeout_s=timeout_s)
        self._attach(label, self._connect(label, timeout_s))
        self.wait_chardevs([label], connected=True, timeout_s=timeout_s)

    # -- output ------------------------------------------------------------
    @property
    def outdev(self) -> list[OutRecord]:
        return self._out.items()

    @property
    def notifications(self) -> list[NotifyMessage]:
        return self._notify.items()

    @property
    def outdev_raw(self) -> bytes:
        """Every byte read from outdev so far (all connections)."""
        with self._out._cond:
            return bytes(self._out.raw)

    @property
    def notify_raw(self) -> bytes:
        """Every byte read from notify_dev so far (all connections)."""
        with self._notify._cond:
            return bytes(self._notify.raw)

    def wait_outdev(self, n: int, timeout_s: float = 5.0) -> list[OutRecord]:
        """Records so far, as soon as there are ``n`` (or on timeout / EOF)."""
        return self._out.wait(n, timeout_s)

    def wait_notify(self, n: int, timeout_s: float = 5.0) -> list[NotifyMessage]:
        return self._notify.wait(n, timeout_s)

    def _stop_io(self) -> None:
        for reader in self._readers.values():
            reader.stop()
        self._readers.clear()
        for sock in self._socks.values():
            try:
                sock.close()
            except OSError:
                pass


# --------------------------------------------------------------------------
# Part 2: guest-less QEMU as producer / consumer of a comparator's sockets
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    """A unix socket of the comparator and the role the **comparator** plays
    on it: ``"client"`` (QEMU listens, the comparator connects) or
    ``"server"`` (the comparator listens, QEMU connects with reconnect=1)."""
    path: str
    role: str


@dataclass(frozen=True)
class ComparatorEndpoints:
    primary_in: Endpoint
    secondary_in: Endpoint
    outdev: Endpoint
    vnet_hdr_support: bool


def _chardev(label: str, path: str, qemu_role: str) -> list[str]:
    if qemu_role == "server":
        return ["-chardev", f"socket,id={label},path={path},server=on,wait=off"]
    if qemu_role == "client":
        return ["-chardev", f"socket,id={label},path={path},reconnect=1"]
    raise ValueError(f"role must be 'server' or 'client', not {qemu_role!r}")


def _other(role: str) -> str:
    if role not in ("server", "client"):
        raise ValueError(f"role must be 'server' or 'client', not {role!r}")
    return "client" if role == "server" else "server"


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


class GuestlessQemu(QemuProcess):
    """``-machine none`` with a dgram netdev ``n0`` on unix datagram sockets
    and two hubports (hp0 is n0's peer; hp1 has none, so the hub always
    accepts and discards).  Interop doc section 1.

    * :meth:`inject` sends a frame into n0 (it travels toward the "guest":
      ``queue=tx`` filters see it);
    * :meth:`received` returns the frames n0 emitted (``queue=rx`` traffic
      that left the backend), read continuously by a background thread.

    ``streams`` lists the server chardevs that the harness itself connects
    to: ``{label: (path, "read"|"write")}``; "read" ones are decoded into
    :class:`OutRecord` lists (see :meth:`records`), "write" ones are for
    :meth:`write`.
    """

    name = "guestless"

    def __init__(self, *, args: Iterable[str] = (), vnet_hdr_support: bool = False,
                 streams: dict[str, tuple[str, str]] | None = None,
                 ready_chardevs: Iterable[str] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.vnet_hdr_support = bool(vnet_hdr_support)
        self.device_args = list(args)
        self.streams = dict(streams or {})
        self.ready_chardevs = list(ready_chardevs)
        self.netdev_path = self._path("qemu.dg")     # QEMU's end (we send here)
        self.py_path = self._path("py.dg")           # our end (QEMU sends here)
        self._rx = _Collector()
        self._rx_reader: _DatagramReader | None = None
        self._tx_sock: socket.socket | None = None
        self._stream_socks: dict[str, socket.socket] = {}
        self._stream_readers: dict[str, _StreamReader] = {}
        self._stream_out: dict[str, _Collector] = {}

    def qemu_args(self) -> list[str]:
        return ["-netdev", "dgram,id=n0,local.type=unix,local.path=" + self.netdev_path
                + ",remote.type=unix,remote.path=" + self.py_path,
                "-netdev", "hubport,id=hp0,hubid=0,netdev=n0",
                "-netdev", "hubport,id=hp1,hubid=0"] + self.device_args

    def spawn(self) -> None:
        # Bind our datagram end first, so n0's first emission has a receiver.
        rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        rx.bind(self.py_path)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._rx_reader = _DatagramReader(rx, self._rx, self.now, f"{self.name}-netdev-rx")
        self._tx_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._tx_sock.settimeout(10.0)
        super().spawn()

    def connect_streams(self, timeout_s: float = 10.0) -> None:
        """Connect to the harness-owned server chardevs (``streams``)."""
        for label, (path, mode) in self.streams.items():
            if label in self._stream_socks:
                continue
            sock = connect_unix(path, timeout_s, self.is_alive)
            self._stream_socks[label] = sock
            if mode == "read":
                coll = self._stream_out.setdefault(label, _Collector())
                self._stream_readers[label] = _StreamReader(
                    sock, _record_parser(self.vnet_hdr_support, self.now), coll,
                    f"{self.name}-{label}")
            else:
                sock.settimeout(10.0)

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Wait until every chardev in ``ready_chardevs`` is connected.  Those
        the comparator connects to (or listens on) are included, so call this
        after the comparator is up."""
        self.wait_chardevs(self.ready_chardevs, True, timeout_s)

    def start(self) -> None:
        """Spawn and connect the harness's own streams; does *not* wait for
        the comparator (see :meth:`wait_ready`)."""
        try:
            self.spawn()
            self.connect_streams(self.start_timeout_s)
            self.mark_t0()
        except BaseException:
            self.close()
            raise

    # -- netdev --------------------------------------------------------------
    def inject(self, frame: bytes) -> None:
        """Send one frame into n0 (blocks while QEMU's queue is full: lossless)."""
        self._tx_sock.sendto(frame, self.netdev_path)

    def received(self) -> list[bytes]:
        """Frames that left n0 so far, in order."""
        return [d.frame for d in self._rx.items()]

    def received_datagrams(self) -> list[Datagram]:
        return self._rx.items()

    def wait_received(self, n: int, timeout_s: float = 10.0) -> list[bytes]:
        return [d.frame for d in self._rx.wait(n, timeout_s)]

    # -- harness-owned chardev streams --------------------------------------
    def write(self, label: str, frame: bytes) -> bytes:
        """Write one record (framed per vnet_hdr_support, vnet_hdr_len 0)."""
        wire = encode(frame, b"" if self.vnet_hdr_support else None)
        self._stream_socks[label].sendall(wire)
        return wire

    def records(self, label: str) -> list[OutRecord]:
        return self._stream_out[label].items()

    def wait_records(self, label: str, n: int, timeout_s: float = 10.0) -> list[OutRecord]:
        return self._stream_out[label].wait(n, timeout_s)

    def _stop_io(self) -> None:
        for reader in self._stream_readers.values():
            reader.stop()
        for sock in self._stream_socks.values():
            try:
                sock.close()
            except OSError:
                pass
        if self._rx_reader is not None:
            self._rx_reader.stop()
        if self._tx_sock is not None:
            self._tx_sock.close()


class QemuProducer(GuestlessQemu):
    """netdev -> ``filter-mirror`` (queue=tx) -> chardev ``out0``.

    Frames given to :meth:`inject` come out of ``out0`` framed as
    colo-compare reads them (vnet_hdr_len is always 0 with a dgram netdev,
    interop section 2).  ``qemu_role`` is QEMU's role on ``out_path``:
    "server" (the comparator connects) or "client" (``reconnect=1``; the
    comparator listens).  ``filter="filter-redirector"`` also works and, unlike
    the mirror, consumes the frame.
    """

    name = "producer"

    def __init__(self, out_path: str, *, qemu_role: str = "server",
                 vnet_hdr_support: bool = False, filter: str = "filter-mirror",
                 **kwargs) -> None:
        self.out_path = out_path
        self.qemu_role = qemu_role
        args = _chardev("out0", out_path, qemu_role) + [
            "-object", f"{filter},id=m0,netdev=n0,queue=tx,outdev=out0,"
                       f"vnet_hdr_support={_onoff(vnet_hdr_support)}"]
        super().__init__(args=args, vnet_hdr_support=vnet_hdr_support,
                         ready_chardevs=["out0"], **kwargs)

    @property
    def endpoint(self) -> Endpoint:
        """The comparator's view of ``out_path``."""
        return Endpoint(self.out_path, _other(self.qemu_role))


class QemuConsumer(GuestlessQemu):
    """chardev ``in0`` -> ``filter-redirector`` (queue=rx, indev) -> netdev.

    Every record written to ``in_path`` leaves n0 as one datagram, byte for
    byte (:meth:`received`).  The vnet_hdr_len word is parsed and ignored:
    all ``len`` bytes leave (interop pitfall 9).  ``qemu_role`` as for
    :class:`QemuProducer`.  An indev serves one connection only (pitfall 5).
    """

    name = "consumer"

    def __init__(self, in_path: str, *, qemu_role: str = "server",
                 vnet_hdr_support: bool = False, **kwargs) -> None:
        self.in_path = in_path
        self.qemu_role = qemu_role
        args = _chardev("in0", in_path, qemu_role) + [
            "-object", f"filter-redirector,id=r0,netdev=n0,queue=rx,indev=in0,"
                       f"vnet_hdr_support={_onoff(vnet_hdr_support)}"]
        super().__init__(args=args, vnet_hdr_support=vnet_hdr_support,
                         ready_chardevs=["in0"], **kwargs)

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.in_path, _other(self.qemu_role))


class QemuGroup:
    """A temp dir plus the QEMUs that live in it; closes them all (reverse
    order) and removes the dir on exit, even when the test failed."""

    def __init__(self, prefix: str = "colo-grp-") -> None:
        self.dir = _short_tmpdir(f"{prefix}{os.getpid()}-")
        self.members: list[QemuProcess] = []

    def path(self, leaf: str) -> str:
        return os.path.join(self.dir, leaf)

    def add(self, proc: QemuProcess) -> QemuProcess:
        self.members.append(proc)
        return proc

    def close(self) -> None:
        errors = []
        for proc in reversed(self.members):
            try:
                proc.close()
            except Exception as exc:    # keep closing the others
                errors.append(exc)
        if not KEEP_WORKDIRS:
            shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise errors[0]

    def __enter__(self) -> "QemuGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Chain:
    """Interop section 4: producer P, producer S, consumer R around a comparator.

    ``endpoints`` says where and how the comparator connects.  Sequence::

        chain = build_chain(group, vnet_hdr_support=True)
        comparator = MyComparator(chain.endpoints)   # listens on its "server" sockets
        chain.start()                                # QEMUs up, QMP answering
        comparator.connect()                         # its "client" sockets
        chain.wait_ready()                           # all chardevs connected
        for f in frames: chain.primary.inject(f); chain.secondary.inject(f)
        assert chain.release.wait_received(len(frames)) == frames
    """
    primary: QemuProducer
    secondary: QemuProducer
    release: QemuConsumer
    endpoints: ComparatorEndpoints

    @property
    def processes(self) -> list[GuestlessQemu]:
        return [self.primary, self.secondary, self.release]

    def start(self) -> None:
        for proc in self.processes:
            proc.start()

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        for proc in self.processes:
            proc.wait_ready(timeout_s)


def build_chain(group: QemuGroup, *, vnet_hdr_support: bool = False,
                primary_in_role: str = "client", secondary_in_role: str = "server",
                outdev_role: str = "client") -> Chain:
    """Create (not start) the three QEMUs of interop section 4.

    Roles are the **comparator's** (the defaults are the section 4 setup):

    ========== =========== ====================== ============================
    socket     comparator  QEMU                   QEMU's filter
    ========== =========== ====================== ============================
    primary_in client      P: server (``pri_out``) filter-mirror queue=tx outdev
    secondary  **server**  S: client, reconnect=1 filter-mirror queue=tx outdev
    outdev     client      R: server (``cmp_out``) filter-redirector queue=rx indev
    ========== =========== ====================== ============================
    """
    d = group.dir
    primary = QemuProducer(os.path.join(d, "pri_out.sock"), qemu_role=_other(primary_in_role),
                           vnet_hdr_support=vnet_hdr_support, name="primary", workdir=d)
    secondary = QemuProducer(os.path.join(d, "sec_in.sock"), qemu_role=_other(secondary_in_role),
                             vnet_hdr_support=vnet_hdr_support, name="secondary", workdir=d)
    release = QemuConsumer(os.path.join(d, "cmp_out.sock"), qemu_role=_other(outdev_role),
                           vnet_hdr_support=vnet_hdr_support, name="release", workdir=d)
    for proc in (primary, secondary, release):
        group.add(proc)
    endpoints = ComparatorEndpoints(primary.endpoint, secondary.endpoint, release.endpoint,
                                    vnet_hdr_support)
    return Chain(primary, secondary, release, endpoints)


@dataclass
class ColoWiring:
    """Interop section 4b: the documented COLO wiring with guests replaced by
    sockets that the harness drives.

    Primary QEMU (filters in this order -- it matters, see the doc):
      * ``m0``      filter-mirror     queue=tx outdev=mirror0      (client traffic -> secondary)
      * ``redire0`` filter-redirector queue=rx indev=compare_out   (comparator outdev -> network)
      * ``redire1`` filter-redirector queue=rx outdev=compare0     (guest output -> primary_in)
      * ``gout``    filter-redirector queue=tx outdev=guest_out    (what the primary guest receives)
      * ``gin``     filter-redirector queue=rx indev=guest_in      (what the primary guest sends)

    Secondary QEMU:
      * ``f1``   filter-redirector queue=tx indev=red0 (client of mirror0.sock)
      * ``f2``   filter-redirector queue=rx outdev=red1 (client of the comparator's secondary_in)
      * ``gout`` / ``gin`` as on the primary.

    The primary QEMU both produces primary_in and consumes outdev from **one
    main loop**: a comparator that blocks writing outdev while not reading
    primary_in deadlocks it (interop pitfall 8).

    Comparator roles (defaults, as in ``docs/COLO-FT.txt``):

    ============ =========== ================= =========================
    socket       comparator  QEMU              file
    ============ =========== ================= =========================
    primary_in   client      primary, server   ``compare0.sock``
    secondary_in **server**  secondary, client ``compare1.sock``
    outdev       client      primary, server   ``compare_out.sock``
    ============ =========== ================= =========================

    Driving it:
      * :meth:`client_send` -- a frame from the network client into the
        primary's netdev; it reaches both ``guest_out`` streams
        (:meth:`guest_received`);
      * :meth:`guest_send` -- a frame sent by a guest; it reaches the
        comparator as primary_in / secondary_in;
      * :meth:`client_received` -- frames the comparator released, as they
        left the primary's netdev.
    """
    primary: GuestlessQemu
    secondary: GuestlessQemu
    endpoints: ComparatorEndpoints

    @property
    def processes(self) -> list[GuestlessQemu]:
        return [self.primary, self.secondary]

    def start(self) -> None:
        """Start the primary, then the secondary (it connects to the
        primary's mirror0), and connect the guest sockets."""
        self.primary.start()
        self.secondary.start()

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        for proc in self.processes:
            proc.wait_ready(timeout_s)

    def _vm(self, side: str) -> GuestlessQemu:
        return self.primary if _SIDES[side.lower()] == PRIMARY else self.secondary

    def client_send(self, frame: bytes) -> None:
        self.primary.inject(frame)

    def client_received(self) -> list[bytes]:
        return self.primary.received()

    def wait_client_received(self, n: int, timeout_s: float = 10.0) -> list[bytes]:
        return self.primary.wait_received(n, timeout_s)

    def guest_send(self, side: str, frame: bytes) -> bytes:
        return self._vm(side).write("guest_in", frame)

    def guest_received(self, side: str) -> list[OutRecord]:
        return self._vm(side).records("guest_out")

    def wait_guest_received(self, side: str, n: int, timeout_s: float = 10.0) -> list[OutRecord]:
        return self._vm(side).wait_records("guest_out", n, timeout_s)


def build_colo_wiring(group: QemuGroup, *, vnet_hdr_support: bool = False,
                      primary_in_role: str = "client", secondary_in_role: str = "server",
                      outdev_role: str = "client",
                      primary_in_path: str | None = None, secondary_in_path: str | None = None,
                      outdev_path: str | None = None, primary_extra_args: Iterable[str] = (),
                      secondary_extra_args: Iterable[str] = ()) -> ColoWiring:
    """Create (not start) the two QEMUs of interop section 4b.

    ``primary_extra_args`` / ``secondary_extra_args`` go on each QEMU's
    command line (a COLO pair: ``colo_pair.ColoPair.primary_args``).

    Paths default to ``compare0.sock``, ``compare1.sock`` and
    ``compare_out.sock`` in ``group.dir``; roles are the comparator's (see
    :class:`ColoWiring` for the table).  Sequence as for :class:`Chain`:
    build, let the comparator listen, ``start()``, comparator connects,
    ``wait_ready()``.
    """
    d = group.dir
    v = _onoff(vnet_hdr_support)
    pri_in = primary_in_path or os.path.join(d, "compare0.sock")
    sec_in = secondary_in_path or os.path.join(d, "compare1.sock")
    out = outdev_path or os.path.join(d, "compare_out.sock")
    mirror = os.path.join(d, "mirror0.sock")
    streams_p = {"guest_in": (os.path.join(d, "p-guest_in.sock"), "write"),
                 "guest_out": (os.path.join(d, "p-guest_out.sock"), "read")}
    streams_s = {"guest_in": (os.path.join(d, "s-guest_in.sock"), "write"),
                 "guest_out": (os.path.join(d, "s-guest_out.sock"), "read")}

    def guest_chardevs(streams):
        return (_chardev("guest_in", streams["guest_in"][0], "server")
                + _chardev("guest_out", streams["guest_out"][0], "server"))

    def filt(kind: str, fid: str, queue: str, **chardev: str) -> list[str]:
        (direction, label), = chardev.items()
        return ["-object", f"{kind},id={fid},netdev=n0,queue={queue},{direction}={label},"
                           f"vnet_hdr_support={v}"]

    # Declaration order matters: tx runs filters in this order, rx in reverse,
    # and an indev injects at its own position (interop section 4b).
    p_args = (_chardev("mirror0", mirror, "server")
              + _chardev("compare0", pri_in, _other(primary_in_role))
              + _chardev("compare_out", out, _other(outdev_role))
              + guest_chardevs(streams_p)
              + filt("filter-mirror", "m0", "tx", outdev="mirror0")
              + filt("filter-redirector", "redire0", "rx", indev="compare_out")
              + filt("filter-redirector", "redire1", "rx", outdev="compare0")
              + filt("filter-redirector", "gout", "tx", outdev="guest_out")
              + filt("filter-redirector", "gin", "rx", indev="guest_in"))
    s_args = (_chardev("red0", mirror, "client")
              + _chardev("red1", sec_in, _other(secondary_in_role))
              + guest_chardevs(streams_s)
              + filt("filter-redirector", "f1", "tx", indev="red0")
              + filt("filter-redirector", "f2", "rx", outdev="red1")
              + filt("filter-redirector", "gout", "tx", outdev="guest_out")
              + filt("filter-redirector", "gin", "rx", indev="guest_in"))
    primary = GuestlessQemu(args=p_args, vnet_hdr_support=vnet_hdr_support, streams=streams_p,
                            ready_chardevs=["mirror0", "compare0", "compare_out",
                                            "guest_in", "guest_out"],
                            name="colo-primary", workdir=d, extra_args=primary_extra_args)
    secondary = GuestlessQemu(args=s_args, vnet_hdr_support=vnet_hdr_support, streams=streams_s,
                              ready_chardevs=["red0", "red1", "guest_in", "guest_out"],
                              name="colo-secondary", workdir=d,
                              extra_args=secondary_extra_args)
    group.add(primary)
    group.add(secondary)
    endpoints = ComparatorEndpoints(Endpoint(pri_in, primary_in_role),
                                    Endpoint(sec_in, secondary_in_role),
                                    Endpoint(out, outdev_role), vnet_hdr_support)
    return ColoWiring(primary, secondary, endpoints)
