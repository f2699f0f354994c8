"""Loopback tests of ``colo-compare serve`` with real sockets.

The real CLI runs as a subprocess (``python -m colo_cli serve``); the test
plays the primary and secondary QEMUs (writers on primary-in and
secondary-in), the primary's outdev reader and Xen's COLO proxy on
notify-dev, with plain unix and TCP loopback sockets.  Every outdev reader
runs in its own thread, so the test never blocks serve; every wait is on a
condition (serve's counters on its control socket, bytes on a socket, a line
on stderr) with a deadline, never a fixed sleep.

References: ``spec/qemu-7.2-observed.md`` section 3 (framing, notify_dev),
section 5 (the experiments named here: j1b, j3, j5, m1, ...) and
``spec/qemu-filter-interop.md`` pitfall 8 (the deadlock).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time

import pytest

from colo_cli.capture import PcapWriter, open_capture
from colo_cli.core.framing import MAX_RECORD_LEN
from colo_cli.testing import (arp_frame, ether, gre_frame, icmp_frame, ipv4, tcp_frame, udp,
                              udp_frame)
from serve_helpers import (PY, Listener, NotifyPeer, OutReader, ServeProc, connect, free_port,
                           peer_closed, processes_with, rec, split_records, tcp_ep, unix_ep,
                           write_nonblocking)

GET_XEN_INIT = b"\x00\x00\x00\x19COLO_COMPARE_GET_XEN_INIT"   # exact bytes, observed section 3
DO_CHECKPOINT = b"\x00\x00\x00\x0dDO_CHECKPOINT"
SYN, ACK, PSH, FIN = 0x02, 0x10, 0x08, 0x01
VNET_LENS = (10, 12, 0, 20)      # virtio-net header sizes (20: the largest QEMU takes)


# -- fixtures ------------------------------------------------------------------------

class Env:
    """One test's world: a short directory under /tmp (unix socket paths are
    limited to 107 bytes), the serve processes it started and the sockets it
    opened.  Everything is torn down by the fixture."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.procs: list[ServeProc] = []
        self.closers: list = []

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def track(self, obj):
        self.closers.append(obj)
        return obj

    def start(self, args, *, control: bool = True, ready: bool = True, verbose: bool = True,
              inject: str | None = None):
        args = list(args)
        ctl = None
        if control:
            ctl = self.path("ctl.sock")
            args += ["--control", ctl]
        if verbose:
            args.append("-v")
        srv = ServeProc(self.workdir, args, control=ctl, inject=inject)
        self.procs.append(srv)
        if ready:
            assert verbose or control, "nothing tells when serve is ready"
            srv.wait_ready(verbose)
        return srv

    def rig(self, **kw) -> "Rig":
        return Rig(self, **kw)

    def close(self) -> None:
        for obj in reversed(self.closers):
            with contextlib.suppress(Exception):
                obj.close()
        for srv in self.procs:
            srv.kill_hard()


@pytest.fixture
def env():
    workdir = tempfile.mkdtemp(prefix="ccs-", dir="/tmp")
    e = Env(workdir)
    try:
        yield e
    finally:
        e.close()
        for srv in e.procs:
            assert srv.proc.poll() is not None, f"serve {srv.pid} still running"
        # no serve (nor anything else) started by this test is left behind
        left = processes_with(workdir)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)
        assert not left, f"processes left running: {left}"


class Rig:
    """serve with primary-in, secondary-in and outdev listening (unix or TCP),
    a control socket and an event log; the test connected as both writers
    and as the outdev reader."""

    def __init__(self, env: Env, *, transport: str = "unix", vnet: bool = False,
                 args=(), notify: str | None = None, outdev: str = "server",
                 verbose: bool = True, inject: str | None = None):
        self.env = env
        self.vnet = vnet
        if transport == "unix":
            self.p_ep = unix_ep(env.workdir, "p.sock")[0]
            self.s_ep = unix_ep(env.workdir, "s.sock")[0]
            self.o_ep = unix_ep(env.workdir, "o.sock")[0]
        else:
            self.p_ep, self.s_ep, self.o_ep = (tcp_ep(free_port()) for _ in range(3))
        self.o_listener = None
        if outdev == "client":          # serve connects to the test's outdev reader (TCP)
            self.o_ep = tcp_ep(free_port(), server=False)
            self.o_listener = env.track(Listener(self.o_ep))
        self.events_path = env.path("events.jsonl")
        argv = ["--primary-in", self.p_ep, "--secondary-in", self.s_ep, "--outdev", self.o_ep,
                "--events", self.events_path, *args]
        if vnet:
            argv.append("--vnet-hdr-support")
        self.xen_listener = None
        self.xen: NotifyPeer | None = None
        if notify == "client":          # serve connects to Xen
            self.n_ep = unix_ep(env.workdir, "n.sock", server=False)[0]
            self.xen_listener = env.track(Listener(self.n_ep))
            argv += ["--notify-dev", self.n_ep]
        elif notify == "server":        # Xen connects to serve
            self.n_ep = unix_ep(env.workdir, "n.sock")[0]
            argv += ["--notify-dev", self.n_ep]
        self.srv = env.start(argv, verbose=verbose, inject=inject)
        if notify == "client":
            self.xen = env.track(NotifyPeer(self.xen_listener.accept(), "notify-dev"))
        elif notify == "server":
            self.xen = env.track(NotifyPeer(connect(self.n_ep), "notify-dev"))
        self.p = env.track(connect(self.p_ep))
        self.s = env.track(connect(self.s_ep))
        self.out = self.connect_out()
        names = ["primary-in", "secondary-in", "outdev"] + (["notify-dev"] if notify else [])
        self.srv.wait_stats(lambda st: all(st["serve"]["links"][n]["connected"] for n in names),
                            what="serve to accept the test's connections")

    def connect_out(self) -> OutReader:
        """A (new) outdev reader: connect to serve, or accept serve's
        connection on the test's listener (made anew if it was closed)."""
        if self.o_listener is None:
            sock = connect(self.o_ep)
        else:
            if self.o_listener.sock.fileno() == -1:
                self.o_listener = self.env.track(Listener(self.o_ep))
            sock = self.o_listener.accept()
        return self.env.track(OutReader(sock, self.vnet))

    def events(self, kind: str | None = None) -> list[dict]:
        with open(self.events_path) as f:
            evs = [json.loads(line) for line in f if line.strip()]
        return [e for e in evs if kind is None or e["event"] == kind]

    def send_pairs(self, p_records, s_records, chunk: int = 16) -> None:
        """Both inputs, alternately, ``chunk`` records at a time."""
        p_records, s_records = list(p_records), list(s_records)
        i = j = 0
        while i < len(p_records) or j < len(s_records):
            if i < len(p_records):
                self.p.sendall(b"".join(p_records[i:i + chunk]))
                i += chunk
            if j < len(s_records):
                self.s.sendall(b"".join(s_records[j:j + chunk]))
                j += chunk

    def wait_read(self, primary: int | None = None, secondary: int | None = None):
        """serve has read (and handled) that many frames on each input."""
        return self.srv.wait_stats(
            lambda st: (primary is None or st["frames_in"]["primary"] >= primary)
            and (secondary is None or st["frames_in"]["secondary"] >= secondary),
            what=f"serve to read {primary} primary / {secondary} secondary frames")

    def stop(self, sig=signal.SIGTERM, timeout: float = 10) -> int:
        """Stop serve; returns its exit status once outdev saw EOF."""
        self.srv.signal(sig)
        rc = self.srv.wait(timeout)
        if self.out is not None:
            self.out.wait_eof()
        return rc


def vhdr(n: int, fill: int) -> bytes:
    """An n-byte virtio-net header whose bytes are recognisable."""
    return bytes((fill + k) & 0xFF for k in range(n))


def records_for(frames, vnet: bool, side: str, vnet_lens=(10, 12, 0)):
    """QEMU records of ``frames``; with vnet each side has its own header
    bytes (not compared) of the same length."""
    if not vnet:
        return [rec(f) for f in frames]
    fill = 0x10 if side == "p" else 0xA0
    return [rec(f, vhdr(vnet_lens[i % len(vnet_lens)], fill + i)) for i, f in enumerate(frames)]


def assert_stream(got: bytes, expected_records: list[bytes], vnet: bool = False) -> None:
    """outdev carried exactly these records, in this order, nothing else."""
    recs, rest = split_records(got, vnet)
    assert rest == b"", f"{len(rest)} stray bytes after {len(recs)} records"
    if recs != expected_records:
        index = {r: i for i, r in enumerate(expected_records)}
        raise AssertionError(f"outdev: {len(recs)} records, expected {len(expected_records)}; "
                             f"order by expected index: {[index.get(r, '?') for r in recs][:60]}")


def udp_flow(n: int, flow: int = 0, size: int = 0, **kw) -> list[bytes]:
    """``n`` distinct UDP datagrams of one flow."""
    return [udp_frame(b"flow %04d datagram %05d " % (flow, i) + bytes(size), sport=10000 + flow,
                      dport=5353, ident=i & 0xFFFF, **kw) for i in range(n)]


def tcp_conversation(flow: int, src="10.0.0.1", dst="10.0.0.2", rounds: int = 2) -> list[bytes]:
    """SYN, then data / pure ACK rounds, then FIN: one side of a TCP
    connection, in sequence order."""
    sport = 20000 + flow
    isn = (flow * 7919 + 1000) & 0xFFFFFFFF
    frames = [tcp_frame(b"", seq=isn, ack=0, flags=SYN, sport=sport, src=src, dst=dst,
                        options=b"\x02\x04\x05\xb4")]
    seq = isn + 1
    ack = 9000
    for r in range(rounds):
        data = b"tcp flow %03d round %d " % (flow, r) * (3 + r)
        frames.append(tcp_frame(data, seq=seq, ack=ack, flags=PSH | ACK, sport=sport, src=src,
                                dst=dst))
        seq += len(data)
        ack += 11
        frames.append(tcp_frame(b"", seq=seq, ack=ack, flags=ACK, sport=sport, src=src, dst=dst))
    frames.append(tcp_frame(b"", seq=seq, ack=ack + 1, flags=FIN | ACK, sport=sport, src=src,
                            dst=dst))
    return frames


