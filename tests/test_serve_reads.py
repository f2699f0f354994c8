"""How serve reads its frame inputs, in process (no event loop turning):
socketpairs stand in for the peers, and the test calls the read the loop
would make.  What the loopback tests (test_serve.py) cannot pin down: how
many reads a decision takes."""

from __future__ import annotations

import asyncio
import socket

import pytest

from colo_cli.endpoints import parse_endpoint
from colo_cli.links import RECV_BYTES
from colo_cli.options import ServeOptions
from colo_cli.serve import Server
from colo_cli.testing import udp_frame

from serve_helpers import rec, split_records


@pytest.fixture
def rig():
    loop = asyncio.new_event_loop()
    opts = ServeOptions(parse_endpoint("tcp:127.0.0.1:1,server"),
                        parse_endpoint("tcp:127.0.0.1:2,server"),
                        parse_endpoint("tcp:127.0.0.1:3,server"), verbose=-1)
    srv = Server(opts, loop)
    peers = {}
    for link in (srv.primary, srv.secondary, srv.outdev):
        ours, theirs = socket.socketpair()
        for s in (ours, theirs):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        link._adopt(ours, "test peer")
        peers[link.name] = theirs
    yield srv, peers["primary-in"], peers["secondary-in"], peers["outdev"]
    srv.close()
    for s in peers.values():
        s.close()
    loop.close()


def outdev_records(out: socket.socket) -> list[bytes]:
    buf = b""
    while True:
        try:
            data = out.recv(1 << 20)
        except BlockingIOError:
            break
        buf += data
    records, rest = split_records(buf)
    assert rest == b""
    return records


def test_one_wakeup_reads_both_inputs_and_releases_the_pair(rig):
    srv, pri, sec, out = rig
    frame = udp_frame(sport=1000, dport=2000, payload=b"pair")
    sec.send(rec(frame))
    pri.send(rec(frame))
    srv.secondary.read_once()                # the loop saw the secondary readable
    assert outdev_records(out) == [rec(frame)]
    assert srv.primary.bytes_in == srv.secondary.bytes_in == len(rec(frame))


def test_reading_the_other_input_goes_one_level_deep(rig):
    srv, pri, sec, out = rig
    frames = [udp_frame(sport=1000 + i, dport=2000, payload=b"x" * 50) for i in range(3)]
    pri.send(rec(frames[0]))
    sec.send(rec(frames[0]))
    srv.primary.read_once()
    assert outdev_records(out) == [rec(frames[0])]
    # nothing waiting on the other side: a read of one input is one read
    pri.send(rec(frames[1]))
    before = srv.secondary.bytes_in
    srv.primary.read_once()
    assert srv.secondary.bytes_in == before and outdev_records(out) == []
    sec.send(rec(frames[1]))
    srv.secondary.read_once()
    assert outdev_records(out) == [rec(frames[1])]


def test_reads_larger_than_the_buffer_and_records_cut_between_reads(rig):
    """More than RECV_BYTES waiting, a record cut across two reads: every
    record is decoded whole, once, in order (the read buffer is reused)."""
    srv, pri, sec, out = rig
    frames = [udp_frame(sport=1000 + i % 50, dport=2000, payload=bytes([i % 256]) * 900)
              for i in range(700)]
    stream = b"".join(rec(f) for f in frames)
    assert len(stream) > 2 * RECV_BYTES
    sec.sendall(stream)
    pri.sendall(stream)
    released = []
    for _ in range(50):
        srv.primary.read_once()
        srv.secondary.read_once()
        released += outdev_records(out)
    assert released == [rec(f) for f in frames]
