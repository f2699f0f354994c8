"""How serve reads its frame inputs, in process (no event loop turning):
socketpairs stand in for the peers, and the test calls the read the loop
would make.  What the loopback tests (test_serve.py) cannot pin down: how
many reads a decision takes."""

from __future__ import annotations

import asyncio
import math
import socket

import pytest

from colo_cli.endpoints import parse_endpoint
from colo_cli.links import RECV_BYTES, LoopSelector
from colo_cli.options import ServeOptions
from colo_cli.serve import Server
from colo_cli.testing import udp_frame

from serve_helpers import rec, split_records


@pytest.fixture
def rig():
    # the loop serve.run makes: its selector counts turns (``turns.select(0)``
    # is a turn of the loop here, with nothing registered on it)
    turns = LoopSelector()
    loop = asyncio.SelectorEventLoop(turns)
    opts = ServeOptions(parse_endpoint("tcp:127.0.0.1:1,server"),
                        parse_endpoint("tcp:127.0.0.1:2,server"),
                        parse_endpoint("tcp:127.0.0.1:3,server"), verbose=-1)
    srv = Server(opts, loop, turns=turns)
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


def test_the_loops_own_read_of_an_input_read_ahead_in_that_turn_is_skipped(rig):
    """Both inputs reported in one turn: the secondary's callback reads the
    primary ahead (the twin), so the primary's callback in that turn does
    not read its empty socket (a system call and an exception).  What came
    after the read ahead is read at the next turn: nothing is lost or held."""
    srv, pri, sec, out = rig
    turns = srv.turns
    a, b = (udp_frame(sport=1000, dport=2000, payload=p) for p in (b"first", b"second"))
    sec.send(rec(a))
    pri.send(rec(a))
    turns.select(0)
    srv.secondary._readable()
    assert outdev_records(out) == [rec(a)]
    pri.send(rec(b))                         # after the read ahead, same turn
    before = srv.primary.bytes_in
    srv.primary._readable()                  # the loop's callback for this turn
    assert srv.primary.bytes_in == before
    turns.select(0)                          # next turn: epoll reports it again
    srv.primary._readable()
    assert srv.primary.bytes_in == before + len(rec(b))
    sec.send(rec(b))
    srv.secondary._readable()
    assert outdev_records(out) == [rec(b)]
    # a callback in a turn with no read ahead reads as always
    sec.send(rec(a))
    srv.secondary._readable()
    pri.send(rec(a))
    turns.select(0)
    srv.primary._readable()
    assert outdev_records(out) == [rec(a)]


def test_a_frame_left_waiting_arms_the_timer_once_both_inputs_were_read(rig):
    """A primary frame without its twin, the secondary read ahead in vain:
    the core's timer is armed for the frame's timeout; the pair completed
    by the read ahead leaves nothing to time out."""
    srv, pri, sec, out = rig
    frame = udp_frame(sport=1000, dport=2000, payload=b"alone")
    pri.send(rec(frame))
    turns = srv.turns
    turns.select(0)
    srv.primary._readable()
    assert outdev_records(out) == []
    due = srv.comparator.get_timer()
    assert due is not None and srv.timer_at == due
    assert due >= srv.now_ms() + srv.options.config.compare_timeout_ms - 1
    sec.send(rec(frame))
    turns.select(0)
    srv.secondary._readable()
    assert outdev_records(out) == [rec(frame)]
    assert srv.comparator.queued_frames == 0


class ScriptedWaits:
    """LoopSelector's plain select and clock, scripted: each plain select
    advances the clock by its step and returns events once the clock has
    reached ``ready_at``; blocking ones jump to it (or to their timeout)."""

    def __init__(self, sel: LoopSelector, ready_at: float | None, step: float = 1e-6):
        self.now = 0.0
        self.ready_at = ready_at
        self.step = step
        self.calls = []                      # the timeouts asked of the plain select
        sel._wait = self.wait
        sel._clock = lambda: self.now

    def wait(self, timeout):
        self.calls.append(timeout)
        if timeout is None or timeout > 0:   # blocks until the event or the timeout
            until = self.ready_at if self.ready_at is not None else math.inf
            if timeout is not None:
                until = min(until, self.now + timeout)
            self.now = max(self.now, until)
        else:
            self.now += self.step
        return ["event"] if self.ready_at is not None and self.now >= self.ready_at else []


def test_the_selector_polls_before_sleeping_only_while_waits_are_short():
    """busy_poll_us 50: after a wait of 20 us the next select polls (and
    finds the event 30 us on without sleeping); after a wait of 400 us it
    sleeps at once; a poll that finds nothing in 50 us sleeps the rest."""
    sel = LoopSelector(busy_poll_us=50)
    # nothing known of the last wait (start, or a timer's turn): sleep at once
    script = ScriptedWaits(sel, ready_at=20e-6)
    assert sel.select(None) == ["event"]
    assert script.calls == [None]
    assert sel.last_wait_s == pytest.approx(20e-6)
    # that wait was short: poll, and the event 30 us on is found polling
    script = ScriptedWaits(sel, ready_at=30e-6)
    assert sel.select(None) == ["event"]
    assert script.calls and all(t == 0 for t in script.calls)
    assert 25 <= len(script.calls) <= 35
    # an event 400 us on: 50 us of polls, then the rest asleep
    script = ScriptedWaits(sel, ready_at=400e-6)
    assert sel.select(None) == ["event"]
    assert script.calls[-1] is None and all(t == 0 for t in script.calls[:-1])
    assert 45 <= len(script.calls) - 1 <= 55
    assert sel.last_wait_s == pytest.approx(400e-6)
    # ... which was a long wait: the next select sleeps at once
    script = ScriptedWaits(sel, ready_at=10e-6)
    assert sel.select(None) == ["event"] and script.calls == [None]


def test_the_selector_polls_no_longer_than_the_loops_timeout_and_never_when_off():
    sel = LoopSelector(busy_poll_us=50)
    sel.last_wait_s = 5e-6
    script = ScriptedWaits(sel, ready_at=None)     # nothing comes: a timer's turn
    assert sel.select(20e-6) == []
    assert all(t == 0 for t in script.calls[:-1]) and 15 <= len(script.calls) <= 25
    assert script.now == pytest.approx(20e-6, abs=2e-6)
    assert sel.last_wait_s == math.inf            # no events: not a short wait
    # a poll asked by the loop (timeout 0) is one plain poll
    script = ScriptedWaits(sel, ready_at=None)
    assert sel.select(0) == [] and script.calls == [0]
    # busy_poll_us 0: every wait sleeps at once, however short the last one
    off = LoopSelector(busy_poll_us=0)
    off.last_wait_s = 1e-6
    script = ScriptedWaits(off, ready_at=5e-6)
    assert off.select(None) == ["event"] and script.calls == [None]
    # the turns are counted whatever happens
    assert off.turn == 1 and sel.turn == 2