def ipv4_fragments(flow: int, datagram: int) -> list[bytes]:
    """One UDP datagram in three IPv4 fragments, in offset order."""
    u = udp(b"fragmented %02d/%d " % (flow, datagram) * 4, sport=30000 + flow, dport=7)
    ident = 0x4000 + flow * 16 + datagram
    return [ether(ipv4(u[0:16], 17, ident=ident, flags_frag=0x2000), 0x0800),
            ether(ipv4(u[16:32], 17, ident=ident, flags_frag=0x2000 | 2), 0x0800),
            ether(ipv4(u[32:], 17, ident=ident, flags_frag=4), 0x0800)]


def non_ip_frame(i: int) -> bytes:
    """Not IP nor ARP (a local experimental ethertype): bypassed."""
    return ether(b"not ip %03d" % i + bytes(40), 0x88B5)


def mixed_groups() -> list[tuple[str, list[bytes]]]:
    """Many flows of every kind; each group's frames in the order each
    replica sends them."""
    g = []
    for f in range(24):
        g.append((f"udp4-{f}", udp_flow(5, f, size=f)))
    for f in range(8):
        g.append((f"tcp4-{f}", tcp_conversation(f)))
    for f in range(3):
        g.append((f"tcp6-{f}", tcp_conversation(100 + f, src="fd00::1", dst="fd00::2")))
    for f in range(6):
        g.append((f"icmp-{f}", [icmp_frame(b"ping %d/%d" % (f, i), ident=f + 1, seq=i, ip_ident=i)
                                for i in range(4)]))
    for f in range(4):
        g.append((f"arp-{f}", [arp_frame(op=1 + i % 2, spa=f"10.0.1.{f + 1}", tpa=f"10.0.2.{i + 1}")
                               for i in range(3)]))
    for f in range(6):
        g.append((f"udp6-{f}", udp_flow(4, 200 + f, src="fd00::1", dst="fd00::2")))
    for f in range(5):
        g.append((f"vlan-{f}", udp_flow(4, 300 + f, vlans=((0x8100, 100 + f),))))
    g.append(("qinq", udp_flow(4, 400, vlans=((0x88A8, 10), (0x8100, 20)))))
    for f in range(5):
        g.append((f"frag-{f}", ipv4_fragments(f, 0) + ipv4_fragments(f, 1)))
    for f in range(3):
        g.append((f"gre-{f}", [gre_frame(b"\0\0\x08\0gre %d/%d" % (f, i), src=f"10.0.3.{f + 1}",
                                         ident=i) for i in range(3)]))
    g.append(("non-ip", [non_ip_frame(i) for i in range(4)]))
    return g


def interleave(groups, seed=None) -> list[tuple[int, int]]:
    """(group, index) in round-robin order, or in a random merge that keeps
    each group's order."""
    if seed is None:
        order = []
        longest = max(len(fr) for _n, fr in groups)
        for i in range(longest):
            order += [(gi, i) for gi, (_n, fr) in enumerate(groups) if i < len(fr)]
        return order
    rnd = random.Random(seed)
    nexts = [0] * len(groups)
    pool = [gi for gi, (_n, fr) in enumerate(groups) for _ in fr]
    rnd.shuffle(pool)
    order = []
    for gi in pool:
        order.append((gi, nexts[gi]))
        nexts[gi] += 1
    return order


# -- 1, 2: identical traffic -------------------------------------------------------------

@pytest.mark.parametrize("transport,vnet", [("unix", False), ("tcp", True), ("tcp", False),
                                            ("unix", True)])
def test_identical_mixed_traffic_every_frame_once_in_connection_order(env, transport, vnet):
    groups = mixed_groups()
    p_recs = {}
    s_recs = {}
    for gi, (_name, frames) in enumerate(groups):
        lens = VNET_LENS[gi % 4:] + VNET_LENS[:gi % 4]
        for i, r in enumerate(records_for(frames, vnet, "p", lens)):
            p_recs[gi, i] = r
        for i, r in enumerate(records_for(frames, vnet, "s", lens)):
            s_recs[gi, i] = r
    assert len(set(p_recs.values())) == len(p_recs)          # every frame is distinct
    if vnet:   # the headers differ between the sides: they are not compared
        assert sum(p_recs[k] != s_recs[k] for k in p_recs) > len(p_recs) // 2
    p_order = interleave(groups)
    s_order = interleave(groups, seed=7)
    assert p_order != s_order
    rig = env.rig(transport=transport, vnet=vnet)
    rig.send_pairs([p_recs[k] for k in p_order], [s_recs[k] for k in s_order], chunk=13)

    n = len(p_recs)
    non_ip = [gi for gi, (name, _f) in enumerate(groups) if name == "non-ip"][0]
    n_bypass = len(groups[non_ip][1])
    total = sum(len(r) for r in p_recs.values())
    st = rig.srv.wait_stats(lambda st: st["serve"]["links"]["outdev"]["frames_out"] >= n
                            and st["frames_in"]["secondary"] == n,
                            what="every primary frame to be written to outdev")
    assert st["frames_in"] == {"primary": n, "secondary": n}
    assert st["released"] == {"match": n - n_bypass, "total": n - n_bypass}
    assert st["bypassed"] == {"unknown-ethertype": n_bypass}
    assert st["dropped"] == {"secondary:unknown-ethertype": n_bypass}
    assert st["miscompares"] == {} and st["checkpoint_requests"] == {}
    assert st["queued"]["frames"] == 0
    assert st["fragments"]["reassembled"] == {"primary": 10, "secondary": 10}
    rig.out.wait_bytes(total)
    assert rig.stop() == 0
    got = rig.out.data()
    assert len(got) == total                      # nothing more came, not even at the stop
    recs, rest = split_records(got, vnet)
    assert rest == b""
    assert sorted(recs) == sorted(p_recs.values())     # each primary record exactly once, as sent
    pos = {r: i for i, r in enumerate(recs)}
    for gi, (name, frames) in enumerate(groups):
        positions = [pos[p_recs[gi, i]] for i in range(len(frames))]
        assert positions == sorted(positions), f"{name} reordered: {positions}"
    if vnet:   # released records keep the primary's own vnet header
        for k, r in p_recs.items():
            if r != s_recs[k]:
                assert r in pos and s_recs[k] not in pos


@pytest.mark.parametrize("kind", ["udp", "tcp"])
@pytest.mark.parametrize("vnet", [False, True])
def test_single_flow_comes_out_in_total_order(env, kind, vnet):
    if kind == "udp":
        frames = udp_flow(400, 1, size=60)
    else:
        frames = [tcp_frame(b"", seq=99, ack=0, flags=SYN)]
        seq = 100
        for i in range(300):
            data = b"%05d" % i * (1 + i % 40)
            frames.append(tcp_frame(data, seq=seq, ack=7 + i, flags=PSH | ACK))
            seq += len(data)
            if i % 10 == 9:
                frames.append(tcp_frame(b"", seq=seq, ack=7 + i, flags=ACK, window=1000 + i))
        frames.append(tcp_frame(b"", seq=seq, ack=9999, flags=FIN | ACK))
    p = records_for(frames, vnet, "p")
    s = records_for(frames, vnet, "s")
    rig = env.rig(vnet=vnet)
    rig.send_pairs(p, s, chunk=7)
    rig.out.wait_bytes(sum(map(len, p)))
    st = rig.srv.stats()
    assert st["released"]["match"] == len(p) and st["queued"]["frames"] == 0
    assert rig.stop() == 0
    assert_stream(rig.out.data(), p, vnet)      # byte for byte: the primary stream itself


# -- 3: a divergence, default policy (release) ---------------------------------------------

def test_divergence_default_policy_releases_the_primary_and_records_it(env):
    rig = env.rig()
    # UDP: payload differs in its 4th byte (fixed UDP checksums, so only the payload differs)
    p0 = rec(udp_frame(b"AAAA", checksum=0x1234))
    s0 = rec(udp_frame(b"AAAB", checksum=0x1234))
    p1 = rec(udp_frame(b"after", checksum=0x4321))
    rig.p.sendall(p0)
    rig.wait_read(primary=1)
    rig.s.sendall(s0)
    rig.out.wait_bytes(len(p0))              # the primary wins: released at the local checkpoint
    rig.p.sendall(p1)
    rig.s.sendall(p1)
    # TCP: one payload byte differs at stream offset 37
    tp = rec(tcp_frame(b"x" * 100, seq=5000, sport=41000))
    ts = rec(tcp_frame(b"x" * 37 + b"y" + b"x" * 62, seq=5000, sport=41000))
    rig.wait_read(primary=2, secondary=2)
    rig.p.sendall(tp)
    rig.wait_read(primary=3)
    rig.s.sendall(ts)
    rig.out.wait_bytes(len(p0) + len(p1) + len(tp))
    st = rig.srv.stats()
    assert st["miscompares"] == {"tcp:content": 1, "udp:content": 1}
    assert st["checkpoint_requests"] == {"miscompare": 2}
    assert st["serve"]["checkpoints_by"] == {"local": 2, "notify": 0, "control": 0}
    assert st["released"] == {"match": 1, "checkpoint": 2, "total": 3}
    assert st["secondary"]["discarded"] == 2
    assert st["queued"]["frames"] == 0
    assert st["serve"]["policy"] == "release"
    assert rig.stop() == 0
    assert_stream(rig.out.data(), [p0, p1, tp])
    mis = rig.events("miscompare")
    assert [(m["flow"], m["protocol"], m["cause"], m["stream_offset"]) for m in mis] == [
        ("udp 10.0.0.1:5000 > 10.0.0.2:6000", "udp", "content", 11),   # 8 (UDP header) + 3
        ("tcp 10.0.0.1:41000 > 10.0.0.2:80", "tcp", "content", 37)]
    assert mis[1]["raw_seq"] == 5037
    assert all(m["v"] == 2 and isinstance(m["time"], float) for m in mis)
    # each input's frames are numbered from 1, in arrival order
    assert [(m["primary"]["frame_number"], m["secondary"]["frame_number"]) for m in mis] == [
        (1, 1), (3, 3)]
    assert mis[1]["primary"]["offset"] == 14 + 20 + 20 + 37
    assert all(m["explanation"] is None for m in mis)      # no protocol to read them in
    assert [(e["cause"], e["flow"]) for e in rig.events("checkpoint_request")] == [
        ("miscompare", "udp 10.0.0.1:5000 > 10.0.0.2:6000"),
        ("miscompare", "tcp 10.0.0.1:41000 > 10.0.0.2:80")]
    assert [(e["released"], e["discarded"]) for e in rig.events("checkpoint")] == [(1, 1), (1, 1)]


