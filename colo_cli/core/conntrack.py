"""Connections: what is queued per flow, and the bounded table of flows.

A connection is keyed by (VLAN tags, addresses, L4 protocol, ports) as the
frame arrives, with no direction normalisation: both inputs carry only
guest-outbound traffic (QEMU does the same).  Each connection has a primary
and a secondary queue (lists: the compiled core indexes them natively, and
they are short in the common case): TCP queues in sequence order (by
``seq_abs``), datagram queues in arrival order.

The table is bounded (``max_connections``); when a new connection needs room
the least recently active of the oldest entries is evicted.  Unlike QEMU, which clears the whole table and frees every
queued packet when it overflows (observed l1), evicting a connection here
goes through the comparator, which releases its queued primary frames.
"""

from __future__ import annotations

from collections import deque
from typing import Final, Iterator

from .compare import TcpStream
from .packet import KIND_TCP, KIND_UDP, Packet


class Connection:
    """One flow: its queued frames, per side, and its comparison state."""

    __slots__ = ("key", "kind", "primary_queue", "secondary_queue", "primary_later",
                 "secondary_later", "stale", "tcp", "rules", "diverged", "last_ms", "compared",
                 "miscompares", "released", "hold_sum_ms", "hold_max_ms")

    key: bytes
    kind: int
    primary_queue: list[Packet]
    secondary_queue: list[Packet]
    primary_later: list[Packet] | None
    secondary_later: list[Packet] | None
    stale: list[bytes] | None
    tcp: TcpStream | None
    rules: tuple
    diverged: bool
    last_ms: float
    compared: int
    miscompares: int
    released: int
    hold_sum_ms: float
    hold_max_ms: float

    def __init__(self, key: bytes, kind: int, now_ms: float, normalize_seq: bool = False,
                 rules: tuple = ()) -> None:
        self.key = key
        self.kind = kind
        #: the noise rules (--ignore) that apply to this connection
        self.rules = rules
        self.tcp = TcpStream(normalize_seq, rules) if kind == KIND_TCP else None
        self.primary_queue = []
        self.secondary_queue = []
        # TCP only: segments of a *new* connection on the same 4-tuple that one
        # side opened (SYN after its own FIN/RST) while the old connection is
        # still being compared; they wait for it to finish.  (None until
        # needed: a flow that never uses them costs nothing.)
        self.primary_later = None
        self.secondary_later = None
        # Datagrams only: what the primary frames flushed at the last
        # checkpoint compared as, the oldest *last* (it is popped first).
        # The secondary's copies of them may still be in flight; they are
        # recognised and absorbed instead of being paired with the next
        # primary datagram (the datagram twin of TCP's "below the
        # verification point").  Kept, and bounded, by ``StaleMemory``.
        self.stale = None
        self.diverged = False
        self.last_ms = now_ms
        self.compared = 0          # datagram pairs compared (the datagram index)
        self.miscompares = 0
        self.released = 0
        self.hold_sum_ms = 0.0
        self.hold_max_ms = 0.0

    def reuse(self, key: bytes, now_ms: float) -> Connection:
        """Make an evicted, empty datagram connection a new one for ``key``
        (its queues are kept: with many short flows through a full table,
        every new flow would otherwise allocate two).  Its ``stale`` is the
        caller's to forget (``StaleMemory.forget``), as it is counted."""
        self.key = key
        self.diverged = False
        self.last_ms = now_ms
        self.compared = self.miscompares = self.released = 0
        self.hold_sum_ms = self.hold_max_ms = 0.0
        return self

    @property
    def has_later(self) -> bool:
        """Segments of a next connection on this 4-tuple are waiting."""
        return bool(self.primary_later) or bool(self.secondary_later)

    @property
    def queued(self) -> int:
        return self.queued_primary + self.queued_secondary

    @property
    def queued_primary(self) -> int:
        later = self.primary_later
        return len(self.primary_queue) + (len(later) if later is not None else 0)

    @property
    def queued_secondary(self) -> int:
        later = self.secondary_later
        return len(self.secondary_queue) + (len(later) if later is not None else 0)

    def all_queued(self) -> list[Packet]:
        """Every queued frame (or reassembled datagram), both sides."""
        out = list(self.primary_queue) + list(self.secondary_queue)
        for later in (self.primary_later, self.secondary_later):
            if later is not None:
                out.extend(later)
        return out


#: what remembering one flushed datagram costs beyond its compared bytes
#: (its bytes object and list slot), and one flush's record (its list and
#: its place in ``StaleMemory.records``); measured with tracemalloc on
#: CPython 3.11: about 42 and 120 bytes.
STALE_ENTRY_OVERHEAD: Final = 64
STALE_RECORD_OVERHEAD: Final = 192


