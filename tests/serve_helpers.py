"""Helpers for the loopback tests of ``colo-compare serve`` (tests/test_serve.py).

The real CLI runs as a subprocess; the tests play QEMU (writers on
primary-in and secondary-in, a reader on outdev) and Xen (notify-dev) with
plain sockets.  Nothing here sleeps a fixed time: every wait is a poll of a
condition with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

from colo_cli.core.framing import encode

PY = sys.executable
TIMEOUT = 10.0            # the default deadline of every wait


# -- waiting -----------------------------------------------------------------------

def wait_until(pred, timeout: float = TIMEOUT, what: str = "a condition", interval: float = 0.003):
    """Poll ``pred`` until it returns something true; AssertionError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- records -----------------------------------------------------------------------

def rec(frame: bytes, vnet_hdr: bytes | None = None) -> bytes:
    """One record as QEMU writes it (``vnet_hdr=None``: vnet off)."""
    return encode(frame, vnet_hdr)


def split_records(buf: bytes, vnet: bool = False) -> tuple[list[bytes], bytes]:
    """Whole records (length words included) and the bytes left over."""
    hdr = 8 if vnet else 4
    out = []
    pos = 0
    while len(buf) - pos >= hdr:
        (length,) = struct.unpack_from(">I", buf, pos)
        stop = pos + hdr + length
        if stop > len(buf):
            break
        out.append(bytes(buf[pos:stop]))
        pos = stop
    return out, bytes(buf[pos:])


def split_notify(buf: bytes) -> list[bytes]:
    """Notify messages as a comparator writes them: be32 length + ASCII."""
    out = []
    pos = 0
    while len(buf) - pos >= 4:
        (length,) = struct.unpack_from(">I", buf, pos)
        if len(buf) - pos - 4 < length:
            break
        out.append(bytes(buf[pos + 4:pos + 4 + length]))
        pos += 4 + length
    return out


# -- endpoints ---------------------------------------------------------------------

def unix_ep(directory: str, name: str, server: bool = True) -> tuple[str, str]:
    path = os.path.join(directory, name)
    assert len(path.encode()) < 100, path
    return f"unix:{path}" + (",server" if server else ""), path


def tcp_ep(port: int, server: bool = True) -> str:
    return f"tcp:127.0.0.1:{port}" + (",server" if server else "")


def connect(ep: str, timeout: float = TIMEOUT) -> socket.socket:
    """Connect to a serve endpoint given in its own syntax (the server one)."""
    head = ep.split(",")[0]
    kind, _, rest = head.partition(":")
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        addr = rest
    else:
        host, _, port = rest.rpartition(":")
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        addr = (host, int(port))
    s.settimeout(timeout)
    s.connect(addr)
    return s