def _dns(ttl: int) -> bytes:
    return (b"\x1a\x2b\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\x07example\x03org\x00"
            b"\x00\x01\x00\x01\xc0\x0c\x00\x01\x00\x01" + struct.pack(">I", ttl)
            + b"\x00\x04\xc0\x00\x02\x0a")


def test_hexdump_n_explains_the_first_n_miscompares_and_events_carry_the_explanation(env):
    """--hexdump N means what it means in replay: the first N miscompares,
    with what differs in protocol terms; the event log explains every one."""
    rig = env.rig(args=["--hexdump", "1", "--color", "never"])
    frames = []
    for i, (p_ttl, s_ttl) in enumerate(((300, 299), (60, 61))):
        p = rec(udp_frame(_dns(p_ttl), sport=53, dport=40000 + i))
        s = rec(udp_frame(_dns(s_ttl), sport=53, dport=40000 + i))
        frames.append(p)
        rig.p.sendall(p)
        rig.wait_read(primary=i + 1)
        rig.s.sendall(s)
        rig.out.wait_bytes(sum(map(len, frames)))
    assert rig.stop() == 0
    err = rig.srv.stderr()
    assert err.count("Miscompare ") == 1                    # the first one only
    assert "  DNS answer 1 example.org A: TTL 300 vs 299" in err
    assert "primary frame 1 (" in err and "secondary frame 1 (" in err
    assert "\x1b[" not in err                               # --color never
    mis = rig.events("miscompare")
    assert [m["explanation"]["text"] for m in mis] == [
        "DNS answer 1 example.org A: TTL 300 vs 299", "DNS answer 1 example.org A: TTL 60 vs 61"]
    assert [(m["primary"]["frame_number"], m["secondary"]["frame_number"]) for m in mis] == [
        (1, 1), (2, 2)]
    # the checksum differs because the TTL does: the payload's byte is named
    assert mis[0]["primary"]["offset"] == 14 + 20 + 6
    # (the TTL's last byte: 0x012c vs 0x012b)
    assert mis[0]["primary"]["payload_offset"] == 14 + 20 + 8 + len(_dns(0)) - 7
    (start,) = rig.events("start")
    from colo_cli import __version__
    assert start["tool"] == {"name": "colo-compare", "version": __version__} and start["v"] == 2


# -- 4: notify_dev (Xen) ----------------------------------------------------------------------

@pytest.mark.parametrize("role,vnet", [("server", False), ("client", True), ("server", True)])
def test_notify_dev_xen_protocol(env, role, vnet):
    rig = env.rig(vnet=vnet, notify=role, args=["--compare-timeout", "60000"])
    xen = rig.xen
    assert rig.srv.stats()["serve"]["policy"] == "hold"
    # INIT is answered with exactly this, never a vnet word (even with --vnet-hdr-support)
    xen.send(b"COLO_USERSPACE_PROXY_INIT")
    assert xen.wait_bytes(len(GET_XEN_INIT)) == GET_XEN_INIT

    def pair(tag: bytes, differ: bool):
        p = udp_frame(b"payload " + tag, checksum=0x1111, sport=7000)
        s = udp_frame(b"payload " + (tag.lower() if differ else tag), checksum=0x1111, sport=7000)
        return records_for([p], vnet, "p")[0], records_for([s], vnet, "s")[0]

    # a divergence: exactly one DO_CHECKPOINT, and the frame is HELD
    p0, s0 = pair(b"ONE", differ=True)
    rig.p.sendall(p0)
    rig.wait_read(primary=1)
    rig.s.sendall(s0)
    assert xen.wait_bytes(len(GET_XEN_INIT) + len(DO_CHECKPOINT)) == GET_XEN_INIT + DO_CHECKPOINT
    st = rig.srv.wait_stats(lambda st: st["frames_in"]["secondary"] == 1)
    assert st["queued"] == {"frames": 2, "bytes": len(p0) + len(s0), "primary": 1, "secondary": 1}
    assert st["serve"]["links"]["outdev"]["frames_out"] == 0 and len(rig.out) == 0
    assert st["serve"]["notify"]["do_checkpoint_sent"] == 1
    # COLO_CHECKPOINT releases it; the queued secondary is dropped
    xen.send(b"COLO_CHECKPOINT")
    rig.out.wait_bytes(len(p0))
    st = rig.srv.wait_stats(lambda st: st["serve"]["notify"]["colo_checkpoint_received"] == 1)
    assert st["queued"]["frames"] == 0 and st["secondary"]["discarded"] == 1
    assert st["released"] == {"match": 0, "checkpoint": 1, "total": 1}
    assert st["serve"]["checkpoints_by"] == {"local": 0, "notify": 1, "control": 0}
    # ... dropped indeed: the primary twin of that secondary now waits for its own
    p_twin = records_for([udp_frame(b"payload one", checksum=0x1111, sport=7000)], vnet, "p")[0]
    rig.p.sendall(p_twin)
    st = rig.wait_read(primary=2)
    assert st["queued"]["primary"] == 1 and st["queued"]["secondary"] == 0
    rig.s.sendall(s0)
    rig.out.wait_bytes(len(p0) + len(p_twin))
    # a notify message WITH a vnet word (0), as QEMU's own framing would send it, is accepted
    p2, s2 = pair(b"TWO", differ=True)
    rig.p.sendall(p2)
    rig.wait_read(primary=3)
    rig.s.sendall(s2)
    xen.wait_messages(3)
    assert len(rig.out) == len(p0) + len(p_twin)        # held
    xen.send(b"COLO_CHECKPOINT", vnet_word=True)
    rig.out.wait_bytes(len(p0) + len(p_twin) + len(p2))
    # an unknown message: ignored (no reply), one line on stderr, and the channel stays in step
    xen.send(b"HELLO")
    rig.srv.wait_stderr("notify-dev: unsupported instruction 'HELLO' ignored")
    xen.send(b"COLO_USERSPACE_PROXY_INIT", vnet_word=True)
    xen.wait_messages(4)
    st = rig.srv.stats()
    assert st["serve"]["notify"] == {"do_checkpoint_sent": 2, "colo_checkpoint_received": 2,
                                     "unknown_messages": 1}
    assert st["serve"]["checkpoints_by"] == {"local": 0, "notify": 2, "control": 0}
    assert [l for l in rig.srv.stderr_lines() if "unsupported" in l] == [
        "colo-compare: notify-dev: unsupported instruction 'HELLO' ignored"]
    assert [e["message"] for e in rig.events("notify_unknown")] == ["HELLO"]
    assert rig.stop() == 0
    assert xen.data() == GET_XEN_INIT + DO_CHECKPOINT + DO_CHECKPOINT + GET_XEN_INIT
    assert_stream(rig.out.data(), [p0, p_twin, p2], vnet)


# -- 5: hold until a control checkpoint --------------------------------------------------

def test_hold_policy_holds_until_control_checkpoint(env):
    rig = env.rig(args=["--checkpoint-policy", "hold", "--compare-timeout", "60000"])
    p0 = rec(udp_frame(b"held AAAA"))
    s0 = rec(udp_frame(b"held AAAB"))
    p1 = rec(udp_frame(b"other flow", sport=5001))
    rig.p.sendall(p0)
    rig.wait_read(primary=1)
    rig.s.sendall(s0)
    st = rig.srv.wait_stats(lambda st: st["checkpoint_requests"].get("miscompare") == 1)
    # a matching pair on another flow still goes through while the diverged one is held
    rig.p.sendall(p1)
    rig.s.sendall(p1)
    rig.out.wait_bytes(len(p1))
    st = rig.srv.wait_stats(lambda st: st["released"]["total"] == 1)
    assert st["queued"]["primary"] == 1 and st["serve"]["checkpoints_by"]["local"] == 0
    assert rig.out.data() == p1
    reply = rig.srv.control({"cmd": "checkpoint"})
    assert reply == {"ok": True, "released": 1, "discarded": 1}
    rig.out.wait_bytes(len(p1) + len(p0))
    st = rig.srv.stats()
    assert st["serve"]["checkpoints_by"] == {"local": 0, "notify": 0, "control": 1}
    assert st["queued"]["frames"] == 0
    assert rig.stop() == 0
    assert_stream(rig.out.data(), [p1, p0])


# -- 6: timeouts -------------------------------------------------------------------------------

FAST = ["--compare-timeout", "300", "--expired-scan-cycle", "100"]


def test_timeout_release_policy_lets_the_frame_out(env):
    rig = env.rig(args=FAST)
    p0 = rec(udp_frame(b"no twin"))
    t0 = time.monotonic()
    rig.p.sendall(p0)
    rig.out.wait_bytes(len(p0), timeout=5)
    took = time.monotonic() - t0
    # older than the timeout (strictly), at the first scan past it: 300 ms + up to one cycle
    assert 0.3 <= took < 1.5, took       # typically 0.35-0.45 s
    st = rig.srv.stats()
    assert st["checkpoint_requests"] == {"timeout": 1}
    assert st["released"] == {"match": 0, "checkpoint": 1, "total": 1}
    assert st["serve"]["checkpoints_by"]["local"] == 1
    assert [(e["cause"], e["flow"]) for e in rig.events("checkpoint_request")] == [
        ("timeout", "udp 10.0.0.1:5000 > 10.0.0.2:6000")]
    assert rig.stop() == 0
    assert rig.out.data() == p0


