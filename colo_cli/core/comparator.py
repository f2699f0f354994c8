"""The comparison state machine.  Sans-IO: bytes and ``now_ms`` in, events out.

::

    c = Comparator(Config())
    events = c.receive(PRIMARY, data, now_ms)      # a frame arrived
    events = c.handle_timer(now_ms)                # when now_ms >= c.get_timer()
    events = c.checkpoint(now_ms)                  # a checkpoint happened
    events = c.finish(now_ms)                      # end of input / shutdown

Time only ever comes in as ``now_ms`` (any monotonic millisecond clock: the
event loop's in ``serve``, capture timestamps in ``replay``), so a replay of
captured traffic takes exactly the decisions ``serve`` would have taken.

Checkpoint requests are requests: the core never performs a checkpoint by
itself.  The adapter decides (replay: at once; serve: at once, or when a
notify peer says ``COLO_CHECKPOINT``) and calls ``checkpoint()``.

Resource limits never drop a frame silently (QEMU tail-drops on a full queue
and clears everything on a full table: observed k1, l1).  When a
connection's queue reaches ``max_queue_size``, when a new connection finds
the table full, or when the queued bytes reach ``max_queued_bytes``, the
connection concerned is flushed: its primary frames are released in order
(counted by reason), its secondary frames discarded, its comparison state
reset, and a checkpoint is requested.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections import deque
from dataclasses import dataclass

from . import events as ev
from .compare import TcpStream, datagram_difference, datagrams_equal, insert_segment
from .conntrack import Connection, ConnectionTable
from .packet import (ACK, FIN, KIND_FRAGMENT, KIND_NAMES, KIND_TCP, KIND_UDP, MAX_VNET_HDR_LEN, PSH,
                     REASON_BAD_VNET_HDR, REASON_IPV4_TRUNCATED, REASON_IPV6_TRUNCATED, RST,
                     SYN, Packet, parse, parse_reassembled)

#: EtherType, version/IHL, total length, flags/fragment offset, protocol of
#: an untagged IPv4 frame, read in one call on the fast path.
_fast_ipv4 = struct.Struct(">HBxHxxHxB").unpack_from
#: the key of an untagged IPv4 UDP flow is the frame's 12 bytes of addresses
#: and ports followed by this (see packet._parse_l4)
_UDP4 = b"\x114"
_TCP4 = b"\x064"
#: sequence number, ack, data offset and flags of a TCP header
_fast_tcp = struct.Struct(">IIBB").unpack_from
_TCP_SIMPLE = ~(ACK | PSH) & 0xFF     # flags the TCP fast path leaves to the general one
_MASK32 = 0xFFFFFFFF
_HALF32 = 0x80000000
_new_packet = object.__new__

from .noise import mask_datagram, rules_for  # noqa: E402
from .reassembly import Reassembler  # noqa: E402
from .stats import Stats  # noqa: E402

PRIMARY = ev.Side.PRIMARY
SECONDARY = ev.Side.SECONDARY

#: What holding one queued frame costs beyond its bytes (its Packet, its
#: queue and arrival-list slots), measured with tracemalloc on CPython 3.11:
#: about 250 bytes.  Counted against ``Config.max_queued_bytes``.
QUEUED_FRAME_OVERHEAD = 256


@dataclass
class Config:
    """Comparator settings.  Names and defaults follow QEMU's properties
    where QEMU has one (``spec/qemu-7.2-observed.md`` section 1)."""

    #: a queued frame older than this raises a checkpoint request (QEMU
    #: ``compare_timeout``); ``None`` switches timeouts off.
    compare_timeout_ms: float | None = 3000
    #: how often queued frames are checked for age (QEMU
    #: ``expired_scan_cycle``: 1000 ms in the code, though its docs say 3000).
    expired_scan_cycle_ms: float = 1000
    #: frames per connection and side (QEMU ``max_queue_size``; QEMU really
    #: keeps one more, observed k1: here the bound is exact).
    max_queue_size: int = 1024
    #: connections tracked at once (QEMU's HASHTABLE_MAX_SIZE).
    max_connections: int = 16384
    #: memory of the frames queued in all, both sides: their bytes plus
    #: QUEUED_FRAME_OVERHEAD each for what holds them (so tiny frames cannot
    #: multiply the memory the bound names).  TCP payload waiting to be
    #: compared is held once more, in its stream: up to twice this for TCP.
    max_queued_bytes: int = 256 * 1024 * 1024
    #: a connection with nothing queued and no traffic for this long is
    #: forgotten (its TCP comparison state with it).
    idle_timeout_ms: float = 120_000
    #: an IP datagram whose fragments have not all arrived after this long
    #: is given up (its primary fragments bypassed): Linux's ipfrag_time.
    fragment_timeout_ms: float = 30_000
    #: compare TCP in relative sequence numbers, per side (the replicas chose
    #: their own ISNs: no filter-rewriter, or captures of two instances)
    normalize_seq: bool = False
    #: noise rules (noise.Rule): bytes that legitimately differ
    ignore: tuple = ()

    def validate(self) -> None:
        if self.compare_timeout_ms is not None and self.compare_timeout_ms <= 0:
            raise ValueError("compare timeout must be positive")
        if self.expired_scan_cycle_ms <= 0:
            raise ValueError("expired scan cycle must be positive")
        if self.max_queue_size < 1:
            raise ValueError("max queue size must be at least 1")
        if self.max_connections < 1:
            raise ValueError("max connections must be at least 1")
        if self.max_queued_bytes < 1:
            raise ValueError("max queued bytes must be at least 1")
        if self.fragment_timeout_ms <= 0:
            raise ValueError("fragment timeout must be positive")


def _last_ms(conn) -> float:
    return conn.last_ms


def _frames(pkt) -> int:
    """How many frames a queued packet stands for (a reassembled datagram
    came in several)."""
    return 1 if pkt.fragments is None else len(pkt.fragments)


class Comparator:
    def __init__(self, config: Config | None = None, compact: bool = False,
                 mode: ev.CheckpointMode = ev.CheckpointMode.EXTERNAL) -> None:
        self.config = config or Config()
        self.config.validate()
        self.stats = Stats()
        self.table = ConnectionTable(self.config.max_connections)
        self._arrivals: deque = deque()  # queued frames, oldest first (for timeouts)
        self.queued_frames = 0
        self.queued_bytes = 0
        self._epoch_ms = None           # first now_ms seen: scan ticks are phased from it
        self._next_scan_ms = None
        self._reassembly = (Reassembler(), Reassembler())   # per side
        self._conns = self.table.conns  # the table's dict, for the hot path
        #: who performs checkpoints (see CheckpointMode)
        self.mode = ev.CheckpointMode(mode)
        self._to_answer: dict = {}      # LOCAL: connections to checkpoint after this call
        self._absent_since_ms = None    # when the secondary's input went away
        self._absent = False            # ... and was given up: primary frames pass
        #: release matched frames as their bytes rather than Released events
        self.compact = compact
        #: take the fast path for the common case (tests turn it off to check
        #: that it decides exactly as the general path)
        self.fast_path = True

    # ------------------------------------------------------------------
    # input

    def receive(self, side, data: bytes, now_ms, l2: int = 0,
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

        Returns the events.  With ``compact`` set, a frame released on a
        match appears as its ``data`` (bytes) instead of a ``Released``
        event: the hot path of the adapters.

        Never raises: should the comparator fail on a frame (a bug of ours),
        the frame is let go, counted as ``internal-error``, and an
        ``InternalError`` event carries the exception (see ``_contain``).
        """
        out: list = []
        try:
            self._receive(side, data, now_ms, l2, vnet_hdr_len, cut, l3, ethertype, out)
            if self._to_answer:
                self._answer_requests(now_ms, out)
        except Exception as exc:  # noqa: BLE001 - one frame, not the comparator
            self._contain(exc, side, data, now_ms, l2, out, l3, ethertype)
        return out

    def _receive(self, side, data, now_ms, l2, vnet_hdr_len, cut, l3, ethertype, out) -> None:
        if self._epoch_ms is None:
            self._start_clock(now_ms)
        stats = self.stats
        size = len(data)
        # frame bytes, as a capture has them: serve's length words and vnet
        # headers are not counted, so serve and replay count alike
        stats.bytes_in[side] += size - l2     # (l2 > size: undone below)
        # frames_in is this index, read by Stats.snapshot
        index = stats.frames_in[side]
        stats.frames_in[side] = index + 1
        if self._absent_since_ms is not None:
            if side == PRIMARY and self._absent:
                # the secondary is gone: nothing to compare with (see
                # secondary_lost); the frame passes at once
                out.extend(self._not_comparable(Packet(side, data, l2, vnet_hdr_len, now_ms, index),
                                                ev.REASON_SECONDARY_ABSENT))
                return
            if side == SECONDARY:
                # secondary frames again: the adapter says so with
                # secondary_back, but the frames themselves are proof
                self._secondary_back(now_ms, out)

        # The fast path: an untagged IPv4 UDP datagram with a 20-byte header,
        # whole and not a fragment, on a connection that is in step.  It
        # decides exactly as the general path below would (a test runs both
        # on the same input); anything unusual (another link) falls through.
        if size >= l2 + 42 and vnet_hdr_len <= MAX_VNET_HDR_LEN and l3 < 0 and self.fast_path:
            etype, vihl, total, frag, proto = _fast_ipv4(data, l2 + 12)
            end = l2 + 14 + total
            if (etype == 0x0800 and vihl == 0x45 and proto == 17 and not frag & 0x3FFF
                    and total >= 28 and end <= size):
                key = data[l2 + 26:l2 + 38] + _UDP4
                conn = self._conns.get(key)
                if conn is None and not self.config.ignore:
                    # a new flow: made here rather than by the general path
                    # (many short flows are the connection-churn case)
                    conn = self._new_connection(key, KIND_UDP, now_ms, out)
                if conn is not None and not conn.diverged and not conn.stale:
                    conn.last_ms = now_ms
                    off = l2 + 34
                    if side:
                        mine, other = conn.s, conn.p
                    else:
                        mine, other = conn.p, conn.s
                    if other:
                        head = other[0]
                        hoff, hend = head.cmp_off, head.cmp_end
                        if (hend - hoff == end - off and head.fragments is None
                                and head.data[hoff:hend] == data[off:end]):
                            other.popleft()
                            conn.compared += 1
                            stats.secondary_matched += 1
                            head.done = True
                            self.queued_frames -= 1
                            self.queued_bytes -= len(head.data)
                            if side:
                                # the secondary completes the pair: the queued
                                # primary leaves
                                hold_ms = now_ms - head.arrival_ms
                                released = head
                            else:
                                hold_ms = 0.0
                                released = None
                            stats.released_match += 1
                            conn.released += 1
                            if released is None:
                                stats.hold.zero += 1
                            else:
                                stats.hold.add(hold_ms)
                                conn.hold_sum_ms += hold_ms
                                if hold_ms > conn.hold_max_ms:
                                    conn.hold_max_ms = hold_ms
                            if released is None:
                                stats.released_bytes += size - l2
                                if self.compact:
                                    out.append(data)
                                    return
                                released = Packet(side, data, l2, vnet_hdr_len, now_ms, index)
                                released.key = conn.key
                                released.kind = conn.kind
                                released.done = True
                            else:
                                stats.released_bytes += len(released.data) - released.l2
                                if self.compact:
                                    out.append(released.data)
                                    return
                            out.append(ev.Released(released, ev.RELEASE_MATCH, hold_ms))
                            return
                    elif len(mine) < self.config.max_queue_size:
                        pkt = _new_packet(Packet)    # see _fast_tcp
                        pkt.side = side
                        pkt.data = data
                        pkt.l2 = l2
                        pkt.vnet_hdr_len = vnet_hdr_len
                        pkt.arrival_ms = now_ms
                        pkt.index = index
                        pkt.kind = KIND_UDP
                        pkt.key = conn.key
                        pkt.cmp_off = off
                        pkt.cmp_end = end
                        pkt.seq_abs = pkt.end_abs = pkt.seq = pkt.ack = pkt.flags = 0
                        pkt.done = False
                        pkt.conn = conn
                        pkt.fragments = None
                        mine.append(pkt)
                        arrivals = self._arrivals
                        while arrivals and arrivals[0].done:
                            arrivals.popleft()
                        arrivals.append(pkt)
                        if len(arrivals) > self.queued_frames + (self.queued_frames >> 2) + 1024:
                            self._compact_arrivals()
                        self.queued_frames += 1
                        self.queued_bytes += size
                        if len(mine) > stats.queue_high_water[side]:
                            stats.queue_high_water[side] = len(mine)
                        if self.queued_bytes > stats.queued_bytes_high_water:
                            stats.queued_bytes_high_water = self.queued_bytes
                        if self.queued_bytes + self.queued_frames * QUEUED_FRAME_OVERHEAD > self.config.max_queued_bytes:
                            self._relieve_memory(now_ms, out)
                        return

            elif (etype == 0x0800 and vihl == 0x45 and proto == 6 and not frag & 0x3FFF
                    and total >= 40 and end <= size):
                if self._fast_tcp(side, data, now_ms, l2, vnet_hdr_len, index, end, out):
                    return

        # The general path.
        pkt = Packet(side, data, l2, vnet_hdr_len, now_ms, index)
        if vnet_hdr_len > MAX_VNET_HDR_LEN or l2 > size:
            if l2 > size:
                stats.bytes_in[side] += l2 - size    # no frame bytes at all
            out.extend(self._not_comparable(pkt, REASON_BAD_VNET_HDR))
            return
        parsed = parse(data, l2, l3, ethertype)
        kind = parsed[0]
        if kind is None:
            out.extend(self._not_comparable(pkt, parsed[1]))
            return
        if parsed[3] > size:
            if not cut:
                # an IP length beyond the frame, and no capture to blame
                out.extend(self._not_comparable(
                    pkt, REASON_IPV6_TRUNCATED if parsed[1][-1:] == b"6" else REASON_IPV4_TRUNCATED))
                return
            # captured short of its IP length (snaplen): only the captured
            # part can be compared
            stats.truncated[side] += 1
        if kind == KIND_FRAGMENT:
            self._receive_fragment(pkt, parsed, now_ms, out)
        else:
            self._dispatch(pkt, parsed, now_ms, out)
        if self.queued_bytes + self.queued_frames * QUEUED_FRAME_OVERHEAD > self.config.max_queued_bytes:
            self._relieve_memory(now_ms, out)

    def _fast_tcp(self, side, data, now_ms, l2, vnet_hdr_len, index, end, out) -> bool:
        """The fast path for an untagged IPv4 TCP segment that carries data in
        sequence on a connection in step (no SYN/FIN/RST, nothing out of
        order, nothing diverged): the bulk-transfer case.  Appends the events
        to ``out`` and returns True, or returns False to leave the segment to
        the general path (then nothing has been changed)."""
        seq, ack, doff, flags = _fast_tcp(data, l2 + 38)
        if flags & _TCP_SIMPLE:
            return False
        off = l2 + 34 + (doff >> 4) * 4
        plen = end - off
        if plen <= 0 or off < l2 + 54:
            return False
        conn = self._conns.get(data[l2 + 26:l2 + 38] + _TCP4)
        if conn is None or conn.diverged or conn.p_later or conn.s_later:
            return False
        tcp = conn.tcp
        if (not tcp.plain or not tcp.locked or tcp.p_pending or tcp.s_pending
                or tcp.unknown is not None or tcp.p_fin is not None or tcp.s_fin is not None):
            return False
        base = tcp.base
        p_buf, s_buf = tcp.p_buf, tcp.s_buf
        if side and not conn.p and not p_buf:
            # the secondary is ahead: queue it, in sequence, as the general
            # path would (TcpStream.add_secondary, insert_segment, _enqueue);
            # nothing can be verified until the primary's twin arrives
            expected = base + len(s_buf)
            squeue = conn.s
            if (seq - expected) & _MASK32 or len(squeue) >= self.config.max_queue_size:
                return False
            if flags & ACK:
                m = tcp.s_max_ack
                if m is None or ((ack - m) & _MASK32) < _HALF32:
                    tcp.s_max_ack = ack
            self._queue_fast_tcp(side, data, l2, vnet_hdr_len, now_ms, index, conn, off,
                                 end, seq, ack, flags, expected, s_buf, squeue, out)
            return True
        if side:
            # the secondary brings bytes the primary has sent and are waiting
            if s_buf or conn.s or not conn.p or (seq - base) & _MASK32 or len(p_buf) < plen:
                return False
            if not p_buf.startswith(data[off:end]):
                return False
            if flags & ACK:
                m = tcp.s_max_ack
                if m is None or ((ack - m) & _MASK32) < _HALF32:
                    tcp.s_max_ack = ack
            del p_buf[:plen]
            tcp.base = tcp.anchor = base = base + plen
            self.stats.secondary_matched += 1
            conn.last_ms = now_ms
            queue = conn.p
            ack_max = tcp.s_max_ack
            while queue:
                # TcpStream.releasable's rule, for a stream with no FIN seen
                head = queue[0]
                hflags = head.flags
                if (head.end_abs > base
                        or (hflags & SYN and not tcp.s_syn) or (hflags & RST and not tcp.s_rst)
                        or (hflags & ACK and (ack_max is None
                                              or ((ack_max - head.ack) & _MASK32) >= _HALF32))):
                    break
                if hflags & RST:
                    tcp.p_rst = True
                queue.pop(0)
                if self.compact and head.fragments is None:
                    # _release, inlined for the bulk case
                    head.done = True
                    size = len(head.data)
                    self.queued_frames -= 1
                    self.queued_bytes -= size
                    hold_ms = now_ms - head.arrival_ms
                    stats = self.stats
                    stats.released_match += 1
                    stats.released_bytes += size - head.l2
                    stats.hold.add(hold_ms)
                    conn.released += 1
                    conn.hold_sum_ms += hold_ms
                    if hold_ms > conn.hold_max_ms:
                        conn.hold_max_ms = hold_ms
                    out.append(head.data)
                else:
                    self._release(conn, head, ev.RELEASE_MATCH, now_ms, out)
            return True
        if s_buf:
            if conn.p or (seq - base) & _MASK32 or len(s_buf) < plen:
                return False
            # the secondary was ahead: this segment's bytes are there already
            ack_max = tcp.s_max_ack
            if (flags & ACK and (ack_max is None or ((ack_max - ack) & _MASK32) >= _HALF32)):
                return False
            if not s_buf.startswith(data[off:end]):
                return False
            del s_buf[:plen]
            base += plen
            tcp.base = tcp.anchor = base
            if tcp.p_end_max is None or base > tcp.p_end_max:
                tcp.p_end_max = base
            conn.last_ms = now_ms
            squeue = conn.s
            while squeue and squeue[0].end_abs <= base:
                done = squeue.pop(0)
                self.stats.secondary_matched += 1
                self._leave(done)
            stats = self.stats
            stats.released_match += 1
            stats.released_bytes += len(data) - l2
            stats.hold.zero += 1
            conn.released += 1
            if self.compact:
                out.append(data)
                return True
            pkt = Packet(side, data, l2, vnet_hdr_len, now_ms, index)
            pkt.kind = KIND_TCP
            pkt.key = conn.key
            pkt.done = True
            out.append(ev.Released(pkt, ev.RELEASE_MATCH, 0.0))
            return True
        # nothing from the secondary yet: queue it, in sequence
        expected = base + len(p_buf)
        if (seq - expected) & _MASK32 or len(conn.p) >= self.config.max_queue_size:
            return False
        end_abs = expected + plen
        if tcp.p_end_max is None or end_abs > tcp.p_end_max:
            tcp.p_end_max = end_abs
        self._queue_fast_tcp(side, data, l2, vnet_hdr_len, now_ms, index, conn, off, end,
                             seq, ack, flags, expected, p_buf, conn.p, out)
        return True

    def _queue_fast_tcp(self, side, data, l2, vnet_hdr_len, now_ms, index, conn, off, end,
                        seq, ack, flags, expected, buf, queue, out) -> None:
        """Queue an in-sequence segment for the TCP fast path: the Packet
        with its fields set once (``Packet.__init__`` would fill defaults
        only to have them overwritten), its payload appended to its side's
        stream ``buf``, and ``_enqueue``, inlined; a memory bound may flush,
        appending to ``out``."""
        pkt = _new_packet(Packet)
        pkt.side = side
        pkt.data = data
        pkt.l2 = l2
        pkt.vnet_hdr_len = vnet_hdr_len
        pkt.arrival_ms = now_ms
        pkt.index = index
        pkt.kind = KIND_TCP
        pkt.key = conn.key
        pkt.cmp_off = off
        pkt.cmp_end = end
        pkt.seq = seq
        pkt.ack = ack
        pkt.flags = flags
        pkt.seq_abs = expected
        pkt.end_abs = expected + (end - off)
        pkt.done = False
        pkt.conn = conn
        pkt.fragments = None
        buf += data[off:end]          # the bytearray itself grows
        conn.last_ms = now_ms
        queue.append(pkt)
        depth = len(queue)
        arrivals = self._arrivals
        while arrivals and arrivals[0].done:
            arrivals.popleft()
        arrivals.append(pkt)
        self.queued_frames += 1
        self.queued_bytes += len(pkt.data)
        stats = self.stats
        if self.queued_bytes > stats.queued_bytes_high_water:
            stats.queued_bytes_high_water = self.queued_bytes
        if depth > stats.queue_high_water[side]:
            stats.queue_high_water[side] = depth
        if len(arrivals) > self.queued_frames + (self.queued_frames >> 2) + 1024:
            self._compact_arrivals()
        if self.queued_bytes + self.queued_frames * QUEUED_FRAME_OVERHEAD > self.config.max_queued_bytes:
            self._relieve_memory(now_ms, out)

    def _dispatch(self, pkt, parsed, now_ms, out) -> None:
        """A parsed, comparable frame (or reassembled datagram) joins its
        connection and is compared."""
        kind, key, off, end, seq, ack, flags = parsed
        pkt.kind = kind
        pkt.key = key
        pkt.cmp_off = off
        pkt.cmp_end = end
        pkt.seq = seq
        pkt.ack = ack
        pkt.flags = flags
        conn = self._conns.get(key)
        if conn is None:
            conn = self._new_connection(key, kind, now_ms, out)
        else:
            conn.last_ms = now_ms
        pkt.conn = conn
        if kind == KIND_TCP:
            self._receive_tcp(conn, pkt, pkt.side, now_ms, out)
        else:
            self._receive_datagram(conn, pkt, pkt.side, now_ms, out)

    # -- fragments -----------------------------------------------------------

    def _receive_fragment(self, pkt, parsed, now_ms, out) -> None:
        _, key, off, end, offset, more, proto = parsed
        side = pkt.side
        pkt.key = key
        self.stats.fragments_in[side] += 1
        reasm = self._reassembly[side]
        done, failed = reasm.add(pkt, key, offset, more, proto, pkt.data[off:end], now_ms)
        for dg, reason in failed:
            self._fail_datagram(dg, reason, out)
        if done is None:
            return
        payload = reasm.complete_payload(done)
        parsed = parse_reassembled(payload, key, done.proto)
        first = done.fragments[0]
        whole = Packet(side, payload, 0, 0, first.arrival_ms, first.index)
        whole.fragments = done.fragments
        if parsed[0] is None:
            self._fail_datagram(done, parsed[1], out)
            return
        self.stats.reassembled[side] += 1
        self._dispatch(whole, parsed, now_ms, out)

    def _fail_datagram(self, dg, reason, out) -> None:
        """A datagram that cannot be reassembled (or compared): its primary
        fragments leave at once, its secondary ones are dropped."""
        for frag in dg.fragments:
            out.extend(self._not_comparable(frag, reason))

    def _not_comparable(self, pkt, reason: str) -> list:
        if pkt.side == PRIMARY:
            self.stats.bypassed[reason] += 1
            pkt.done = True
            return [ev.Bypassed(pkt, reason)]
        self.stats.dropped["secondary:" + reason] += 1
        pkt.done = True
        return [ev.Dropped(pkt, SECONDARY, reason)]

    def _new_connection(self, key, kind, now_ms, out) -> Connection:
        table = self.table
        config = self.config
        if len(self._conns) >= table.max_connections:
            if kind == KIND_UDP and not config.ignore:
                # the connection-churn case (many short flows through a full
                # table): the oldest connection, when it is an idle datagram
                # one, becomes the new one in place, its deques kept
                conn = table.recycle_oldest_datagram(key, now_ms)
                if conn is not None:
                    self.stats.connections_evicted["idle"] += 1
                    self.stats.connections_created += 1
                    return conn
            self._evict_for_room(now_ms, out)
        if config.ignore or config.normalize_seq:
            conn = Connection(key, kind, now_ms, config.normalize_seq,
                              rules_for(config.ignore, kind, key))
        else:
            conn = Connection(key, kind, now_ms)
        table.add(conn)
        self.stats.connections_created += 1
        return conn

    def _enqueue(self, conn, queue, pkt, side, now_ms, out) -> None:
        arrivals = self._arrivals
        # drop the frames at the front that have left, as they leave: kept
        # until the next scan, a second's worth of released frames were freed
        # all at once there (a stall of tens of ms, and memory in proportion)
        while arrivals and arrivals[0].done:
            arrivals.popleft()
        arrivals.append(pkt)
        if len(arrivals) > self.queued_frames + (self.queued_frames >> 2) + 1024:
            self._compact_arrivals()
        self.queued_frames += 1
        self.queued_bytes += len(pkt.data)
        if self.queued_bytes > self.stats.queued_bytes_high_water:
            self.stats.queued_bytes_high_water = self.queued_bytes
        n = len(queue)
        if n > self.stats.queue_high_water[side]:
            self.stats.queue_high_water[side] = n

    # -- TCP ---------------------------------------------------------------

    def _receive_tcp(self, conn, pkt, side, now_ms, out) -> None:
        tcp = conn.tcp
        later = conn.p_later if side == PRIMARY else conn.s_later
        if later or (pkt.flags & SYN and tcp.ended(side == PRIMARY)):
            # A new connection on the same 4-tuple, opened by this side before
            # the old one is fully compared: it waits until the old one is.
            later.append(pkt)
            self._enqueue(conn, later, pkt, side, now_ms, out)
        elif side == PRIMARY:
            tcp.add_primary(pkt, pkt.data, pkt.cmp_off, pkt.cmp_end)   # sets seq_abs
            insert_segment(conn.p, pkt)
            self._enqueue(conn, conn.p, pkt, PRIMARY, now_ms, out)
        else:
            self._add_secondary_segment(conn, pkt, now_ms, out)
        self._progress_tcp(conn, now_ms, out)
        if conn.queued_primary > self.config.max_queue_size or \
                conn.queued_secondary > self.config.max_queue_size:
            self._flush_connection(conn, now_ms, ev.RELEASE_QUEUE_FULL, out)
            self._request(ev.CAUSE_QUEUE_FULL, conn, now_ms, out, answered=True)

    def _add_secondary_segment(self, conn, pkt, now_ms, out) -> None:
        if conn.tcp.add_secondary(pkt, pkt.data, pkt.cmp_off, pkt.cmp_end):
            insert_segment(conn.s, pkt)
            self._enqueue(conn, conn.s, pkt, SECONDARY, now_ms, out)
        else:
            pkt.done = True
            self.stats.secondary_absorbed += _frames(pkt)

    def _start_next_connection(self, conn) -> None:
        conn.tcp = tcp = TcpStream(self.config.normalize_seq, conn.rules)
        conn.diverged = False
        p_later, s_later = conn.p_later, conn.s_later
        conn.p_later, conn.s_later = [], []
        for pkt in p_later:
            tcp.add_primary(pkt, pkt.data, pkt.cmp_off, pkt.cmp_end)
            insert_segment(conn.p, pkt)
        for pkt in s_later:
            # already counted as queued: keep it if it brings bytes
            if tcp.add_secondary(pkt, pkt.data, pkt.cmp_off, pkt.cmp_end):
                insert_segment(conn.s, pkt)
            else:
                self._leave(pkt)
                self.stats.secondary_absorbed += _frames(pkt)

    def _progress_tcp(self, conn, now_ms, out) -> None:
        tcp = conn.tcp
        if not conn.diverged:
            bad = tcp.advance()
            if bad is not None:
                self._tcp_miscompare(conn, bad, now_ms, out)
        s = conn.s
        n = tcp.verified_secondaries(s)
        if n:
            for _ in range(n):
                done = s.pop(0)
                self.stats.secondary_matched += _frames(done)
                self._leave(done)
        n = tcp.releasable(conn.p)
        if n:
            p = conn.p
            for _ in range(n):
                pkt = p.pop(0)
                if pkt.flags & RST:
                    tcp.p_rst = True
                self._release(conn, pkt, ev.RELEASE_MATCH, now_ms, out)
        if (conn.p_later or conn.s_later) and not conn.p and not conn.s and tcp.finished():
            # the old connection on this 4-tuple is over: compare the new one
            self._start_next_connection(conn)
            self._progress_tcp(conn, now_ms, out)

    def _tcp_miscompare(self, conn, bad, now_ms, out) -> None:
        cause, at = bad
        tcp = conn.tcp
        p_pkt, p_off = tcp.find(conn.p, at)
        s_pkt, s_off = tcp.find(conn.s, at)
        conn.diverged = True
        conn.miscompares += 1
        self.stats.miscompares["tcp:" + cause] += 1
        raw_seq = at & 0xFFFFFFFF
        if tcp.norm is not None:
            # report the primary's own sequence number for the byte
            raw_seq = tcp.norm.raw_seq(0, raw_seq)
        out.append(ev.Miscompare(conn.key, "tcp", cause, tcp.stream_offset(at),
                                 raw_seq, None, p_pkt, s_pkt, p_off, s_off, now_ms))
        self._request(ev.CAUSE_MISCOMPARE, conn, now_ms, out)

    # -- datagrams ---------------------------------------------------------

    def _receive_datagram(self, conn, pkt, side, now_ms, out) -> None:
        if conn.stale and side == SECONDARY:
            if conn.stale[0] == pkt.data[pkt.cmp_off:pkt.cmp_end]:
                # the secondary's copy of a datagram flushed at the checkpoint
                conn.stale.popleft()
                pkt.done = True
                self.stats.secondary_absorbed += _frames(pkt)
                return
            conn.stale.clear()      # the secondary has moved past them
        queue = conn.p if side == PRIMARY else conn.s
        queue.append(pkt)
        self._enqueue(conn, queue, pkt, side, now_ms, out)
        if not conn.diverged:
            p, s = conn.p, conn.s
            while p and s:
                pp = p[0]
                ss = s[0]
                if datagrams_equal(pp, ss) or (conn.rules and self._equal_but_noise(conn, pp, ss)):
                    p.popleft()
                    s.popleft()
                    conn.compared += 1
                    self.stats.secondary_matched += _frames(ss)
                    self._leave(ss)
                    self._release(conn, pp, ev.RELEASE_MATCH, now_ms, out)
                    continue
                cause, offset = datagram_difference(pp, ss)
                conn.diverged = True
                conn.miscompares += 1
                kind = KIND_NAMES[conn.kind]
                self.stats.miscompares[kind + ":" + cause] += 1
                out.append(ev.Miscompare(conn.key, kind, cause, offset, None, conn.compared,
                                         pp, ss, pp.cmp_off + offset, ss.cmp_off + offset,
                                         now_ms))
                self._request(ev.CAUSE_MISCOMPARE, conn, now_ms, out)
                break
        if len(conn.p) > self.config.max_queue_size or len(conn.s) > self.config.max_queue_size:
            self._flush_connection(conn, now_ms, ev.RELEASE_QUEUE_FULL, out)
            self._request(ev.CAUSE_QUEUE_FULL, conn, now_ms, out, answered=True)

    def _equal_but_noise(self, conn, p, s) -> bool:
        """Whether two datagrams differ only where the noise rules say bytes
        may differ; the rules that made the difference are counted."""
        if p.cmp_end - p.cmp_off != s.cmp_end - s.cmp_off:
            return False
        a = p.data[p.cmp_off:p.cmp_end]
        b = s.data[s.cmp_off:s.cmp_end]
        if len(a) != len(b) or mask_datagram(a, conn.rules) != mask_datagram(b, conn.rules):
            return False
        differing = [i for i in range(len(a)) if a[i] != b[i]]
        for rule in conn.rules:
            if any(start <= i < end for start, end in rule.spans(a) for i in differing):
                self.stats.ignored[rule.text] += 1
        return True

    # -- leaving -----------------------------------------------------------

    def _leave(self, pkt) -> None:
        """A queued frame leaves its queue (released, consumed or discarded)."""
        pkt.done = True
        self.queued_frames -= 1
        self.queued_bytes -= len(pkt.data)

    def _release(self, conn, pkt, reason, now_ms, out) -> None:
        self._leave(pkt)
        if pkt.fragments is not None:
            # a reassembled datagram leaves as the fragments it came in
            for frag in pkt.fragments:
                frag.done = True
                self._count_release(conn, frag, reason, now_ms, out)
            return
        self._count_release(conn, pkt, reason, now_ms, out)

    def _count_release(self, conn, pkt, reason, now_ms, out) -> None:
        hold_ms = now_ms - pkt.arrival_ms
        stats = self.stats
        stats.released_bytes += len(pkt.data) - pkt.l2
        stats.hold.add(hold_ms)
        conn.released += 1
        conn.hold_sum_ms += hold_ms
        if hold_ms > conn.hold_max_ms:
            conn.hold_max_ms = hold_ms
        if reason is ev.RELEASE_MATCH:
            stats.released_match += 1
            if self.compact:
                out.append(pkt.data)
                return
        else:
            stats.released_flushed[reason] += 1
        out.append(ev.Released(pkt, reason, hold_ms))

    def _request(self, cause, conn, now_ms, out, answered=False, key=None) -> None:
        """Ask for a checkpoint.  In ``CheckpointMode.LOCAL`` the comparator
        answers it itself, on the connection concerned, once the call that
        raised it has finished its work (``_answer_requests``): answering in
        the middle of a comparison would pull the state from under it."""
        self.stats.checkpoint_requests[cause] += 1
        if conn is not None:
            key = conn.key
        if not answered and self.mode is ev.CheckpointMode.LOCAL and key is not None:
            self._to_answer[key] = None      # (a dict: ordered, and no duplicates)
            answered = True
        out.append(ev.CheckpointRequested(cause, key, now_ms, answered))

    def _answer_requests(self, now_ms, out) -> None:
        """``CheckpointMode.LOCAL``: checkpoint each connection that raised a
        request during this call (in the order they did)."""
        keys, self._to_answer = self._to_answer, {}
        for key in keys:
            conn = self._conns.get(key)
            if conn is not None:
                self._checkpoint_one(conn, now_ms, out)

    def _flush_connection(self, conn, now_ms, reason, out, keep_ahead=False) -> tuple[int, int]:
        """Release every queued primary frame of ``conn`` in order, discard its
        secondary frames, and reset its comparison state.

        ``keep_ahead``: keep what the secondary sent beyond what the primary
        has sent so far (``resolve``: no VM is reset, the secondary's stream
        goes on, and those frames are the twins of primary frames still to
        come).  After a real checkpoint they are discarded: the secondary,
        now a copy of the primary, will send them again."""
        p_later = conn.p_later
        released = discarded = 0
        n_primary = len(conn.p)
        for pkt in conn.p:
            released += _frames(pkt)
            self._release(conn, pkt, reason, now_ms, out)
        for pkt in p_later:
            released += _frames(pkt)
            self._release(conn, pkt, reason, now_ms, out)
        kept = []
        if keep_ahead and not p_later and not conn.s_later:
            if conn.tcp is None:
                # datagrams pair in order: those beyond the primary's are ahead
                kept = list(conn.s)[n_primary:]
            elif conn.tcp.p_end_max is not None:
                end = conn.tcp.p_end_max
                kept = [pkt for pkt in conn.s if pkt.end_abs > end]
        keep = set(map(id, kept))
        for pkt in conn.s:
            if id(pkt) not in keep:
                discarded += _frames(pkt)
                self._leave(pkt)
        for pkt in conn.s_later:
            discarded += _frames(pkt)
            self._leave(pkt)
        self.stats.secondary_discarded += discarded
        if conn.tcp is None:
            # remember what the flushed primaries compare as, in case their
            # secondary copies are still to come (see Connection.stale);
            # those already paired with a queued secondary are not waited for
            unpaired = list(conn.p)[len(conn.s):]
            conn.stale = deque(p.data[p.cmp_off:p.cmp_end] for p in unpaired)
        conn.p.clear()
        conn.s.clear()
        conn.diverged = False
        if conn.tcp is None:
            conn.s.extend(kept)
        else:
            if p_later:
                # the primary had moved on to a new connection on this 4-tuple:
                # the secondary now holds that state, so continue from there
                tcp = conn.tcp = TcpStream(self.config.normalize_seq, conn.rules)
                for pkt in p_later:
                    tcp.add_primary(pkt, pkt.data, pkt.cmp_off, pkt.cmp_end)
            conn.p_later, conn.s_later = [], []
            if keep_ahead and conn.tcp.p_end_max is not None:
                conn.tcp.skip_to_primary_end()
                conn.s.extend(kept)
            else:
                conn.tcp.reset()
        return released, discarded

    def _evict_for_room(self, now_ms, out) -> None:
        """The table is full and a new connection arrives: forget an idle
        connection (the oldest, when it is idle: the usual case, in O(1)),
        else the least recently active of the 64 oldest, releasing what it
        holds."""
        table = self.table
        front = table.pop_oldest()
        if front is not None and not front.queued:
            self.stats.connections_evicted["idle"] += 1
            table.remove(front)
            return
        sample = ([front] if front is not None else []) + table.oldest(63)
        if not sample:
            return
        idle = [c for c in sample if not c.queued]
        victim = min(idle or sample, key=_last_ms)
        table.put_back([c for c in sample if c is not victim])
        table.remove(victim)
        if idle:
            self.stats.connections_evicted["idle"] += 1
            return
        self.stats.connections_evicted["table-full"] += 1
        self._flush_connection(victim, now_ms, ev.RELEASE_TABLE_FULL, out)
        self._request(ev.CAUSE_TABLE_FULL, None, now_ms, out, answered=True, key=victim.key)

    def _relieve_memory(self, now_ms, out) -> None:
        """Too many bytes queued: flush the connections holding the oldest
        frames until under the bound."""
        limit = self.config.max_queued_bytes
        requested = False
        while self.queued_bytes + self.queued_frames * QUEUED_FRAME_OVERHEAD > limit:
            pkt = self._oldest_queued()
            if pkt is None:
                break
            self._flush_connection(pkt.conn, now_ms, ev.RELEASE_MEMORY_FULL, out)
            if not requested:
                self._request(ev.CAUSE_MEMORY_FULL, pkt.conn, now_ms, out, answered=True)
                requested = True

    def _oldest_queued(self):
        arrivals = self._arrivals
        while arrivals and arrivals[0].done:
            arrivals.popleft()
        return arrivals[0] if arrivals else None

    def _compact_arrivals(self) -> None:
        """Frames that left out of arrival order pile up behind a long-held
        one: drop them, so the list holds at most a quarter more than what is
        queued (plus 1024).  A frame that left is kept alive by the list, its
        bytes with it, so this slack is memory: the bound of
        ``max_queued_bytes`` is exceeded by at most that quarter; each
        compaction removes at least that many, so its cost per frame stays
        constant."""
        self._arrivals = deque(p for p in self._arrivals if not p.done)

    # ------------------------------------------------------------------
    # time

    def _start_clock(self, now_ms) -> None:
        self._epoch_ms = now_ms
        self._next_scan_ms = now_ms + self.config.expired_scan_cycle_ms

    def _tick_at_or_after(self, t_ms) -> float:
        """The first scan tick at or after ``t_ms``."""
        cycle = self.config.expired_scan_cycle_ms
        return self._epoch_ms - ((self._epoch_ms - t_ms) // cycle) * cycle

    def _tick_after(self, t_ms) -> float:
        """The first scan tick strictly after ``t_ms``."""
        cycle = self.config.expired_scan_cycle_ms
        return self._epoch_ms + ((t_ms - self._epoch_ms) // cycle + 1) * cycle

    def get_timer(self):
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
        if self._next_scan_ms is None:
            return None
        due = None
        timeout = self.config.compare_timeout_ms
        if timeout is not None and self.queued_frames:
            oldest = self._oldest_queued()
            if oldest is not None:
                # the first tick where the age is strictly over the timeout
                due = self._tick_after(oldest.arrival_ms + timeout)
        if self._absent_since_ms is not None and not self._absent:
            t = self._tick_after(self._absent_since_ms + self.absent_after_ms)
            due = t if due is None or t < due else due
        ftimeout = self.config.fragment_timeout_ms
        for reasm in self._reassembly:
            if reasm.pending:
                first = next(iter(reasm.pending.values())).first_ms
                # given up when now - first >= the timeout
                t = self._tick_at_or_after(first + ftimeout)
                due = t if due is None or t < due else due
        front = self.table.peek_oldest()
        if front is not None and not front.queued:
            # forgotten when last_ms <= now - idle_timeout
            t = self._tick_at_or_after(front.last_ms + self.config.idle_timeout_ms)
            due = t if due is None or t < due else due
        if due is None:
            return None
        return due if due > self._next_scan_ms else self._next_scan_ms

    def handle_timer(self, now_ms) -> list:
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
        Never raises (see ``InternalError``).
        """
        out: list = []
        if self._epoch_ms is None:
            self._start_clock(now_ms)
            return out
        if now_ms < self._next_scan_ms:
            return out
        cycle = self.config.expired_scan_cycle_ms
        ticks = (now_ms - self._epoch_ms) // cycle
        tick_ms = self._epoch_ms + ticks * cycle        # the last tick due
        self._next_scan_ms = tick_ms + cycle
        try:
            self._scan(tick_ms, out)
            if self._to_answer:
                self._answer_requests(tick_ms, out)
        except Exception as exc:  # noqa: BLE001 - a bug of ours must not stop the scans
            self._to_answer = {}
            out.append(ev.InternalError(exc, None, tick_ms))
        return out

    def _scan(self, tick_ms, out) -> None:
        timeout = self.config.compare_timeout_ms
        if timeout is not None and self.queued_frames:
            if self.mode is ev.CheckpointMode.LOCAL:
                limit = tick_ms - timeout
                seen = set()
                for pkt in self._arrivals:      # oldest first
                    if pkt.done:
                        continue
                    if pkt.arrival_ms >= limit:
                        break
                    key = pkt.conn.key
                    if key not in seen:
                        seen.add(key)
                        self._request(ev.CAUSE_TIMEOUT, pkt.conn, tick_ms, out)
            else:
                oldest = self._oldest_queued()
                if oldest is not None and tick_ms - oldest.arrival_ms > timeout:
                    self._request(ev.CAUSE_TIMEOUT, oldest.conn, tick_ms, out)
        if (self._absent_since_ms is not None and not self._absent
                and tick_ms - self._absent_since_ms > self.absent_after_ms):
            self._enter_absent(tick_ms, out)
        self._evict_idle(tick_ms)
        for reasm in self._reassembly:
            for dg, reason in reasm.expire(tick_ms, self.config.fragment_timeout_ms):
                self._fail_datagram(dg, reason, out)

    def _evict_idle(self, now_ms) -> None:
        """Forget connections idle for ``idle_timeout_ms`` with nothing
        queued.  Looks at the 256 oldest entries per scan; the active ones
        among them go to the back, so every connection is looked at in turn
        without a per-frame cost for keeping the table ordered."""
        limit = now_ms - self.config.idle_timeout_ms
        table = self.table
        for conn in table.oldest(256):
            if conn.last_ms <= limit and not conn.queued:
                table.remove(conn)
                self.stats.connections_evicted["idle"] += 1
            else:
                table.requeue(conn)

    # ------------------------------------------------------------------
    # the secondary's presence

    @property
    def absent_after_ms(self) -> float:
        """How long the secondary's input may be gone before comparing stops
        (``compare_timeout_ms``; 3000 ms, QEMU's default, with timeouts off)."""
        timeout = self.config.compare_timeout_ms
        return timeout if timeout is not None else 3000

    @property
    def secondary_absent(self) -> bool:
        """Comparing has stopped for want of a secondary (see
        ``secondary_lost``)."""
        return self._absent

    def secondary_lost(self, now_ms) -> list:
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

    def secondary_back(self, now_ms) -> list:
        """The secondary's input is back.  If comparing had stopped, it
        resumes from a clean state: the connections are forgotten (nothing is
        queued in that mode), since the secondary now sending may be a new
        or resynchronised VM."""
        out: list = []
        self._secondary_back(now_ms, out)
        return out

    def _secondary_back(self, now_ms, out) -> None:
        if self._absent_since_ms is None:
            return
        self._absent_since_ms = None
        if not self._absent:
            return
        self._absent = False
        for conn in self.table:
            self.table.remove(conn)
            self.stats.connections_evicted["secondary-absent"] += 1
        out.append(ev.SecondaryAbsent(False, now_ms))

    def _enter_absent(self, now_ms, out) -> None:
        self._absent = True
        self.stats.secondary_absent_periods += 1
        released = 0
        for conn in self.table:
            if conn.queued or conn.diverged:
                released += self._flush_connection(conn, now_ms, ev.RELEASE_SECONDARY_ABSENT, out)[0]
        for reasm in self._reassembly:
            for dg, reason in reasm.drain():
                self._fail_datagram(dg, reason, out)
        self._arrivals.clear()
        self._to_answer = {}
        out.append(ev.SecondaryAbsent(True, now_ms, released))

    # ------------------------------------------------------------------
    # checkpoints

    def checkpoint(self, now_ms) -> list:
        """A checkpoint happened: release every queued primary frame (per
        connection in order), discard the queued secondary frames, and reset
        the comparison state, so later traffic compares cleanly."""
        out: list = []
        released = discarded = 0
        for conn in self.table:
            if conn.queued or conn.diverged or conn.tcp is not None:
                r, d = self._flush_connection(conn, now_ms, ev.RELEASE_CHECKPOINT, out)
                released += r
                discarded += d
        self.stats.checkpoints += 1
        self._arrivals.clear()
        out.append(ev.CheckpointDone(released, discarded, now_ms))
        return out

    def checkpoint_connection(self, key, now_ms) -> list:
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

    def _checkpoint_one(self, conn, now_ms, out) -> None:
        # A whole-table flush would also discard other connections'
        # secondary frames whose primary twins are still to come: after a
        # real checkpoint the secondary VM sends those again, but a capture
        # cannot (nor can a secondary nobody checkpointed), and the twins
        # would then miscompare or time out for nothing.
        # What the secondary sent ahead is kept, unless it is itself past the
        # timeout: then no primary twin came in time, and keeping it would
        # only have the next scan ask again (for ever, if none ever comes).
        timeout = self.config.compare_timeout_ms
        keep_ahead = timeout is None or not any(
            now_ms - pkt.arrival_ms > timeout for pkt in itertools.chain(conn.s, conn.s_later))
        released, discarded = self._flush_connection(conn, now_ms, ev.RELEASE_CHECKPOINT, out,
                                                     keep_ahead=keep_ahead)
        self.stats.checkpoints += 1
        out.append(ev.CheckpointDone(released, discarded, now_ms, conn.key))

    def set_mode(self, mode: ev.CheckpointMode, now_ms) -> list:
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
            timeout = self.config.compare_timeout_ms
            for conn in self.table:
                if not conn.queued:
                    continue
                held = conn.diverged
                if not held and timeout is not None:
                    oldest = min((q[0].arrival_ms for q in (conn.p, conn.s, conn.p_later,
                                                            conn.s_later) if q), default=None)
                    held = oldest is not None and now_ms - oldest > timeout
                if held:
                    self._checkpoint_one(conn, now_ms, out)
        return out

    def finish(self, now_ms) -> list:
        """End of input (or shutdown): flush what is still queued.  The frames
        are released with reason ``end`` and count as unmatched."""
        out: list = []
        try:
            for conn in self.table:
                if conn.queued:
                    self._flush_connection(conn, now_ms, ev.RELEASE_END, out)
            for reasm in self._reassembly:
                for dg, reason in reasm.drain():
                    self._fail_datagram(dg, reason, out)
        except Exception as exc:  # noqa: BLE001 - every primary frame must still leave
            out.append(ev.InternalError(exc, None, now_ms))
            self._salvage(now_ms, ev.RELEASE_END, out)
        self._arrivals.clear()
        return out

    # ------------------------------------------------------------------
    # internal errors

    def _contain(self, exc, side, data, now_ms, l2, out, l3=-1, ethertype=0) -> None:
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
            if self._holds(data, l2, l3, ethertype) or any(type(e) is ev.Released and e.packet.data is data
                                            for e in out):
                return
        except Exception:  # noqa: BLE001 - the frame must leave, whatever else fails
            self._to_answer = {}
        pkt = Packet(side, data, l2, 0, now_ms, self.stats.frames_in[side] - 1)
        out.extend(self._not_comparable(pkt, ev.REASON_INTERNAL_ERROR))

    def _holds(self, data, l2, l3=-1, ethertype=0) -> bool:
        """Whether the frame ``data`` sits in a queue (or a reassembly
        buffer), from where it will leave."""
        for reasm in self._reassembly:
            for dg in reasm.pending.values():
                if any(f.data is data for f in dg.fragments):
                    return True
        parsed = parse(data, l2, l3, ethertype) if len(data) >= l2 else (None,)
        conn = self._conns.get(parsed[1]) if parsed[0] is not None else None
        if conn is None:
            return False
        return any(pkt.data is data or (pkt.fragments and any(f.data is data for f in pkt.fragments))
                   for queue in (conn.p, conn.s, conn.p_later, conn.s_later) for pkt in queue)

    def _salvage(self, now_ms, reason, out, start: int = 0) -> None:
        """The last resort when flushing fails: every primary frame still
        queued anywhere leaves (released with ``reason``), in per-connection
        order, the table and the reassembly buffers start empty, and the
        counts are recomputed.  Frames already in ``out[start:]`` are not
        released twice."""
        already = {id(e.packet) for e in out[start:] if type(e) is ev.Released}
        for conn in list(self.table.conns.values()):
            for queue in (conn.p, conn.p_later):
                for pkt in queue:
                    for frame in (pkt.fragments or (pkt,)):
                        if id(frame) in already or frame.side != PRIMARY:
                            continue
                        frame.done = True
                        already.add(id(frame))
                        self.stats.released_flushed[reason] += 1
                        out.append(ev.Released(frame, reason, now_ms - frame.arrival_ms))
            for queue in (conn.s, conn.s_later):
                for pkt in queue:
                    pkt.done = True
        self.table = ConnectionTable(self.config.max_connections)
        self._conns = self.table.conns
        for reasm in self._reassembly:
            with contextlib.suppress(Exception):
                for dg, why in reasm.drain():
                    self._fail_datagram(dg, why, out)
        self._reassembly = (Reassembler(), Reassembler())
        self._arrivals.clear()
        self.queued_frames = self.queued_bytes = 0

    # ------------------------------------------------------------------
    # introspection

    def top_connections(self, n: int = 10) -> dict:
        """The connections now in the table with the most miscompares, and
        with the longest hold time (evicted connections take their counts
        with them)."""
        import heapq
        conns = list(self.table)
        worst = heapq.nlargest(n, (c for c in conns if c.miscompares), key=lambda c: c.miscompares)
        slowest = heapq.nlargest(n, (c for c in conns if c.released), key=lambda c: c.hold_max_ms)
        return {"by_miscompares": [c.summary() for c in worst],
                "by_hold": [c.summary() for c in slowest]}

    def connections(self, limit: int | None = None) -> list[dict]:
        conns = list(self.table)
        if limit is not None:
            conns = conns[-limit:]
        return [c.summary() for c in conns]

    def snapshot(self) -> dict:
        snap = self.stats.snapshot()
        snap["connections"]["now"] = len(self.table)
        snap["queued"] = {"frames": self.queued_frames, "bytes": self.queued_bytes,
                          "primary": sum(len(c.p) for c in self.table),
                          "secondary": sum(len(c.s) for c in self.table)}
        return snap

