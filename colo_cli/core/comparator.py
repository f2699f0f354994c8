"""The comparison state machine.  Sans-IO: bytes and ``now_ms`` in, events out.

::

    c = Comparator(Config())
    events = c.receive(PRIMARY, data, now_ms)      # a frame arrived
    events = c.handle_timer(now_ms)                # when now_ms >= c.get_timer()
    events = c.checkpoint(now_ms)                  # a checkpoint happened
    events = c.finish(now_ms)                      # end of input / shutdown

Theory of operation
===================

House rules
-----------

* **The core never reads a clock.**  Time only comes in as ``now_ms`` (any
  monotonic millisecond clock: the event loop's in ``serve``, capture
  timestamps in ``replay``), so a replay of captured traffic takes exactly the
  decisions ``serve`` would have taken for the same arrival times.  No
  sockets, files or printing either: bytes in, events out.
* **Every primary frame leaves exactly once**: in a ``Released`` event (on a
  match, or flushed with a reason), a ``Matched`` one (the compact form of a
  release on a match), or a ``Bypassed`` one (not comparable).  A secondary
  frame never leaves: it is consumed by a match, absorbed (pure ACKs,
  duplicates), discarded at a checkpoint, or reported ``Dropped``.  Per
  connection, primary frames leave in the order the primary sent them (TCP:
  sequence order).
* **Nothing is dropped silently and nothing grows without bound**: a full
  queue, table or memory bound flushes the connection concerned (its
  primary frames released, counted by reason) and raises a checkpoint
  request (QEMU tail-drops on a full queue and clears everything on a full
  table: observed k1, l1).
* **Requests are requests**: in ``CheckpointMode.EXTERNAL`` the core asks
  (``CheckpointRequested``) and a COLO system checkpoints, then calls
  ``checkpoint()``; in ``CheckpointMode.LOCAL`` (replay, serve's ``release``
  policy) nobody outside can, so the core answers each request itself, on
  the connection concerned, at the end of the call that raised it.
* **A bug of ours costs one frame, not the comparator**: the public methods
  never raise; see ``InternalError``.  A scan that fails checkpoints the
  connections it had to decide on, so nothing stays held for want of one.

The public methods, and the QEMU function each one stands for
--------------------------------------------------------------

``receive(side, data, now_ms)``
    A frame arrived on primary-in or secondary-in: parse it, queue it on its
    connection, compare, release what matched (QEMU: ``compare_pri_rs_finalize``
    / ``compare_sec_rs_finalize`` then ``colo_compare_connection``, with the
    per-protocol ``colo_compare_tcp`` / ``colo_packet_compare_udp`` /
    ``_icmp`` / ``_other``).
``receive_records(side, records, now_ms, header_len)``
    ``receive`` for each record one read of serve's framing brought, in one
    call: the same decisions and events.
``get_timer()`` / ``handle_timer(now_ms)``
    When the periodic scan is next due, and the scan itself: timeouts, idle
    connections, fragments, the secondary's absence (QEMU's
    ``expired_scan_cycle`` timer, ``check_old_packet_regular``).  serve arms
    a loop timer for ``get_timer()``; replay, whose clock is the captures',
    calls ``handle_timer(t)`` for each ``t = get_timer()`` up to the next
    frame's time, before giving it that frame: the same contract, driven by
    another clock, so both take the same decisions.  ``next_scan_ms``: no
    timer is due before it (replay's cheap check before each frame).
``checkpoint(now_ms)``
    A checkpoint happened: every queue flushed, comparison state reset
    (QEMU: ``colo_notify_compares_event`` -> ``colo_flush_packets``).
``checkpoint_connection(key, now_ms)``
    The same for one connection only (what ``CheckpointMode.LOCAL`` does with
    each request; QEMU has no equivalent).
``set_mode(mode, now_ms)``
    Who answers checkpoint requests (see ``CheckpointMode``).
``secondary_lost(now_ms)`` / ``secondary_back(now_ms)``
    The secondary's input went away / came back; after ``absent_after_ms``
    primary frames stop waiting for it (QEMU waits for ever).
``finish(now_ms)``
    End of input or shutdown: what is still queued leaves with reason ``end``
    (QEMU: ``colo_compare_finalize`` flushes too).
``snapshot()``
    Counters and histograms (``Stats``), for ``stats`` and reports.
``connections(limit)`` / ``top_connections(n)`` / ``connection_count``
    The connections now in the table (``flows.connection_summary`` shows one).

Public attributes an adapter may read (never write): ``stats`` (the
``Stats`` counters), ``queued_frames`` and ``queued_bytes`` (what is held
now), ``mode``, ``config``.

Each rule is written once
-------------------------

TCP stream comparison, releasability and the ACK gate live in
``compare.TcpStream``; datagram pairing in ``_receive_datagram``; queueing
in ``_enqueue``; leaving and release accounting in ``_leave`` /
``_release``; connection keys in ``packet.parse``.  There is one path for
every frame: the same code decides for the first frame of a capture and for
the millionth of a bulk transfer.

How the speed is obtained
-------------------------

From how that one path is built, not from a second copy of it:

* the core is typed Python compiled with mypyc when ``pip install`` finds a C
  compiler (``colo-compare --version`` says which build runs; the same source
  runs interpreted otherwise, and ``COLO_COMPARE_PURE=1`` forces that):
  attribute access on ``Packet``/``Connection``/``TcpStream`` and integer
  arithmetic then cost a few machine instructions, not dictionary lookups;
* few copies on the common path: of a TCP segment in step, the first copy
  to arrive is appended to its side's stream buffer and the second is
  compared where it stands in its frame, with one ``startswith`` at the
  payload's offset (``TcpStream._add_payload``); a datagram pair is
  compared with one slice and a ``startswith`` at an offset; connection
  keys are slices of the frame;
* few objects and calls per frame: one ``Packet`` with every field set
  once; for a release on a match the compact ``Matched`` event
  (``compact=True``, what the adapters use); ``receive_records`` takes a
  whole read of serve's framing in one call;
* bounded work per frame: frames leave the timeout list as they leave (no
  scan frees a second's worth at once), the connection table evicts in O(1)
  in the usual case and reuses an idle datagram connection in place.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Final

from . import events as ev
from .compare import UNSET, TcpStream, datagram_difference, datagrams_equal, insert_segment
from .config import Config
from .conntrack import Connection, ConnectionTable, StaleMemory
from .events import Matched, Released
from .noise import mask_datagram, rules_for
from .packet import (KIND_FRAGMENT, KIND_NAMES, KIND_TCP, KIND_UDP, MAX_VNET_HDR_LEN,
                     REASON_BAD_VNET_HDR, REASON_IPV4_TRUNCATED, REASON_IPV6_TRUNCATED, RST,
                     SYN, Packet, parse_into, parse_reassembled)
from .reassembly import Datagram, Reassembler
from .stats import Stats

try:
    from mypy_extensions import mypyc_attr
except ImportError:      # not needed to run: only mypyc reads it
    def mypyc_attr(*_args: object, **_attrs: object) -> Any:  # type: ignore[misc]
        return lambda cls: cls

PRIMARY: Final = ev.Side.PRIMARY
SECONDARY: Final = ev.Side.SECONDARY
#: ``Side.PRIMARY`` as a plain int: the compiled core compares an int with
#: another natively, with an enum member through a generic call
_PRIMARY: Final = 0

#: What holding one queued frame costs beyond its bytes (its Packet, its
#: queue and arrival-list slots), measured with tracemalloc on CPython 3.11:
#: about 250 bytes.  Counted against ``Config.max_queued_bytes``.
QUEUED_FRAME_OVERHEAD: Final = 256


def _last_ms(conn: Connection) -> float:
    return conn.last_ms


def _after(t_ms: float, later_ms: float) -> float:
    """``later_ms`` if it is after ``t_ms``, else the next float after
    ``t_ms``: past 2**53 ms a float no longer holds a millisecond step (nor,
    further on, a scan cycle), and a timer that adds one must still move."""
    return later_ms if later_ms > t_ms else math.nextafter(t_ms, math.inf)


# Python subclasses are allowed (the compiled class stays open to them): the
# fault tests inject failures into one method of a subclass.
@mypyc_attr(allow_interpreted_subclasses=True)
class Comparator:
    """The state machine; see the module's theory of operation."""

    def __init__(self, config: Config | None = None, compact: bool = False,
                 mode: ev.CheckpointMode = ev.CheckpointMode.EXTERNAL) -> None:
        self.config: Config = config or Config()
        self.config.validate()
        self.stats: Stats = Stats()
        self.table: ConnectionTable = ConnectionTable(self.config.max_connections)
        #: queued frames, oldest first (for timeouts), from index
        #: ``_arrivals_head`` on: frames that left before it are cut off in
        #: bulk (a list, not a deque: the compiled core indexes it natively)
        self._arrivals: list[Packet] = []
        self._arrivals_head: int = 0
        self.queued_frames: int = 0
        self.queued_bytes: int = 0
        self._epoch_ms: float | None = None   # first now_ms seen: scan ticks are phased from it
        self._next_scan_ms: float | None = None
        self._reassembly: tuple[Reassembler, Reassembler] = (Reassembler(), Reassembler())
        self._conns: dict[bytes, Connection] = self.table.conns   # the table's dict
        #: what flushed datagram connections remember for late secondary
        #: copies, counted with the queues against max_queued_bytes
        self._stale: StaleMemory = StaleMemory()
        #: who performs checkpoints (see CheckpointMode)
        self.mode: ev.CheckpointMode = ev.CheckpointMode(mode)
        #: LOCAL: connections to checkpoint at the end of this call (a dict:
        #: ordered, and no duplicates)
        self._to_answer: dict[bytes, None] = {}
        self._absent_since_ms: float | None = None   # when the secondary's input went away
        self._absent: bool = False      # ... and was given up: primary frames pass
        #: a release on a match comes as a ``Matched`` event (the frame's
        #: bytes) rather than a ``Released`` one: what the adapters use
        self.compact: bool = compact
        # The settings the comparator reads after this, copied once: Config
        # is not compiled, so each read of it is a generic attribute lookup
        # (one per new connection showed with many short flows; four were a
        # third of get_timer(), which serve calls after every read).
        self._max_queue_size: int = self.config.max_queue_size
        self._max_queued_bytes: int = self.config.max_queued_bytes
        self._noise_rules: bool = bool(self.config.ignore)
        self._normalize_seq: bool = self.config.normalize_seq
        self._cycle_ms: float = self.config.expired_scan_cycle_ms
        self._compare_timeout_ms: float | None = self.config.compare_timeout_ms
        self._fragment_timeout_ms: float = self.config.fragment_timeout_ms
        self._idle_timeout_ms: float = self.config.idle_timeout_ms

    # ------------------------------------------------------------------
    # input

    def receive(self, side: int, data: bytes, now_ms: float, l2: int = 0,
                vnet_hdr_len: int = 0, cut: bool = False,
                l3: int = -1, ethertype: int = 0) -> list:
        """A frame arrived on ``side``.  ``data[l2:]`` is the Ethernet frame;
        ``vnet_hdr_len`` bytes before it are a virtio-net header (kept, not
        compared).  ``cut``: a capture recorded less of the frame than was
        sent (snaplen), so an IP length beyond the data is the capture's
        doing, not a malformed frame.  ``l3 >= 0``: the frame at ``l2`` has
        another link-layer header (a capture's Linux cooked, loopback or
        raw-IP link), read by the adapter: the network header of EtherType
        ``ethertype`` starts at ``data[l3:]`` (see ``packet.parse``).

        Returns the events.  Never raises: should the comparator fail on a
        frame (a bug of ours), the frame is let go, counted as
        ``internal-error``, and an ``InternalError`` event carries the
        exception (see ``_contain``).
        """
        out: list = []
        self._receive_contained(side, data, now_ms, l2, vnet_hdr_len, cut, l3, ethertype, out)
        return out

    def receive_records(self, side: int, records: list[tuple[bytes, int]], now_ms: float,
                        header_len: int) -> list:
        """``receive`` for each record of a ``FrameDecoder.feed`` on
        ``side``, in order, at one ``now_ms``: ``(wire, vnet_hdr_len)``
        pairs, the Ethernet frame of each at ``header_len + vnet_hdr_len``.
        Returns the events of all of them, in order: the same decisions and
        events as one ``receive`` per record, in one call per read (serve's
        hot path: no call, list or loop turn of the adapter per frame)."""
        out: list = []
        for wire, vnet_hdr_len in records:
            self._receive_contained(side, wire, now_ms, header_len + vnet_hdr_len,
                                    vnet_hdr_len, False, -1, 0, out)
        return out

    def _receive_contained(self, side: int, data: bytes, now_ms: float, l2: int,
                           vnet_hdr_len: int, cut: bool, l3: int, ethertype: int,
                           out: list) -> None:
        """One frame, its events appended to ``out``; a failure costs this
        frame only (``_contain``)."""
        try:
            self._receive(side, data, now_ms, l2, vnet_hdr_len, cut, l3, ethertype, out)
            if self._to_answer:
                self._answer_requests(now_ms, out)
        except Exception as exc:  # noqa: BLE001 - one frame, not the comparator
            self._contain(exc, side, data, now_ms, l2, out, l3, ethertype)

    def _receive(self, side: int, data: bytes, now_ms: float, l2: int, vnet_hdr_len: int,
                 cut: bool, l3: int, ethertype: int, out: list) -> None:
        if self._epoch_ms is None:
            self._start_clock(now_ms)
        stats = self.stats
        primary = side == _PRIMARY
        i = 0 if primary else 1
        size = len(data)
        # frame bytes, as a capture has them: serve's length words and vnet
        # headers are not counted, so serve and replay count alike
        frame_bytes = size - l2 if size >= l2 else 0
        # frames_in is this frame's index
        if primary:
            index = stats.p_frames_in
            stats.p_frames_in = index + 1
            stats.p_bytes_in += frame_bytes
        else:
            index = stats.s_frames_in
            stats.s_frames_in = index + 1
            stats.s_bytes_in += frame_bytes
        pkt = Packet(side, data, l2, vnet_hdr_len, now_ms, index)
        if self._absent_since_ms is not None:
            if primary and self._absent:
                # the secondary is gone: nothing to compare with (see
                # secondary_lost); the frame passes at once
                out.append(self._not_comparable(pkt, ev.REASON_SECONDARY_ABSENT))
                return
            if not primary:
                # secondary frames again: the adapter says so with
                # secondary_back, but the frames themselves are proof
                self._secondary_back(now_ms, out)
        if vnet_hdr_len > MAX_VNET_HDR_LEN or l2 > size:
            out.append(self._not_comparable(pkt, REASON_BAD_VNET_HDR))
            return
        reason = parse_into(pkt, l3, ethertype)
        if reason:
            out.append(self._not_comparable(pkt, reason))
            return
        if pkt.cmp_end > size:
            if not cut:
                # an IP length beyond the frame, and no capture to blame
                key = pkt.key
                assert key is not None
                out.append(self._not_comparable(
                    pkt, REASON_IPV6_TRUNCATED if key[-1:] == b"6" else REASON_IPV4_TRUNCATED))
                return
            # captured short of its IP length (snaplen): only the captured
            # part can be compared
            stats.truncated[i] += 1
        if pkt.kind == KIND_FRAGMENT:
            self._receive_fragment(pkt, now_ms, out)
        else:
            self._dispatch(pkt, primary, now_ms, out)
        if (self.queued_bytes + self.queued_frames * QUEUED_FRAME_OVERHEAD + self._stale.held_bytes
                > self._max_queued_bytes):
            self._relieve_memory(now_ms, out)

    def _dispatch(self, pkt: Packet, primary: bool, now_ms: float, out: list) -> None:
        """A parsed, comparable frame (or reassembled datagram) joins its
        connection and is compared."""
        key = pkt.key
        assert key is not None
        kind = pkt.kind
        conn = self._conns.get(key)
        if conn is None:
            conn = self._new_connection(key, kind, now_ms, out)
        else:
            conn.last_ms = now_ms
        pkt.conn = conn
        if kind == KIND_TCP:
            self._receive_tcp(conn, pkt, primary, now_ms, out)
        else:
            self._receive_datagram(conn, pkt, primary, now_ms, out)

    # -- fragments -----------------------------------------------------------

    def _receive_fragment(self, pkt: Packet, now_ms: float, out: list) -> None:
        # (parse_into gave a fragment: seq its offset, ack its MF flag,
        # flags its protocol)
        key = pkt.key
        assert key is not None
        primary = pkt.side == _PRIMARY
        self.stats.fragments_in[0 if primary else 1] += 1
        reasm = self._reassembly[0 if primary else 1]
        done, failed = reasm.add(pkt, key, pkt.seq, pkt.ack, pkt.flags,
                                 pkt.data[pkt.cmp_off:pkt.cmp_end], now_ms)
        for dg, reason in failed:
            self._fail_datagram(dg, reason, out)
        if done is None:
            return
        payload, overlap, conflict = done.assemble()
        if overlap:
            self.stats.fragment_overlap_bytes[0 if primary else 1] += overlap
            self.stats.fragment_conflict_bytes[0 if primary else 1] += conflict
        first = done.fragments[0]
        whole = Packet(pkt.side, payload, 0, 0, first.arrival_ms, first.index)
        whole.fragments = done.fragments
        reason = parse_reassembled(whole, key, done.proto)
        if reason:
            self._fail_datagram(done, reason, out)
            return
        self.stats.reassembled[0 if primary else 1] += 1
        self._dispatch(whole, primary, now_ms, out)

    def _fail_datagram(self, dg: Datagram, reason: str, out: list) -> None:
        """A datagram that cannot be reassembled (or compared): its primary
        fragments leave at once, its secondary ones are dropped."""
        for frag in dg.fragments:
            out.append(self._not_comparable(frag, reason))

    def _not_comparable(self, pkt: Packet, reason: str) -> object:
        """The event for a frame that is not compared: a primary one is
        bypassed (it leaves at once), a secondary one dropped."""
        pkt.left = True
        if pkt.side == _PRIMARY:
            self.stats.bypassed[reason] += 1
            return ev.Bypassed(pkt, reason)
        self.stats.dropped["secondary:" + reason] += 1
        return ev.Dropped(pkt, SECONDARY, reason)

    def _new_connection(self, key: bytes, kind: int, now_ms: float, out: list) -> Connection:
        table = self.table
        if len(self._conns) >= table.max_connections:
            if kind == KIND_UDP and not self._noise_rules:
                # the connection-churn case (many short flows through a full
                # table): the oldest connection, when it is an idle datagram
                # one, becomes the new one in place, its deques kept
                recycled = table.recycle_oldest_datagram(key, now_ms)
                if recycled is not None:
                    self._stale.forget(recycled)
                    self.stats.evicted_idle += 1
                    self.stats.connections_created += 1
                    return recycled
            self._evict_for_room(now_ms, out)
        if self._noise_rules or self._normalize_seq:
            config = self.config
            conn = Connection(key, kind, now_ms, config.normalize_seq,
                              rules_for(config.ignore, kind, key))
        else:
            conn = Connection(key, kind, now_ms)
        table.add(conn)
        self.stats.connections_created += 1
        return conn

    def _enqueue(self, queue: list[Packet], pkt: Packet, primary: bool) -> None:
        """Account for a frame that has just joined ``queue``."""
        arrivals = self._arrivals
        # pass over the frames at the front that have left, as they leave:
        # kept until the next scan, a second's worth of released frames were
        # freed all at once there (a stall of tens of ms, and memory in
        # proportion)
        head = self._arrivals_head
        n = len(arrivals)
        while head < n and arrivals[head].left:
            head += 1
        if head > 64 and 2 * head >= n:
            del arrivals[:head]     # each frame is moved at most once, on average
            head = 0
        self._arrivals_head = head
        arrivals.append(pkt)
        queued_frames = self.queued_frames + 1
        self.queued_frames = queued_frames
        if len(arrivals) - head > queued_frames + (queued_frames >> 2) + 1024:
            self._compact_arrivals()
        queued_bytes = self.queued_bytes + len(pkt.data)
        self.queued_bytes = queued_bytes
        self._note_high_water(primary, len(queue), queued_bytes)

    def _note_high_water(self, primary: bool, depth: int, queued_bytes: int) -> None:
        """A frame of that side is held with ``depth`` frames in its
        connection's queue and ``queued_bytes`` in all."""
        stats = self.stats
        if queued_bytes > stats.queued_bytes_high_water:
            stats.queued_bytes_high_water = queued_bytes
        if primary:
            if depth > stats.p_queue_high_water:
                stats.p_queue_high_water = depth
        elif depth > stats.s_queue_high_water:
            stats.s_queue_high_water = depth

    # -- TCP ---------------------------------------------------------------

    def _receive_tcp(self, conn: Connection, pkt: Packet, primary: bool, now_ms: float,
                     out: list) -> None:
        tcp = conn.tcp
        assert tcp is not None
        later = conn.primary_later if primary else conn.secondary_later
        if later or (pkt.flags & SYN and tcp.ended(primary)):
            # A new connection on the same 4-tuple, opened by this side before
            # the old one is fully compared: it waits until the old one is.
            if later is None:
                later = []
                if primary:
                    conn.primary_later = later
                else:
                    conn.secondary_later = later
            later.append(pkt)
            self._enqueue(later, pkt, primary)
            self._progress_tcp(conn, tcp, now_ms, out)
        elif primary:
            tcp.add_primary(pkt)     # gives it its stream positions
            self._progress_tcp(conn, tcp, now_ms, out, pkt)
        elif tcp.add_secondary(pkt):
            self._progress_tcp(conn, tcp, now_ms, out, pkt)
        else:
            # nothing new in it (a pure ACK, a duplicate): absorbed
            pkt.left = True
            self.stats.secondary_absorbed += pkt.frames
            self._progress_tcp(conn, tcp, now_ms, out)
        limit = self._max_queue_size
        if conn.queued_primary > limit or conn.queued_secondary > limit:
            self._flush_connection(conn, now_ms, ev.ReleaseReason.QUEUE_FULL, out)
            self._request(ev.CheckpointCause.QUEUE_FULL, conn, now_ms, out, answered=True)

    def _start_next_connection(self, conn: Connection) -> None:
        """The old connection on this 4-tuple is over: the segments that
        waited for it (``primary_later``/``secondary_later``) start the new
        one."""
        conn.tcp = tcp = TcpStream(self._normalize_seq, conn.rules)
        conn.diverged = False
        p_later, s_later = conn.primary_later, conn.secondary_later
        conn.primary_later = conn.secondary_later = None
        for pkt in p_later or ():
            tcp.add_primary(pkt)
            insert_segment(conn.primary_queue, pkt)
        for pkt in s_later or ():
            # already counted as queued: kept if it brings bytes
            if tcp.add_secondary(pkt):
                insert_segment(conn.secondary_queue, pkt)
            else:
                self._leave(pkt)
                self.stats.secondary_absorbed += pkt.frames

    def _progress_tcp(self, conn: Connection, tcp: TcpStream, now_ms: float, out: list,
                      arrived: Packet | None = None) -> None:
        """Verify what both sides have sent, let the verified secondary
        segments go and release the primary ones that may leave.

        ``arrived``: a segment that has just arrived (placed in its stream,
        not yet queued).  It joins its queue only if it cannot leave at
        once: in step, the common case, a segment is verified or released as
        it comes, and no queue grows and shrinks for it."""
        if not conn.diverged:
            bad = tcp.advance()
            if tcp.gap_bytes:
                # bytes both captures lost: skipped, not compared (counted
                # where reports and stats read them)
                self.stats.stream_gap_bytes += tcp.gap_bytes
                tcp.gap_bytes = 0
            if bad is not None:
                if arrived is not None:
                    self._queue_segment(conn, arrived)     # (where the miscompare finds it)
                    arrived = None
                self._tcp_miscompare(conn, tcp, bad[0], bad[1], now_ms, out)
        squeue = conn.secondary_queue
        if arrived is not None and arrived.side != _PRIMARY:
            if squeue or not tcp.verified(arrived):
                self._queue_segment(conn, arrived)
            else:
                arrived.left = True
                self._note_high_water(False, 1, self.queued_bytes + len(arrived.data))
                self.stats.secondary_matched += arrived.frames
            arrived = None
        while squeue and tcp.verified(squeue[0]):
            done = squeue.pop(0)
            self.stats.secondary_matched += done.frames
            self._leave(done)
        pqueue = conn.primary_queue
        if arrived is not None:
            if pqueue or not tcp.releasable(arrived):
                self._queue_segment(conn, arrived)
            else:
                self._note_high_water(True, 1, self.queued_bytes + len(arrived.data))
                self._release_segment(conn, tcp, arrived, False, now_ms, out)
        while pqueue and tcp.releasable(pqueue[0]):
            self._release_segment(conn, tcp, pqueue.pop(0), True, now_ms, out)
        if conn.has_later and not pqueue and not squeue and tcp.finished():
            # the old connection on this 4-tuple is over: compare the new one
            self._start_next_connection(conn)
            new_tcp = conn.tcp
            assert new_tcp is not None
            self._progress_tcp(conn, new_tcp, now_ms, out)

    def _queue_segment(self, conn: Connection, pkt: Packet) -> None:
        """A segment that cannot leave yet joins its side's queue (in
        sequence order)."""
        primary = pkt.side == _PRIMARY
        queue = conn.primary_queue if primary else conn.secondary_queue
        insert_segment(queue, pkt)
        self._enqueue(queue, pkt, primary)

    def _release_segment(self, conn: Connection, tcp: TcpStream, pkt: Packet, queued: bool,
                         now_ms: float, out: list) -> None:
        """A primary segment that may leave leaves (see TcpStream.releasable)."""
        if pkt.flags & RST:
            tcp.p_rst = True
        self._release(conn, pkt, ev.ReleaseReason.MATCH, now_ms, out, queued)

    def _tcp_miscompare(self, conn: Connection, tcp: TcpStream, cause: ev.MiscompareCause,
                        at: int, now_ms: float, out: list) -> None:
        p_pkt, p_off = tcp.find(conn.primary_queue, at)
        s_pkt, s_off = tcp.find(conn.secondary_queue, at)
        conn.diverged = True
        conn.miscompares += 1
        self.stats.miscompares["tcp:" + cause] += 1
        raw_seq: int | None = at & 0xFFFFFFFF
        if tcp.norm is not None:
            # report the primary's own sequence number for the byte
            raw_seq = tcp.norm.raw_seq(0, at & 0xFFFFFFFF)
        out.append(ev.Miscompare(conn.key, "tcp", cause, tcp.stream_offset(at),
                                 raw_seq, None, p_pkt, s_pkt, p_off, s_off, now_ms))
        self._request(ev.CheckpointCause.MISCOMPARE, conn, now_ms, out)

    # -- datagrams ---------------------------------------------------------

    def _receive_datagram(self, conn: Connection, pkt: Packet, primary: bool, now_ms: float,
                          out: list) -> None:
        """Datagrams pair in order: the oldest queued primary one with the
        oldest queued secondary one of the same connection.  A datagram
        that arrives with none of its side queued and one of the other's
        pairs with that one at once; if they are equal it is never queued
        (the common case: no queue grows and shrinks for it)."""
        stale = conn.stale
        if stale and not primary:
            if stale[-1] == pkt.compared:
                # the secondary's copy of a datagram flushed at the checkpoint
                self._stale.absorbed(conn)
                pkt.left = True
                self.stats.secondary_absorbed += pkt.frames
                return
            self._stale.forget(conn)      # the secondary has moved past them
        pqueue, squeue = conn.primary_queue, conn.secondary_queue
        own = pqueue if primary else squeue
        if not own and not conn.diverged:
            other = squeue if primary else pqueue
            if other:
                head = other[0]
                if self._pair_datagrams(conn, pkt if primary else head,
                                        head if primary else pkt, pkt, now_ms, out):
                    # (held for a moment, as far as the high-water marks go)
                    self._note_high_water(primary, 1, self.queued_bytes + len(pkt.data))
                    return
        own.append(pkt)
        self._enqueue(own, pkt, primary)
        if not conn.diverged:
            while pqueue and squeue and self._pair_datagrams(conn, pqueue[0], squeue[0], None,
                                                              now_ms, out):
                pass
        limit = self._max_queue_size
        if len(pqueue) > limit or len(squeue) > limit:
            self._flush_connection(conn, now_ms, ev.ReleaseReason.QUEUE_FULL, out)
            self._request(ev.CheckpointCause.QUEUE_FULL, conn, now_ms, out, answered=True)

    def _pair_datagrams(self, conn: Connection, pp: Packet, ss: Packet,
                        arrived: Packet | None, now_ms: float, out: list) -> bool:
        """Compare the primary datagram ``pp`` with the secondary one ``ss``,
        each the oldest of its side on ``conn``: queued, except ``arrived``
        (one of them, or None), which has just arrived.  Equal: both leave,
        the primary released, and True.  Else False, and a miscompare when
        both were queued (the caller queues ``arrived`` and asks again)."""
        if datagrams_equal(pp, ss) or (conn.rules and self._equal_but_noise(conn, pp, ss)):
            if pp is not arrived:
                conn.primary_queue.pop(0)
            if ss is not arrived:
                conn.secondary_queue.pop(0)
                self._leave(ss)
            else:
                ss.left = True
            conn.compared += 1
            self.stats.secondary_matched += ss.frames
            self._release(conn, pp, ev.ReleaseReason.MATCH, now_ms, out, pp is not arrived)
            return True
        if arrived is not None:
            return False
        cause, offset = datagram_difference(pp, ss)
        conn.diverged = True
        conn.miscompares += 1
        kind = KIND_NAMES[conn.kind]
        self.stats.miscompares[kind + ":" + cause] += 1
        out.append(ev.Miscompare(conn.key, kind, cause, offset, None, conn.compared,
                                 pp, ss, pp.cmp_off + offset, ss.cmp_off + offset, now_ms))
        self._request(ev.CheckpointCause.MISCOMPARE, conn, now_ms, out)
        return False

    def _equal_but_noise(self, conn: Connection, p: Packet, s: Packet) -> bool:
        """Whether two datagrams differ only where the noise rules say bytes
        may differ; the rules that made the difference are counted."""
        if p.cmp_end - p.cmp_off != s.cmp_end - s.cmp_off:
            return False
        a = p.compared
        b = s.compared
        if len(a) != len(b) or mask_datagram(a, conn.rules) != mask_datagram(b, conn.rules):
            return False
        differing = [i for i in range(len(a)) if a[i] != b[i]]
        for rule in conn.rules:
            if any(start <= i < end for start, end in rule.spans(a) for i in differing):
                self.stats.ignored[rule.text] += 1
        return True

    # -- leaving -----------------------------------------------------------

    def _leave(self, pkt: Packet) -> None:
        """A queued frame leaves its queue (released, consumed or discarded)."""
        pkt.left = True
        self.queued_frames -= 1
        self.queued_bytes -= len(pkt.data)
        arrivals = self._arrivals
        if len(arrivals) > self._arrivals_head and arrivals[-1] is pkt:
            # the newest arrival (a frame matched as it came): forgotten now
            # rather than when it reaches the front
            arrivals.pop()

    def _release(self, conn: Connection, pkt: Packet, reason: ev.ReleaseReason, now_ms: float,
                 out: list, queued: bool = True) -> None:
        """A primary frame leaves toward the client (from its queue, unless
        not ``queued``: paired as it arrived): counted, and its event
        appended (a reassembled datagram leaves as its fragments)."""
        if queued:
            self._leave(pkt)
        else:
            pkt.left = True
        fragments = pkt.fragments
        if fragments is not None:
            for frag in fragments:
                frag.left = True
                self._count_release(conn, frag, reason, now_ms, out)
            return
        self._count_release(conn, pkt, reason, now_ms, out)

    def _count_release(self, conn: Connection, pkt: Packet, reason: ev.ReleaseReason,
                       now_ms: float, out: list) -> None:
        hold_ms = now_ms - pkt.arrival_ms
        stats = self.stats
        stats.released_bytes += len(pkt.data) - pkt.l2
        stats.hold.add(hold_ms)
        conn.released += 1
        conn.hold_sum_ms += hold_ms
        if hold_ms > conn.hold_max_ms:
            conn.hold_max_ms = hold_ms
        if reason is ev.ReleaseReason.MATCH:
            stats.released_match += 1
            if self.compact:
                out.append(Matched(pkt.data, pkt.l2))
                return
        else:
            stats.released_flushed[reason] += 1
        out.append(Released(pkt, reason, hold_ms))

    def _request(self, cause: ev.CheckpointCause, conn: Connection | None, now_ms: float,
                 out: list, answered: bool = False, key: bytes | None = None) -> None:
        """Ask for a checkpoint.  In ``CheckpointMode.LOCAL`` the comparator
        answers it itself, on the connection concerned, once the call that
        raised it has finished its work (``_answer_requests``): answering in
        the middle of a comparison would pull the state from under it."""
        self.stats.checkpoint_requests[cause] += 1
        if conn is not None:
            key = conn.key
        if not answered and self.mode is ev.CheckpointMode.LOCAL and key is not None:
            self._to_answer[key] = None
            answered = True
        out.append(ev.CheckpointRequested(cause, key, now_ms, answered))

    def _answer_requests(self, now_ms: float, out: list) -> None:
        """``CheckpointMode.LOCAL``: checkpoint each connection that raised a
        request during this call (in the order they did)."""
        keys, self._to_answer = self._to_answer, {}
        for key in keys:
            conn = self._conns.get(key)
            if conn is not None:
                self._checkpoint_one(conn, now_ms, out)

    def _flush_connection(self, conn: Connection, now_ms: float, reason: ev.ReleaseReason,
                          out: list, keep_ahead: bool = False) -> tuple[int, int]:
        """Release every queued primary frame of ``conn`` in order, discard its
        secondary frames, and reset its comparison state.

        ``keep_ahead``: keep what the secondary sent beyond what the primary
        has sent so far (a checkpoint of this connection alone: no VM is
        reset, the secondary's stream goes on, and those frames are the
        twins of primary frames still to come).  After a real checkpoint
        they are discarded: the secondary, now a copy of the primary, will
        send them again."""
        pqueue, squeue = conn.primary_queue, conn.secondary_queue
        p_later = list(conn.primary_later or ())
        s_later = list(conn.secondary_later or ())
        released = discarded = 0
        n_primary = len(pqueue)
        for pkt in pqueue:
            released += pkt.frames
            self._release(conn, pkt, reason, now_ms, out)
        for pkt in p_later:
            released += pkt.frames
            self._release(conn, pkt, reason, now_ms, out)
        tcp = conn.tcp
        kept: list[Packet] = []
        if keep_ahead and not p_later and not s_later:
            if tcp is None:
                # datagrams pair in order: those beyond the primary's are ahead
                kept = list(squeue)[n_primary:]
            elif tcp.p_end_max != UNSET:
                end = tcp.p_end_max
                kept = [pkt for pkt in squeue if pkt.end_abs > end]
        keep = set(map(id, kept))
        for pkt in squeue:
            if id(pkt) not in keep:
                discarded += pkt.frames
                self._leave(pkt)
        for pkt in s_later:
            discarded += pkt.frames
            self._leave(pkt)
        self.stats.secondary_discarded += discarded
        if tcp is None:
            # remember what the flushed primaries compare as, in case their
            # secondary copies are still to come (see Connection.stale);
            # those already paired with a queued secondary are not waited for
            stale = self._stale
            stale.remember(conn, [p.compared for p in pqueue[len(squeue):]])
            if stale.held_bytes:
                # within what the queues leave of the memory bound
                room = (self._max_queued_bytes - self.queued_bytes
                        - self.queued_frames * QUEUED_FRAME_OVERHEAD)
                while stale.held_bytes > room and stale.trim():
                    pass
        pqueue.clear()
        squeue.clear()
        conn.diverged = False
        if tcp is None:
            squeue.extend(kept)
            return released, discarded
        if p_later:
            # the primary had moved on to a new connection on this 4-tuple:
            # the secondary now holds that state, so continue from there
            tcp = conn.tcp = TcpStream(self._normalize_seq, conn.rules)
            for pkt in p_later:
                tcp.add_primary(pkt)
        conn.primary_later = conn.secondary_later = None
        if keep_ahead and tcp.p_end_max != UNSET:
            tcp.skip_to_primary_end()
            squeue.extend(kept)
        else:
            tcp.reset()
        return released, discarded

    def _evict_for_room(self, now_ms: float, out: list) -> None:
        """The table is full and a new connection arrives: forget an idle
        connection (the oldest, when it is idle: the usual case, in O(1)),
        else the least recently active of the 64 oldest, releasing what it
        holds."""
        table = self.table
        front = table.pop_oldest()
        if front is not None and not front.queued:
            self.stats.evicted_idle += 1
            self._forget(front)
            return
        sample = ([front] if front is not None else []) + table.oldest(63)
        if not sample:
            return
        idle = [c for c in sample if not c.queued]
        victim = min(idle or sample, key=_last_ms)
        table.put_back([c for c in sample if c is not victim])
        self._forget(victim)
        if idle:
            self.stats.evicted_idle += 1
            return
        self.stats.evicted_other["table-full"] += 1
        self._flush_connection(victim, now_ms, ev.ReleaseReason.TABLE_FULL, out)
        self._stale.forget(victim)      # (gone: no late copy will find it)
        self._request(ev.CheckpointCause.TABLE_FULL, None, now_ms, out, answered=True,
                      key=victim.key)

    def _forget(self, conn: Connection) -> None:
        """``conn`` leaves the table (nothing queued), with what it
        remembered."""
        self.table.remove(conn)
        self._stale.forget(conn)

    def _relieve_memory(self, now_ms: float, out: list) -> None:
        """Too many bytes held: forget what flushed connections remember
        (oldest first; see ``StaleMemory``), then flush the connections
        holding the oldest frames, until under the bound."""
        limit = self._max_queued_bytes
        requested = False
        stale = self._stale
        while self.queued_bytes + self.queued_frames * QUEUED_FRAME_OVERHEAD + stale.held_bytes > limit:
            if stale.trim():
                continue
            pkt = self._oldest_queued()
            if pkt is None:
                break
            conn = pkt.conn
            self._flush_connection(conn, now_ms, ev.ReleaseReason.MEMORY_FULL, out)
            if not requested:
                self._request(ev.CheckpointCause.MEMORY_FULL, conn, now_ms, out, answered=True)
                requested = True

    def _oldest_queued(self) -> Packet | None:
        arrivals = self._arrivals
        head = self._arrivals_head
        n = len(arrivals)
        while head < n and arrivals[head].left:
            head += 1
        self._arrivals_head = head
        return arrivals[head] if head < n else None

    def _held_arrivals(self) -> list[Packet]:
        """The arrival list from its head: what may still be queued, oldest
        first."""
        return self._arrivals[self._arrivals_head:]

    def _clear_arrivals(self) -> None:
        self._arrivals = []
        self._arrivals_head = 0

    def _compact_arrivals(self) -> None:
        """Frames that left out of arrival order pile up behind a long-held
        one: drop them, so the list holds at most a quarter more than what is
        queued (plus 1024).  A frame that left is kept alive by the list, its
        bytes with it, so this slack is memory: the bound of
        ``max_queued_bytes`` is exceeded by at most that quarter; each
        compaction removes at least that many, so its cost per frame stays
        constant."""
        self._arrivals = [p for p in self._held_arrivals() if not p.left]
        self._arrivals_head = 0

    # ------------------------------------------------------------------
    # time

    def _start_clock(self, now_ms: float) -> None:
        self._epoch_ms = now_ms
        self._next_scan_ms = now_ms + self._cycle_ms

    def _tick_at_or_after(self, t_ms: float) -> float:
        """The first scan tick at or after ``t_ms``."""
        cycle = self._cycle_ms
        epoch = self._epoch_ms
        assert epoch is not None
        tick = epoch - ((epoch - t_ms) // cycle) * cycle
        return tick if tick >= t_ms else t_ms     # (rounded, past 2**53 ms)

    def _tick_after(self, t_ms: float) -> float:
        """The first scan tick strictly after ``t_ms``."""
        cycle = self._cycle_ms
        epoch = self._epoch_ms
        assert epoch is not None
        return _after(t_ms, epoch + ((t_ms - epoch) // cycle + 1) * cycle)

    @property
    def next_scan_ms(self) -> float | None:
        """The next tick of the scan grid (None before the first frame):
        ``get_timer()`` is never earlier, so an adapter that checks for a
        due scan before every frame (replay) may skip ``get_timer()``, which
        looks at every kind of pending work, until its clock reaches this."""
        return self._next_scan_ms

    def get_timer(self) -> float | None:
        """When ``handle_timer`` should next be called (ms), or None when no
        scan has anything to do.

        Scans sit on a fixed grid, every ``expired_scan_cycle_ms`` from the
        first ``now_ms`` seen, as QEMU's timer does; this is the first tick of
        the grid at which one would decide something: a queued frame past
        ``compare_timeout_ms`` (in ``CheckpointMode.EXTERNAL``, every tick
        while one is, since the request repeats), a fragmented datagram to
        give up, the secondary's absence bound, or an idle connection to
        forget.  Ticks with nothing to do are skipped, so an adapter's cost is
        bounded by what happens, not by the time that passes: ``replay``
        follows a capture across a gap of days at no cost, and ``serve`` does
        not wake up every cycle for nothing.
        """
        next_scan = self._next_scan_ms
        if next_scan is None:
            return None
        due: float | None = None
        timeout = self._compare_timeout_ms
        if timeout is not None and self.queued_frames:
            oldest = self._oldest_queued()
            if oldest is not None:
                # the first tick where the age is strictly over the timeout
                due = self._tick_after(oldest.arrival_ms + timeout)
        absent_since = self._absent_since_ms
        if absent_since is not None and not self._absent:
            t = self._tick_after(absent_since + self.absent_after_ms)
            due = t if due is None or t < due else due
        reassembly = self._reassembly
        for i in range(2):          # (indexed: no iterator object per call)
            pending = reassembly[i].pending
            if pending:
                first = next(iter(pending.values())).first_ms
                # given up when now - first >= the timeout
                t = self._tick_at_or_after(first + self._fragment_timeout_ms)
                due = t if due is None or t < due else due
        front = self.table.peek_oldest()
        if front is not None and not front.queued:
            # forgotten when last_ms <= now - idle_timeout
            t = self._tick_at_or_after(front.last_ms + self._idle_timeout_ms)
            due = t if due is None or t < due else due
        if due is None:
            return None
        return due if due > next_scan else next_scan

    def handle_timer(self, now_ms: float) -> list:
        """Run the periodic scan if one is due by ``now_ms``.

        A scan that finds frames queued longer than ``compare_timeout_ms``
        (strictly) raises checkpoint requests: in ``CheckpointMode.LOCAL``
        one for every connection with such a frame, each answered at once,
        so N silent flows are released in one scan, not in N; in
        ``CheckpointMode.EXTERNAL`` one however many there are (the
        checkpoint it asks for flushes every queue), repeated every scan
        until a checkpoint comes, as QEMU does.

        If several scans are overdue (a loop that slept, a capture with a gap
        of hours) they collapse into the last one: ages only grow, so it alone
        decides, and the decision is the one QEMU's last tick would take.
        Never raises (see ``InternalError``); a scan that fails still lets
        the frames past the timeout go (see ``_scan_failed``), so a scan
        that fails every time costs checkpoints, never a stalled primary.
        """
        out: list = []
        epoch = self._epoch_ms
        next_scan = self._next_scan_ms
        if epoch is None or next_scan is None:
            self._start_clock(now_ms)
            return out
        if now_ms < next_scan:
            return out
        cycle = self._cycle_ms
        tick_ms = epoch + ((now_ms - epoch) // cycle) * cycle     # the last tick due
        # Past 2**53 ms (a clock gone wrong: 285,000 years) float
        # milliseconds no longer step by a cycle, and the grid arithmetic
        # rounds: the tick handled is never before the one that was due,
        # and the next one is always after now_ms, so the timer moves on
        # whatever the clock reads.
        if tick_ms > now_ms:
            tick_ms = now_ms
        if tick_ms < next_scan:
            tick_ms = next_scan
        self._next_scan_ms = _after(now_ms, tick_ms + cycle)
        try:
            self._scan(tick_ms, out)
            if self._to_answer:
                self._answer_requests(tick_ms, out)
        except Exception as exc:  # noqa: BLE001 - a bug of ours must not stop the scans
            out.append(ev.InternalError(exc, None, tick_ms))
            self._scan_failed(tick_ms, out)
        return out

    def _scan_failed(self, tick_ms: float, out: list) -> None:
        """The scan failed (a bug of ours): what it had to decide is done
        here instead, plainly, so that a scan that fails every time stalls
        nothing.  Every connection that raised a request before the failure,
        and every one holding a frame past the timeout, is checkpointed on
        its own at once, whatever the mode (nobody outside may ever be asked:
        the scan may fail before its request), and fragments past their
        timeout are given up.  Should that fail too, every queued primary
        frame leaves (``_salvage``)."""
        start = len(out)
        keys, self._to_answer = self._to_answer, {}
        try:
            timeout = self._compare_timeout_ms
            if timeout is not None:
                for conn in self._overdue_connections(tick_ms - timeout):
                    if conn.key not in keys:
                        keys[conn.key] = None
                        self._request(ev.CheckpointCause.TIMEOUT, conn, tick_ms, out,
                                      answered=True)
            for key in keys:
                held = self._conns.get(key)
                if held is not None:
                    self._checkpoint_one(held, tick_ms, out)
            for reasm in self._reassembly:
                for dg, reason in reasm.expire(tick_ms, self._fragment_timeout_ms):
                    self._fail_datagram(dg, reason, out)
        except Exception as exc:  # noqa: BLE001 - the last resort: nothing stays held
            out.append(ev.InternalError(exc, None, tick_ms))
            self._to_answer = {}
            self._salvage(tick_ms, ev.ReleaseReason.CHECKPOINT, out, start)

    def _overdue_connections(self, limit_ms: float) -> list[Connection]:
        """The connections holding a frame that arrived before ``limit_ms``,
        in the order of their oldest such frame."""
        overdue: dict[bytes, Connection] = {}
        for pkt in self._held_arrivals():      # oldest first
            if pkt.left:
                continue
            if pkt.arrival_ms >= limit_ms:
                break
            conn = pkt.conn
            if conn.key not in overdue:
                overdue[conn.key] = conn
        return list(overdue.values())

    def _scan(self, tick_ms: float, out: list) -> None:
        timeout = self._compare_timeout_ms
        if timeout is not None and self.queued_frames:
            if self.mode is ev.CheckpointMode.LOCAL:
                for conn in self._overdue_connections(tick_ms - timeout):
                    self._request(ev.CheckpointCause.TIMEOUT, conn, tick_ms, out)
            else:
                oldest = self._oldest_queued()
                if oldest is not None and tick_ms - oldest.arrival_ms > timeout:
                    self._request(ev.CheckpointCause.TIMEOUT, oldest.conn, tick_ms, out)
        absent_since = self._absent_since_ms
        if (absent_since is not None and not self._absent
                and tick_ms - absent_since > self.absent_after_ms):
            self._enter_absent(tick_ms, out)
        self._evict_idle(tick_ms)
        for reasm in self._reassembly:
            for dg, reason in reasm.expire(tick_ms, self._fragment_timeout_ms):
                self._fail_datagram(dg, reason, out)

    def _evict_idle(self, now_ms: float) -> None:
        """Forget connections idle for ``idle_timeout_ms`` with nothing
        queued.  Looks at the 256 oldest entries per scan; the active ones
        among them go to the back, so every connection is looked at in turn
        without a per-frame cost for keeping the table ordered."""
        limit = now_ms - self._idle_timeout_ms
        table = self.table
        for conn in table.oldest(256):
            if conn.last_ms <= limit and not conn.queued:
                self._forget(conn)
                self.stats.evicted_idle += 1
            else:
                table.requeue(conn)

    # ------------------------------------------------------------------
    # the secondary's presence

    @property
    def absent_after_ms(self) -> float:
        """How long the secondary's input may be gone before comparing stops
        (``compare_timeout_ms``; 3000 ms, QEMU's default, with timeouts off)."""
        timeout = self._compare_timeout_ms
        return timeout if timeout is not None else 3000

    @property
    def secondary_absent(self) -> bool:
        """Comparing has stopped for want of a secondary (see
        ``secondary_lost``)."""
        return self._absent

    def secondary_lost(self, now_ms: float) -> list:
        """The secondary's input went away (its connection closed).  Frames
        keep being compared (and time out) as usual; once it has been gone
        longer than ``absent_after_ms``, a scan gives it up: every queued
        primary frame is released (reason ``secondary-absent``), later
        primary frames pass through at once (bypassed, reason
        ``secondary-absent``) and a ``SecondaryAbsent`` event says so.
        ``secondary_back`` (or a secondary frame) ends it."""
        if self._epoch_ms is None:
            self._start_clock(now_ms)
        if self._absent_since_ms is None:
            self._absent_since_ms = now_ms
        return []

    def secondary_back(self, now_ms: float) -> list:
        """The secondary's input is back.  If comparing had stopped, it
        resumes from a clean state: the connections are forgotten (nothing is
        queued in that mode), since the secondary now sending may be a new
        or resynchronised VM."""
        out: list = []
        self._secondary_back(now_ms, out)
        return out

    def _secondary_back(self, now_ms: float, out: list) -> None:
        if self._absent_since_ms is None:
            return
        self._absent_since_ms = None
        if not self._absent:
            return
        self._absent = False
        for conn in self.table:
            self._forget(conn)
            self.stats.evicted_other["secondary-absent"] += 1
        out.append(ev.SecondaryAbsent(False, now_ms))

    def _enter_absent(self, now_ms: float, out: list) -> None:
        self._absent = True
        self.stats.secondary_absent_periods += 1
        released = 0
        for conn in self.table:
            if conn.queued or conn.diverged:
                released += self._flush_connection(conn, now_ms,
                                                   ev.ReleaseReason.SECONDARY_ABSENT, out)[0]
        for reasm in self._reassembly:
            for dg, reason in reasm.drain():
                self._fail_datagram(dg, reason, out)
        self._clear_arrivals()
        self._to_answer = {}
        out.append(ev.SecondaryAbsent(True, now_ms, released))

    # ------------------------------------------------------------------
    # checkpoints

    def checkpoint(self, now_ms: float) -> list:
        """A checkpoint happened: release every queued primary frame (per
        connection in order), discard the queued secondary frames, and reset
        the comparison state, so later traffic compares cleanly."""
        out: list = []
        released = discarded = 0
        for conn in self.table:
            if conn.queued or conn.diverged or conn.tcp is not None:
                r, d = self._flush_connection(conn, now_ms, ev.ReleaseReason.CHECKPOINT, out)
                released += r
                discarded += d
        self.stats.checkpoints += 1
        self._clear_arrivals()
        out.append(ev.CheckpointDone(released, discarded, now_ms))
        return out

    def checkpoint_connection(self, key: bytes | None, now_ms: float) -> list:
        """Checkpoint one connection, as if a checkpoint had happened for it
        alone: its primary frames are released in order, its secondary
        frames discarded (except those beyond what the primary has sent: no
        VM was reset, and they are the twins of primary frames still to
        come), its comparison state reset.  What ``CheckpointMode.LOCAL``
        does for every request; an adapter calls it for a checkpoint asked
        for from outside on one flow.  ``key`` None checkpoints everything
        (``checkpoint``); an unknown key (already flushed) does nothing."""
        if key is None:
            return self.checkpoint(now_ms)
        conn = self._conns.get(key)
        out: list = []
        if conn is not None:
            self._checkpoint_one(conn, now_ms, out)
        return out

    def _checkpoint_one(self, conn: Connection, now_ms: float, out: list) -> None:
        # A whole-table flush would also discard other connections'
        # secondary frames whose primary twins are still to come: after a
        # real checkpoint the secondary VM sends those again, but a capture
        # cannot (nor can a secondary nobody checkpointed), and the twins
        # would then miscompare or time out for nothing.
        # What the secondary sent ahead is kept, unless it is itself past the
        # timeout: then no primary twin came in time, and keeping it would
        # only have the next scan ask again (for ever, if none ever comes).
        timeout = self._compare_timeout_ms
        secondaries = list(conn.secondary_queue) + list(conn.secondary_later or ())
        keep_ahead = timeout is None or not any(
            now_ms - pkt.arrival_ms > timeout for pkt in secondaries)
        released, discarded = self._flush_connection(conn, now_ms, ev.ReleaseReason.CHECKPOINT,
                                                     out, keep_ahead=keep_ahead)
        self.stats.checkpoints += 1
        out.append(ev.CheckpointDone(released, discarded, now_ms, conn.key))

    def set_mode(self, mode: ev.CheckpointMode, now_ms: float) -> list:
        """Switch between ``CheckpointMode.LOCAL`` and ``EXTERNAL`` (serve's
        QMP policy falls back to local checkpoints while QEMU is not in COLO
        state).  Entering LOCAL answers what is held: every connection with
        a divergence or a frame past the timeout is checkpointed now."""
        mode = ev.CheckpointMode(mode)
        out: list = []
        if mode is self.mode:
            return out
        self.mode = mode
        if mode is ev.CheckpointMode.LOCAL:
            timeout = self._compare_timeout_ms
            for conn in self.table:
                if not conn.queued:
                    continue
                held = conn.diverged
                if not held and timeout is not None:
                    heads = [q[0].arrival_ms for q in (conn.primary_queue, conn.secondary_queue,
                                                       conn.primary_later, conn.secondary_later)
                             if q]
                    held = bool(heads) and now_ms - min(heads) > timeout
                if held:
                    self._checkpoint_one(conn, now_ms, out)
        return out

    def finish(self, now_ms: float) -> list:
        """End of input (or shutdown): flush what is still queued.  The frames
        are released with reason ``end`` and count as unmatched."""
        out: list = []
        try:
            for conn in self.table:
                if conn.queued:
                    self._flush_connection(conn, now_ms, ev.ReleaseReason.END, out)
            for reasm in self._reassembly:
                for dg, reason in reasm.drain():
                    self._fail_datagram(dg, reason, out)
        except Exception as exc:  # noqa: BLE001 - every primary frame must still leave
            out.append(ev.InternalError(exc, None, now_ms))
            self._salvage(now_ms, ev.ReleaseReason.END, out)
        self._clear_arrivals()
        return out

    # ------------------------------------------------------------------
    # internal errors

    def _contain(self, exc: Exception, side: int, data: bytes, now_ms: float, l2: int,
                 out: list, l3: int = -1, ethertype: int = 0) -> None:
        """The comparator failed on a frame (a bug of ours).  What it decided
        before failing stands (those frames have left, and the requests it
        raised are answered as usual).  The frame itself leaves, unless it
        got as far as a queue (then it leaves from there, as any other): a
        primary frame is bypassed, a secondary one dropped, both with reason
        ``internal-error``.  Nothing else is touched: if the failure left its
        connection's comparison state wrong, that shows as a miscompare or a
        timeout, which checkpoints the connection, as for any divergence.
        An ``InternalError`` event carries ``exc``."""
        out.append(ev.InternalError(exc, ev.Side(side), now_ms))
        try:
            if self._to_answer:
                self._answer_requests(now_ms, out)
            if self._holds(data, l2, l3, ethertype) or self._released_in(data, out):
                return
        except Exception:  # noqa: BLE001 - the frame must leave, whatever else fails
            self._to_answer = {}
        i = 0 if side == PRIMARY else 1
        pkt = Packet(side, data, l2, 0, now_ms, self.stats.frames_in[i] - 1)   # (its index)
        out.append(self._not_comparable(pkt, ev.REASON_INTERNAL_ERROR))

    @staticmethod
    def _released_in(data: bytes, out: list) -> bool:
        """Whether the frame ``data`` already left in one of ``out``'s events."""
        for e in out:
            if type(e) is Released and e.packet.data is data:
                return True
            if type(e) is Matched and e.data is data:
                return True
        return False

    def _holds(self, data: bytes, l2: int, l3: int = -1, ethertype: int = 0) -> bool:
        """Whether the frame ``data`` sits in a queue (or a reassembly
        buffer), from where it will leave."""
        for reasm in self._reassembly:
            for dg in reasm.pending.values():
                if any(f.data is data for f in dg.fragments):
                    return True
        if len(data) < l2:
            return False
        probe = Packet(PRIMARY, data, l2, 0, 0.0, 0)
        conn = None
        if not parse_into(probe, l3, ethertype) and probe.key is not None:
            conn = self._conns.get(probe.key)
        if conn is None:
            return False
        for pkt in conn.all_queued():
            if pkt.data is data:
                return True
            if pkt.fragments and any(f.data is data for f in pkt.fragments):
                return True
        return False

    def _salvage(self, now_ms: float, reason: ev.ReleaseReason, out: list,
                 start: int = 0) -> None:
        """The last resort when flushing fails: every primary frame still
        queued anywhere leaves (released with ``reason``), in per-connection
        order, the table and the reassembly buffers start empty, and the
        counts are recomputed.  Frames already in ``out[start:]`` are not
        released twice."""
        already = {id(e.packet) for e in out[start:] if type(e) is Released}
        for conn in list(self.table.conns.values()):
            for queue in (conn.primary_queue, conn.primary_later or ()):
                for pkt in queue:
                    for frame in (pkt.fragments or (pkt,)):
                        if id(frame) in already or frame.side != PRIMARY:
                            continue
                        frame.left = True
                        already.add(id(frame))
                        self.stats.released_flushed[reason] += 1
                        out.append(Released(frame, reason, now_ms - frame.arrival_ms))
            for queue in (conn.secondary_queue, conn.secondary_later or ()):
                for pkt in queue:
                    pkt.left = True
        self.table = ConnectionTable(self.config.max_connections)
        self._conns = self.table.conns
        self._stale = StaleMemory()
        for reasm in self._reassembly:
            with contextlib.suppress(Exception):
                for dg, why in reasm.drain():
                    self._fail_datagram(dg, why, out)
        self._reassembly = (Reassembler(), Reassembler())
        self._clear_arrivals()
        self.queued_frames = self.queued_bytes = 0

    # ------------------------------------------------------------------
    # introspection

    def top_connections(self, n: int = 10) -> dict[str, list[Connection]]:
        """The connections now in the table with the most miscompares, and
        with the longest hold time (evicted connections take their counts
        with them); ``flows.connection_summary`` shows one."""
        import heapq
        conns = list(self.table)
        worst = heapq.nlargest(n, (c for c in conns if c.miscompares), key=lambda c: c.miscompares)
        slowest = heapq.nlargest(n, (c for c in conns if c.released), key=lambda c: c.hold_max_ms)
        return {"by_miscompares": worst, "by_hold": slowest}

    @property
    def connection_count(self) -> int:
        """How many connections the table holds now."""
        return len(self.table)

    def connections(self, limit: int | None = None) -> list[Connection]:
        """The connections now in the table, the most recent ``limit``."""
        conns = list(self.table)
        if limit is not None:
            conns = conns[-limit:]
        return conns

    def snapshot(self) -> dict:
        snap = self.stats.snapshot()
        snap["connections"]["now"] = len(self.table)
        snap["queued"] = {"frames": self.queued_frames, "bytes": self.queued_bytes,
                          "primary": sum(len(c.primary_queue) for c in self.table),
                          "secondary": sum(len(c.secondary_queue) for c in self.table)}
        return snap