def test_timeout_with_notify_repeats_do_checkpoint_every_scan(env):
    rig = env.rig(args=FAST, notify="server")
    xen = rig.xen
    p0 = rec(udp_frame(b"no twin"))
    t0 = time.monotonic()
    rig.p.sendall(p0)
    xen.wait_messages(1, timeout=5)
    first = xen.times()[0] - t0
    assert 0.3 <= first < 1.5, first
    xen.wait_messages(5, timeout=5)
    times = xen.times()
    span = times[4] - times[0]           # four scan cycles
    assert 0.25 < span < 2.0, times       # typically 0.40 s
    assert set(xen.messages()) == {b"DO_CHECKPOINT"}
    assert len(rig.out) == 0             # hold: a timeout never releases anything by itself
    xen.send(b"COLO_CHECKPOINT")
    rig.out.wait_bytes(len(p0))
    sent = rig.srv.stats()["serve"]["notify"]["do_checkpoint_sent"]
    # no more requests once the checkpoint emptied the queues: watch four scan cycles
    deadline = time.monotonic() + 0.4
    while time.monotonic() < deadline:
        assert rig.srv.stats()["serve"]["notify"]["do_checkpoint_sent"] == sent
        time.sleep(0.05)
    assert len(xen.wait_messages(sent)) == sent
    st = rig.srv.stats()
    assert st["checkpoint_requests"] == {"timeout": sent}
    assert st["released"] == {"match": 0, "checkpoint": 1, "total": 1}
    assert rig.stop() == 0
    assert xen.data() == DO_CHECKPOINT * sent
    assert rig.out.data() == p0


# -- 7: reconnects -----------------------------------------------------------------------------

def test_inputs_reconnect_to_listening_serve(env):
    rig = env.rig()
    a = udp_flow(3, 1)
    b = [udp_frame(b"after reconnect %d" % i, sport=10001, dport=5353) for i in range(3)]
    rig.send_pairs([rec(f) for f in a], [rec(f) for f in a])
    rig.out.wait_bytes(sum(len(rec(f)) for f in a))
    rig.p.close()
    rig.s.close()
    rig.srv.wait_stats(lambda st: st["serve"]["links"]["primary-in"]["disconnects"] == 1
                       and st["serve"]["links"]["secondary-in"]["disconnects"] == 1)
    rig.p = env.track(connect(rig.p_ep))
    rig.s = env.track(connect(rig.s_ep))
    rig.send_pairs([rec(f) for f in b], [rec(f) for f in b])
    expected = [rec(f) for f in a + b]
    rig.out.wait_bytes(sum(map(len, expected)))
    st = rig.srv.stats()
    assert st["released"] == {"match": 6, "total": 6} and st["miscompares"] == {}
    assert st["serve"]["links"]["primary-in"]["connections"] == 2
    assert rig.stop() == 0
    assert_stream(rig.out.data(), expected)


def test_inputs_reconnect_when_serve_connects(env):
    """serve connects to the primary's and secondary's chardev servers (as in
    the documented wiring); the primary's goes away and comes back."""
    p_port, s_port = free_port(), free_port()
    lp = env.track(Listener(tcp_ep(p_port)))
    ls = env.track(Listener(tcp_ep(s_port)))
    o_ep = unix_ep(env.workdir, "o.sock")[0]
    srv = env.start(["--primary-in", tcp_ep(p_port, server=False),
                     "--secondary-in", tcp_ep(s_port, server=False), "--outdev", o_ep])
    p = env.track(lp.accept())
    s = env.track(ls.accept())
    out = env.track(OutReader(connect(o_ep)))
    a = [udp_frame(b"before %d" % i) for i in range(3)]
    b = [udp_frame(b"after %d" % i) for i in range(3)]
    p.sendall(b"".join(rec(f) for f in a))
    s.sendall(b"".join(rec(f) for f in a))
    out.wait_bytes(sum(len(rec(f)) for f in a))
    # the primary's listener goes away...
    p.close()
    lp.close()
    srv.wait_stderr(f"primary-in: tcp:127.0.0.1:{p_port}: connection refused; retrying")
    assert srv.link("primary-in")["connected"] is False
    # ... and comes back: serve reconnects by itself
    lp = env.track(Listener(tcp_ep(p_port)))
    p = env.track(lp.accept(timeout=8))
    srv.wait_stats(lambda st: st["serve"]["links"]["primary-in"]["connected"])
    p.sendall(b"".join(rec(f) for f in b))
    s.sendall(b"".join(rec(f) for f in b))
    expected = [rec(f) for f in a + b]
    out.wait_bytes(sum(map(len, expected)))
    st = srv.stats()
    assert st["released"] == {"match": 6, "total": 6} and st["miscompares"] == {}
    assert st["serve"]["links"]["primary-in"]["connections"] == 2
    srv.signal(signal.SIGTERM)
    assert srv.wait() == 0
    assert_stream(out.wait_eof(), expected)


@pytest.mark.parametrize("role", ["server", "client"])
def test_outdev_reconnect_buffers_frames_in_order(env, role):
    rig = env.rig(outdev=role)
    frames = [rec(f) for f in udp_flow(300, 2, size=200)]
    first, second, third = frames[:100], frames[100:250], frames[250:]
    rig.send_pairs(first, first)
    rig.out.wait_bytes(sum(map(len, first)))
    # outdev goes away (a client endpoint: its listener too)
    rig.out.close()
    if role == "client":
        rig.o_listener.close()          # the reader's listener goes away too
    rig.srv.wait_stats(lambda st: not st["serve"]["links"]["outdev"]["connected"])
    # frames released meanwhile are buffered, in order
    rig.send_pairs(second, second)
    st = rig.srv.wait_stats(lambda st: st["released"]["total"] == 250)
    assert st["serve"]["links"]["outdev"]["queued_frames"] == 150
    assert st["serve"]["links"]["outdev"]["dropped_frames"] == 0
    if role == "client":
        rig.srv.wait_stderr(f"outdev: {rig.o_ep}: connection refused; retrying")
    rig.out = rig.connect_out()
    rig.send_pairs(third, third)
    rig.out.wait_bytes(sum(map(len, second + third)))
    st = rig.srv.stats()
    assert st["serve"]["links"]["outdev"]["connections"] == 2
    assert st["serve"]["links"]["outdev"]["frames_out"] == 300
    rig.srv.signal(signal.SIGTERM)
    assert rig.srv.wait() == 0
    assert_stream(rig.out.wait_eof(), second + third)     # none lost, none twice, in order


def test_outdev_frame_cut_by_a_new_connection_is_sent_again_whole(env):
    """The outdev reader stalls with a frame half written; a new reader
    replaces it.  The old connection ends with the cut frame's first bytes;
    the new one starts with that frame, whole, and continues in order."""
    rig = env.rig(args=["--compare-timeout", "60000"])
    recs = [rec(udp_frame(b"cut %04d " % i + bytes(3001), sport=5000 + i % 50)) for i in range(600)]
    stream = b"".join(recs)
    rig.out.pause()
    write_nonblocking([(rig.p, stream), (rig.s, stream)])
    st = rig.srv.wait_stats(lambda st: st["released"]["total"] == len(recs))
    assert st["serve"]["links"]["outdev"]["queued_frames"] > 0      # serve waits on outdev
    old = rig.out
    rig.out = rig.connect_out()
    old.resume()
    old_recs, cut = split_records(old.wait_eof())
    rig.out.wait_bytes(len(stream) - sum(map(len, old_recs)))
    assert rig.stop() == 0
    new_recs, rest = split_records(rig.out.data())
    assert rest == b""                               # the new stream starts on a record boundary
    assert old_recs + new_recs == recs               # none lost, none twice, in order
    # (the unix socket takes part of a frame when full: in practice the old
    # connection always ends in the middle of one)
    assert new_recs[0].startswith(cut)


def test_notify_peer_reconnects(env):
    rig = env.rig(notify="server", args=["--compare-timeout", "60000"])
    rig.xen.send(b"COLO_USERSPACE_PROXY_INIT")
    rig.xen.wait_bytes(len(GET_XEN_INIT))
    rig.xen.sock.sendall(struct.pack(">I", 15) + b"COLO_CHE")       # cut by the disconnect
    rig.srv.wait_stats(lambda st: st["serve"]["links"]["notify-dev"]["bytes_in"] == 29 + 12)
    rig.xen.close()
    rig.srv.wait_stats(lambda st: not st["serve"]["links"]["notify-dev"]["connected"])
    xen = rig.xen = env.track(NotifyPeer(connect(rig.n_ep), "notify-dev"))
    rig.srv.wait_stats(lambda st: st["serve"]["links"]["notify-dev"]["connected"])
    # a divergence: DO_CHECKPOINT on the new connection; the old half message is forgotten
    rig.p.sendall(rec(udp_frame(b"AAAA")))
    rig.wait_read(primary=1)
    rig.s.sendall(rec(udp_frame(b"AAAB")))
    assert xen.wait_bytes(len(DO_CHECKPOINT)) == DO_CHECKPOINT
    assert len(rig.out) == 0
    xen.send(b"COLO_CHECKPOINT")
    rig.out.wait_bytes(len(rec(udp_frame(b"AAAA"))))
    st = rig.srv.stats()
    assert st["serve"]["notify"]["unknown_messages"] == 0
    assert st["serve"]["notify"]["colo_checkpoint_received"] == 1
    assert rig.stop() == 0
    assert xen.data() == DO_CHECKPOINT
    assert rig.out.data() == rec(udp_frame(b"AAAA"))


def test_new_connection_replaces_the_old_one(env):
    rig = env.rig()
    p0, p1, p2 = (rec(udp_frame(b"replace %d" % i)) for i in range(3))
    rig.p.sendall(p0)
    rig.wait_read(primary=1)
    # a second primary: serve takes it and closes the first
    old_p = rig.p
    rig.p = env.track(connect(rig.p_ep))
    rig.srv.wait_stats(lambda st: st["serve"]["links"]["primary-in"]["connections"] == 2)
    assert peer_closed(old_p)
    rig.p.sendall(p1)
    rig.s.sendall(p0 + p1)
    rig.out.wait_bytes(len(p0) + len(p1))
    # a second outdev reader: the first is closed, the new one gets what follows
    old_out = rig.out
    rig.out = env.track(OutReader(connect(rig.o_ep)))
    rig.srv.wait_stats(lambda st: st["serve"]["links"]["outdev"]["connections"] == 2)
    old_out.wait_eof()
    rig.p.sendall(p2)
    rig.s.sendall(p2)
    rig.out.wait_bytes(len(p2))
    st = rig.srv.stats()
    assert st["released"] == {"match": 3, "total": 3}
    assert st["serve"]["links"]["primary-in"]["last_error"] == "replaced by a new connection"
    assert rig.stop() == 0
    assert old_out.data() == p0 + p1
    assert rig.out.data() == p2


