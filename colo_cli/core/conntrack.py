"""Connections: what is queued per flow, and the bounded table of flows.

A connection is keyed by (VLAN tags, addresses, L4 protocol, ports) as the
frame arrives, with no direction normalisation: both inputs carry only
guest-outbound traffic (QEMU does the same).  Each connection has a primary
and a secondary queue.  TCP queues are kept in sequence order (lists sorted
by ``seq_abs``), datagram queues in arrival order (deques).

The table is bounded (``max_connections``); when a new connection needs room
the least recently active of the oldest entries is evicted.  Unlike QEMU, which clears the whole table and frees every
queued packet when it overflows (observed l1), evicting a connection here
goes through the comparator, which releases its queued primary frames.
"""

from __future__ import annotations

from collections import deque

from .packet import KIND_TCP, KIND_UDP


class Connection:
    __slots__ = ("key", "kind", "p", "s", "p_later", "s_later", "stale", "tcp", "rules",
                 "diverged", "last_ms", "compared", "miscompares", "released",
                 "hold_sum_ms", "hold_max_ms")

    def __init__(self, key: bytes, kind: int, now_ms, normalize_seq: bool = False,
                 rules: tuple = ()) -> None:
        self.key = key
        self.kind = kind
        #: the noise rules (--ignore) that apply to this connection
        self.rules = rules
        if kind == KIND_TCP:
            from .compare import TcpStream  # local: compare imports us
            self.tcp = TcpStream(normalize_seq, rules)
            self.p: list | deque = []
            self.s: list | deque = []
        else:
            self.tcp = None
            self.p = deque()
            self.s = deque()
        # TCP only: segments of a *new* connection on the same 4-tuple that one
        # side opened (SYN after its own FIN/RST) while the old connection is
        # still being compared; they wait for it to finish.  (An empty tuple
        # until needed: a flow that never uses them costs nothing.)
        self.p_later: list | tuple = [] if kind == KIND_TCP else ()
        self.s_later: list | tuple = [] if kind == KIND_TCP else ()
        # Datagrams only: what the primary frames flushed at the last
        # checkpoint compared as, oldest first.  The secondary's copies of
        # them may still be in flight; they are recognised and absorbed
        # instead of being paired with the next primary datagram (the
        # datagram twin of TCP's "below the verification point").
        self.stale: deque | tuple = ()
        self.diverged = False
        self.last_ms = now_ms
        self.compared = 0          # datagram pairs compared (the datagram index)
        self.miscompares = 0
        self.released = 0
        self.hold_sum_ms = 0.0
        self.hold_max_ms = 0.0

    def reuse(self, key: bytes, now_ms) -> "Connection":
        """Make an evicted, empty datagram connection a new one for ``key``
        (its deques are kept: with many short flows through a full table,
        every new flow would otherwise allocate two)."""
        self.key = key
        self.stale = ()
        self.diverged = False
        self.last_ms = now_ms
        self.compared = self.miscompares = self.released = 0
        self.hold_sum_ms = self.hold_max_ms = 0.0
        return self

    @property
    def queued(self) -> int:
        return len(self.p) + len(self.s) + len(self.p_later) + len(self.s_later)

    @property
    def queued_primary(self) -> int:
        return len(self.p) + len(self.p_later)

    @property
    def queued_secondary(self) -> int:
        return len(self.s) + len(self.s_later)

    def summary(self) -> dict:
        from .packet import describe_key, format_key
        d = {"flow": format_key(self.key), **describe_key(self.key),
             "queued_primary": self.queued_primary, "queued_secondary": self.queued_secondary,
             "diverged": self.diverged, "miscompares": self.miscompares,
             "released": self.released,
             "hold_mean_ms": round(self.hold_sum_ms / self.released, 3) if self.released else 0.0,
             "hold_max_ms": round(self.hold_max_ms, 3)}
        if self.tcp is not None:
            d["stream_offset"] = self.tcp.stream_offset()
        return d


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

    def __init__(self, max_connections: int) -> None:
        self.conns: dict[bytes, Connection] = {}
        self.max_connections = max_connections
        self._order: deque = deque()

    def __len__(self) -> int:
        return len(self.conns)

    def __iter__(self):
        return iter(list(self.conns.values()))

    def get(self, key: bytes):
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
        seen = set()
        fresh = deque()
        # keep each live connection's latest position only
        for key, conn in reversed(self._order):
            if conns.get(key) is conn and key not in seen:
                seen.add(key)
                fresh.appendleft((key, conn))
        self._order = fresh

    def pop_oldest(self):
        """The live connection at the front of the order, taken off it (or
        None)."""
        order, conns = self._order, self.conns
        while order:
            key, conn = order.popleft()
            if conns.get(key) is conn:
                return conn
        return None

    def peek_oldest(self):
        """The live connection at the front of the order (left there), or
        None."""
        order, conns = self._order, self.conns
        while order:
            key, conn = order[0]
            if conns.get(key) is conn:
                return conn
            order.popleft()          # lazily deleted entries
        return None

    def recycle_oldest_datagram(self, key: bytes, now_ms):
        """The oldest live connection, when it is an idle datagram one with
        no noise rules, re-keyed as ``key`` and moved to the back (its
        deques kept); else None and nothing is changed."""
        front = self.peek_oldest()
        if front is None:
            return None
        old_key = front.key
        order, conns = self._order, self.conns
        if front.kind != KIND_UDP or front.rules or front.p or front.s:
            return None
        order.popleft()
        del conns[old_key]
        front.reuse(key, now_ms)
        conns[key] = front
        order.append((key, front))
        if len(order) > 2 * len(conns) + 1024:
            self._compact()
        return front

    def put_back(self, conns: list) -> None:
        """Return connections taken with ``oldest`` to the front, in order."""
        order = self._order
        for conn in reversed(conns):
            order.appendleft((conn.key, conn))

    @property
    def full(self) -> bool:
        return len(self.conns) >= self.max_connections

    def oldest(self, limit: int) -> list:
        """Up to ``limit`` live connections from the front of the order
        (taken off it: the caller requeues those it keeps)."""
        out = []
        order, conns = self._order, self.conns
        while order and len(out) < limit:
            key, conn = order.popleft()
            if conns.get(key) is conn and conn not in out:
                out.append(conn)
        return out
