"""Frames waiting for a socket: serve's outdev (and its notify and QMP peers).

Released frames wait here in one FIFO, in release order, whatever the
socket does (QEMU's own send list pops the newest first under backpressure,
which reorders a flow).  The queue is bounded in bytes, counting what each
frame costs to hold beyond its bytes, so tiny frames cannot multiply the
memory the bound names; past it new frames are refused and counted.  A
frame cut by a disconnect goes again, whole, on the next connection
(``restart``).  ``send`` writes as many frames as the socket takes in one
``sendmsg`` call per batch of buffers, never blocking.

serve's per-frame path appends to ``frames`` and adds to ``bytes``
directly (one frame released on a match), then calls ``trim`` once per
read to hold the bound: that is why both are plain attributes.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Any, Final

MAX_IOV: Final = 512          # buffers per sendmsg (IOV_MAX is 1024 on Linux)

#: What holding one frame in an OutQueue costs beyond its bytes (the bytes
#: object's header, its deque slot, malloc's rounding): counted against the
#: queue's limit, so that tiny frames cannot multiply the memory it names.
OUT_FRAME_OVERHEAD: Final = 64


class OutQueue:
    """Frames waiting for a socket, in order.  ``head_sent`` bytes of the
    first frame have gone out on the current connection.  ``limit`` bounds
    the frames' bytes plus OUT_FRAME_OVERHEAD each."""

    def __init__(self, limit: int) -> None:
        self.frames: deque[bytes] = deque()
        self.head_sent: int = 0
        self.bytes: int = 0
        self.limit: int = limit
        self.high_water: int = 0
        self.dropped: int = 0

    def __len__(self) -> int:
        return len(self.frames)

    def over_limit(self, more_bytes: int = 0, more_frames: int = 0) -> bool:
        """Whether the queue, with ``more_frames`` frames of ``more_bytes``
        bytes added, is past its bound (bytes plus the overhead of each)."""
        return ((self.bytes + more_bytes + (len(self.frames) + more_frames) * OUT_FRAME_OVERHEAD)
                > self.limit)

    def push(self, data: bytes) -> bool:
        if self.over_limit(len(data), 1):
            self.dropped += 1
            return False
        self.frames.append(data)
        self.bytes += len(data)
        if self.bytes > self.high_water:
            self.high_water = self.bytes
        return True

    def trim(self) -> list[bytes]:
        """Enforce the bound on frames appended without ``push`` (the hot
        path appends directly): the newest ones beyond it are dropped, as
        ``push`` would have refused them.  Returns what was dropped."""
        dropped: list[bytes] = []
        while self.over_limit() and len(self.frames) > (1 if self.head_sent else 0):
            data = self.frames.pop()
            self.bytes -= len(data)
            self.dropped += 1
            dropped.append(data)
        if self.bytes > self.high_water:
            self.high_water = self.bytes      # what the queue really held
        return dropped

    def clear(self) -> None:
        """Forget every frame (what was meant for a connection that is gone)."""
        self.frames.clear()
        self.bytes = 0
        self.head_sent = 0

    def restart(self) -> None:
        """A new connection: the frame that was cut goes again, whole."""
        self.head_sent = 0

    def send(self, sock: Any) -> int:
        """Send what the socket takes now; returns the number of whole frames
        that left.  Raises OSError (other than EAGAIN) on a broken peer."""
        frames = self.frames
        if len(frames) == 1 and not self.head_sent:
            # one frame (each read releases one in the latency case): a
            # plain send, without building a buffer list
            frame = frames[0]
            try:
                n = sock.send(frame)
            except (BlockingIOError, InterruptedError):
                return 0
            if n == len(frame):
                frames.popleft()
                self.bytes -= n
                return 1
            self.head_sent = n
            return 0
        done = 0
        while frames:
            bufs: list[Any] = list(islice(frames, MAX_IOV))
            if self.head_sent:
                bufs[0] = memoryview(bufs[0])[self.head_sent:]
            try:
                n = sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                return done
            sent = n
            while sent and frames:
                head_left = len(frames[0]) - self.head_sent
                if sent >= head_left:
                    sent -= head_left
                    self.bytes -= len(frames.popleft())
                    self.head_sent = 0
                    done += 1
                else:
                    self.head_sent += sent
                    sent = 0
            if n < sum(map(len, bufs)):
                return done        # the socket is full
        return done