def test_frames_sent_just_before_a_reconnect_are_not_lost(env):
    """A peer writes its last frames, closes and reconnects at once; serve
    (stopped meanwhile, so both are pending when it resumes) reads what the
    old connection had sent before the new one replaces it, whichever of
    the two it notices first."""
    import os
    import signal as sig
    rig = env.rig()
    # as much as fits in the socket buffers while serve is stopped
    frames = [rec(udp_frame(b"late %d " % i + bytes(1000), sport=3000 + i % 50)) for i in range(150)]
    rig.p.sendall(b"".join(frames))
    os.kill(rig.srv.pid, sig.SIGSTOP)
    try:
        rig.s.sendall(b"".join(frames))
        rig.s.close()
        rig.s = env.track(connect(rig.s_ep))       # queued in the listener's backlog
    finally:
        os.kill(rig.srv.pid, sig.SIGCONT)
    rig.out.wait_bytes(sum(map(len, frames)))
    st = rig.srv.wait_stats(lambda st: st["frames_in"]["secondary"] == 150)
    assert st["released"] == {"match": 150, "total": 150}
    assert st["serve"]["links"]["secondary-in"]["connections"] == 2
    assert rig.out.data() == b"".join(frames)
    assert rig.stop() == 0


# -- 8: backpressure ---------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["interleaved", "primary-first"])
def test_stalled_outdev_inputs_keep_being_read_then_all_frames_in_release_order(env, order):
    """20,000 matching pairs on 2,000 flows while the outdev reader stalls.

    serve must go on reading both inputs (in the COLO wiring one QEMU main
    loop writes primary-in and reads outdev: a comparator that stops reading
    while an outdev write is pending deadlocks it, qemu-filter-interop.md
    pitfall 8), and when the reader resumes every frame arrives exactly once
    in the order released.  Both inputs send the pairs in the same order, so
    each frame is released in that order (a frame leaves when the later of
    its two copies is read), whatever the interleaving of the reads: outdev
    must carry exactly the primary's byte stream.

    QEMU 7.2 does not: once outdev returns EAGAIN it pops its send list from
    the tail, newest first (observed m1: 20,000 pairs, only the first ~4,200
    in order, 15,789 inversions).
    """
    rig = env.rig(args=["--compare-timeout", "60000"])
    flows, per_flow = 2000, 10
    frames = [udp_frame(b"m1 flow %04d frame %02d" % (f, i), sport=10000 + f, dport=4000,
                        ident=i) for i in range(per_flow) for f in range(flows)]
    p_stream = b"".join(rec(f) for f in frames)
    s_stream = p_stream
    n = len(frames)
    rig.out.pause()
    stall_start = time.monotonic()
    if order == "interleaved":
        w = write_nonblocking([(rig.p, p_stream), (rig.s, s_stream)])
        waits = [w["longest_wait"]]
    else:
        w1 = write_nonblocking([(rig.p, p_stream)])
        st = rig.wait_read(primary=n)
        assert st["queued"]["primary"] == n and st["released"]["total"] == 0
        w2 = write_nonblocking([(rig.s, s_stream)])
        waits = [w1["longest_wait"], w2["longest_wait"]]
    # every input byte was taken while outdev was stalled; no write waited long
    assert max(waits) < 2.0, waits        # typically a few ms
    st = rig.srv.wait_stats(lambda st: st["frames_in"] == {"primary": n, "secondary": n}
                            and st["released"]["total"] == n)
    assert len(rig.out) == 0
    out_link = st["serve"]["links"]["outdev"]
    assert out_link["queued_frames"] > n // 2                 # the frames wait in serve
    assert out_link["bytes_out"] + out_link["queued_bytes"] == len(p_stream)
    assert st["miscompares"] == {} and st["checkpoint_requests"] == {}
    assert st["serve"]["links"]["primary-in"]["bytes_in"] == len(p_stream)
    assert st["serve"]["links"]["secondary-in"]["bytes_in"] == len(s_stream)
    # a stall of a few seconds: serve stays responsive and loses nothing meanwhile
    while time.monotonic() < stall_start + 2.0:
        t = time.monotonic()
        now = rig.srv.stats()["serve"]["links"]["outdev"]
        assert now["queued_frames"] == out_link["queued_frames"]
        assert time.monotonic() - t < 0.5                    # the control socket answers at once
        time.sleep(0.1)
    rig.out.resume()
    rig.out.wait_bytes(len(p_stream), timeout=20)
    st = rig.srv.wait_stats(lambda st: st["serve"]["links"]["outdev"]["queued_frames"] == 0)
    assert st["serve"]["links"]["outdev"]["frames_out"] == n
    assert st["serve"]["links"]["outdev"]["dropped_frames"] == 0
    assert rig.stop() == 0
    got = rig.out.data()
    if got != p_stream:
        recs = split_records(got)[0]
        index = {r: i for i, r in enumerate(rec(f) for f in frames)}
        seq = [index[r] for r in recs]
        inversions = sum(1 for a, b in zip(seq, seq[1:]) if b < a)
        raise AssertionError(f"{len(recs)} of {n} frames, {len(set(recs))} distinct, "
                             f"{inversions} adjacent inversions; first: {seq[:20]}")


def test_outdev_buffer_bound_drops_the_newest_counts_them_and_stays_up(env):
    rig = env.rig(args=["--outdev-buffer", "1", "--compare-timeout", "60000"])
    frames = [udp_frame(b"bounded %02d/%03d " % (i % 100, i) + bytes(1000), sport=10000 + i % 100)
              for i in range(2500)]          # 100 flows, ~2.7 MB in all
    recs = [rec(f) for f in frames]
    n = len(recs)
    rig.out.pause()
    w = write_nonblocking([(rig.p, b"".join(recs)), (rig.s, b"".join(recs))])
    assert w["longest_wait"] < 2.0, w
    st = rig.srv.wait_stats(lambda st: st["released"]["total"] == n)
    link = st["serve"]["links"]["outdev"]
    dropped = link["dropped_frames"]
    assert dropped > 0
    assert st["dropped"] == {"primary:outdev-overflow": dropped}
    assert link["queued_bytes"] <= 1024 * 1024 and link["queued_bytes_high_water"] <= 1024 * 1024
    # full up to the bound, which counts what holding each frame costs too
    from colo_cli.outqueue import OUT_FRAME_OVERHEAD as cost
    held = link["queued_bytes"] + link["queued_frames"] * cost
    assert 1024 * 1024 - len(recs[0]) - cost < held <= 1024 * 1024
    # reported on stderr, at the first drop and then about once a thousand (not once a frame)
    lines = rig.srv.wait_stderr("released frames dropped")
    counts = []
    for line in lines:
        m = re.fullmatch(r"colo-compare: outdev: (\d+) released frames dropped: more than 1048576 "
                         r"bytes wait for outdev \(see --outdev-buffer\)", line)
        assert m, line
        counts.append(int(m.group(1)))
    assert counts == sorted(counts) and 1 <= counts[0] and counts[-1] <= dropped
    assert len(lines) <= 1 + dropped // 1000
    drops = rig.events("drop")
    assert len(drops) == dropped
    assert {(d["side"], d["reason"]) for d in drops} == {("primary", "outdev-overflow")}
    # the reader comes back: what was kept arrives, in order; serve is still up and working
    rig.out.resume()
    kept = n - dropped
    rig.out.wait_bytes(sum(map(len, recs[:kept])))
    after = rec(udp_frame(b"after the overflow"))
    rig.p.sendall(after)
    rig.s.sendall(after)
    rig.out.wait_bytes(sum(map(len, recs[:kept])) + len(after))
    assert rig.stop() == 0
    assert_stream(rig.out.data(), recs[:kept] + [after])     # the dropped ones are the newest


# -- 9: hostile framing ------------------------------------------------------------------------

def _bytes_in(rig, link="primary-in"):
    return rig.srv.link(link)["bytes_in"]


def test_oversized_length_prefix_closes_that_connection_and_the_next_is_read_afresh(env):
    """QEMU (observed j1b): primary_in is dead for the rest of the process."""
    rig = env.rig()
    rig.p.sendall(struct.pack(">I", 0x7FFFFFFF) + b"\xee" * 100)
    assert peer_closed(rig.p)                             # that connection only
    rig.srv.wait_stats(lambda st: st["serve"]["input_errors"]["primary"]["oversized"] == 1)
    error = "oversized record: length prefix 2147483647 exceeds the 69632-byte limit"
    assert [l for l in rig.srv.stderr_lines() if "closing the connection" in l] == [
        f"colo-compare: primary-in: {error}; closing the connection (the next one is read afresh)"]
    assert [e["error"] for e in rig.events("input_error")] == [error]
    # serve is up; a new connection on primary-in starts from a clean state
    rig.p = env.track(connect(rig.p_ep))
    pair = rec(udp_frame(b"after the hostile prefix"))
    rig.p.sendall(pair)
    rig.s.sendall(pair)
    rig.out.wait_bytes(len(pair))
    st = rig.srv.stats()
    assert st["released"] == {"match": 1, "total": 1} and st["frames_in"]["primary"] == 1
    assert st["serve"]["links"]["primary-in"]["connections"] == 2
    assert rig.stop() == 0
    assert rig.out.data() == pair


