#!/usr/bin/env python3
"""Benchmarks for colo-compare: serve throughput and latency (against QEMU
7.2's colo-compare on the same client), replay speed (against a dpkt floor)
and replay memory (does it stream?).

Run from a checkout with the package installed (``pip install -e .``)::

    python benchmarks/bench.py                      # everything, ~5-10 min
    python benchmarks/bench.py --only serve --workloads udp-1000,tcp-bulk
    python benchmarks/bench.py --frames 2000 --repeat 1 --no-qemu --json out.json

The serve client follows ``shared/spec/qemu-7.2-observed.md`` section 6 (the
client QEMU's own numbers were measured with): both streams pre-encoded in
memory, one sender thread writing big chunks to non-blocking sockets,
alternating primary/secondary so neither leads by more than 256 KiB, one
reader thread on outdev, and a closed loop: the sender never runs more than
W frames ahead of what outdev has released.  Every frame carries its
sequence number, so loss, duplicates and order are checked after the clock
stops.  See ``benchmarks/README.md`` for what each number means.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import json
import math
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from dataclasses import dataclass
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from colo_cli import testing  # noqa: E402
from colo_cli.capture import PcapWriter, open_capture  # noqa: E402
from colo_cli.core.framing import encode  # noqa: E402

WORKLOAD_NAMES = ("udp-1000", "udp-1", "tcp-bulk", "udp-100k")
PARTS = ("serve", "replay", "latency", "memory")

UDP_FRAME_LEN = 1000                 # Ethernet frame bytes
TCP_PAYLOAD = 1448                   # -> 1502-byte frames
SEQ_LEN = 8                          # be64 sequence number, first payload bytes
UDP_SEQ_OFF = 14 + 20 + 8            # offset of the sequence number in a UDP frame
TCP_SEQ_OFF = 14 + 20 + 20
PCAP_BASE_NS = 1_700_000_000 * 1_000_000_000
PCAP_STEP_NS = 10_000                # 10 us between frames, same on both sides

CLK_TCK = os.sysconf("SC_CLK_TCK")
_BE32 = struct.Struct(">I")
_unpack_be32 = _BE32.unpack_from
_pack_q = struct.Struct("!Q").pack
_pack_h = struct.Struct("!H").pack


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------

def _sum16(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    return sum(struct.unpack(f"!{len(b) // 2}H", b))


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _seq_words(seq: int) -> int:
    return ((seq >> 48) & 0xFFFF) + ((seq >> 32) & 0xFFFF) + ((seq >> 16) & 0xFFFF) + (seq & 0xFFFF)


def _filler(n: int) -> bytes:
    return (bytes(range(32, 127)) * (n // 95 + 1))[:n]


_ETH = testing.MAC_B + testing.MAC_A + b"\x08\x00"      # dst, src, IPv4 (as testing.ether)


class UdpBuilder:
    """Byte-identical to ``testing.udp_frame`` (checked in ``self_check``) but
    with precomputed checksums, so 2,000,000 frames take seconds."""

    def __init__(self, frame_len: int = UDP_FRAME_LEN) -> None:
        self.payload_len = frame_len - UDP_SEQ_OFF
        self.filler = _filler(self.payload_len - SEQ_LEN)
        self.filler_sum = _sum16(self.filler)
        self.ulen = 8 + self.payload_len
        self._ip: dict = {}
        self._flow: dict = {}

    def _ip_hdr(self, src: str, dst: str) -> bytes:
        key = (src, dst)
        h = self._ip.get(key)
        if h is None:
            h = self._ip[key] = testing.ipv4(b"", 17, src, dst, ident=1,
                                             total_length=20 + self.ulen)
        return h

    def flow(self, sport: int, dport: int, src: str, dst: str):
        key = (sport, dport, src, dst)
        f = self._flow.get(key)
        if f is None:
            prefix = _ETH + self._ip_hdr(src, dst) + struct.pack("!HHH", sport, dport, self.ulen)
            pseudo = testing._pseudo(src, dst, 17, self.ulen)
            base = _sum16(pseudo) + sport + dport + self.ulen + self.filler_sum
            f = self._flow[key] = (prefix, base)
        return f

    def frame(self, flow, seq: int) -> bytes:
        prefix, base = flow
        cs = ~_fold(base + _seq_words(seq)) & 0xFFFF or 0xFFFF
        return b"".join((prefix, _pack_h(cs), _pack_q(seq), self.filler))

    def reference(self, sport, dport, src, dst, seq) -> bytes:
        payload = _pack_q(seq) + self.filler
        return testing.udp_frame(payload, sport, dport, src, dst)


class TcpBuilder:
    """One TCP flow, in-sequence 1448-byte segments, ack constant; equal to
    ``testing.tcp_frame`` (checked in ``self_check``)."""

    SPORT, DPORT, ACK, FLAGS, WINDOW, ISN = 40000, 80, 5000, 0x18, 65535, 1000
    SRC, DST = "10.0.0.1", "10.0.0.2"

    def __init__(self, payload_len: int = TCP_PAYLOAD) -> None:
        self.payload_len = payload_len
        self.filler = _filler(payload_len - SEQ_LEN)
        tcp_len = 20 + payload_len
        self.prefix = _ETH + testing.ipv4(b"", 6, self.SRC, self.DST, ident=1,
                                          total_length=20 + tcp_len)
        self.ports = struct.pack("!HH", self.SPORT, self.DPORT)
        self.mid = struct.pack("!IBBH", self.ACK, 5 << 4, self.FLAGS, self.WINDOW)
        self.base = (_sum16(testing._pseudo(self.SRC, self.DST, 6, tcp_len)) + self.SPORT + self.DPORT
                     + (self.ACK >> 16) + (self.ACK & 0xFFFF) + ((5 << 4) << 8 | self.FLAGS)
                     + self.WINDOW + _sum16(self.filler))

    def tcp_seq(self, i: int) -> int:
        return (self.ISN + i * self.payload_len) & 0xFFFFFFFF

    def frame(self, i: int) -> bytes:
        s = self.tcp_seq(i)
        cs = ~_fold(self.base + (s >> 16) + (s & 0xFFFF) + _seq_words(i)) & 0xFFFF
        return b"".join((self.prefix, self.ports, struct.pack("!I", s), self.mid, _pack_h(cs),
                         b"\0\0", _pack_q(i), self.filler))

    def reference(self, i: int) -> bytes:
        return testing.tcp_frame(_pack_q(i) + self.filler, seq=self.tcp_seq(i), ack=self.ACK,
                                 flags=self.FLAGS, sport=self.SPORT, dport=self.DPORT,
                                 src=self.SRC, dst=self.DST, window=self.WINDOW)


@dataclass
class Workload:
    name: str
    n: int
    nflows: int                 # frame i belongs to flow i % nflows
    seq_off: int                # where the be64 sequence number is in a frame
    frame_len: int
    make: Callable[[int], bytes]
    description: str

    @property
    def one_flow(self) -> bool:
        return self.nflows == 1

    def frames(self) -> list:
        make = self.make
        return [make(i) for i in range(self.n)]

    def iter_frames(self):
        make = self.make
        for i in range(self.n):
            yield make(i)


def _udp_flow_addr(f: int):
    """Flow f -> (sport, dport, src, dst); up to 50,000 flows per source address."""
    return 1024 + f % 50000, 6000, f"10.0.{f // 50000}.1", "10.0.0.2"


def make_workload(name: str, n: int) -> Workload:
    if name == "tcp-bulk":
        b = TcpBuilder()
        return Workload(name, n, 1, TCP_SEQ_OFF, 14 + 20 + 20 + TCP_PAYLOAD, b.frame,
                        f"TCP, one flow, {TCP_PAYLOAD}-byte payloads ({14 + 40 + TCP_PAYLOAD}-byte "
                        "frames), in sequence order, ack constant")
    b = UdpBuilder()
    if name == "udp-1":
        flow = b.flow(5000, 6000, "10.0.0.1", "10.0.0.2")
        return Workload(name, n, 1, UDP_SEQ_OFF, UDP_FRAME_LEN, lambda i: b.frame(flow, i),
                        "UDP 1000-byte frames, one 5-tuple, distinct payloads")
    if name == "udp-1000":
        nflows = max(1, min(1000, n))
        desc = f"UDP 1000-byte frames over {nflows} flows, round robin"
    elif name == "udp-100k":
        nflows = max(1, n // 2)
        desc = f"UDP 1000-byte frames over {nflows} flows (each used twice), round robin"
    else:
        raise ValueError(f"unknown workload {name!r}")
    flows = [b.flow(*_udp_flow_addr(f)) for f in range(nflows)]
    frame = b.frame
    return Workload(name, n, nflows, UDP_SEQ_OFF, UDP_FRAME_LEN,
                    lambda i: frame(flows[i % nflows], i), desc)


def workload_sizes(frames: int) -> dict:
    """Frame counts per workload: --frames for the UDP ones, half for TCP
    (200,000 / 100,000 by default, as in the observed doc)."""
    return {"udp-1000": frames, "udp-1": frames, "tcp-bulk": max(1, frames // 2),
            "udp-100k": frames}


def self_check() -> None:
    """The fast builders produce exactly what colo_cli.testing builds."""
    b = UdpBuilder()
    for f, seq in ((0, 0), (7, 123456789), (99999, 2**40 + 17), (50000, 65535)):
        args = _udp_flow_addr(f)
        assert b.frame(b.flow(*args), seq) == b.reference(*args, seq), (f, seq)
        assert len(b.frame(b.flow(*args), seq)) == UDP_FRAME_LEN
    t = TcpBuilder()
    for i in (0, 1, 2965, 99999, 3_000_000):
        assert t.frame(i) == t.reference(i), i
        assert len(t.frame(i)) == 14 + 40 + TCP_PAYLOAD


def encode_stream(frames: list):
    """One bytes object with every record, and the start offset of each
    record (offsets[n] = total)."""
    wires = [encode(f) for f in frames]
    offsets = array("q", [0]) * (len(wires) + 1)
    pos = 0
    for i, w in enumerate(wires):
        offsets[i] = pos
        pos += len(w)
    offsets[len(wires)] = pos
    return b"".join(wires), offsets


# ---------------------------------------------------------------------------
# Checking what came out
# ---------------------------------------------------------------------------

def check_records(records, wl: Workload, expected: int, frames: list | None = None) -> dict:
    """``records``: iterable of Ethernet frames in the order they came out.
    Every one must be a frame we sent (byte-equal when ``frames`` is given),
    each exactly once, and in order: in total order for a one-flow workload,
    per flow otherwise."""
    seen = bytearray(expected)
    last = [-1] * wl.nflows
    nflows = wl.nflows
    so = wl.seq_off
    released = dup = ooo = corrupt = 0
    for fr in records:
        released += 1
        seq = int.from_bytes(fr[so:so + SEQ_LEN], "big") if len(fr) >= so + SEQ_LEN else -1
        if not 0 <= seq < expected or (frames is not None and fr != frames[seq]):
            corrupt += 1
            continue
        if seen[seq]:
            dup += 1
            continue
        seen[seq] = 1
        f = seq % nflows
        if seq < last[f]:
            ooo += 1
        else:
            last[f] = seq
    unique = expected - seen.count(0)
    lost = expected - unique
    return {"expected": expected, "released": released, "unique": unique, "lost": lost,
            "duplicates": dup, "out_of_order": ooo, "corrupt": corrupt,
            "order": "total" if nflows == 1 else "per-flow",
            "lossless": lost == 0 and dup == 0 and corrupt == 0,
            "in_order": ooo == 0}


def iter_stream_frames(buf, header_len: int = 4):
    """Frames of a length-prefixed stream (a cut last record is ignored)."""
    pos, end = 0, len(buf)
    mv = memoryview(buf)
    while end - pos >= header_len:
        n = _unpack_be32(buf, pos)[0]
        stop = pos + header_len + n
        if stop > end:
            break
        yield bytes(mv[pos + header_len:stop])
        pos = stop


# ---------------------------------------------------------------------------
# Processes under test
# ---------------------------------------------------------------------------

_children: dict[int, subprocess.Popen] = {}


def _kill_children() -> None:
    for p in list(_children.values()):
        if p.poll() is None:
            with contextlib.suppress(Exception):
                p.kill()
                p.wait(5)


atexit.register(_kill_children)

_setpriv: list | None = None


def _pdeathsig() -> list:
    """``setpriv --pdeathsig KILL`` (it execs: the pid is the child's own) so
    a killed benchmark leaves nothing behind."""
    global _setpriv
    if _setpriv is None:
        _setpriv = []
        if shutil.which("setpriv"):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                if subprocess.run(["setpriv", "--pdeathsig", "KILL", "true"],
                                  capture_output=True, timeout=5).returncode == 0:
                    _setpriv = ["setpriv", "--pdeathsig", "KILL"]
    return _setpriv


def _spawn(argv, **kw) -> subprocess.Popen:
    p = subprocess.Popen(_pdeathsig() + list(argv), stdin=subprocess.DEVNULL, **kw)
    _children[p.pid] = p
    return p


def _stop(p: subprocess.Popen, sig=signal.SIGTERM, timeout=10.0) -> int | None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    _children.pop(p.pid, None)
    return p.returncode


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def thread_cpu_s(pid: int, comm: str) -> float | None:
    total = None
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    s = f.read()
                if s[s.index("(") + 1:s.rindex(")")] == comm:
                    rest = s.rsplit(")", 1)[1].split()
                    total = (total or 0.0) + (int(rest[11]) + int(rest[12])) / CLK_TCK
    return total


def proc_peak_rss_mib(pid: int) -> float | None:
    """VmHWM: the process's peak resident set so far."""
    with contextlib.suppress(OSError, ValueError):
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return None


def system_busy_s() -> float:
    """CPU seconds spent non-idle on the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / CLK_TCK


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connect(addr, alive: Callable[[], bool], timeout_s: float = 15.0) -> socket.socket:
    family = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
    deadline = time.monotonic() + timeout_s
    while True:
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.connect(addr)
        except (ConnectionRefusedError, FileNotFoundError):
            s.close()
            if not alive() or time.monotonic() > deadline:
                raise RuntimeError(f"cannot connect to {addr}")
            time.sleep(0.01)
            continue
        if family == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s


class Target:
    """A comparator with primary, secondary and outdev sockets connected."""
    label = "?"
    pid: int
    pri: socket.socket
    sec: socket.socket
    out: socket.socket

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)

    def extra(self) -> dict:
        return {"peak_rss_mib": proc_peak_rss_mib(self.pid)}

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ServeTarget(Target):
    """``python -m colo_cli serve`` as a subprocess, listening on all three
    sockets, default policy (release, no notify_dev)."""
    label = "serve"

    def __init__(self, unix: bool, workdir: str, extra_args=()) -> None:
        self.unix = unix
        self.workdir = workdir
        self.stderr_path = os.path.join(workdir, "serve-stderr.log")
        self.proc = None
        last = None
        for _attempt in range(3):
            try:
                self._start(extra_args)
                return
            except RuntimeError as e:     # a picked port was taken meanwhile
                last = e
                self.close()
        raise last

    def _start(self, extra_args) -> None:
        if self.unix:
            addrs = [os.path.join(self.workdir, f"serve-{n}.sock") for n in ("pri", "sec", "out")]
            eps = [f"unix:{a},server" for a in addrs]
        else:
            addrs = [("127.0.0.1", _free_port()) for _ in range(3)]
            eps = [f"tcp:127.0.0.1:{a[1]},server" for a in addrs]
        argv = [sys.executable, "-m", "colo_cli", "serve", "--primary-in", eps[0],
                "--secondary-in", eps[1], "--outdev", eps[2], "--quiet", *extra_args]
        self._err = open(self.stderr_path, "wb")
        self.proc = _spawn(argv, stdout=self._err, stderr=subprocess.STDOUT, cwd=ROOT)
        self.pid = self.proc.pid
        alive = lambda: self.proc.poll() is None   # noqa: E731
        try:
            self.out = _connect(addrs[2], alive)
            self.pri = _connect(addrs[0], alive)
            self.sec = _connect(addrs[1], alive)
        except RuntimeError as e:
            raise RuntimeError(f"serve did not start: {e}: {self.stderr()}") from None

    def stderr(self) -> str:
        with contextlib.suppress(OSError), open(self.stderr_path, "rb") as f:
            return f.read().decode(errors="replace").strip()
        return ""

    def close(self) -> None:
        for s in ("pri", "sec", "out"):
            with contextlib.suppress(AttributeError, OSError):
                getattr(self, s).close()
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None
        with contextlib.suppress(AttributeError, OSError):
            self._err.close()


class QmpClient:
    def __init__(self, sock: socket.socket, timeout_s: float = 10.0) -> None:
        self.sock = sock
        sock.settimeout(timeout_s)
        self.f = sock.makefile("rb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise RuntimeError(f"unexpected QMP greeting {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        line = self.f.readline()
        if not line:
            raise RuntimeError("QMP closed")
        return json.loads(line)

    def execute(self, cmd: str, **arguments):
        msg = {"execute": cmd}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {cmd}: {reply['error']}")
            return reply.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()
            self.sock.close()


class QemuTarget(Target):
    """QEMU 7.2's colo-compare with no guest (observed doc section 2): -machine
    none, an iothread, TCP (or unix) server chardevs with wait=off, notify_dev
    connected and drained, QMP on a socketpair (a listening QMP socket can hang
    QEMU's startup: see tests/qemu_harness.py), and the chardevs confirmed
    connected through query-chardev before anything is sent."""
    label = "qemu"
    LABELS = ("pri", "sec", "out", "ntf")

    def __init__(self, unix: bool, workdir: str, binary: str = "qemu-system-x86_64",
                 nodelay: bool = False) -> None:
        self.unix = unix
        self.workdir = workdir
        self.binary = binary
        self.nodelay = nodelay
        self.stderr_path = os.path.join(workdir, "qemu-stderr.log")
        self.proc = None
        self.qmp = None
        self.ntf = None
        self.notify_messages = 0
        self.do_checkpoints = 0
        last = None
        for _attempt in range(3):
            try:
                self._start()
                return
            except RuntimeError as e:
                last = e
                self.close()
        raise last

    def _start(self) -> None:
        if self.unix:
            addrs = {lb: os.path.join(self.workdir, f"qemu-{lb}.sock") for lb in self.LABELS}
        else:
            addrs = {lb: ("127.0.0.1", _free_port()) for lb in self.LABELS}
        argv = [self.binary, "-machine", "none", "-nodefaults", "-display", "none",
                "-no-user-config", "-name", "colo-bench,debug-threads=on"]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv += ["-chardev", f"socket,id=qmp0,fd={theirs.fileno()}", "-mon", "chardev=qmp0,mode=control"]
        for lb, a in addrs.items():
            where = f"path={a}" if self.unix else f"host={a[0]},port={a[1]}"
            if self.nodelay and not self.unix:
                where += ",nodelay=on"
            argv += ["-chardev", f"socket,id={lb},{where},server=on,wait=off"]
        argv += ["-object", "iothread,id=iothread1",
                 "-object", "colo-compare,id=comp0,primary_in=pri,secondary_in=sec,outdev=out,"
                            "iothread=iothread1,notify_dev=ntf"]
        self._err = open(self.stderr_path, "wb")
        try:
            self.proc = _spawn(argv, stdout=self._err, stderr=subprocess.STDOUT,
                               cwd=self.workdir, pass_fds=[theirs.fileno()])
        finally:
            theirs.close()
        self.pid = self.proc.pid
        try:
            self.qmp = QmpClient(ours)
        except (RuntimeError, OSError, ValueError) as e:
            ours.close()
            time.sleep(0.05)
            raise RuntimeError(f"QEMU did not start: {e!r}: {self.stderr()}") from None
        alive = lambda: self.proc.poll() is None   # noqa: E731
        # outputs first: a release to an unconnected outdev is lost (observed section 2)
        self.out = _connect(addrs["out"], alive)
        self.ntf = _connect(addrs["ntf"], alive)
        self.pri = _connect(addrs["pri"], alive)
        self.sec = _connect(addrs["sec"], alive)
        self._ntf_thread = threading.Thread(target=self._drain_notify, daemon=True,
                                            name="qemu-notify")
        self._ntf_thread.start()
        deadline = time.monotonic() + 10
        while True:
            state = {c["label"]: c["filename"] for c in self.qmp.execute("query-chardev")}
            if not any(state.get(lb, "disconnected:").startswith("disconnected:")
                       for lb in self.LABELS):
                break
            if time.monotonic() > deadline or not alive():
                raise RuntimeError(f"QEMU chardevs not connected: {state}: {self.stderr()}")
            time.sleep(0.005)

    def _drain_notify(self) -> None:
        buf = b""
        sock = self.ntf
        try:
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    return
                buf += data
                pos = 0
                while len(buf) - pos >= 4:
                    n = _unpack_be32(buf, pos)[0]
                    if len(buf) - pos - 4 < n:
                        break
                    if buf[pos + 4:pos + 4 + n] == b"DO_CHECKPOINT":
                        self.do_checkpoints += 1
                    self.notify_messages += 1
                    pos += 4 + n
                buf = buf[pos:]
        except OSError:
            return

    def extra(self) -> dict:
        return {"do_checkpoint": self.do_checkpoints,
                "iothread_cpu_s": thread_cpu_s(self.pid, "IO iothread1"),
                "peak_rss_mib": proc_peak_rss_mib(self.pid)}

    def stderr(self) -> str:
        with contextlib.suppress(OSError), open(self.stderr_path, "rb") as f:
            return f.read().decode(errors="replace").strip()
        return ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.sock.settimeout(2)
                self.qmp.execute("quit")
        for s in ("pri", "sec", "out", "ntf"):
            sock = getattr(self, s, None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
        if self.proc is not None:
            _stop(self.proc, timeout=5)
            self.proc = None
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        with contextlib.suppress(AttributeError, OSError):
            self._err.close()


def qemu_binary() -> str | None:
    path = shutil.which(os.environ.get("COLO_QEMU_BINARY", "qemu-system-x86_64"))
    if not path:
        return None
    try:
        ok = subprocess.run([path, "--version"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return path if ok else None


# ---------------------------------------------------------------------------
# The closed-loop client (observed doc section 6)
# ---------------------------------------------------------------------------

@dataclass
class LoopResult:
    buf: bytearray
    records: int
    wall_s: float | None       # first byte sent -> last released byte received
    complete: bool
    stalled: bool
    timed_out: bool
    sent_frames: int
    active_s: float | None     # first byte sent -> last record received (also when incomplete)


def closed_loop(pri: socket.socket, sec: socket.socket, out: socket.socket, wire: bytes,
                offsets: array, n: int, window: int = 512, chunk: int = 128 * 1024,
                lead: int = 256 * 1024, stall_s: float = 5.0, timeout_s: float = 120.0) -> LoopResult:
    total = len(wire)
    mv = memoryview(wire)
    socks = (pri, sec)
    for s in socks:
        s.setblocking(False)
    out.settimeout(0.1)
    stop = threading.Event()
    progress = threading.Event()
    state = {"count": 0, "t0": None, "t_end": None, "t_last": None, "sent": [0, 0]}
    buf = bytearray()

    def reader() -> None:
        pos = 0
        count = 0
        recv = out.recv
        unpack = _unpack_be32
        while not stop.is_set():
            try:
                data = recv(1 << 20)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            buf.extend(data)
            end = len(buf)
            while end - pos >= 4:
                stop_at = pos + 4 + unpack(buf, pos)[0]
                if stop_at > end:
                    break
                pos = stop_at
                count += 1
            if count != state["count"]:
                state["count"] = count
                state["t_last"] = time.perf_counter()
                if count >= n:
                    state["t_end"] = time.perf_counter()
                    progress.set()
                    return
                progress.set()

    def sender() -> None:
        sent = state["sent"]
        state["t0"] = time.perf_counter()
        while (sent[0] < total or sent[1] < total) and not stop.is_set():
            limit = offsets[min(n, state["count"] + window)]
            moved = False
            want = []
            for side in (0, 1):
                pos = sent[side]
                hi = min(limit, sent[1 - side] + lead, pos + chunk, total)
                if hi > pos:
                    try:
                        k = socks[side].send(mv[pos:hi])
                    except (BlockingIOError, InterruptedError):
                        k = 0
                    except OSError:
                        stop.set()
                        return
                    if k:
                        sent[side] = pos + k
                        moved = True
                    else:
                        want.append(socks[side])
            if moved:
                continue
            if want:
                select.select([], want, [], 0.05)
            else:
                # window closed: wait for outdev to release more
                progress.clear()
                if offsets[min(n, state["count"] + window)] <= limit:
                    progress.wait(0.05)

    rt = threading.Thread(target=reader, name="bench-outdev-reader", daemon=True)
    st = threading.Thread(target=sender, name="bench-sender", daemon=True)
    rt.start()
    st.start()
    started = time.monotonic()
    last_count, last_change = -1, started
    stalled = timed_out = False
    while rt.is_alive():
        rt.join(0.1)
        now = time.monotonic()
        if state["count"] != last_count:
            last_count, last_change = state["count"], now
        elif now - last_change > stall_s:
            stalled = True
            break
        if now - started > timeout_s:
            timed_out = True
            break
    stop.set()
    progress.set()
    st.join(10)
    rt.join(10)
    count = state["count"]
    complete = count >= n
    wall = (state["t_end"] - state["t0"]) if complete and state["t0"] else None
    sent_frames = min(_frames_before(offsets, state["sent"][0]), _frames_before(offsets, state["sent"][1]))
    active = (state["t_last"] - state["t0"]) if state["t_last"] and state["t0"] else None
    return LoopResult(buf, count, wall, complete, stalled and not complete, timed_out and not complete,
                      sent_frames, active)


def _frames_before(offsets: array, pos: int) -> int:
    """Whole records in the first ``pos`` bytes."""
    import bisect
    return bisect.bisect_right(offsets, pos) - 1


# ---------------------------------------------------------------------------
# Part: serve (and QEMU) throughput
# ---------------------------------------------------------------------------

def throughput_run(make_target: Callable[[], Target], wl: Workload, frames, wire, offsets,
                   args) -> dict:
    timeout_s = max(60.0, wl.n / 5000.0)
    with make_target() as t:
        cpu0 = t.cpu_s()
        r = closed_loop(t.pri, t.sec, t.out, wire, offsets, wl.n, window=args.window,
                        stall_s=args.stall_timeout, timeout_s=timeout_s)
        cpu1 = t.cpu_s()
        extra = t.extra()
        alive = t.proc.poll() is None
    check = check_records(iter_stream_frames(r.buf), wl, wl.n, frames)
    run = {"complete": r.complete, "stalled": r.stalled, "timed_out": r.timed_out,
           "records_received": r.records, "sent_frames": r.sent_frames,
           "wall_s": r.wall_s, "cpu_s": round(cpu1 - cpu0, 3), "process_alive": alive,
           **check, **extra}
    if r.wall_s:
        run["frames_per_s"] = wl.n / r.wall_s
        run["mb_per_s"] = wl.n * wl.frame_len / r.wall_s / 1e6
    elif r.active_s:
        # an incomplete run: the rate until the last record that did come out
        run["partial_frames_per_s"] = r.records / r.active_s
    return run


def summarise_runs(runs: list, wl: Workload) -> dict:
    ok = [r for r in runs if r["complete"]]
    summary = {"runs": runs, "frames": wl.n, "frame_bytes": wl.frame_len,
               "complete_runs": len(ok), "all_complete": len(ok) == len(runs),
               "lossless": all(r["lossless"] for r in runs),
               "in_order": all(r["in_order"] for r in runs)}
    if ok:
        wall = statistics.median(r["wall_s"] for r in ok)
        summary.update({"median_wall_s": wall, "frames_per_s": wl.n / wall,
                        "mb_per_s": wl.n * wl.frame_len / wall / 1e6,
                        "median_cpu_s": statistics.median(r["cpu_s"] for r in ok),
                        "min_wall_s": min(r["wall_s"] for r in ok),
                        "max_wall_s": max(r["wall_s"] for r in ok)})
    return summary


def part_throughput(args, results: dict, workdir: str, log) -> None:
    qemu = None if args.no_qemu else qemu_binary()
    if not args.no_qemu and qemu is None:
        log("QEMU: qemu-system-x86_64 not found; QEMU columns skipped")
    results["serve"] = {}
    results["qemu"] = {} if qemu else None
    transport = "unix" if args.unix else "tcp"
    results["throughput_setup"] = {"transport": transport, "window_frames": args.window,
                                   "chunk_bytes": 128 * 1024, "lead_bytes": 256 * 1024,
                                   "repeat": args.repeat, "stall_timeout_s": args.stall_timeout}
    for name in args.workloads:
        wl = make_workload(name, args.sizes[name])
        t = time.monotonic()
        frames = wl.frames()
        wire, offsets = encode_stream(frames)
        log(f"{name}: {wl.n} frames generated in {time.monotonic() - t:.1f} s")
        targets = [("serve", lambda: ServeTarget(args.unix, workdir))]
        if qemu:
            targets.append(("qemu", lambda: QemuTarget(args.unix, workdir, qemu)))
        # Runs alternate between the comparators (serve, QEMU, serve, ...):
        # this 2-vCPU VM's speed drifts by up to ~1.5x over tens of seconds
        # (same work, same syscalls, 50 % more CPU time), and alternating
        # exposes both to the same drift, so the ratio is fair.
        runs = {label: [] for label, _ in targets}
        for i in range(args.repeat):
            for label, make in targets:
                run = throughput_run(make, wl, frames, wire, offsets, args)
                runs[label].append(run)
                log(f"  {label} {name} run {i + 1}: " + _run_text(run))
        for label, _ in targets:
            results[label][name] = summarise_runs(runs[label], wl)
        del frames, wire, offsets


def _run_text(run: dict) -> str:
    if run["complete"]:
        s = f"{run['wall_s']:.3f} s, {run['frames_per_s'] / 1e3:.1f} k frames/s, cpu {run['cpu_s']:.2f} s"
    else:
        why = "stalled" if run["stalled"] else ("timed out" if run["timed_out"] else "ended")
        s = f"{why} at {run['records_received']}/{run['expected']} records"
        if run.get("partial_frames_per_s"):
            s += f" ({run['partial_frames_per_s'] / 1e3:.1f} k frames/s until then)"
    s += f"; lost {run['lost']}, dup {run['duplicates']}, out of order {run['out_of_order']}"
    if run.get("corrupt"):
        s += f", corrupt {run['corrupt']}"
    if "do_checkpoint" in run:
        s += f", DO_CHECKPOINT {run['do_checkpoint']}"
    return s


# ---------------------------------------------------------------------------
# Part: latency
# ---------------------------------------------------------------------------

def latency_run(t: Target, wl: Workload, rate: float, stall_s: float = 5.0) -> dict:
    """Single-threaded (no GIL hand-offs in the measurement): paced pairs,
    secondary first, then the primary twin; latency = time the primary's
    record was read from outdev - time just before the primary was written."""
    n = wl.n
    wires = [encode(f) for f in wl.iter_frames()]
    frames = [w[4:] for w in wires]
    pri, sec, out = t.pri, t.sec, t.out
    pri.setblocking(True)
    sec.setblocking(True)
    out.setblocking(False)
    period = 1e9 / rate
    send_ns = array("q", [0]) * n
    recv_ns = array("q", [0]) * n
    buf = bytearray()
    pos = 0
    got = 0
    i = 0
    skipped = 0
    so = 4 + wl.seq_off
    clock = time.perf_counter_ns
    unpack = _unpack_be32
    t_start = clock()
    next_t = t_start
    last_change = t_start
    stalled = False
    while got < n:
        now = clock()
        if i < n and now >= next_t:
            w = wires[i]
            sec.sendall(w)
            ts = clock()
            pri.sendall(w)
            send_ns[i] = ts
            i += 1
            next_t += period
            if next_t < now - period:        # fell behind: skip slots, no catch-up burst
                skipped += int((now - next_t) // period)
                next_t = now
        try:
            data = out.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            if now - last_change > stall_s * 1e9:
                stalled = True
                break
            continue
        if not data:
            break
        tr = clock()
        last_change = tr
        buf += data
        end = len(buf)
        # only the sequence numbers here; frames are checked after the clock stops
        while end - pos >= 4:
            stop = pos + 4 + unpack(buf, pos)[0]
            if stop > end:
                break
            seq = int.from_bytes(buf[pos + so:pos + so + SEQ_LEN], "big")
            if 0 <= seq < n and not recv_ns[seq]:
                recv_ns[seq] = tr
                got += 1
            pos = stop
    elapsed = (clock() - t_start) / 1e9
    check = check_records(iter_stream_frames(buf), wl, n, frames)
    lat = sorted((recv_ns[k] - send_ns[k]) / 1e3 for k in range(n) if recv_ns[k] and send_ns[k])
    res = {"frames": n, "rate_pairs_per_s": rate, "elapsed_s": round(elapsed, 3),
           "achieved_pairs_per_s": (round((i - 1) * 1e9 / (send_ns[i - 1] - send_ns[0]), 1)
                                    if i > 1 and send_ns[i - 1] > send_ns[0] else None),
           "skipped_slots": skipped, "stalled": stalled, "measured": len(lat), **check}
    if lat:
        res.update({"p50_us": _pct(lat, 50), "p90_us": _pct(lat, 90), "p99_us": _pct(lat, 99),
                    "p999_us": _pct(lat, 99.9), "max_us": lat[-1], "min_us": lat[0],
                    "mean_us": sum(lat) / len(lat)})
    return res


def _pct(sorted_vals: list, p: float) -> float:
    """Nearest-rank percentile."""
    k = min(len(sorted_vals) - 1, max(0, math.ceil(p / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def part_latency(args, results: dict, workdir: str, log) -> None:
    n = min(args.latency_frames, args.frames)
    wl = make_workload("udp-1000", n)
    results["latency"] = {"workload": "udp-1000", "frames": n, "rate_pairs_per_s": args.latency_rate,
                          "transport": "unix" if args.unix else "tcp"}
    def measured(t) -> dict:
        # the comparator's CPU over the run too: polling before sleeping
        # (serve's default) trades CPU for latency
        cpu0 = t.cpu_s()
        res = latency_run(t, wl, args.latency_rate, args.stall_timeout)
        res["cpu_s"] = round(t.cpu_s() - cpu0, 3)
        return res

    with ServeTarget(args.unix, workdir) as t:
        res = measured(t)
    results["latency"]["serve"] = res
    log("  latency serve: " + _lat_text(res))
    with ServeTarget(args.unix, workdir, extra_args=("--busy-poll-us", "0")) as t:
        res = measured(t)
    results["latency"]["serve_sleeping"] = res
    log("  latency serve --busy-poll-us 0: " + _lat_text(res))
    qemu = None if args.no_qemu else qemu_binary()
    if qemu:
        with QemuTarget(args.unix, workdir, qemu) as t:
            res = measured(t)
            res.update(t.extra())
        results["latency"]["qemu"] = res
        log("  latency qemu: " + _lat_text(res))
        if not args.unix:
            with QemuTarget(False, workdir, qemu, nodelay=True) as t:
                res = measured(t)
                res.update(t.extra())
            results["latency"]["qemu_nodelay"] = res
            log("  latency qemu (chardev nodelay=on): " + _lat_text(res))


def _lat_text(r: dict) -> str:
    if "p50_us" not in r:
        return f"no measurement ({r})"
    return (f"p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us, max {r['max_us']:.0f} us "
            f"over {r['measured']} frames at {r['achieved_pairs_per_s']:.0f} pairs/s; "
            f"lost {r['lost']}, out of order {r['out_of_order']}")


# ---------------------------------------------------------------------------
# Part: replay (and memory)
# ---------------------------------------------------------------------------

FLOOR_SCRIPT = r"""
import sys, dpkt
with open(sys.argv[1], "rb") as fp, open(sys.argv[2], "rb") as fs, open("/dev/null", "wb") as out:
    w = dpkt.pcap.Writer(out, nano=True)
    for (tp, bp), (_ts, _bs) in zip(dpkt.pcap.Reader(fp), dpkt.pcap.Reader(fs)):
        w.writepkt(bp, tp)
"""


def write_capture_pair(wl: Workload, directory: str) -> tuple[str, str]:
    p_path = os.path.join(directory, f"{wl.name}-{wl.n}-primary.pcap")
    s_path = os.path.join(directory, f"{wl.name}-{wl.n}-secondary.pcap")
    with open(p_path, "wb", buffering=1 << 20) as fp, open(s_path, "wb", buffering=1 << 20) as fs:
        wp, ws = PcapWriter(fp), PcapWriter(fs)
        ts = PCAP_BASE_NS
        for frame in wl.iter_frames():
            wp.write(ts, frame)
            ws.write(ts, frame)
            ts += PCAP_STEP_NS
    return p_path, s_path


def run_measured(argv, timeout_s: float) -> dict:
    """Run a command; wall time, CPU (user+sys, from wait4) and peak RSS.

    The peak RSS comes from ``/usr/bin/time -f %M``: wait4's ru_maxrss of a
    child of this process would include this process's own RSS at fork time
    (Linux keeps the pre-exec high-water mark), which is hundreds of MB here."""
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    rss_file = None
    if gnu_time:
        fd, rss_file = tempfile.mkstemp(prefix="ccbench-rss-")
        os.close(fd)
        argv = [gnu_time, "-f", "%M", "-o", rss_file, *argv]
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, cwd=ROOT)
    _children[p.pid] = p
    timer = threading.Timer(timeout_s, lambda: p.poll() is None and p.kill())
    timer.start()
    try:
        stderr_chunks = []
        reader = threading.Thread(target=lambda: stderr_chunks.append(p.stderr.read()), daemon=True)
        reader.start()
        _pid, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        reader.join(5)
    finally:
        timer.cancel()
        _children.pop(p.pid, None)
    p.returncode = os.waitstatus_to_exitcode(status)
    rc = p.returncode
    max_rss = ru.ru_maxrss / 1024
    rss_source = "wait4 (includes the benchmark's RSS at fork)"
    if rss_file:
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(rss_file) as f:
                lines = f.read().split()
            max_rss = int(lines[-1]) / 1024
            rss_source = "/usr/bin/time %M"
            # GNU time exits with the command's status
        os.unlink(rss_file)
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "max_rss_mib": max_rss,
            "rss_source": rss_source, "returncode": rc,
            "stderr": b"".join(c for c in stderr_chunks if c).decode(errors="replace")[-2000:]}


def replay_argv(p_path: str, s_path: str, out: str = "/dev/null") -> list:
    return [sys.executable, "-m", "colo_cli", "replay", p_path, s_path, "--out", out, "--quiet"]


def verify_replay_output(wl: Workload, p_path: str, s_path: str, directory: str) -> dict:
    """An untimed run with --out to a real file: every frame out once, in order."""
    out = os.path.join(directory, f"{wl.name}-out.pcap")
    r = run_measured(replay_argv(p_path, s_path, out), timeout_s=600)
    with open_capture(out) as reader:
        check = check_records((data for _n, _ts, data, _ol, _lt in reader), wl, wl.n, None)
    os.unlink(out)
    check["returncode"] = r["returncode"]
    return check


def part_replay(args, results: dict, workdir: str, log) -> None:
    results["replay"] = {}
    for name in args.workloads:
        wl = make_workload(name, args.sizes[name])
        t = time.monotonic()
        p_path, s_path = write_capture_pair(wl, workdir)
        log(f"{name}: capture pair written in {time.monotonic() - t:.1f} s "
            f"({os.path.getsize(p_path) / 1e6:.0f} MB each)")
        timeout = max(120.0, wl.n / 2000.0)
        rep, flo = [], []
        for i in range(args.repeat):
            r = run_measured(replay_argv(p_path, s_path), timeout)
            rep.append(r)
            f = run_measured([sys.executable, "-c", FLOOR_SCRIPT, p_path, s_path], timeout)
            flo.append(f)
            log(f"  replay {name} run {i + 1}: {r['wall_s']:.2f} s (exit {r['returncode']}, "
                f"rss {r['max_rss_mib']:.0f} MiB); floor {f['wall_s']:.2f} s")
        entry = {"frames": wl.n, "frame_bytes": wl.frame_len,
                 "capture_bytes": os.path.getsize(p_path),
                 "replay": _summ_cmd(rep, wl.n, wl.frame_len), "floor": _summ_cmd(flo, wl.n, wl.frame_len)}
        entry["match"] = all(r["returncode"] == 0 for r in rep)
        entry["floor_ok"] = all(r["returncode"] == 0 for r in flo)
        entry["ratio_replay_over_floor_time"] = entry["replay"]["median_wall_s"] / entry["floor"]["median_wall_s"]
        if args.verify_replay:
            entry["verify"] = verify_replay_output(wl, p_path, s_path, workdir)
            log(f"  replay {name} output check: lost {entry['verify']['lost']}, "
                f"out of order {entry['verify']['out_of_order']}")
        results["replay"][name] = entry
        os.unlink(p_path)
        os.unlink(s_path)


def _summ_cmd(runs: list, n: int, frame_len: int) -> dict:
    wall = statistics.median(r["wall_s"] for r in runs)
    return {"runs": [{k: v for k, v in r.items() if k != "stderr" or v} for r in runs],
            "median_wall_s": wall, "frames_per_s": n / wall, "mb_per_s": n * frame_len / wall / 1e6,
            "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "max_rss_mib": max(r["max_rss_mib"] for r in runs)}


def part_memory(args, results: dict, workdir: str, log) -> None:
    base = args.sizes["udp-1000"]
    big = args.memory_frames if args.memory_frames else 10 * base
    entry = {"workload": "udp-1000", "sizes": {}}
    free = shutil.disk_usage(workdir).free

    def need(n: int) -> int:
        return 2 * n * (UDP_FRAME_LEN + 16) + 2 * 24

    if need(big) * 1.1 > free:
        reduced = big // 2
        entry["note"] = (f"{big} frames need {need(big) / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB free "
                         f"in {workdir}: used {reduced} frames instead")
        log("  memory: " + entry["note"])
        big = reduced
        if need(big) * 1.1 > free:
            raise SystemExit(f"memory part: not enough disk space in {workdir} (see --tmpdir)")
    tiny = max(1, min(1000, base // 10))
    sizes = sorted({tiny, base, big})
    for n in sizes:
        wl = make_workload("udp-1000", n)
        t = time.monotonic()
        p_path, s_path = write_capture_pair(wl, workdir)
        gen = time.monotonic() - t
        r = run_measured(replay_argv(p_path, s_path), timeout_s=max(300.0, n / 1000.0))
        entry["sizes"][str(n)] = {"frames": n, "capture_bytes": os.path.getsize(p_path),
                                  "max_rss_mib": r["max_rss_mib"], "wall_s": r["wall_s"],
                                  "cpu_s": r["cpu_s"], "returncode": r["returncode"],
                                  "frames_per_s": n / r["wall_s"]}
        log(f"  memory: {n} frames ({os.path.getsize(p_path) / 1e9:.2f} GB per capture, written in "
            f"{gen:.0f} s): peak RSS {r['max_rss_mib']:.1f} MiB, {r['wall_s']:.1f} s, exit {r['returncode']}")
        os.unlink(p_path)
        os.unlink(s_path)
    b, g = entry["sizes"][str(base)], entry["sizes"][str(big)]
    entry["base_frames"], entry["big_frames"] = base, big
    entry["rss_growth_big_over_base"] = g["max_rss_mib"] / b["max_rss_mib"]
    entry["streams"] = g["max_rss_mib"] < 1.25 * b["max_rss_mib"] + 16
    results["memory"] = entry


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def machine_info() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    qv = None
    q = shutil.which("qemu-system-x86_64")
    if q:
        with contextlib.suppress(Exception):
            qv = subprocess.run([q, "--version"], capture_output=True, text=True,
                                timeout=10).stdout.splitlines()[0]
    mem = None
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            mem = f.readline().split()[1]
    from colo_cli import __version__
    commit = dirty = None
    with contextlib.suppress(Exception):
        if os.path.exists(os.path.join(ROOT, ".git")):
            commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True, timeout=5).stdout.strip() or None
            dirty = bool(subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "colo_cli"],
                                        capture_output=True, text=True, timeout=5).stdout.strip())
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "nproc": os.cpu_count(), "cpu": cpu, "mem_gib": round(int(mem) / 2**20, 1) if mem else None,
            "kernel": platform.release(), "python": platform.python_version(), "qemu": qv,
            "colo_compare": __version__, "code": os.path.join(ROOT, "colo_cli"), "commit": commit,
            "colo_cli_modified": dirty}


def _fmt(v, spec=".0f", none="-"):
    return none if v is None else format(v, spec)


def _table(headers: list, rows: list) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def _status(s: dict) -> str:
    bits = []
    if not s["all_complete"]:
        incomplete = [r for r in s["runs"] if not r["complete"]]
        r = incomplete[0]
        why = "stalled" if r["stalled"] else ("timeout" if r["timed_out"] else "ended")
        bits.append(f"{len(incomplete)}/{len(s['runs'])} runs {why}, "
                    f"{r['records_received']}/{r['expected']} out"
                    + (f" at {r['partial_frames_per_s'] / 1e3:.0f}k/s" if r.get("partial_frames_per_s") else ""))
    lost = max(r["lost"] for r in s["runs"])
    if lost:
        bits.append(f"lost<= {lost}")
    ooo = max(r["out_of_order"] for r in s["runs"])
    if ooo:
        bits.append(f"out-of-order<= {ooo}")
    dup = max(r["duplicates"] for r in s["runs"])
    if dup:
        bits.append(f"dup<= {dup}")
    if any(r.get("corrupt") for r in s["runs"]):
        bits.append("corrupt")
    return "; ".join(bits) or "ok"


def report(results: dict) -> str:
    out = []
    m = results["machine"]
    code = f"commit {m['commit']}{' + local changes' if m['colo_cli_modified'] else ''}" if m["commit"] \
        else m["code"]
    out.append(f"colo-compare {m['colo_compare']} ({code}) on {m['nproc']} x {m['cpu']}, "
               f"Python {m['python']}, {m['qemu'] or 'no QEMU'}, {m['date_utc']}")
    if "serve" in results:
        ts = results["throughput_setup"]
        out.append(f"\nserve throughput: closed loop W={ts['window_frames']} frames, "
                   f"{ts['transport']} sockets, median of {ts['repeat']}")
        rows = []
        for name, s in results["serve"].items():
            q = (results.get("qemu") or {}).get(name)
            ratio = None
            if q and q.get("frames_per_s") and s.get("frames_per_s") and q["all_complete"]:
                ratio = s["frames_per_s"] / q["frames_per_s"]
            rows.append([name, s["frames"], _fmt(s.get("frames_per_s")), _fmt(s.get("mb_per_s"), ".1f"),
                         _fmt(s.get("median_wall_s"), ".3f"), _fmt(s.get("median_cpu_s"), ".2f"),
                         _status(s),
                         _fmt(q.get("frames_per_s")) if q else "-",
                         _fmt(q.get("mb_per_s"), ".1f") if q else "-",
                         _fmt(q.get("median_wall_s"), ".3f") if q else "-",
                         _status(q) if q else "-",
                         _fmt(ratio, ".2f") + ("*" if ratio and not (q["lossless"] and q["in_order"]) else "")])
            results.setdefault("ratio_serve_over_qemu", {})[name] = ratio
        out.append(_table(["workload", "frames", "serve f/s", "MB/s", "wall s", "cpu s", "serve check",
                           "QEMU f/s", "MB/s", "wall s", "QEMU check", "serve/QEMU"], rows))
        if any("*" in row[-1] for row in rows):
            out.append("* QEMU completed but its output was not lossless and in order")
    if "replay" in results:
        out.append("\nreplay --out /dev/null --quiet (whole command) vs floor (dpkt read both, write primary)")
        rows = []
        for name, e in results["replay"].items():
            r, f = e["replay"], e["floor"]
            check = "exit 0" if e["match"] else "DIVERGED/exit!=0"
            if "verify" in e:
                v = e["verify"]
                check += ", output ok" if v["lossless"] and v["in_order"] else \
                    f", output lost {v['lost']} ooo {v['out_of_order']}"
            rows.append([name, e["frames"], _fmt(r["median_wall_s"], ".2f"), _fmt(r["frames_per_s"]),
                         _fmt(r["mb_per_s"], ".1f"), _fmt(r["max_rss_mib"], ".0f"),
                         _fmt(f["median_wall_s"], ".2f"), _fmt(f["frames_per_s"]),
                         _fmt(e["ratio_replay_over_floor_time"], ".1f") + "x", check])
        out.append(_table(["workload", "frames", "replay s", "f/s", "MB/s", "RSS MiB", "floor s",
                           "floor f/s", "replay/floor", "check"], rows))
    if "latency" in results:
        lt = results["latency"]
        out.append(f"\nlatency: udp-1000 frames, {lt['frames']} pairs paced at {lt['rate_pairs_per_s']:.0f}/s, "
                   f"secondary first; primary write -> its record read from outdev ({lt['transport']})")
        rows = []
        names = {"serve": "serve", "serve_sleeping": "serve --busy-poll-us 0", "qemu": "qemu",
                 "qemu_nodelay": "qemu (chardev nodelay)"}
        for label, name in names.items():
            r = lt.get(label)
            if not r:
                continue
            rows.append([name,
                         r["measured"], _fmt(r.get("p50_us")), _fmt(r.get("p90_us")), _fmt(r.get("p99_us")),
                         _fmt(r.get("p999_us")), _fmt(r.get("max_us")), _fmt(r.get("achieved_pairs_per_s")),
                         _fmt(r.get("cpu_s"), ".2f"),
                         "ok" if r["lossless"] and r["in_order"] and not r["stalled"] else
                         f"lost {r['lost']} ooo {r['out_of_order']}" + (" stalled" if r["stalled"] else "")])
        out.append(_table(["comparator", "frames", "p50 us", "p90 us", "p99 us", "p99.9 us", "max us",
                           "pairs/s", "CPU s", "check"], rows))
    if "memory" in results:
        me = results["memory"]
        out.append("\nmemory: peak RSS of colo-compare replay (udp-1000 capture pairs)")
        rows = [[v["frames"], f"{v['capture_bytes'] / 1e6:.0f}", f"{v['max_rss_mib']:.1f}",
                 f"{v['wall_s']:.1f}", f"{v['frames_per_s']:.0f}", v["returncode"]]
                for v in me["sizes"].values()]
        out.append(_table(["frames", "MB per capture", "peak RSS MiB", "wall s", "f/s", "exit"], rows))
        if me.get("note"):
            out.append("note: " + me["note"])
        out.append(f"{me['big_frames']} vs {me['base_frames']} frames: peak RSS x{me['rss_growth_big_over_base']:.2f}"
                   f" -> {'streams (flat)' if me['streams'] else 'GROWS with the input'}")
    return "\n".join(out)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Benchmark colo-compare serve (throughput, latency; against QEMU 7.2's "
                    "colo-compare when installed) and replay (speed against a dpkt floor, memory). "
                    "Prints a table; see benchmarks/README.md.")
    ap.add_argument("--only", default=",".join(PARTS), metavar="PARTS",
                    help=f"comma-separated parts to run, of: {', '.join(PARTS)} (default: all)")
    ap.add_argument("--workloads", default=",".join(WORKLOAD_NAMES), metavar="NAMES",
                    help=f"comma-separated workloads, of: {', '.join(WORKLOAD_NAMES)} (default: all)")
    ap.add_argument("--frames", type=int, default=200_000, metavar="N",
                    help="frames per UDP workload; tcp-bulk gets N/2 and udp-100k uses N/2 flows "
                         "(default: 200000)")
    ap.add_argument("--repeat", type=int, default=3, metavar="R",
                    help="runs per measurement; the median is reported (default: 3)")
    ap.add_argument("--no-qemu", action="store_true", help="do not run QEMU's colo-compare")
    ap.add_argument("--unix", action="store_true", help="unix sockets instead of TCP loopback")
    ap.add_argument("--window", type=int, default=512, metavar="W",
                    help="closed loop: most frames the sender runs ahead of outdev (default: 512)")
    ap.add_argument("--stall-timeout", type=float, default=5.0, metavar="S",
                    help="a run that releases nothing for S seconds is stopped and reported as "
                         "stalled (default: 5)")
    ap.add_argument("--latency-frames", type=int, default=20_000, metavar="N",
                    help="pairs in the latency run, at most --frames (default: 20000)")
    ap.add_argument("--latency-rate", type=float, default=20_000.0, metavar="PPS",
                    help="pairs per second in the latency run (default: 20000)")
    ap.add_argument("--memory-frames", type=int, default=0, metavar="N",
                    help="frames of the large capture pair in the memory part (default: 10 x --frames)")
    ap.add_argument("--verify-replay", action="store_true",
                    help="also run replay once, untimed, with --out to a file and check every frame "
                         "came out once and in order")
    ap.add_argument("--tmpdir", default=None, metavar="DIR",
                    help="where capture files go (default: /tmp); the memory part needs ~4 GB there")
    ap.add_argument("--json", metavar="FILE", help="also write every result as JSON to FILE ('-': stdout)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    bad = [p for p in args.only if p not in PARTS]
    if bad:
        ap.error(f"--only: unknown part(s) {bad}; choose from {list(PARTS)}")
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in args.workloads if w not in WORKLOAD_NAMES]
    if bad:
        ap.error(f"--workloads: unknown workload(s) {bad}; choose from {list(WORKLOAD_NAMES)}")
    if args.frames < 2 or args.repeat < 1 or args.window < 1:
        ap.error("--frames must be >= 2, --repeat and --window >= 1")
    args.sizes = workload_sizes(args.frames)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    self_check()
    results = {"version": 1, "machine": machine_info(),
               "params": {"frames": args.frames, "sizes": {w: args.sizes[w] for w in args.workloads},
                          "repeat": args.repeat, "parts": args.only, "workloads": args.workloads,
                          "unix": args.unix, "qemu": not args.no_qemu}}
    started = time.monotonic()
    busy0, own0 = system_busy_s(), own_cpu_s()
    workdir = tempfile.mkdtemp(prefix="ccbench-", dir=args.tmpdir or ("/tmp" if os.path.isdir("/tmp") else None))
    try:
        if "serve" in args.only:
            log("== serve throughput")
            part_throughput(args, results, workdir, log)
        if "latency" in args.only:
            log("== latency")
            part_latency(args, results, workdir, log)
        if "replay" in args.only:
            log("== replay")
            part_replay(args, results, workdir, log)
        if "memory" in args.only:
            log("== memory")
            part_memory(args, results, workdir, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        _kill_children()
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    # CPU the machine spent on anything but this benchmark and its children
    # (loopback softirq work not charged to a process lands here too)
    # (the two are sampled at different granularities, so a quiet machine can
    # come out a fraction of a second below zero: read that as zero)
    other = max(0.0, (system_busy_s() - busy0) - (own_cpu_s() - own0))
    results["other_cpu_s"] = round(other, 1)
    with contextlib.suppress(OSError):
        with open("/proc/loadavg") as f:
            results["loadavg_end"] = f.read().split()[:3]
    text = report(results)
    table_out = sys.stderr if args.json == "-" else sys.stdout
    print(text, file=table_out)
    print(f"\n(total {results['elapsed_s']:.0f} s; CPU used by other processes meanwhile: "
          f"{results['other_cpu_s']:.1f} s{'  -- the machine was not quiet, numbers are disturbed' if results['other_cpu_s'] > 0.1 * results['elapsed_s'] else ''})", file=table_out)
    if args.json:
        doc = json.dumps(results, indent=1, default=str)
        if args.json == "-":
            print(doc)
        else:
            with open(args.json, "w") as f:
                f.write(doc + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
