"""What comes out of the comparator: facts and requests.

Every call into ``Comparator`` returns a list of these.  Each primary frame
leaves in exactly one ``Released`` or ``Bypassed`` event; secondary frames
never leave, they are consumed by a match, discarded at a checkpoint, or
reported in a ``Dropped`` event.
"""

from __future__ import annotations

import enum


class Side(enum.IntEnum):
    PRIMARY = 0
    SECONDARY = 1

    @property
    def label(self) -> str:
        return "primary" if self is Side.PRIMARY else "secondary"


PRIMARY = Side.PRIMARY
SECONDARY = Side.SECONDARY

# Why a primary frame was released.
RELEASE_MATCH = "match"              # the secondary sent the same
RELEASE_CHECKPOINT = "checkpoint"    # flushed at a checkpoint
RELEASE_QUEUE_FULL = "queue-full"    # its connection's queue was full
RELEASE_TABLE_FULL = "table-full"    # its connection was evicted from a full table
RELEASE_MEMORY_FULL = "memory-full"  # the total queued bytes hit the bound
RELEASE_END = "end"                  # still queued at the end of input / shutdown

# Why a checkpoint was requested.
CAUSE_MISCOMPARE = "miscompare"
CAUSE_TIMEOUT = "timeout"
CAUSE_QUEUE_FULL = "queue-full"
CAUSE_TABLE_FULL = "table-full"
CAUSE_MEMORY_FULL = "memory-full"
CHECKPOINT_CAUSES = (CAUSE_MISCOMPARE, CAUSE_TIMEOUT, CAUSE_QUEUE_FULL,
                     CAUSE_TABLE_FULL, CAUSE_MEMORY_FULL)

# Why a miscompare was declared.
MISCOMPARE_CONTENT = "content"        # same length, a byte differs
MISCOMPARE_LENGTH = "length"          # datagrams of different sizes
MISCOMPARE_STREAM_END = "stream-end"  # one TCP side ended (FIN) where the other has data


class Released:
    """A primary frame leaves toward the client."""
    __slots__ = ("packet", "reason", "hold_ms")

    def __init__(self, packet, reason: str, hold_ms: float) -> None:
        self.packet = packet
        self.reason = reason
        self.hold_ms = hold_ms

    def __repr__(self) -> str:
        return f"Released(#{self.packet.index}, {self.reason}, {self.hold_ms:g} ms)"


class Bypassed:
    """A primary frame that cannot be compared; released at once."""
    __slots__ = ("packet", "reason")

    def __init__(self, packet, reason: str) -> None:
        self.packet = packet
        self.reason = reason

    def __repr__(self) -> str:
        return f"Bypassed(#{self.packet.index}, {self.reason})"


class Dropped:
    """A secondary frame that was not compared (never a primary one from the
    core; the serve adapter reports a primary one only past its outdev
    memory bound)."""
    __slots__ = ("packet", "side", "reason")

    def __init__(self, packet, side: Side, reason: str) -> None:
        self.packet = packet
        self.side = side
        self.reason = reason

    def __repr__(self) -> str:
        return f"Dropped({self.side.label} #{self.packet.index}, {self.reason})"


class Miscompare:
    """The two replicas sent different bytes on one connection.

    ``stream_offset`` is, for TCP, the offset of the first differing byte in
    the connection's byte stream (0 = the first payload byte after the SYN,
    or the first byte seen when the capture starts mid-stream) and
    ``raw_seq`` its sequence number; for datagrams it is the offset within
    the compared region (from the L4 header) and ``datagram_index`` counts
    the connection's datagrams.  ``primary_offset``/``secondary_offset`` are
    the positions of that byte inside each frame's data (for hexdumps), or
    -1 when that side has no byte there.
    """
    __slots__ = ("key", "kind", "cause", "stream_offset", "raw_seq",
                 "datagram_index", "primary", "secondary",
                 "primary_offset", "secondary_offset", "now_ms")

    def __init__(self, key, kind, cause, stream_offset, raw_seq, datagram_index,
                 primary, secondary, primary_offset, secondary_offset, now_ms):
        self.key = key
        self.kind = kind
        self.cause = cause
        self.stream_offset = stream_offset
        self.raw_seq = raw_seq
        self.datagram_index = datagram_index
        self.primary = primary
        self.secondary = secondary
        self.primary_offset = primary_offset
        self.secondary_offset = secondary_offset
        self.now_ms = now_ms

    def __repr__(self) -> str:
        return (f"Miscompare({self.cause}, offset={self.stream_offset}, "
                f"index={self.datagram_index})")


class CheckpointRequested:
    """The comparator asks for a checkpoint (DO_CHECKPOINT).  ``key`` is the
    connection concerned; ``handled`` is True when the comparator has already
    flushed that connection itself (a full queue, table or memory), so an
    adapter that answers requests per connection has nothing left to do."""
    __slots__ = ("cause", "key", "now_ms", "handled")

    def __init__(self, cause: str, key, now_ms, handled: bool = False) -> None:
        self.cause = cause
        self.key = key
        self.now_ms = now_ms
        self.handled = handled

    def __repr__(self) -> str:
        return f"CheckpointRequested({self.cause})"


class CheckpointDone:
    """A checkpoint was performed: queues flushed, comparison state reset."""
    __slots__ = ("released", "discarded", "now_ms")

    def __init__(self, released: int, discarded: int, now_ms) -> None:
        self.released = released
        self.discarded = discarded
        self.now_ms = now_ms

    def __repr__(self) -> str:
        return f"CheckpointDone(released={self.released}, discarded={self.discarded})"