class Listener:
    """A test-side listening socket for an endpoint serve connects to."""

    def __init__(self, ep: str):
        head = ep.split(",")[0]
        kind, _, rest = head.partition(":")
        if kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rest)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(rest)
            self.path = rest
        else:
            host, _, port = rest.rpartition(":")
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, int(port)))
            self.path = None
        self.sock.listen(4)

    def accept(self, timeout: float = TIMEOUT) -> socket.socket:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        conn.settimeout(TIMEOUT)
        if conn.family == socket.AF_INET:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def close(self) -> None:
        self.sock.close()
        if self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def peer_closed(sock: socket.socket, timeout: float = TIMEOUT) -> bool:
    """True once the peer closed ``sock`` (EOF or reset); what it sent
    before is read and thrown away."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([sock], [], [], 0.05)
        if not r:
            continue
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


# -- the readers -------------------------------------------------------------------

class StreamReader:
    """Reads a socket continuously in a thread, so serve is never blocked by
    the test; ``pause()`` stalls it (the kernel buffers fill up), ``resume()``
    goes on."""

    def __init__(self, sock: socket.socket, name: str = "outdev"):
        self.sock = sock
        self.name = name
        self.buf = bytearray()
        self.chunks: list[tuple[float, int]] = []    # (arrival time, total bytes so far)
        self.lock = threading.Lock()
        self.eof = False
        self.error: BaseException | None = None
        self._go = threading.Event()
        self._go.set()
        self._idle = threading.Event()
        self._stop = threading.Event()
        sock.setblocking(False)
        self.thread = threading.Thread(target=self._loop, name=f"reader-{name}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._go.is_set():
                self._idle.set()
                self._go.wait(0.05)
                continue
            self._idle.clear()
            try:
                r, _, _ = select.select([self.sock], [], [], 0.05)
                if not r:
                    continue
                data = self.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                continue
            except (OSError, ValueError) as e:
                self.error = e
                self.eof = True
                return
            if not data:
                self.eof = True
                return
            with self.lock:
                self.buf += data
                self.chunks.append((time.monotonic(), len(self.buf)))

    # control
    def pause(self) -> None:
        """Stop reading; returns once the thread reads no more."""
        self._idle.clear()
        self._go.clear()
        wait_until(lambda: self._idle.is_set() or self.eof, 5, f"{self.name} reader to pause")

    def resume(self) -> None:
        self._go.set()

    def close(self) -> None:
        self._stop.set()
        self._go.set()
        self.thread.join(5)
        with contextlib.suppress(OSError):
            self.sock.close()

    # what came
    def data(self) -> bytes:
        with self.lock:
            return bytes(self.buf)

    def __len__(self) -> int:
        with self.lock:
            return len(self.buf)

    def wait_bytes(self, n: int, timeout: float = TIMEOUT) -> bytes:
        wait_until(lambda: len(self) >= n, timeout, f"{n} bytes on {self.name} (have {len(self)})")
        return self.data()

    def wait_eof(self, timeout: float = TIMEOUT) -> bytes:
        wait_until(lambda: self.eof, timeout, f"EOF on {self.name}")
        return self.data()


class OutReader(StreamReader):
    """outdev: records."""

    def __init__(self, sock, vnet: bool = False, name: str = "outdev"):
        self.vnet = vnet
        super().__init__(sock, name)

    def records(self) -> list[bytes]:
        return split_records(self.data(), self.vnet)[0]

    def wait_records(self, n: int, timeout: float = TIMEOUT) -> list[bytes]:
        wait_until(lambda: len(self.records()) >= n, timeout,
                   f"{n} records on {self.name} (have {len(self.records())})")
        return self.records()


class NotifyPeer(StreamReader):
    """Plays Xen on notify-dev: reads serve's messages continuously (with
    their arrival times) and sends Xen's."""

    def messages(self) -> list[bytes]:
        return split_notify(self.data())

    def times(self) -> list[float]:
        """Arrival time of each whole message (from the chunks read)."""
        with self.lock:
            chunks = list(self.chunks)
            data = bytes(self.buf)
        out = []
        pos = 0
        ends = []
        while len(data) - pos >= 4:
            (length,) = struct.unpack_from(">I", data, pos)
            pos += 4 + length
            if pos > len(data):
                break
            ends.append(pos)
        for end in ends:
            out.append(next(t for t, total in chunks if total >= end))
        return out

    def wait_messages(self, n: int, timeout: float = TIMEOUT) -> list[bytes]:
        wait_until(lambda: len(self.messages()) >= n, timeout,
                   f"{n} notify messages (have {self.messages()})")
        return self.messages()

    def send(self, message: bytes, vnet_word: bool = False) -> None:
        head = struct.pack(">II", len(message), 0) if vnet_word else struct.pack(">I", len(message))
        self.sock.sendall(head + message)    # a few bytes: a non-blocking socket takes them


# -- the serve process -------------------------------------------------------------