def test_oversized_length_prefix_logs_exactly_one_line(env):
    rig = env.rig(verbose=False)
    rig.p.sendall(struct.pack(">I", 0x7FFFFFFF) + b"\xee" * 100)
    assert peer_closed(rig.p)
    rig.srv.wait_stats(lambda st: st["serve"]["input_errors"]["primary"]["oversized"] == 1)
    assert rig.srv.stderr_lines() == [
        "colo-compare: primary-in: oversized record: length prefix 2147483647 exceeds the "
        "69632-byte limit; closing the connection (the next one is read afresh)"]


@pytest.mark.parametrize("vnet", [False, True])
def test_zero_length_records_are_skipped_and_counted(env, vnet):
    """QEMU aborts on a zero-length record (observed j3)."""
    rig = env.rig(vnet=vnet)
    zero = b"\0" * (8 if vnet else 4)
    f0, f1, f2 = (udp_frame(b"around zero %d" % i) for i in range(3))
    r0, r1, r2 = (records_for([f], vnet, "p")[0] for f in (f0, f1, f2))
    stream = zero + r0 + zero + zero + r1 + zero + r2 + zero
    # in pieces that cut the zero-length records and the records around them,
    # each piece read by serve before the next is sent
    cuts = [1, 3, len(zero) + 2, len(zero) + len(r0) + 1, len(zero) * 2 + len(r0) + 1,
            len(zero) * 3 + len(r0) + 2, len(stream) - len(zero) - len(r2) - 2, len(stream) - 1,
            len(stream)]
    cuts = sorted(set(c for c in cuts if 0 < c <= len(stream)))
    start = 0
    for c in cuts:
        rig.p.sendall(stream[start:c])
        rig.srv.wait_stats(lambda st, c=c: st["serve"]["links"]["primary-in"]["bytes_in"] == c)
        start = c
    s = [records_for([f], vnet, "s")[0] for f in (f0, f1, f2)]
    rig.s.sendall(b"".join(s))
    rig.out.wait_bytes(len(r0) + len(r1) + len(r2))
    st = rig.srv.stats()
    assert st["serve"]["input_errors"]["primary"]["zero_length"] == 5
    assert st["released"] == {"match": 3, "total": 3}
    assert st["frames_in"]["primary"] == 3 and st["bypassed"] == {}
    assert sum(e.get("count", 0) for e in rig.events("input_error")
               if e["error"] == "zero-length record skipped") == 5
    assert rig.stop() == 0
    assert_stream(rig.out.data(), [r0, r1, r2], vnet)


def test_record_cut_by_a_disconnect_does_not_leak_into_the_next_connection(env):
    """QEMU (observed j5): the parser state survives the reconnect, the new
    connection's first bytes complete the old record and the stream stays
    desynchronised."""
    rig = env.rig()
    rig.p.sendall(struct.pack(">I", 100) + b"\xab" * 50)
    rig.srv.wait_stats(lambda st: st["serve"]["links"]["primary-in"]["bytes_in"] == 54)
    rig.p.close()
    st = rig.srv.wait_stats(lambda st: st["serve"]["links"]["primary-in"]["disconnects"] == 1)
    assert st["serve"]["input_errors"]["primary"]["cut_by_disconnect"] == 1
    cut = [e for e in rig.events("input_error") if e["error"] == "record cut by disconnect"]
    assert len(cut) == 1 and cut[0]["link"] == "primary-in"
    rig.p = env.track(connect(rig.p_ep))
    frames = [udp_frame(b"clean after the cut %d" % i + bytes(60)) for i in range(3)]
    recs = [rec(f) for f in frames]
    rig.send_pairs(recs, recs)
    rig.out.wait_bytes(sum(map(len, recs)))
    st = rig.srv.stats()
    assert st["frames_in"]["primary"] == 3 and st["released"] == {"match": 3, "total": 3}
    assert st["bypassed"] == {} and st["miscompares"] == {}
    assert rig.stop() == 0
    assert_stream(rig.out.data(), recs)


@pytest.mark.parametrize("vnet", [False, True])
def test_largest_record_accepted_one_byte_more_refused(env, vnet):
    """Observed j2: 69632 bytes (NET_BUFSIZE, vnet header included) is
    accepted, 69633 is not."""
    rig = env.rig(vnet=vnet)
    hdr = vhdr(12, 0x40) if vnet else None
    room = MAX_RECORD_LEN - (12 if vnet else 0)
    big = udp_frame(b"J" * 65507, pad_to=room)            # the largest UDP datagram, padded
    assert len(big) == room
    r = rec(big, hdr)
    assert struct.unpack_from(">I", r)[0] == 69632
    rig.p.sendall(r)
    rig.s.sendall(rec(big, vhdr(12, 0x80) if vnet else None))
    rig.out.wait_bytes(len(r))
    assert rig.srv.stats()["released"] == {"match": 1, "total": 1}
    too_big = rec(udp_frame(b"J" * 65507, pad_to=room + 1), hdr)
    assert struct.unpack_from(">I", too_big)[0] == 69633
    rig.p.sendall(too_big)
    assert peer_closed(rig.p)
    st = rig.srv.wait_stats(lambda st: st["serve"]["input_errors"]["primary"]["oversized"] == 1)
    assert st["frames_in"]["primary"] == 1
    rig.srv.wait_stderr("length prefix 69633 exceeds the 69632-byte limit")
    assert rig.stop() == 0
    assert rig.out.data() == r


def test_vnet_header_length_out_of_bounds_is_passed_through(env):
    """Observed j7: vnet_hdr_len 21 (over the 20-byte maximum): the primary
    record passes through unchanged, the secondary is dropped.  Also a vnet
    length larger than the record itself."""
    rig = env.rig(vnet=True)
    frame = udp_frame(b"vnet 21")
    j7 = struct.pack(">II", 21 + len(frame), 21) + vhdr(21, 1) + frame
    over = struct.pack(">II", 30, 50) + bytes(30)       # the vnet header would end past the record
    ok = rec(udp_frame(b"fine"), vhdr(10, 3))
    rig.p.sendall(j7 + over + ok)
    rig.s.sendall(j7 + over + ok)
    rig.out.wait_bytes(len(j7) + len(over) + len(ok))
    st = rig.srv.stats()
    assert st["bypassed"] == {"bad-vnet-header": 2}
    assert st["dropped"] == {"secondary:bad-vnet-header": 2}
    assert st["released"]["match"] == 1
    assert rig.stop() == 0
    assert_stream(rig.out.data(), [j7, over, ok], vnet=True)


def test_garbage_on_secondary_in_does_not_crash_serve(env):
    rig = env.rig()
    rnd = random.Random(1234)
    template = udp_frame(b"template payload" + bytes(30), sport=999)
    rounds = [
        bytes(rnd.getrandbits(8) for _ in range(65536)),                     # raw noise
        b"".join(rec(bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 300))))
                 for _ in range(300)),                                      # framed noise
        b"".join(rec(bytes(b ^ (rnd.getrandbits(8) if rnd.random() < 0.05 else 0)
                           for b in frame))
                 for frame in [template, tcp_frame(b"t" * 40), icmp_frame(), arp_frame(),
                               udp_frame(b"six", src="fd00::1", dst="fd00::2"),
                               *ipv4_fragments(1, 0)] * 40),                 # mutated frames
        struct.pack(">I", 69633) + bytes(100),                               # oversized
    ]
    for i, garbage in enumerate(rounds):
        rig.s.sendall(garbage)
        rig.srv.wait_stats(lambda st, i=i: st["serve"]["links"]["secondary-in"]["bytes_in"]
                           >= sum(map(len, rounds[:i + 1]))
                           or st["serve"]["links"]["secondary-in"]["disconnects"] > i)
        rig.s.close()
        rig.srv.wait_stats(lambda st, i=i: st["serve"]["links"]["secondary-in"]["disconnects"]
                           == i + 1)
        rig.s = env.track(connect(rig.s_ep))
        rig.srv.assert_running()
    clean = rec(udp_frame(b"clean after the garbage", sport=31337))
    rig.p.sendall(clean)
    rig.s.sendall(clean)
    rig.out.wait_bytes(len(clean))
    st = rig.srv.stats()
    assert st["released"]["match"] == 1
    assert st["serve"]["input_errors"]["secondary"]["oversized"] >= 1
    assert rig.stop() == 0
    assert rig.out.data() == clean


def test_mutated_frames_identical_on_both_sides_each_primary_out_exactly_once(env):
    """Fuzzed frames of every kind, the same on both sides: whatever the core
    makes of them (matched, bypassed, flushed), each primary record leaves
    exactly once, byte-identical, by the end."""
    rig = env.rig(args=["--compare-timeout", "60000"])
    rnd = random.Random(99)
    templates = [udp_frame(b"u" * 30), tcp_frame(b"t" * 40), tcp_frame(b"", flags=SYN),
                 icmp_frame(), arp_frame(), udp_frame(b"six", src="fd00::1", dst="fd00::2"),
                 *ipv4_fragments(2, 0), udp_frame(b"vlan", vlans=((0x8100, 5),)), gre_frame()]
    recs = []
    for i in range(600):
        frame = bytearray(rnd.choice(templates))
        for _ in range(rnd.randint(1, 4)):
            frame[rnd.randrange(len(frame))] = rnd.getrandbits(8)
        if rnd.random() < 0.1:
            frame = frame[:rnd.randint(1, len(frame))]
        frame += b"#%d" % i if rnd.random() < 0.5 else b""
        recs.append(rec(bytes(frame)))
    rig.send_pairs(recs, recs, chunk=50)
    rig.wait_read(primary=len(recs), secondary=len(recs))
    rig.srv.assert_running()
    assert rig.stop() == 0
    got, rest = split_records(rig.out.data())
    assert rest == b""
    assert sorted(got) == sorted(recs)


def test_byte_at_a_time_writer_still_gets_its_frames_compared(env):
    rig = env.rig()
    frames = [udp_frame(b"slowloris %d" % i) for i in range(2)] + [tcp_frame(b"slow tcp")]
    stream = b"".join(rec(f) for f in frames[:2]) + b"\0\0\0\0" + rec(frames[2])
    rig.s.sendall(b"".join(rec(f) for f in frames))
    for i in range(len(stream)):
        rig.p.sendall(stream[i:i + 1])
        # each byte is read on its own before the next is sent
        rig.srv.wait_stats(lambda st, n=i + 1: st["serve"]["links"]["primary-in"]["bytes_in"] == n)
    rig.out.wait_bytes(sum(len(rec(f)) for f in frames))
    st = rig.srv.stats()
    assert st["released"] == {"match": 3, "total": 3}
    assert st["serve"]["input_errors"]["primary"]["zero_length"] == 1
    assert rig.stop() == 0
    assert_stream(rig.out.data(), [rec(f) for f in frames])


