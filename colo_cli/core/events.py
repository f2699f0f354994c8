"""What comes out of the comparator: facts and requests.

Every call into ``Comparator`` returns a list of these.  Each primary frame
leaves in exactly one ``Released``, ``Matched`` (the compact form of a
release on a match, for ``Comparator(compact=True)``) or ``Bypassed`` event;
secondary frames never leave, they are consumed by a match, discarded at a
checkpoint, or reported in a ``Dropped`` event.  The event lists hold
nothing but these classes.

Reasons and causes are ``StrEnum`` members: they compare equal to (and
serialise as) their stable strings, which appear in reports, JSON, the event
log and metrics.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Side(enum.IntEnum):
    PRIMARY = 0
    SECONDARY = 1

    @property
    def label(self) -> str:
        return "primary" if self is Side.PRIMARY else "secondary"


PRIMARY = Side.PRIMARY
SECONDARY = Side.SECONDARY


class ReleaseReason(enum.StrEnum):
    """Why a primary frame was released."""
    MATCH = "match"                  # the secondary sent the same
    CHECKPOINT = "checkpoint"        # flushed at a checkpoint
    QUEUE_FULL = "queue-full"        # its connection's queue was full
    TABLE_FULL = "table-full"        # its connection was evicted from a full table
    MEMORY_FULL = "memory-full"      # the total queued bytes hit the bound
    SECONDARY_ABSENT = "secondary-absent"  # flushed when the secondary was given up
    END = "end"                      # still queued at the end of input / shutdown


class CheckpointCause(enum.StrEnum):
    """Why a checkpoint was requested."""
    MISCOMPARE = "miscompare"
    TIMEOUT = "timeout"
    QUEUE_FULL = "queue-full"
    TABLE_FULL = "table-full"
    MEMORY_FULL = "memory-full"


class MiscompareCause(enum.StrEnum):
    """Why a miscompare was declared."""
    CONTENT = "content"          # same length, a byte differs
    LENGTH = "length"            # datagrams of different sizes
    STREAM_END = "stream-end"    # one TCP side ended (FIN) where the other has data


class CheckpointMode(enum.StrEnum):
    """Who performs the checkpoints the comparator asks for.

    ``LOCAL``: nobody outside can, so the comparator answers each request
    itself, at once, on the connection concerned (see
    ``Comparator.checkpoint_connection``): the primary wins, its frames
    leave, its comparison restarts.  ``replay`` and serve's ``release``
    policy.  A timeout scan answers every connection whose oldest frame is
    overdue in that same scan.

    ``EXTERNAL``: a COLO system checkpoints (Xen's notify peer, QEMU through
    QMP); requests go out as events and the held frames wait for
    ``Comparator.checkpoint()``.  A timeout scan raises one request however
    many connections are overdue (the checkpoint flushes them all), and
    repeats it every scan until a checkpoint comes, as QEMU does.
    """
    LOCAL = "local"
    EXTERNAL = "external"


# Module-level names for the common members (older call sites use them).
RELEASE_MATCH = ReleaseReason.MATCH
RELEASE_CHECKPOINT = ReleaseReason.CHECKPOINT
RELEASE_QUEUE_FULL = ReleaseReason.QUEUE_FULL
RELEASE_TABLE_FULL = ReleaseReason.TABLE_FULL
RELEASE_MEMORY_FULL = ReleaseReason.MEMORY_FULL
RELEASE_SECONDARY_ABSENT = ReleaseReason.SECONDARY_ABSENT
RELEASE_END = ReleaseReason.END
CAUSE_MISCOMPARE = CheckpointCause.MISCOMPARE
CAUSE_TIMEOUT = CheckpointCause.TIMEOUT
CAUSE_QUEUE_FULL = CheckpointCause.QUEUE_FULL
CAUSE_TABLE_FULL = CheckpointCause.TABLE_FULL
CAUSE_MEMORY_FULL = CheckpointCause.MEMORY_FULL
MISCOMPARE_CONTENT = MiscompareCause.CONTENT
MISCOMPARE_LENGTH = MiscompareCause.LENGTH

#: Bypass/drop reason of a frame the comparator failed on (a bug of ours):
#: the frame is let go so that one bad frame costs one frame, not the
#: comparator (see ``InternalError``).
REASON_INTERNAL_ERROR = "internal-error"
#: Bypass reason of a primary frame that arrives while the secondary is
#: absent (``Comparator.secondary_lost``).
REASON_SECONDARY_ABSENT = "secondary-absent"


@dataclass(slots=True)
class Released:
    """A primary frame leaves toward the client.

    ``packet`` is the core's ``Packet`` (``packet.data`` the record exactly
    as it arrived); ``hold_ms`` how long it was queued."""
    packet: Any
    reason: ReleaseReason
    hold_ms: float

    def __repr__(self) -> str:
        return f"Released(#{self.packet.index}, {self.reason}, {self.hold_ms:g} ms)"


@dataclass(slots=True, init=False)
class Matched:
    """A primary frame released on a match, in compact form: only what an
    adapter writes out.  A comparator made with ``compact=True`` (what
    ``serve`` and ``replay`` use) emits this instead of
    ``Released(packet, ReleaseReason.MATCH, hold_ms)`` for every frame
    released on a match, the one event of the common case, so that no
    per-frame ``Packet`` has to outlive the call; every other event is the
    same in both forms.  The hold time is counted in the stats all the same.

    ``data`` is the record exactly as it arrived (``Packet.data``) and
    ``l2`` the offset of its Ethernet frame in it."""
    data: bytes
    l2: int

    # written out (rather than generated by @dataclass) so that the compiled
    # core builds it natively: it is made once per matched frame
    def __init__(self, data: bytes, l2: int) -> None:
        self.data = data
        self.l2 = l2

    def __repr__(self) -> str:
        return f"Matched({len(self.data)} B)"


@dataclass(slots=True)
class Bypassed:
    """A primary frame that cannot be compared (``reason``: a parse reason
    such as ``unknown-ethertype``, ``secondary-absent`` or
    ``internal-error``); released at once."""
    packet: Any
    reason: str

    def __repr__(self) -> str:
        return f"Bypassed(#{self.packet.index}, {self.reason})"


@dataclass(slots=True)
class Dropped:
    """A secondary frame that was not compared (never a primary one from the
    core; the serve adapter reports a primary one only past its outdev
    memory bound)."""
    packet: Any
    side: Side
    reason: str

    def __repr__(self) -> str:
        return f"Dropped({self.side.label} #{self.packet.index}, {self.reason})"


@dataclass(slots=True)
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
    key: bytes
    kind: str
    cause: MiscompareCause
    stream_offset: int | None
    raw_seq: int | None
    datagram_index: int | None
    primary: Any
    secondary: Any
    primary_offset: int
    secondary_offset: int
    now_ms: float

    def __repr__(self) -> str:
        return (f"Miscompare({self.cause}, offset={self.stream_offset}, "
                f"index={self.datagram_index})")


@dataclass(slots=True)
class CheckpointRequested:
    """The comparator asks for a checkpoint (DO_CHECKPOINT).  ``key`` is the
    connection concerned (None: several, or none in particular).
    ``answered`` is True when the comparator has already flushed that
    connection itself (a full queue, table or memory; or any request in
    ``CheckpointMode.LOCAL``), so nothing is left to do for it locally."""
    cause: CheckpointCause
    key: bytes | None
    now_ms: float
    answered: bool = False

    def __repr__(self) -> str:
        return f"CheckpointRequested({self.cause})"


@dataclass(slots=True)
class CheckpointDone:
    """A checkpoint was performed: queues flushed, comparison state reset.
    ``key`` is the connection checkpointed alone (``CheckpointMode.LOCAL``),
    None for a whole-table checkpoint."""
    released: int
    discarded: int
    now_ms: float
    key: bytes | None = None

    def __repr__(self) -> str:
        return f"CheckpointDone(released={self.released}, discarded={self.discarded})"


@dataclass(slots=True)
class SecondaryAbsent:
    """The secondary's input has been gone longer than the absence bound
    (``entered`` True): comparing is pointless, every queued primary frame
    has been released (reason ``secondary-absent``) and new primary frames
    pass through at once, bypassed with reason ``secondary-absent``.
    ``entered`` False: the secondary is back and comparison resumes from a
    clean state."""
    entered: bool
    now_ms: float
    #: primary frames released when the mode was entered
    released: int = 0


#: (a module-level name for the annotation below: the compiled build
#: resolves dataclass annotations in this module's namespace)
Failure = BaseException


@dataclass(slots=True)
class InternalError:
    """The comparator failed on a frame (or a scan): a bug of ours.  The
    frame has been let go (a primary one in a ``Bypassed`` event, a
    secondary one in a ``Dropped`` event, both with reason
    ``internal-error``), the connection concerned has been flushed so that
    its state is consistent again, and comparison goes on.  ``error`` is the
    exception, for the adapter to log (with its traceback under --debug)."""
    error: Failure
    side: Side | None
    now_ms: float
