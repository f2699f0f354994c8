"""serve's send queue (``outqueue.OutQueue``) against sockets that take a
little at a time: every frame leaves once, whole and in order, whichever of
its two ways (one frame: ``send``; several: ``sendmsg``) it took, however
the socket cut it, and across a reconnect."""

from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from colo_cli.outqueue import MAX_IOV, OUT_FRAME_OVERHEAD, OutQueue


class Trickle:
    """A non-blocking socket that takes at most ``budget[i]`` bytes on its
    i-th call (0: EAGAIN), then as much as it is given."""

    def __init__(self, budgets=()):
        self.budgets = list(budgets)
        self.got = bytearray()
        self.calls = []                  # ("send" | "sendmsg", bytes taken)

    def _take(self, kind: str, data: bytes) -> int:
        budget = self.budgets.pop(0) if self.budgets else len(data)
        if budget == 0:
            self.calls.append((kind, 0))
            raise BlockingIOError
        n = min(budget, len(data))
        self.got += data[:n]
        self.calls.append((kind, n))
        return n

    def send(self, data) -> int:
        return self._take("send", bytes(data))

    def sendmsg(self, bufs) -> int:
        assert len(bufs) <= MAX_IOV
        return self._take("sendmsg", b"".join(bytes(b) for b in bufs))


def frames_of(sizes):
    return [bytes([i % 251]) * size for i, size in enumerate(sizes)]


def queue_with(frames, limit=1 << 30) -> OutQueue:
    q = OutQueue(limit)
    for f in frames:
        assert q.push(f)
    return q


def test_one_frame_goes_with_a_plain_send():
    q = queue_with([b"abcdef"])
    sock = Trickle()
    assert q.send(sock) == 1
    assert sock.calls == [("send", 6)]
    assert bytes(sock.got) == b"abcdef"
    assert (len(q), q.bytes, q.head_sent) == (0, 0, 0)


def test_one_frame_cut_by_a_full_socket_resumes_where_it_stopped():
    q = queue_with([b"abcdef"])
    sock = Trickle([4, 0, 1])
    assert q.send(sock) == 0                 # 4 bytes out, the socket is full
    assert (q.head_sent, q.bytes) == (4, 6)
    assert q.send(sock) == 0                 # EAGAIN: nothing moves
    assert q.head_sent == 4
    assert q.send(sock) == 0                 # 1 more byte (a memoryview of the rest)
    assert q.send(sock) == 1
    assert bytes(sock.got) == b"abcdef"
    assert (len(q), q.bytes, q.head_sent) == (0, 0, 0)


def test_several_frames_go_in_one_sendmsg_and_stop_when_the_socket_is_full():
    frames = frames_of([10, 20, 30])
    q = queue_with(frames)
    sock = Trickle([30])                     # exactly the first two frames
    assert q.send(sock) == 2
    assert sock.calls == [("sendmsg", 30)]   # no second call on a full socket
    assert q.send(sock) == 1
    assert bytes(sock.got) == b"".join(frames)


def test_a_cut_frame_goes_again_whole_on_a_new_connection():
    q = queue_with([b"0123456789", b"abc"])
    first = Trickle([4, 0])
    assert q.send(first) == 0
    q.restart()                              # the connection is gone
    second = Trickle()
    assert q.send(second) == 2
    assert bytes(second.got) == b"0123456789abc"


def test_more_frames_than_one_sendmsg_takes():
    frames = frames_of([3] * (MAX_IOV * 2 + 5))
    q = queue_with(frames)
    sock = Trickle()
    assert q.send(sock) == len(frames)
    assert [kind for kind, _ in sock.calls] == ["sendmsg", "sendmsg", "sendmsg"]
    assert bytes(sock.got) == b"".join(frames)


def test_the_bound_counts_each_frames_overhead():
    q = OutQueue(limit=2 * (100 + OUT_FRAME_OVERHEAD))
    assert q.push(b"x" * 100) and q.push(b"y" * 100)
    assert not q.push(b"z")
    assert q.dropped == 1 and q.high_water == 200


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=40),
       budgets=st.lists(st.integers(0, 5000), max_size=60),
       restarts=st.sets(st.integers(0, 60), max_size=3),
       seed=st.integers(0, 2**32 - 1))
def test_every_frame_leaves_once_whole_and_in_order(sizes, budgets, restarts, seed):
    """Whatever the socket takes per call, and wherever connections end: each
    connection's byte stream is a run of whole frames (the first may be the
    cut frame again, whole) and, over all connections, every frame arrives
    whole exactly once, in order."""
    rng = random.Random(seed)
    frames = frames_of(sizes)               # frame i is filled with byte i
    q = OutQueue(1 << 30)
    pending = list(frames)
    streams = [Trickle(budgets)]
    for step in range(120):
        # new frames arrive between sends, as they do in serve
        for _ in range(rng.randint(0, 3)):
            if pending:
                assert q.push(pending.pop(0))
        q.send(streams[-1])
        if step in restarts:
            q.restart()
            streams.append(Trickle(streams[-1].budgets))
    for f in pending:
        assert q.push(f)
    streams[-1].budgets = []                 # the last peer takes everything
    q.send(streams[-1])
    assert (len(q), q.bytes, q.head_sent) == (0, 0, 0)
    whole = []
    for i, sock in enumerate(streams):
        data = bytes(sock.got)
        pos = 0
        while pos < len(data):
            f = frames[data[pos]]
            if data.startswith(f, pos):
                whole.append(f)
                pos += len(f)
            else:
                # cut: only where a connection ended, and only its last frame
                assert i < len(streams) - 1 and f.startswith(data[pos:])
                break
    assert whole == frames