# -- 10: SIGINT and SIGTERM ---------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_flushes_queued_frames_exits_0_and_removes_its_sockets(env, sig):
    rig = env.rig(args=["--drain-timeout", "3", "--compare-timeout", "60000"])
    matched = rec(udp_frame(b"matched", sport=1))
    udp_held = [rec(udp_frame(b"held udp %d" % i, sport=2)) for i in range(3)]
    tcp_held = [rec(tcp_frame(b"held tcp %d" % i, seq=1000 + 10 * i, sport=3)) for i in range(2)]
    rig.p.sendall(matched + b"".join(udp_held + tcp_held))
    rig.s.sendall(matched)
    rig.out.wait_bytes(len(matched))
    st = rig.wait_read(primary=6, secondary=1)
    assert st["queued"]["primary"] == 5
    paths = [rig.p_ep, rig.s_ep, rig.o_ep]
    paths = [ep.split(":", 1)[1].split(",")[0] for ep in paths] + [rig.srv.control_path]
    assert all(os.path.exists(p) for p in paths)
    t0 = time.monotonic()
    rig.srv.signal(sig)
    rc = rig.srv.wait(timeout=10)
    took = time.monotonic() - t0
    assert rc == 0
    assert took < 3.0, took                          # well within the drain timeout
    got = rig.out.wait_eof()
    # each held primary frame flushed exactly once, each flow in order
    assert_stream(got[len(matched):], udp_held + tcp_held)
    for p in paths:
        assert not os.path.exists(p), p
    stop = rig.events("stop")
    assert len(stop) == 1 and stop[0]["unwritten"] == 0
    assert "Traceback" not in rig.srv.stderr()


def _start_with_outdev_never_there(env):
    port = free_port()          # nothing listens there
    p, s, _o = _unix_triple(env)
    srv = env.start(["--primary-in", p, "--secondary-in", s,
                     "--outdev", tcp_ep(port, server=False), "--connect-timeout", "30"])
    srv.wait_stderr(f"outdev: tcp:127.0.0.1:{port}: connection refused; retrying")
    return srv


def test_signal_while_a_client_endpoint_still_waits_for_its_first_connection(env):
    srv = _start_with_outdev_never_there(env)
    t0 = time.monotonic()
    srv.signal(signal.SIGTERM)
    assert srv.wait(timeout=10) == 0
    assert time.monotonic() - t0 < 3.0
    assert sorted(f for f in os.listdir(env.workdir) if f.endswith(".sock")) == []


def test_signal_while_waiting_for_a_first_connection_prints_no_traceback(env):
    srv = _start_with_outdev_never_there(env)
    srv.signal(signal.SIGTERM)
    assert srv.wait(timeout=10) == 0
    err = srv.stderr()
    assert "Traceback" not in err and "Task was destroyed" not in err, err


def test_signal_with_a_stalled_outdev_gives_up_after_the_drain_timeout(env):
    rig = env.rig(args=["--drain-timeout", "1", "--compare-timeout", "60000"])
    rig.out.pause()
    big = [rec(udp_frame(b"stuck %04d " % i + bytes(1000), sport=4000 + i % 50))
           for i in range(1000)]
    rig.p.sendall(b"".join(big))              # no twins: all still queued at the signal
    rig.wait_read(primary=len(big))
    t0 = time.monotonic()
    rig.srv.signal(signal.SIGTERM)
    rc = rig.srv.wait(timeout=10)
    took = time.monotonic() - t0
    assert rc == 0 and 1.0 <= took < 3.0, (rc, took)
    line = rig.srv.wait_stderr("could not be written to outdev within 1 s")[0]
    m = re.fullmatch(r"colo-compare: stopping: (\d+) released frames could not be written to "
                     r"outdev within 1 s", line)
    assert m and 0 < int(m.group(1)) < len(big)
    assert rig.events("stop")[0]["unwritten"] == int(m.group(1))
    assert not os.path.exists(rig.srv.control_path)


# -- 11: startup errors -------------------------------------------------------------------------

def run_serve(env, args, timeout=15):
    t0 = time.monotonic()
    r = subprocess.run([PY, "-m", "colo_cli", "serve", *args], capture_output=True,
                       timeout=timeout, cwd=env.workdir)
    return r.returncode, r.stderr.decode(), time.monotonic() - t0


def _unix_triple(env):
    return (unix_ep(env.workdir, "p.sock")[0], unix_ep(env.workdir, "s.sock")[0],
            unix_ep(env.workdir, "o.sock")[0])


def _busy_listener(env, address, family=socket.AF_INET):
    """Something else listening at ``address``; returns where it listens."""
    busy = socket.socket(family, socket.SOCK_STREAM)
    env.track(busy)
    busy.bind(address)
    busy.listen(1)
    return busy.getsockname()


@pytest.mark.parametrize("bad,expected", [
    ("foo:bar", "'foo:bar': unknown endpoint type 'foo'"),
    ("unix:", "'unix:': unix: needs a path"),
    ("tcp:127.0.0.1:99999,server", "port 99999 is out of range (1-65535)"),
    ("tcp:127.0.0.1:9000,serverx", "unknown option 'serverx'"),
])
def test_startup_bad_endpoint_syntax(env, bad, expected):
    p, s, o = _unix_triple(env)
    rc, err, _ = run_serve(env, ["--primary-in", bad, "--secondary-in", s, "--outdev", o])
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("colo-compare serve: Invalid value for '--primary-in': ")
    assert expected in err


def test_startup_tcp_port_in_use(env):
    port = _busy_listener(env, ("127.0.0.1", 0))[1]
    p, s, _o = _unix_triple(env)
    rc, err, _ = run_serve(env, ["--primary-in", p, "--secondary-in", s,
                                 "--outdev", tcp_ep(port), "--control", env.path("ctl.sock")])
    assert rc == 2
    assert err.splitlines() == [f"colo-compare: --outdev tcp:127.0.0.1:{port},server: "
                                "cannot listen: address already in use"]
    # the listeners opened before the failure are gone again
    assert sorted(f for f in os.listdir(env.workdir) if f.endswith(".sock")) == []


@pytest.mark.parametrize("taken", ["--primary-in", "--control", "--metrics-listen"])
def test_startup_address_in_use_reads_the_same_for_every_listener(env, taken):
    """Something else listens where serve would: the same words whichever
    option names the place (a unix endpoint, the control socket, /metrics)."""
    busy_path = _busy_listener(env, env.path("busy.sock"), socket.AF_UNIX)
    port = _busy_listener(env, ("127.0.0.1", 0))[1]
    p, s, o = _unix_triple(env)
    args = {"--primary-in": ["--primary-in", f"unix:{busy_path},server"],
            "--control": ["--primary-in", p, "--control", busy_path],
            "--metrics-listen": ["--primary-in", p, "--metrics-listen", f"127.0.0.1:{port}"]}[taken]
    rc, err, _ = run_serve(env, [*args, "--secondary-in", s, "--outdev", o])
    assert rc == 2
    where = {"--primary-in": f"unix:{busy_path},server", "--control": busy_path,
             "--metrics-listen": f"127.0.0.1:{port}"}[taken]
    assert err.splitlines() == [f"colo-compare: {taken} {where}: cannot listen: "
                                "address already in use"]


def test_startup_outdev_never_connects(env):
    port = free_port()          # nothing listens there
    p, s, _o = _unix_triple(env)
    rc, err, took = run_serve(env, ["--primary-in", p, "--secondary-in", s, "--outdev",
                                    tcp_ep(port, server=False), "--connect-timeout", "1",
                                    "--control", env.path("ctl.sock")])
    assert rc == 2
    assert 1.0 <= took < 4.0, took
    assert (f"colo-compare: --outdev tcp:127.0.0.1:{port}: connection refused (gave up after 1 s; "
            "see --connect-timeout)") in err.splitlines()
    assert "Traceback" not in err
    assert sorted(f for f in os.listdir(env.workdir) if f.endswith(".sock")) == []


def test_startup_never_connects_leaves_no_asyncio_noise(env):
    port = free_port()
    p, s, _o = _unix_triple(env)
    rc, err, _ = run_serve(env, ["--primary-in", p, "--secondary-in", s,
                                 "--outdev", tcp_ep(port, server=False), "--connect-timeout", "1"])
    assert rc == 2
    assert "Task was destroyed" not in err, err


def test_startup_never_connects_is_one_line(env):
    port = free_port()
    p, s, _o = _unix_triple(env)
    rc, err, _ = run_serve(env, ["--primary-in", p, "--secondary-in", s,
                                 "--outdev", tcp_ep(port, server=False), "--connect-timeout", "1"])
    assert rc == 2
    assert err.splitlines() == [f"colo-compare: --outdev tcp:127.0.0.1:{port}: connection refused "
                                "(gave up after 1 s; see --connect-timeout)"]


@pytest.mark.parametrize("second", ["server", "client"])
def test_startup_same_endpoint_twice(env, second):
    p, s, o = _unix_triple(env)
    again = p if second == "server" else p.split(",")[0]
    rc, err, _ = run_serve(env, ["--primary-in", p, "--secondary-in", again, "--outdev", o])
    assert rc == 2
    path = p.split(":", 1)[1].split(",")[0]
    assert err.splitlines() == [
        f"colo-compare serve: --secondary-in and --primary-in are the same endpoint "
        f"({again}) (see 'colo-compare serve --help')"]
    assert not os.path.exists(path)


# -- 12: the control socket ---------------------------------------------------------------------

