"""Prove ``tests/qemu_harness.py`` against Debian's QEMU 7.2 itself.

Part 1 reproduces a handful of the observed experiments
(``shared/spec/qemu-7.2-observed.md`` a1, a2, d1, i2, b1, j8, k1, j3, and
the notify vnet-word asymmetry of section 3) through :class:`QemuColoCompare`
and checks the exact bytes QEMU released; it also exercises reconnects on
every channel and the TCP transport.  Part 2
runs interop sections 4 and 4b (``shared/spec/qemu-filter-interop.md``) with
a tiny select-based stub comparator in the middle.

Each test runs its own QEMU(s); all are skipped when QEMU is not installed.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time

import pytest

from colo_cli.core.framing import FrameDecoder, encode
from colo_cli.testing import arp_frame, udp_frame

from qemu_harness import (QEMU_MISSING_REASON, ComparatorEndpoints, QemuColoCompare,
                          QemuError, QemuGroup, build_chain, build_colo_wiring,
                          connect_unix, listen_unix, live_qemu_pids, qemu_available,
                          qemu_colo, requires_qemu)  # noqa: F401 (qemu_colo is a fixture)

pytestmark = [pytest.mark.qemu, requires_qemu]

P, S = "primary", "secondary"
DO_CHECKPOINT = b"DO_CHECKPOINT"


@pytest.fixture(autouse=True)
def _no_qemu_left_behind():
    yield
    assert live_qemu_pids() == [], "a QEMU started by the harness is still running"


def msgs(notifications):
    return [n.message for n in notifications]


def wires(records):
    return [r.wire for r in records]


# ---------------------------------------------------------------------------
# The harness itself
# ---------------------------------------------------------------------------

def test_skip_reason_and_availability():
    assert qemu_available()
    assert "apt-get install qemu-system-x86" in QEMU_MISSING_REASON


def test_cleanup_kills_qemu_and_removes_workdir():
    q = QemuColoCompare()
    with pytest.raises(RuntimeError, match="boom"):
        with q:
            pid, workdir = q.pid, q.workdir
            assert q.is_alive()
            raise RuntimeError("boom")
    assert q.returncode == 0                # quit over QMP
    assert pid not in live_qemu_pids()
    assert not os.path.exists(workdir)
    assert q.stderr_text() == ""            # kept after the dir is gone


def test_startup_failure_is_reported_with_exit_status_and_stderr():
    # observed §1: compare_timeout=0 is rejected and the rejection aborts QEMU
    q = QemuColoCompare(compare_timeout=0)
    with pytest.raises(QemuError, match="did not start") as info:
        q.start()
    assert q.returncode == -6                  # SIGABRT
    assert "mutex->initialized" in str(info.value)
    assert q.pid not in live_qemu_pids()
    assert not os.path.exists(q.workdir)


# ---------------------------------------------------------------------------
# Part 1: QEMU's colo-compare, observed experiments
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a1_identical_udp_released_as_each_secondary_arrives(qemu_colo, transport):
    q = qemu_colo(transport=transport)
    frames = [udp_frame(b"same-%d" % i) for i in range(3)]
    for i, f in enumerate(frames):
        q.send(P, f)
        q.settle(0.03)
        assert len(q.outdev) == i, "released before its secondary arrived"
        q.send(S, f)
        assert len(q.wait_outdev(i + 1, 2.0)) == i + 1
    assert wires(q.outdev) == [encode(f) for f in frames]
    assert [r.frame for r in q.outdev] == frames
    assert q.wait_trace("packet same and release packet", 3, 2.0)
    assert q.trace_count("compare udp") == 3
    q.settle(0.05)
    assert q.notifications == []
    assert q.outdev_raw == b"".join(encode(f) for f in frames)


def test_a2_primary_ahead_released_reversed_with_checkpoints(qemu_colo):
    q = qemu_colo()
    frames = [udp_frame(b"distinct-%d" % i) for i in range(3)]
    for f in frames:
        q.send(P, f)
        q.settle(0.02)
    q.settle(0.05)
    for f in frames:
        q.send(S, f)
        q.settle(0.02)
    out = q.wait_outdev(3, 2.0)
    assert wires(out) == [encode(frames[2]), encode(frames[1]), encode(frames[0])]
    assert msgs(q.wait_notify(2, 2.0)) == [DO_CHECKPOINT, DO_CHECKPOINT]
    q.settle(0.1)
    assert len(q.outdev) == 3 and len(q.notifications) == 2
    assert q.wait_trace("packet same and release packet", 3, 2.0)
    assert q.trace_count("packet different") == 2
    assert q.trace_count("colo_compare_udp_miscompare : primary") == 6


def test_d1_arp_and_ipv6_pass_through_immediately(qemu_colo):
    q = qemu_colo(compare_timeout=500, expired_scan_cycle=100)
    arp = arp_frame()
    v6 = udp_frame(b"ipv6 payload", src="fd00::1", dst="fd00::2")
    q.send(P, arp)
    q.send(P, v6)
    out = q.wait_outdev(2, 2.0)
    assert wires(out) == [encode(arp), encode(v6)]
    assert out[1].t < 0.5                   # immediately, not at a timeout
    q.settle(0.7)                           # past compare_timeout: nothing queued
    assert q.notifications == []
    assert len(q.outdev) == 2
    assert q.trace_count("primary: unsupported packet in") == 2


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
def test_i2_proxy_init_answered_unknown_rejected_checkpoint_silent(qemu_colo, vnet):
    q = qemu_colo(vnet_hdr_support=vnet)
    q.send_notify(b"COLO_USERSPACE_PROXY_INIT")
    assert msgs(q.wait_notify(1, 2.0)) == [b"COLO_COMPARE_GET_XEN_INIT"]
    # notify output never carries a vnet word, even with vnet on (observed §3)
    assert q.notify_raw == b"\x00\x00\x00\x19COLO_COMPARE_GET_XEN_INIT"
    q.send_notify(b"HELLO")
    assert q.wait_stderr("COLO compare got unsupported instruction", 2.0)
    q.send_notify(b"COLO_CHECKPOINT")
    q.settle(0.1)
    assert len(q.notifications) == 1 and q.outdev == []
    assert q.is_alive()


def test_notify_input_without_vnet_word_is_misparsed_when_vnet_on(qemu_colo):
    q = qemu_colo(vnet_hdr_support=True)
    q.send_notify(b"COLO_USERSPACE_PROXY_INIT", vnet_word=False)
    q.settle(0.2)
    assert q.notifications == []


def test_b1_fast_mismatch_checkpoints_then_colo_checkpoint_releases(qemu_colo):
    q = qemu_colo(compare_timeout=500, expired_scan_cycle=100)
    pkt_p, pkt_s = udp_frame(b"AAAA"), udp_frame(b"AAAB")
    t_sent = q.now()
    q.send(P, pkt_p)
    q.settle(0.02)
    q.send(S, pkt_s)
    first = q.wait_notify(1, 1.0)
    assert msgs(first) == [DO_CHECKPOINT]
    assert first[0].t - t_sent < 0.3        # the miscompare itself
    n = q.wait_notify(5, 3.0)
    assert msgs(n) == [DO_CHECKPOINT] * 5
    # first old-packet tick: between compare_timeout and timeout + one cycle
    # (0.5-0.6 s; the upper bound leaves room for a loaded machine)
    times = [round(m.t - t_sent, 3) for m in n]
    assert 0.49 <= times[1] <= 0.9, times
    # then one per expired_scan_cycle (3 cycles = 0.3 s)
    assert 0.25 <= times[4] - times[1] <= 0.6, times
    assert q.outdev == []                   # timeouts never release
    q.send_notify(b"COLO_CHECKPOINT")
    out = q.wait_outdev(1, 1.0)
    assert wires(out) == [encode(pkt_p)]
    q.settle(0.35)
    late = [m for m in q.notifications if m.t > out[0].t + 0.05]
    assert late == [], "DO_CHECKPOINT after the queues were flushed"
    assert len(q.outdev) == 1
    assert q.trace_count("colo_old_packet_check_found") >= 4


def test_j8_vnet_released_with_the_primary_vnet_header(qemu_colo):
    q = qemu_colo(vnet_hdr_support=True)
    frame = udp_frame(b"vnet test")
    q.send(P, frame, vnet_hdr=b"\x01" * 12)
    q.send(S, frame, vnet_hdr=b"\x02" * 12)
    out = q.wait_outdev(1, 2.0)
    assert wires(out) == [encode(frame, b"\x01" * 12)]
    assert out[0].wire[:8] == (12 + len(frame)).to_bytes(4, "big") + (12).to_bytes(4, "big")
    assert out[0].vnet_hdr == b"\x01" * 12 and out[0].frame == frame
    q.settle(0.05)
    assert q.notifications == []


def test_k1_small_queue_keeps_max_plus_one_and_checkpoint_flushes_newest_first(qemu_colo):
    q = qemu_colo(max_queue_size=10)
    frames = [udp_frame(b"queued-%02d" % i) for i in range(15)]
    for f in frames:
        q.send(P, f)
    assert q.wait_trace("primary: queue size too big, drop packet", 4, 2.0)
    q.send_notify(b"COLO_CHECKPOINT")
    out = q.wait_outdev(11, 2.0)
    assert wires(out) == [encode(f) for f in reversed(frames[:11])]
    q.settle(0.1)
    assert len(q.outdev) == 11
    assert q.trace_count("queue size too big") == 4


def test_reconnect_every_channel_keeps_comparing(qemu_colo):
    q = qemu_colo()
    frames = [udp_frame(b"reconnect-%d" % i) for i in range(4)]
    q.send(P, frames[0]); q.send(S, frames[0])
    assert len(q.wait_outdev(1, 2.0)) == 1
    q.reconnect("outdev")
    q.send(P, frames[1]); q.send(S, frames[1])
    assert len(q.wait_outdev(2, 2.0)) == 2
    q.reconnect(P)
    q.reconnect(S)
    q.send(P, frames[2]); q.send(S, frames[2])
    q.reconnect("notify")
    q.send_notify(b"COLO_USERSPACE_PROXY_INIT")
    assert msgs(q.wait_notify(1, 2.0)) == [b"COLO_COMPARE_GET_XEN_INIT"]
    q.send(P, frames[3]); q.send(S, frames[3])
    assert wires(q.wait_outdev(4, 2.0)) == [encode(f) for f in frames]


def test_j3_zero_length_record_aborts_qemu_and_harness_reports_it(qemu_colo):
    q = qemu_colo()
    q.send_raw(P, b"\x00\x00\x00\x00" + b"x")
    assert q.wait_exit(5.0) == -6           # SIGABRT
    assert "Assertion" in q.stderr_text()
    t = time.monotonic()
    assert q.wait_outdev(1, 5.0) == []      # returns at EOF, not at the timeout
    assert time.monotonic() - t < 1.0


# ---------------------------------------------------------------------------
# Part 2: guest-less QEMU around a stub comparator
# ---------------------------------------------------------------------------

class StubComparator:
    """Forward each primary record to outdev byte for byte; read and discard
    the secondary.  One thread, non-blocking sockets, select(): it keeps
    reading its inputs while an outdev write is pending (interop pitfall 8).
    """

    CHANNELS = ("primary_in", "secondary_in", "outdev")

    def __init__(self, endpoints: ComparatorEndpoints) -> None:
        self.endpoints = endpoints
        self.listeners: dict[socket.socket, str] = {}
        self.conns: dict[str, socket.socket] = {}
        self.decoders = {ch: FrameDecoder(endpoints.vnet_hdr_support)
                         for ch in ("primary_in", "secondary_in")}
        self.records: dict[str, list[bytes]] = {"primary_in": [], "secondary_in": []}
        self.cond = threading.Condition()
        self.out = bytearray()
        self.forwarded = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stub", daemon=True)
        for ch in self.CHANNELS:                 # listen before QEMU starts
            ep = getattr(endpoints, ch)
            if ep.role == "server":
                self.listeners[listen_unix(ep.path)] = ch

    def connect(self, timeout_s: float = 10.0) -> None:
        for ch in self.CHANNELS:
            ep = getattr(self.endpoints, ch)
            if ep.role == "client":
                self._add(ch, connect_unix(ep.path, timeout_s))
        self._thread.start()

    def _add(self, ch: str, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.conns[ch] = sock

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                rlist = list(self.listeners) + [self.conns[ch] for ch in
                                                ("primary_in", "secondary_in") if ch in self.conns]
                wlist = [self.conns["outdev"]] if self.out and "outdev" in self.conns else []
                readable, writable, _ = select.select(rlist, wlist, [], 0.05)
                for sock in readable:
                    if sock in self.listeners:
                        conn, _ = sock.accept()
                        self._add(self.listeners.pop(sock), conn)
                        sock.close()
                        continue
                    ch = "primary_in" if sock is self.conns.get("primary_in") else "secondary_in"
                    try:
                        data = sock.recv(1 << 18)
                    except BlockingIOError:
                        continue
                    if not data:
                        del self.conns[ch]
                        continue
                    recs = [w for w, _ in self.decoders[ch].feed(data)]
                    if ch == "primary_in":
                        for w in recs:
                            self.out += w
                    with self.cond:
                        self.records[ch].extend(recs)
                        self.cond.notify_all()
                for sock in writable:
                    try:
                        n = sock.send(self.out)
                    except BlockingIOError:
                        continue
                    del self.out[:n]
        except BaseException as exc:            # surfaced by wait_records / close
            self.error = exc
            with self.cond:
                self.cond.notify_all()

    def wait_records(self, ch: str, n: int, timeout_s: float) -> list[bytes]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.records[ch]) >= n or self.error, timeout_s)
            if self.error:
                raise self.error
            return list(self.records[ch])

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for sock in list(self.listeners) + list(self.conns.values()):
            sock.close()


def chain_frames(n: int) -> list[bytes]:
    return [udp_frame(b"%06d" % i + b"x" * (i % 300), sport=5000 + i % 7) for i in range(n)]


def expected_record(frame: bytes, vnet: bool) -> bytes:
    # dgram netdevs never set a vnet header: the word is always 0 (interop §2)
    return encode(frame, b"" if vnet else None)


@pytest.mark.parametrize("n", [5, 2000])
@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
def test_chain_producers_stub_consumer_byte_exact(vnet, n):
    frames = chain_frames(n)
    with QemuGroup() as group:
        chain = build_chain(group, vnet_hdr_support=vnet)
        stub = StubComparator(chain.endpoints)
        try:
            chain.start()
            stub.connect()
            chain.wait_ready()
            for f in frames:
                chain.primary.inject(f)
                chain.secondary.inject(f)
            released = chain.release.wait_received(n, 20.0)
            assert len(released) == n
            assert released == frames
            expected = [expected_record(f, vnet) for f in frames]
            assert stub.wait_records("primary_in", n, 10.0) == expected
            assert stub.wait_records("secondary_in", n, 10.0) == expected
            assert chain.release.received() == frames      # nothing extra
        finally:
            stub.close()


ROLE_SETS = {
    # the comparator's roles on primary_in, secondary_in, outdev
    "default": ("client", "server", "client"),
    "flipped": ("server", "client", "server"),
}


@pytest.mark.parametrize("roles", list(ROLE_SETS))
def test_chain_with_either_role_on_every_socket(roles):
    pri, sec, out = ROLE_SETS[roles]
    frames = chain_frames(20)
    with QemuGroup() as group:
        chain = build_chain(group, vnet_hdr_support=True, primary_in_role=pri,
                            secondary_in_role=sec, outdev_role=out)
        assert (chain.endpoints.primary_in.role, chain.endpoints.secondary_in.role,
                chain.endpoints.outdev.role) == (pri, sec, out)
        stub = StubComparator(chain.endpoints)
        try:
            chain.start()
            stub.connect()
            chain.wait_ready()
            for f in frames:
                chain.primary.inject(f)
                chain.secondary.inject(f)
            assert chain.release.wait_received(20, 10.0) == frames
            assert len(stub.wait_records("secondary_in", 20, 10.0)) == 20
        finally:
            stub.close()


def test_producer_record_bytes_match_the_interop_doc():
    # interop §2: a 59-byte frame, vnet on -> 0000003b 00000000 <frame>
    frame = udp_frame(b"\x00" * 17, sport=40000, dport=7)
    assert len(frame) == 59
    with QemuGroup() as group:
        chain = build_chain(group, vnet_hdr_support=True)
        stub = StubComparator(chain.endpoints)
        try:
            chain.start()
            stub.connect()
            chain.wait_ready()
            chain.primary.inject(frame)
            rec = stub.wait_records("primary_in", 1, 5.0)
            assert rec == [bytes.fromhex("0000003b00000000") + frame]
            assert chain.release.wait_received(1, 5.0) == [frame]
        finally:
            stub.close()


@pytest.mark.parametrize("n", [5, 2000])
@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
def test_colo_wiring_guests_to_client_through_stub(vnet, n):
    frames = chain_frames(n)
    with QemuGroup() as group:
        wiring = build_colo_wiring(group, vnet_hdr_support=vnet)
        stub = StubComparator(wiring.endpoints)
        try:
            wiring.start()
            stub.connect()
            wiring.wait_ready()
            for f in frames:
                wiring.guest_send(P, f)
                wiring.guest_send(S, f)
            released = wiring.wait_client_received(n, 20.0)
            assert len(released) == n
            assert released == frames
            expected = [expected_record(f, vnet) for f in frames]
            assert stub.wait_records("primary_in", n, 10.0) == expected
            assert stub.wait_records("secondary_in", n, 10.0) == expected
            assert wiring.client_received() == frames       # no loop back
        finally:
            stub.close()


@pytest.mark.parametrize("roles", list(ROLE_SETS))
def test_colo_wiring_with_either_role_on_every_socket(roles):
    pri, sec, out = ROLE_SETS[roles]
    frames = chain_frames(20)
    with QemuGroup() as group:
        wiring = build_colo_wiring(group, primary_in_role=pri, secondary_in_role=sec,
                                   outdev_role=out)
        stub = StubComparator(wiring.endpoints)
        try:
            wiring.start()
            stub.connect()
            wiring.wait_ready()
            for f in frames:
                wiring.guest_send(P, f)
                wiring.guest_send(S, f)
            assert wiring.wait_client_received(20, 10.0) == frames
            assert len(stub.wait_records("secondary_in", 20, 10.0)) == 20
        finally:
            stub.close()


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
def test_colo_wiring_client_to_both_guests(vnet):
    n = 200
    frames = chain_frames(n)
    with QemuGroup() as group:
        wiring = build_colo_wiring(group, vnet_hdr_support=vnet)
        stub = StubComparator(wiring.endpoints)
        try:
            wiring.start()
            stub.connect()
            wiring.wait_ready()
            for f in frames:
                wiring.client_send(f)
            expected = [expected_record(f, vnet) for f in frames]
            assert wires(wiring.wait_guest_received(P, n, 10.0)) == expected
            assert wires(wiring.wait_guest_received(S, n, 10.0)) == expected
            assert stub.records == {"primary_in": [], "secondary_in": []}
            assert wiring.client_received() == []
        finally:
            stub.close()