class StaleMemory:
    """What the datagram connections remember of the primary frames their
    checkpoints flushed (``Connection.stale``), and what that costs.

    It is bounded with the queues, by ``Config.max_queued_bytes``: the
    comparator counts ``held_bytes`` with what is queued and, short of room,
    forgets the oldest flush's record before it flushes any queued frame
    (forgetting costs at worst a miscompare, should a late twin come; a
    flush costs a checkpoint).  ``held_bytes`` counts each record
    STALE_RECORD_OVERHEAD until it leaves ``records``, and each entry its
    length plus STALE_ENTRY_OVERHEAD until it is absorbed or forgotten.
    Records leave in the order they came; one whose connection has moved
    on (absorbed all, forgotten, remembered anew) leaves as soon as it is
    at the front."""

    __slots__ = ("records", "held_bytes")

    records: deque[tuple[Connection, list[bytes]]]
    held_bytes: int

    def __init__(self) -> None:
        self.records = deque()
        self.held_bytes = 0

    def remember(self, conn: Connection, compared: list[bytes]) -> None:
        """``conn`` was flushed: ``compared``, oldest first, is what its
        unpaired primary datagrams compared as (replacing what it
        remembered)."""
        self.forget(conn)
        if not compared:
            return
        compared.reverse()
        conn.stale = compared
        records = self.records
        records.append((conn, compared))
        size = STALE_RECORD_OVERHEAD + STALE_ENTRY_OVERHEAD * len(compared)
        for b in compared:
            size += len(b)
        self.held_bytes += size
        while records:
            front, remembered = records[0]
            if remembered and front.stale is remembered:
                break
            self._drop()

    def absorbed(self, conn: Connection) -> None:
        """The secondary's copy of ``conn``'s oldest remembered datagram
        came (and was absorbed)."""
        stale = conn.stale
        assert stale is not None
        self.held_bytes -= len(stale.pop()) + STALE_ENTRY_OVERHEAD

    def forget(self, conn: Connection) -> None:
        """``conn`` no longer waits for late copies (the secondary moved
        past them, it was flushed anew, or it is gone)."""
        stale = conn.stale
        if stale is None:
            return
        conn.stale = None
        size = STALE_ENTRY_OVERHEAD * len(stale)
        for b in stale:
            size += len(b)
        self.held_bytes -= size
        stale.clear()

    def trim(self) -> bool:
        """Forget the oldest record; False when there is none."""
        if not self.records:
            return False
        self._drop()
        return True

    def _drop(self) -> None:
        conn, stale = self.records.popleft()
        if conn.stale is stale:
            self.forget(conn)
        else:
            # (moved on: what it held was counted off when it was let go)
            stale.clear()
        self.held_bytes -= STALE_RECORD_OVERHEAD


class ConnectionTable:
    """key -> Connection, with the order connections joined (or were last
    ``requeue``d) kept aside for eviction.

    Nothing is done per frame to keep it ordered by activity (each
    connection's ``last_ms`` says when it was last active): eviction picks
    the least recently active among the oldest entries, and the idle scan
    moves the active ones it meets to the back.  The order is a deque of
    (key, connection) with lazy deletion: a plain dict, whose front fills
    with deleted slots when the oldest entries go first, made each eviction
    cost a walk over them (quadratic with 100,000 flows through a full table).
    """

    __slots__ = ("conns", "max_connections", "_order")

    conns: dict[bytes, Connection]
    max_connections: int
    _order: deque[tuple[bytes, Connection]]

    def __init__(self, max_connections: int) -> None:
        self.conns = {}
        self.max_connections = max_connections
        self._order = deque()

    def __len__(self) -> int:
        return len(self.conns)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self.conns.values()))

    def get(self, key: bytes) -> Connection | None:
        return self.conns.get(key)

    def add(self, conn: Connection) -> None:
        self.conns[conn.key] = conn
        self._order.append((conn.key, conn))
        if len(self._order) > 2 * len(self.conns) + 1024:
            self._compact()

    def remove(self, conn: Connection) -> None:
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]

    def requeue(self, conn: Connection) -> None:
        """Move to the back of the eviction order."""
        if self.conns.get(conn.key) is conn:
            self._order.append((conn.key, conn))
            if len(self._order) > 2 * len(self.conns) + 1024:
                self._compact()

    def _compact(self) -> None:
        conns = self.conns
        seen: set[bytes] = set()
        fresh: deque[tuple[bytes, Connection]] = deque()
        # keep each live connection's latest position only
        for key, conn in reversed(self._order):
            if conns.get(key) is conn and key not in seen:
                seen.add(key)
                fresh.appendleft((key, conn))
        self._order = fresh

    def pop_oldest(self) -> Connection | None:
        """The live connection at the front of the order, taken off it (or
        None)."""
        order, conns = self._order, self.conns
        while order:
            key, conn = order.popleft()
            if conns.get(key) is conn:
                return conn
        return None

    def peek_oldest(self) -> Connection | None:
        """The live connection at the front of the order (left there), or
        None."""
        order, conns = self._order, self.conns
        while order:
            key, conn = order[0]
            if conns.get(key) is conn:
                return conn
            order.popleft()          # lazily deleted entries
        return None

    def recycle_oldest_datagram(self, key: bytes, now_ms: float) -> Connection | None:
        """The oldest live connection, when it is an idle datagram one with
        no noise rules, re-keyed as ``key`` and moved to the back (its
        queues kept); else None and nothing is changed."""
        front = self.peek_oldest()
        if front is None:
            return None
        if front.kind != KIND_UDP or front.rules or front.primary_queue or front.secondary_queue:
            return None
        order, conns = self._order, self.conns
        order.popleft()
        del conns[front.key]
        front.reuse(key, now_ms)
        conns[key] = front
        order.append((key, front))
        if len(order) > 2 * len(conns) + 1024:
            self._compact()
        return front

    def put_back(self, conns: list[Connection]) -> None:
        """Return connections taken with ``oldest`` to the front, in order."""
        order = self._order
        for conn in reversed(conns):
            order.appendleft((conn.key, conn))

    def oldest(self, limit: int) -> list[Connection]:
        """Up to ``limit`` live connections from the front of the order
        (taken off it: the caller requeues those it keeps)."""
        out: list[Connection] = []
        order, conns = self._order, self.conns
        while order and len(out) < limit:
            key, conn = order.popleft()
            if conns.get(key) is conn and conn not in out:
                out.append(conn)
        return out
