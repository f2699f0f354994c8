"""serve's endpoints: one peer at a time on each, listened for or connected to.

A :class:`Link` is one endpoint of QEMU's chardev syntax (``endpoints``)
and the one peer on it: a server endpoint listens and takes the newest
connection (the one before is read to its end, bounded, then closed, as a
QEMU server chardev replaces its peer); a client endpoint connects, and
connects again with backoff whenever the peer goes away.  Bytes read go to
the link's owner as they come; bytes to send wait in the link's
``OutQueue`` (``outqueue``) until the socket takes them.

The owner (serve's ``Server``) gives the link its event ``loop``, a
``log(msg, level)``, whether it is ``running``, and three callbacks:
``on_connect(link)``, ``on_data(link, data)`` and ``on_disconnect(link)``;
``on_data`` can be given per link instead (``Link(..., on_data=...)``), so
that a frame input's bytes go straight to its side's handler.  The link
knows nothing else of it.

Reads land in a buffer of the link's own (``recv_into``) and are copied out
at their exact size.  ``sock.recv(RECV_BYTES)`` would allocate RECV_BYTES
for every read and shrink it after: above glibc's mmap threshold that is an
mmap, page faults and an munmap per read (18 against 3.4 µs for a
one-frame read on this project's benchmark VM), which a one-frame read, the
latency case, pays in full.  (serve also raises that threshold: ``heap``.)

``LoopSelector`` is the selector serve's event loop runs on: it counts the
loop's turns (a link read ahead in a turn skips its own callback in it) and
polls briefly before sleeping while packets come densely (``--busy-poll-us``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import selectors
import socket
from time import monotonic as _monotonic

from .endpoints import Endpoint
from .errors import os_error_text
from .outqueue import OutQueue
from .sockets import addr_text, client_socket, listening_socket, peer_name

RECV_BYTES = 256 * 1024
REPLACE_DRAIN_BYTES = 4 * 1024 * 1024   # read from a replaced connection, at most
BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 2.0


class LoopSelector(selectors.DefaultSelector):
    """serve's event-loop selector (``asyncio.SelectorEventLoop(selector)``):
    it counts the loop's turns, and polls for a while before it sleeps.

    Turns: one ``select()`` each, after which the loop runs the callbacks of
    everything reported.  When both inputs are reported in one turn and the
    first one's callback reads the other ahead (``Link.read_ahead``: the twin
    it waits for), the other's own callback in that turn would find its
    socket empty; a non-blocking read of an empty socket is a system call
    and an exception (~2,400 user instructions, callgrind), in about half
    the pairs of the latency benchmark.  It is skipped instead
    (``Link._readable``): epoll is level-triggered, so whatever arrived
    after the read ahead is reported again at the next turn.

    Polling (``busy_poll_us``, ``serve --busy-poll-us``): a process that
    sleeps in epoll is woken by the kernel when data comes, and on a virtual
    machine that wake-up alone costs tens of microseconds (this project's
    VM: 44-76 µs for a socketpair round trip between two sleeping
    processes, 27 µs when the responder polls), paid by every packet.  So
    before sleeping the selector polls (``select(0)``, ~1 µs each) for up to
    ``busy_poll_us``, but only while the loop's last wait was shorter than
    that: with packets closer together than the window it never sleeps
    (the latency benchmark at 20,000 pairs/s: p50 60 -> 32 µs, CPU 0.82 ->
    1.0 s per second), with sparser traffic it sleeps at once and polling
    costs nothing.  As Linux's ``busy_poll`` for the sockets that support
    it (loopback and unix sockets do not)."""

    turn = 0

    def __init__(self, busy_poll_us: float = 0) -> None:
        super().__init__()
        self.busy_poll_s = busy_poll_us / 1e6
        #: how long the last select() waited for something (s), until it
        #: returned events; "long" when it returned none (a timer's turn)
        self.last_wait_s = math.inf
        # the plain select and the clock (tests script them)
        self._wait = super().select
        self._clock = _monotonic

    def select(self, timeout=None):
        self.turn += 1
        if timeout is not None and timeout <= 0:
            return self._wait(timeout)                  # (a poll: the loop is busy)
        clock = self._clock
        start = clock()
        if self.last_wait_s < self.busy_poll_s:
            deadline = start + self.busy_poll_s
            if timeout is not None and start + timeout < deadline:
                deadline = start + timeout
            while True:
                ready = self._wait(0)
                now = clock()
                if ready:
                    self.last_wait_s = now - start
                    return ready
                if now >= deadline:
                    break
            if timeout is not None:
                timeout = max(0.0, timeout - (now - start))
        ready = self._wait(timeout)
        self.last_wait_s = clock() - start if ready else math.inf
        return ready


class Link:
    """One endpoint and, at most, one peer on it at a time.

    A server endpoint listens and takes the newest connection (the old one
    is closed, as a QEMU server chardev does); a client endpoint connects,
    and reconnects with backoff whenever the peer goes away.
    """

    def __init__(self, owner, name: str, endpoint: Endpoint, out_limit: int = 0,
                 on_data=None):
        self.owner = owner
        self._on_data = on_data or owner.on_data
        self.loop = owner.loop
        #: the loop's LoopSelector, when the owner made the loop with one
        self._turns: LoopSelector | None = getattr(owner, "turns", None)
        self._read_ahead_turn = -1       # the turn of the last read_ahead
        self.name = name
        self.endpoint = endpoint
        self.listener: socket.socket | None = None
        self.sock: socket.socket | None = None
        self.peer = ""
        self.out = OutQueue(out_limit) if out_limit else None
        self._read_buf = bytearray(RECV_BYTES)
        self._read_view = memoryview(self._read_buf)
        self.writer_registered = False
        self.closed = False
        self.connected_once = asyncio.Event()
        self._lost = asyncio.Event()
        self.task = None                 # a client endpoint's connecting task
        # counters
        self.connections = 0
        self.disconnects = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.frames_out = 0
        self.last_error = ""

    # setup ----------------------------------------------------------------
    def open_server(self) -> None:
        """Listen (a server endpoint); OSError when that cannot be done."""
        sock = listening_socket(self.endpoint)
        self.listener = sock
        self.loop.add_reader(sock, self._accept)

    def start_client(self) -> None:
        self.task = self.loop.create_task(self._connect_loop())

    async def _connect_loop(self) -> None:
        ep = self.endpoint
        backoff = ep.reconnect_s or BACKOFF_START_S
        reported = ""
        while not self.closed:
            sock = client_socket(ep)
            try:
                await self.loop.sock_connect(sock, ep.address)
            except OSError as e:
                sock.close()
                self.last_error = os_error_text(e)
                if self.last_error != reported:
                    # before the first connection this is startup, where a peer
                    # not there yet is normal (--connect-timeout decides); once
                    # a peer was lost, say why we are waiting
                    self.owner.log(f"{self.name}: {ep}: {self.last_error}; retrying",
                                   0 if self.connections else 1)
                    reported = self.last_error
                await asyncio.sleep(backoff)
                if not ep.reconnect_s:
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            reported = ""
            backoff = ep.reconnect_s or BACKOFF_START_S
            self._lost.clear()
            self._adopt(sock, peer_name(sock, ep))
            await self._lost.wait()
            if not self.closed:
                await asyncio.sleep(ep.reconnect_s or BACKOFF_START_S)

    def _accept(self) -> None:
        try:
            sock, addr = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.owner.log(f"{self.name}: accept failed: {os_error_text(e)}", 0)
            return
        sock.setblocking(False)
        if self.sock is not None:
            self.read_what_is_left()
            if self.sock is not None:
                self._drop("replaced by a new connection")
        self._adopt(sock, addr_text(addr) or "unix peer")

    def read_what_is_left(self) -> None:
        """Before a new peer replaces this one, take what the old one has
        already sent: a peer that writes its last frames, closes and
        reconnects at once must not lose them because the new connection
        was noticed first.  At most REPLACE_DRAIN_BYTES, so a peer that
        keeps writing cannot hold the loop here."""
        taken = 0
        while self.sock is not None and taken < REPLACE_DRAIN_BYTES:
            before = self.bytes_in
            self.read_once()             # may drop the link (EOF, error, bad input)
            if self.bytes_in == before:
                return                   # nothing more to read now
            taken += self.bytes_in - before

    def _adopt(self, sock, peer: str) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.peer = peer
        self.connections += 1
        self.connected_once.set()
        self.owner.log(f"{self.name}: connected ({peer})", 1)
        self.loop.add_reader(sock, self._readable)
        self.owner.on_connect(self)
        if self.out is not None:
            self.out.restart()
            self.flush()

    # data -------------------------------------------------------------------
    def _readable(self) -> None:
        # the loop's reader callback: nothing to do if this turn already
        # read the socket ahead (see LoopSelector)
        turns = self._turns
        if turns is not None and self._read_ahead_turn == turns.turn:
            return
        self.read_once()

    def read_ahead(self) -> bool:
        """``read_once`` now, ahead of the loop's own callback for this link
        (the owner expects data: the twin of a frame just read); whether
        anything was read.  The loop's callback for this link in the same
        turn then does nothing."""
        before = self.bytes_in
        self.read_once()
        if self.bytes_in == before:
            return False
        if self._turns is not None:
            self._read_ahead_turn = self._turns.turn
        return True

    def read_once(self) -> None:
        """Read what the peer has sent so far, up to RECV_BYTES, and hand it
        on; never blocks (nothing there: nothing happens)."""
        sock = self.sock
        if sock is None:
            return
        try:
            n = sock.recv_into(self._read_buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(os_error_text(e))
            return
        if not n:
            self._drop("closed by the peer")
            return
        self.bytes_in += n
        self._on_data(self, self._read_view[:n].tobytes())

    def flush(self) -> None:
        """Send what is queued, as far as the socket takes it now."""
        sock = self.sock
        if sock is None or self.writer_registered or not self.out.frames:
            return
        try:
            before = self.out.bytes
            self.frames_out += self.out.send(sock)
            self.bytes_out += before - self.out.bytes
        except OSError as e:
            self._drop(os_error_text(e))
            return
        if self.out.frames:
            self.writer_registered = True
            self.loop.add_writer(sock, self._writable)

    def _writable(self) -> None:
        self.loop.remove_writer(self.sock)
        self.writer_registered = False
        self.flush()

    def _drop(self, why: str, logged: bool = False) -> None:
        """The peer is gone (or cut off): forget it; clients reconnect.
        ``logged``: the reason was reported already (say it once)."""
        sock = self.sock
        if sock is None:
            return
        self.loop.remove_reader(sock)
        if self.writer_registered:
            self.loop.remove_writer(sock)
            self.writer_registered = False
        with contextlib.suppress(OSError):
            sock.close()
        self.sock = None
        self.disconnects += 1
        self.last_error = why
        self.owner.log(f"{self.name}: disconnected ({self.peer}): {why}",
                       0 if self.owner.running and not logged else 1)
        self.owner.on_disconnect(self)
        self._lost.set()

    def cut_off(self, why: str) -> None:
        """We close the connection (bad input), after logging why."""
        self._drop(why, logged=True)

    def close(self) -> None:
        self.closed = True
        if self.sock is not None:
            self.loop.remove_reader(self.sock)
            if self.writer_registered:
                self.loop.remove_writer(self.sock)
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
        if self.listener is not None:
            self.loop.remove_reader(self.listener)
            self.listener.close()
            if self.endpoint.kind == "unix":
                with contextlib.suppress(OSError):
                    os.unlink(self.endpoint.path)
            self.listener = None
        if self.task is not None:
            self.task.cancel()
        self._lost.set()

    def snapshot(self) -> dict:
        d = {"endpoint": str(self.endpoint), "connected": self.sock is not None,
             "peer": self.peer if self.sock is not None else None,
             "connections": self.connections, "disconnects": self.disconnects,
             "bytes_in": self.bytes_in, "last_error": self.last_error or None}
        if self.out is not None:
            d.update({"frames_out": self.frames_out, "bytes_out": self.bytes_out,
                      "queued_frames": len(self.out), "queued_bytes": self.out.bytes,
                      "queued_bytes_high_water": self.out.high_water,
                      "dropped_frames": self.out.dropped})
        return d