class ServeProc:
    """``python -m colo_cli serve ...`` with its stderr in a file."""

    def __init__(self, workdir: str, args: list[str], control: str | None = None,
                 inject: str | None = None):
        """``inject``: Python source run in the serve process before the CLI
        (to patch the core, e.g. to make it fail on chosen frames)."""
        self.workdir = workdir
        self.control_path = control
        n = len([f for f in os.listdir(workdir) if f.startswith("stderr")])
        self.stderr_path = os.path.join(workdir, f"stderr{n}.txt")
        self.stdout_path = os.path.join(workdir, f"stdout{n}.txt")
        if inject is None:
            self.argv = [PY, "-m", "colo_cli", "serve", *args]
        else:
            runner = inject + "\nimport sys\nfrom colo_cli.cli import main\nsys.argv[0] = 'colo-compare'\nmain()\n"
            self.argv = [PY, "-c", runner, "serve", *args]
        with open(self.stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, cwd=workdir)
        self.pid = self.proc.pid

    # output
    def stderr(self) -> str:
        with open(self.stderr_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stderr_lines(self) -> list[str]:
        return self.stderr().splitlines()

    def wait_stderr(self, text: str, timeout: float = TIMEOUT, count: int = 1) -> list[str]:
        def found():
            lines = [l for l in self.stderr_lines() if text in l]
            if len(lines) < count and self.proc.poll() is not None:
                raise AssertionError(f"serve exited ({self.proc.returncode}) before printing "
                                     f"{text!r}; stderr:\n{self.stderr()}")
            return lines if len(lines) >= count else None
        return wait_until(found, timeout, f"{text!r} on serve's stderr")

    def wait_ready(self, verbose: bool = True, timeout: float = TIMEOUT) -> None:
        """Every listener is open.  serve -v logs 'serving:' once they are;
        without -v, the control socket answering tells the same (serve opens
        it first, then the listeners, with no wait in between)."""
        if verbose:
            self.wait_stderr("colo-compare: serving:", timeout)
        if self.control_path:
            def answers():
                self.assert_running()
                try:
                    return self.control({"cmd": "version"})["ok"]
                except (OSError, ValueError):
                    return False
            wait_until(answers, timeout, "the control socket to answer")

    # the control socket
    def control(self, request, timeout: float = 5.0) -> dict:
        line = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.control_path)
            s.sendall(line)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
        return json.loads(buf)

    def stats(self) -> dict:
        reply = self.control({"cmd": "stats"})
        assert reply["ok"], reply
        return reply["stats"]

    def link(self, name: str) -> dict:
        return self.stats()["serve"]["links"][name]

    def wait_stats(self, pred, timeout: float = TIMEOUT, what: str = "serve's counters"):
        """Poll the counters until ``pred(stats)``; returns those stats."""
        last = {}

        def check():
            nonlocal last
            self.assert_running()
            last = self.stats()
            return last if pred(last) else None
        try:
            return wait_until(check, timeout, what, interval=0.005)
        except AssertionError as e:
            raise AssertionError(f"{e}; last stats: {json.dumps(_brief(last))}") from None

    # the process
    def assert_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"serve exited with {self.proc.returncode}; "
                                 f"stderr:\n{self.stderr()}")

    def signal(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def kill_hard(self) -> None:
        """SIGTERM, then SIGKILL; always reaps."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _brief(stats: dict) -> dict:
    if not stats:
        return {}
    keys = ("frames_in", "released", "bypassed", "dropped", "miscompares",
            "checkpoint_requests", "queued")
    d = {k: stats.get(k) for k in keys}
    wanted = ("connected", "connections", "bytes_in", "frames_out", "queued_frames",
              "dropped_frames")
    if "serve" in stats:
        d["links"] = {n: {k: v for k, v in link.items() if k in wanted}
                      for n, link in stats["serve"]["links"].items()}
    return d


def processes_with(text: str) -> list[int]:
    """Pids of live processes whose command line mentions ``text``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state != b"Z":
            pids.append(int(entry))
    return pids


# -- writing without blocking ------------------------------------------------------

def write_nonblocking(socks_and_data, chunk: int = 64 * 1024, timeout: float = 20.0) -> dict:
    """Write each ``(sock, data)`` completely, round robin in chunks, with
    non-blocking sockets.  Returns timings: ``longest_wait`` (the longest a
    write had to wait for the socket to take more) and ``elapsed``."""
    todo = []
    for sock, data in socks_and_data:
        sock.setblocking(False)
        todo.append([sock, memoryview(data), 0])
    start = time.monotonic()
    longest = 0.0
    waiting_since = None
    while any(pos < len(mv) for _s, mv, pos in todo):
        progressed = False
        for item in todo:
            sock, mv, pos = item
            if pos >= len(mv):
                continue
            try:
                n = sock.send(mv[pos:pos + chunk])
            except (BlockingIOError, InterruptedError):
                n = 0
            if n:
                item[2] = pos + n
                progressed = True
        now = time.monotonic()
        if progressed:
            if waiting_since is not None:
                longest = max(longest, now - waiting_since)
            waiting_since = None
            continue
        if waiting_since is None:
            waiting_since = now
        if now - start > timeout:
            left = sum(len(mv) - pos for _s, mv, pos in todo)
            raise AssertionError(f"serve stopped taking input: {left} bytes not accepted "
                                 f"after {timeout:g} s")
        select.select([], [s for s, mv, pos in todo if pos < len(mv)], [], 0.05)
    if waiting_since is not None:
        longest = max(longest, time.monotonic() - waiting_since)
    for sock, _mv, _pos in todo:
        sock.setblocking(True)
    return {"longest_wait": longest, "elapsed": time.monotonic() - start}