def _raw_control(path: str, payload: bytes, replies: int, timeout: float = 5):
    """Send raw bytes on one connection and read ``replies`` JSON replies.
    Then tell whether serve kept the connection open: it answers one more
    request on it (True), or closes it (False)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(payload)
        buf = b""

        def read_lines(n):
            nonlocal buf
            while buf.count(b"\n") < n:
                try:
                    chunk = s.recv(1 << 16)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    return False
                buf += chunk
            return True
        read_lines(replies)
        got = [json.loads(l) for l in buf.splitlines() if l.strip()]
        try:
            s.sendall(b'{"cmd":"version"}\n')
        except (BrokenPipeError, ConnectionResetError):
            return got, False
        is_open = read_lines(replies + 1)
        if is_open:
            assert json.loads(buf.splitlines()[-1])["ok"] is True
        return got, is_open


def test_control_socket_commands(env):
    from colo_cli import __version__
    rig = env.rig()
    ctl = rig.srv.control_path
    st_mode = os.stat(ctl).st_mode
    assert stat.S_ISSOCK(st_mode) and stat.S_IMODE(st_mode) == 0o600
    pair = rec(udp_frame(b"for the counters"))
    held = rec(udp_frame(b"held", sport=77))
    rig.p.sendall(pair + held)
    rig.s.sendall(pair)
    rig.out.wait_bytes(len(pair))
    rig.wait_read(primary=2, secondary=1)

    assert rig.srv.control({"cmd": "version"}) == {"ok": True, "version": __version__,
                                                   "protocol": 1}
    stats = rig.srv.control({"cmd": "stats"})
    assert stats["ok"] is True and stats["protocol"] == 1
    assert stats["stats"]["frames_in"] == {"primary": 2, "secondary": 1}
    assert stats["stats"]["serve"]["links"]["outdev"]["frames_out"] == 1
    assert set(stats["top_connections"]) == {"by_miscompares", "by_hold"}
    conns = rig.srv.control({"cmd": "connections"})
    assert conns["ok"] is True and conns["total"] == 2 and len(conns["connections"]) == 2
    assert rig.srv.control({"cmd": "checkpoint"}) == {"ok": True, "released": 1, "discarded": 0}
    rig.out.wait_bytes(len(pair) + len(held))
    assert rig.srv.stats()["serve"]["checkpoints_by"]["control"] == 1

    for bad in ({"cmd": "reboot"}, {"command": "stats"}, [1, 2], {"cmd": "stats", "top": -1},
                {"cmd": "connections", "limit": 0}):
        reply = rig.srv.control(bad)
        assert reply["ok"] is False and isinstance(reply["error"], str), (bad, reply)
    assert rig.srv.control(b"this is not json\n") == {"ok": False, "error": "not JSON"}
    # several requests on one connection, answered in order
    # several requests on one connection (a blank line is no request), answered in order;
    # a bad one does not end the connection
    replies, still_open = _raw_control(ctl, b'{"cmd":"version"}\n\n{"cmd":"nope"}\nxx\n'
                                        b'{"cmd":"stats","top":0}\n', 4)
    assert [r["ok"] for r in replies] == [True, False, False, True] and still_open
    # a request over 64 KiB: an error, and the connection is cut
    huge = b'{"cmd":"stats","pad":"' + b"x" * (65 * 1024) + b'"}\n'
    replies, still_open = _raw_control(ctl, huge, 1)
    assert replies == [{"ok": False, "error": "request longer than 65536 bytes"}]
    assert not still_open
    huge_no_newline = b"y" * (70 * 1024)
    replies, still_open = _raw_control(ctl, huge_no_newline, 1)
    assert replies == [{"ok": False, "error": "request longer than 65536 bytes"}]
    assert not still_open
    rig.srv.assert_running()
    assert rig.srv.control({"cmd": "version"})["ok"] is True
    assert rig.stop() == 0


NOBODY_CLIENT = r"""
import json, os, socket, sys
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES")
    sys.exit(0)
try:
    s.sendall(b'{"cmd": "checkpoint"}\n')
except (BrokenPipeError, ConnectionResetError):
    pass        # serve may refuse before reading anything: its answer is still there to read
buf = b""
while not buf.endswith(b"\n"):
    try:
        chunk = s.recv(4096)
    except ConnectionResetError:
        break
    if not chunk:
        break
    buf += chunk
print(buf.decode().strip())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another uid needs root")
def test_control_socket_refuses_another_uid(env):
    rig = env.rig()
    ctl = rig.srv.control_path
    # as created: mode 0600 keeps user nobody out at connect()
    r = subprocess.run([PY, "-c", NOBODY_CLIENT, ctl], capture_output=True, timeout=15)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == "EACCES"
    # opened up on the file system, the peer credentials still refuse it
    os.chmod(env.workdir, 0o711)
    os.chmod(ctl, 0o666)
    r = subprocess.run([PY, "-c", NOBODY_CLIENT, ctl], capture_output=True, timeout=15)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"ok": False, "error": "permission denied"}
    assert rig.srv.stats()["serve"]["checkpoints_by"]["control"] == 0     # not performed
    assert rig.stop() == 0


# -- 13: one engine, two adapters ---------------------------------------------------------------

def _two_adapter_script():
    """(side, frame) in the order both inputs deliver them: identical,
    diverging and unsupported frames of several kinds, P and S taking turns
    to lead.  Starts with a non-IP frame on each side (a bypass and a drop),
    which also pins both captures' clocks to the same zero."""
    P, S = "p", "s"
    steps = [(P, non_ip_frame(0)), (S, non_ip_frame(0))]
    a = udp_flow(6, 1)
    steps += [(P, a[0]), (S, a[0]), (S, a[1]), (P, a[1]), (P, a[2]), (P, a[3]), (S, a[2]),
              (S, a[3])]
    # a UDP divergence, then the same flow in step again
    steps += [(P, udp_frame(b"AAAA", sport=2)), (S, udp_frame(b"AAAB", sport=2)),
              (P, udp_frame(b"next", sport=2)), (S, udp_frame(b"next", sport=2))]
    # TCP: handshake, data, a diverging segment, more data
    t = tcp_conversation(5, rounds=3)
    bad = bytearray(t[3])
    bad[-5] ^= 0xFF
    steps += [(P, t[0]), (S, t[0]), (P, t[1]), (P, t[2]), (S, t[1]), (S, t[2]),
              (P, t[3]), (S, bytes(bad)), (P, t[4]), (S, t[4]), (P, t[5]), (S, t[5])]
    # unsupported frames: a short one, a bad IPv4 header length, non-IP on both sides
    short = b"\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a"
    bad_ihl = bytearray(udp_frame(b"bad ihl"))
    bad_ihl[14] = 0x4F
    steps += [(P, short), (S, short), (S, bytes(bad_ihl)), (P, bytes(bad_ihl)),
              (P, non_ip_frame(1)), (S, non_ip_frame(2))]
    # ICMP, ARP, IPv6, VLAN, GRE pairs; an ICMP divergence
    steps += [(P, icmp_frame(b"ping", seq=1)), (S, icmp_frame(b"ping", seq=1)),
              (P, icmp_frame(b"ping", seq=2)), (S, icmp_frame(b"pong", seq=2)),
              (S, arp_frame()), (P, arp_frame()),
              (P, udp_frame(b"v6", src="fd00::1", dst="fd00::2")),
              (S, udp_frame(b"v6", src="fd00::1", dst="fd00::2")),
              (P, udp_frame(b"tagged", vlans=((0x8100, 7),))),
              (S, udp_frame(b"tagged", vlans=((0x8100, 7),))),
              (P, gre_frame()), (S, gre_frame())]
    # fragments, interleaved across the sides
    f = ipv4_fragments(9, 0)
    steps += [(P, f[0]), (S, f[0]), (S, f[1]), (P, f[1]), (P, f[2]), (S, f[2])]
    # the rest of flow a, secondary first
    steps += [(S, a[4]), (S, a[5]), (P, a[4]), (P, a[5])]
    return steps


def test_serve_and_replay_release_the_same_frames(env):
    steps = _two_adapter_script()
    # serve, policy release, fed in exactly this interleaving (no timeouts in either adapter:
    # the clocks differ, serve's being the real one)
    rig = env.rig(args=["--compare-timeout", "60000"])
    n = {"p": 0, "s": 0}
    for side, frame in steps:
        (rig.p if side == "p" else rig.s).sendall(rec(frame))
        n[side] += 1
        rig.wait_read(primary=n["p"], secondary=n["s"])
    serve_stats = rig.srv.stats()
    assert serve_stats["queued"]["frames"] == 0
    assert rig.stop() == 0
    serve_out = [r[4:] for r in split_records(rig.out.data())[0]]
    # replay, from two pcaps whose timestamps give the same interleaving
    base = 1_700_000_000 * 10**9
    p_pcap, s_pcap, out_pcap = env.path("p.pcap"), env.path("s.pcap"), env.path("out.pcap")
    with open(p_pcap, "wb") as pf, open(s_pcap, "wb") as sf:
        writers = {"p": PcapWriter(pf, nano=True), "s": PcapWriter(sf, nano=True)}
        for i, (side, frame) in enumerate(steps):
            t = max(i - 1, 0) * 1_000_000     # both sides' first frame at zero; then 1 ms apart
            writers[side].write(base + t, frame)
    r = subprocess.run([PY, "-m", "colo_cli", "replay", p_pcap, s_pcap, "--out", out_pcap,
                        "--json", "--compare-timeout", "60000"], capture_output=True, timeout=30,
                       cwd=env.workdir)
    assert r.returncode == 1, r.stderr              # they diverge
    report = json.loads(r.stdout)
    with open_capture(out_pcap) as reader:
        replay_out = [data for _n, _ts, data, _orig, _lt in reader]
    assert len(serve_out) == sum(1 for side, _f in steps if side == "p")
    assert serve_out == replay_out
    for key in ("frames_in", "bytes_in", "released", "released_bytes", "bypassed", "dropped",
                "miscompares", "checkpoint_requests", "checkpoints", "secondary"):
        assert serve_stats[key] == report["stats"][key], key
    assert serve_stats["miscompares"] == {"icmp:content": 1, "tcp:content": 1, "udp:content": 1}
    assert serve_stats["bypassed"] and serve_stats["dropped"]
