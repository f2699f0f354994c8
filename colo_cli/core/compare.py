"""Per-protocol comparison rules.

TCP (``TcpStream``) — compared as a byte stream by absolute sequence range
--------------------------------------------------------------------------

QEMU overlays the queued segments position by position and never checks that
they line up in sequence space, so a retransmission that partly overlaps
already-compared data is compared misaligned and miscompares
(``docs/qemu.md`` section 3).  Here each side's payload is laid into
a byte stream by its (unwrapped, 64-bit) sequence number; the bytes both
sides have sent from the verification point ``base`` on are compared, and
``base`` advances over equal bytes.  Segmentation does not matter (one 3000
byte segment matches two of 1500, GSO super-frames match MTU-sized segments)
and overlaps are harmless.  Only payload is compared: headers, IP ID/TTL,
window, options and checksums are not.

A primary segment is released, in sequence order, once

1. every sequence number it covers is verified: its payload bytes, its SYN
   (the secondary sent a SYN too: the ISNs differ before filter-rewriter's
   offset is learnt, so the SYN's own number is not compared) and its FIN
   (the secondary ended its stream at the same offset);
2. for an RST, the secondary sent an RST too;
3. the ACK gate: the secondary has acknowledged at least as much as this
   segment acknowledges.  This is why the gate exists: the primary must never
   acknowledge client data the secondary has not acknowledged, or a failover
   could lose it.

Zero-payload primary segments (pure ACKs, SYN, FIN, RST) follow the same
rule: they are neither held forever (they leave as soon as the rule holds;
a secondary that never catches up raises a timeout checkpoint) nor released
blindly (QEMU releases one whenever *any* secondary packet exists, observed
g4/g6).  A pure ACK is ordered after the data sent before it.

Secondary zero-payload segments are not queued: they update what the
secondary has acknowledged/sent (SYN, RST, FIN) and are absorbed, so extra
pure ACKs on the secondary are never a divergence and never fill a queue
(QEMU lets them accumulate until "secondary queue size too big").

The ACK gate is a wait, never a miscompare (QEMU declares a miscompare when
the bytes match but the ack is ahead: observed e3), and it applies to every
segment (QEMU skips it when the segmentation matches exactly: observed e4).

Stream origin: the byte after the primary's SYN when the handshake is seen;
otherwise the lower of the two sides' first stream positions (a capture that
starts mid-stream).  After a
checkpoint the verification point moves to the primary's next sequence
number, because the secondary now holds the primary's state: anything the
secondary sends below it is pre-checkpoint output and is absorbed (QEMU
keeps its old state and overlays it on the next segment: observed i4).

Datagrams (UDP, ICMP, other IP, ARP, fragments) — FIFO
------------------------------------------------------

The oldest queued primary datagram of a connection is compared with the
oldest queued secondary one of the same connection; equal means released.
QEMU takes the *newest* primary first and searches the whole secondary list,
which reverses output order and raises spurious checkpoints whenever the
primary is ahead (observed a2, b3).  Strict FIFO pairing also makes the
outcome independent of how the two streams interleave.
"""

from __future__ import annotations

from bisect import insort
from typing import Final, Iterable

from .events import MiscompareCause
from .noise import STREAM_LOOKBACK, WAIT, stream_match
from .packet import ACK, FIN, RST, SYN, Packet

#: a TCP noise rule's value is looked for up to this far past a difference
MAX_HIDDEN: Final = 64 * 1024

_MASK: Final = 0xFFFFFFFF
_HALF: Final = 0x80000000
_WRAP: Final = 0x100000000

#: a stream position or an ack not known yet.  TcpStream's positions are
#: plain ints with this value rather than ``int | None``: the compiled core
#: keeps an int attribute unboxed, and boxes (allocates) an optional one on
#: every write.  Absolute positions start at 2**32 and move by less than
#: 2**31 at a time, so no real one comes near it.
UNSET: Final = -(1 << 62)


def _seq_key(pkt: Packet) -> int:
    return pkt.seq_abs


def ack_covers(ack_max: int, ack: int) -> bool:
    """The ACK gate's test: the secondary has acknowledged (``ack_max``, the
    highest ack it sent, or UNSET) at least as much as ``ack`` (both 32-bit
    sequence numbers, compared in serial-number arithmetic)."""
    return ack_max != UNSET and ((ack_max - ack) & _MASK) < _HALF


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """Index of the first byte where ``a`` and ``b`` differ (they are known
    to differ within ``min(len)`` or to have different lengths)."""
    n = min(len(a), len(b))
    lo, hi = 0, n
    # binary search on prefix equality: O(n log n) copies in the worst case
    # but only on the (rare) miscompare path, and far faster than a Python
    # byte loop for 64 KiB GSO frames.
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return n


class SeqNormalizer:
    """Relative sequence and ack numbers, per side, for replicas whose TCP
    stacks chose their own initial sequence numbers (captures of two
    instances, or COLO without filter-rewriter).

    Each side's sequence numbers are taken relative to its own origin: the
    byte after its SYN when the handshake is seen, else its first segment.
    Its ack numbers are taken relative to the first ack it sends, which is
    the peer's ISN + 1 when the handshake is seen (in a passive open the
    SYN-ACK acknowledges the client's SYN; in an active open the handshake's
    ACK acknowledges the server's), so acks of the two sides become
    comparable too, and the ACK gate works in the relative space.  Relative
    stream offset 0 is the first byte after the SYN, as Wireshark counts.
    """

    __slots__ = ("seq_origin", "ack_origin")

    def __init__(self) -> None:
        self.seq_origin: list[int | None] = [None, None]   # per side (0 primary)
        self.ack_origin: list[int | None] = [None, None]

    def apply(self, side: int, pkt: Packet) -> None:
        """Rewrite ``pkt.seq``/``pkt.ack`` (not the frame) to relative numbers."""
        flags = pkt.flags
        origin = self.seq_origin[side]
        if origin is None:
            if flags & RST and not flags & SYN:
                return      # an RST's sequence number says nothing about the stream
            origin = (pkt.seq + 1) & _MASK if flags & SYN else pkt.seq
            self.seq_origin[side] = origin
        pkt.seq = (pkt.seq - origin) & _MASK
        if flags & ACK:
            a = self.ack_origin[side]
            if a is None:
                a = self.ack_origin[side] = pkt.ack
            pkt.ack = (pkt.ack - a) & _MASK

    def raw_seq(self, side: int, relative: int) -> int | None:
        origin = self.seq_origin[side]
        return None if origin is None else (relative + origin) & _MASK


class TcpStream:
    """Byte-stream comparison state of one TCP connection.

    ``p_buf``/``s_buf`` hold each side's bytes from the verification point
    ``base`` on, contiguous; what arrived beyond a gap waits in
    ``p_pending``/``s_pending``.  In the bulk case (segments in sequence on
    both sides, in step) the first copy of a segment is appended to its
    side's buffer, and its twin is compared with it where the twin stands
    in its frame (one ``startswith``), never buffered."""

    __slots__ = ("anchor", "base", "origin", "locked", "p_buf", "s_buf",
                 "p_pending", "s_pending", "p_end_max", "s_max_ack", "s_syn",
                 "s_rst", "p_rst", "p_rst_sent", "p_fin", "s_fin", "unknown",
                 "p_first", "s_first", "gap_bytes", "norm", "masks", "p_seen", "s_seen")

    anchor: int
    base: int
    origin: int
    locked: bool
    p_buf: bytearray
    s_buf: bytearray
    p_pending: list[tuple[int, bytes]]
    s_pending: list[tuple[int, bytes]]
    p_end_max: int
    s_max_ack: int
    s_syn: bool
    s_rst: bool
    p_rst: bool
    p_rst_sent: bool
    p_fin: int
    s_fin: int
    unknown: list[tuple[int, int]] | None
    p_first: int
    s_first: int
    gap_bytes: int
    norm: SeqNormalizer | None
    masks: tuple | None
    p_seen: bytes
    s_seen: bytes

    def __init__(self, normalize: bool = False, masks: tuple = ()) -> None:
        #: relative sequence numbers per side (--normalize-seq), or None
        self.norm = SeqNormalizer() if normalize else None
        #: the patterns of the TCP noise rules (--ignore), or None; applied
        #: where the streams differ (see advance and noise.stream_match)
        self.masks = tuple(rule.pattern for rule in masks) or None
        #: with masks: the last verified bytes of each side, for a rule's
        #: match to start in (noise.STREAM_LOOKBACK of them)
        self.p_seen = self.s_seen = b""
        # (positions not known yet are UNSET)
        self.anchor = UNSET      # an absolute sequence number near the action
        self.base = UNSET        # next absolute sequence number to verify
        self.origin = UNSET      # stream offset 0
        self.locked = False      # base fixed (both sides seen, SYN, or checkpoint)
        self.p_buf = bytearray()  # primary bytes from base on, contiguous
        self.s_buf = bytearray()
        self.p_pending = []      # (start, bytes) beyond a gap, or before lock
        self.s_pending = []
        self.p_end_max = UNSET   # highest primary end seen (the primary's snd_nxt)
        self.s_max_ack = UNSET   # highest ack the secondary sent (32-bit)
        self.s_syn = False
        self.s_rst = False
        self.p_rst = False       # a primary RST was released
        self.p_rst_sent = False  # a primary RST arrived
        self.p_fin = UNSET       # absolute position of each side's FIN
        self.s_fin = UNSET
        self.unknown = None      # [(start, end)] not captured (snaplen), either side
        self.p_first = UNSET     # lowest stream position each side showed before lock
        self.s_first = UNSET
        self.gap_bytes = 0       # skipped since the comparator last took them into its stats:
                                 # missing on both sides (capture loss)

    # -- sequence numbers -------------------------------------------------

    def unwrap(self, seq: int) -> int:
        """32-bit sequence number -> 64-bit absolute one, nearest the anchor.
        Absolute numbers are congruent to the raw ones modulo 2**32."""
        a = self.anchor
        if a == UNSET:
            a = self.anchor = _WRAP | seq
            return a
        d = (seq - a) & _MASK
        if d & _HALF:
            d -= _WRAP
        return a + d

    def ended(self, primary: bool) -> bool:
        """That side has closed this connection (sent a FIN or an RST): a SYN
        it sends now opens a new connection on the same 4-tuple."""
        if primary:
            return self.p_fin != UNSET or self.p_rst_sent
        return self.s_fin != UNSET or self.s_rst

    def finished(self) -> bool:
        """The connection is over: both FINs verified, or both sides reset."""
        if self.p_rst and self.s_rst:
            return True
        p_fin = self.p_fin
        return p_fin != UNSET and self.base > p_fin      # (an UNSET base is below any)

    def stream_offset(self, abs_seq: int | None = None) -> int | None:
        """Stream offset of ``abs_seq`` (default: the verification point),
        or None when not known."""
        origin = self.origin
        if origin == UNSET:
            return None
        if abs_seq is None:
            if self.base == UNSET:
                return None
            abs_seq = self.base
        return abs_seq - origin

    def ack_gate_open(self, pkt: Packet) -> bool:
        """The ACK gate for one primary segment: it may leave only once the
        secondary has acknowledged at least as much (a segment without ACK
        passes).  The primary must never acknowledge client data that the
        secondary has not: a failover could lose it."""
        return not pkt.flags & ACK or ack_covers(self.s_max_ack, pkt.ack)

    # -- feeding ----------------------------------------------------------

    def add_primary(self, pkt: Packet) -> None:
        """Place a primary segment (the caller queues it) in the stream and
        give it its stream positions ``seq_abs``/``end_abs``."""
        if self.norm is not None:
            self.norm.apply(0, pkt)
        flags = pkt.flags
        a = self.unwrap(pkt.seq)
        start = a + 1 if flags & SYN else a
        off, end = pkt.cmp_off, pkt.cmp_end
        dend = start + (end - off)
        end_abs = dend + 1 if flags & FIN else dend
        pkt.seq_abs = a
        pkt.end_abs = end_abs
        if end_abs > self.p_end_max:        # (UNSET is below any)
            self.p_end_max = end_abs
        if flags & RST:
            self.p_rst_sent = True
        if not self.locked:
            if flags & SYN:
                self._lock(start)
            elif not flags & RST:
                self._position(True, start)
        if flags & FIN:
            self.p_fin = dend
        if end > off:
            self._add_payload(True, pkt.data, start, off, end)

    def add_secondary(self, pkt: Packet) -> bool:
        """Place a secondary segment.  Returns True when the caller should
        queue it (it brings new bytes), False when it is absorbed (no payload,
        or only bytes already held or already verified)."""
        if self.norm is not None:
            self.norm.apply(1, pkt)
        flags = pkt.flags
        if flags & ACK:
            ack = pkt.ack
            m = self.s_max_ack
            if m == UNSET or ((ack - m) & _MASK) < _HALF:
                self.s_max_ack = ack
        if flags & SYN:
            self.s_syn = True
        if flags & RST:
            self.s_rst = True
        off, end = pkt.cmp_off, pkt.cmp_end
        if not self.locked and not flags & (SYN | RST):
            # where the secondary's stream stands, even from a pure ACK
            self._position(False, self.unwrap(pkt.seq))
        if end <= off and not flags & FIN:
            return False
        a = self.unwrap(pkt.seq)
        start = a + 1 if flags & SYN else a
        dend = start + (end - off)
        pkt.seq_abs = a
        pkt.end_abs = dend
        if flags & FIN:
            self.s_fin = dend
        if end <= off:
            return False
        return self._add_payload(False, pkt.data, start, off, end)

    def _add_payload(self, primary: bool, data: bytes, start: int, off: int, end: int) -> bool:
        """A segment's payload ``data[off:end]``, starting at stream position
        ``start``, joins its side's stream.  Returns whether it brought bytes
        not already held or verified."""
        buf = self.p_buf if primary else self.s_buf
        if (self.locked and end <= len(data)
                and start == self.base + len(buf)):     # type: ignore[operator]
            # in sequence: the bulk case
            pending = self.p_pending if primary else self.s_pending
            other = self.s_buf if primary else self.p_buf
            if (not buf and len(other) == end - off and self.masks is None
                    and data.startswith(other, off)):
                # In step: the twin is all the other side holds, and the
                # bytes are the same.  Verified where they stand, in the
                # frame: what advance() would find, without copying them
                # into this side's buffer first.
                other.clear()
                self.base = self.anchor = start + (end - off)
            else:
                buf += data[off:end]
            if pending:
                self._merge(buf, pending)
            return True
        payload = data[off:end]
        if len(payload) < end - off:
            payload = self._cut_short(start, payload, end - off)
        return self._add_data(primary, start, payload)

    def _cut_short(self, start: int, payload: bytes, length: int) -> bytes:
        """A segment captured short of its length (snaplen): remember which
        sequence range was not captured, and pad it so the stream keeps its
        shape.  Differences inside such a range are not divergences: nothing
        is known of those bytes."""
        unknown = self.unknown
        if unknown is None:
            unknown = self.unknown = []
        elif len(unknown) > 32 and self.base != UNSET:
            # forget ranges already behind the verification point
            base = self.base
            unknown = self.unknown = [r for r in unknown if r[1] > base]
        unknown.append((start + len(payload), start + length))
        return payload + bytes(length - len(payload))

    def _unknown_until(self, pos: int) -> int | None:
        """End of the uncaptured range holding ``pos``, or None."""
        if not self.unknown:
            return None
        best: int | None = None
        for lo, hi in self.unknown:
            if lo <= pos < hi and (best is None or hi > best):
                best = hi
        return best

    def _position(self, primary: bool, pos: int) -> None:
        """Before the stream origin is known: a side's segment says where its
        stream stands (data start, FIN, or a pure ACK's sequence number, which
        is the next byte that side will send).  Comparison starts at the lower
        of the two sides' *first* positions: each side's own order decides
        it, not how the two sides interleave (a lowest-so-far rule would let
        a stray early segment on one side move the origin depending on when
        the other side's first segment arrived)."""
        if primary:
            if self.p_first == UNSET:
                self.p_first = pos
        elif self.s_first == UNSET:
            self.s_first = pos
        p_first, s_first = self.p_first, self.s_first
        if p_first != UNSET and s_first != UNSET:
            self._lock(p_first if p_first < s_first else s_first)

    def _lock(self, base: int) -> None:
        self.base = base
        self.anchor = base
        self.p_seen = self.s_seen = b""
        if self.origin == UNSET:
            self.origin = base
        self.locked = True
        for primary in (True, False):
            pending = self.p_pending if primary else self.s_pending
            buf = self.p_buf if primary else self.s_buf
            pending[:] = [(start, payload) for start, payload in pending
                          if start + len(payload) > base]   # before the origin: nothing to verify
            del buf[:]
            self._merge(buf, pending)

    def _merge(self, buf: bytearray, pending: list[tuple[int, bytes]]) -> None:
        """Move what of ``pending`` now joins ``buf`` onto it."""
        base = self.base
        buf_end = base + len(buf)
        while pending and pending[0][0] <= buf_end:
            start, payload = pending.pop(0)
            stop = start + len(payload)
            if stop > buf_end:
                buf += payload[buf_end - start:]
                buf_end = stop

    def _add_data(self, primary: bool, start: int, payload: bytes) -> bool:
        pending = self.p_pending if primary else self.s_pending
        if not self.locked:
            insort(pending, (start, payload))
            self._position(primary, start)
            return True
        base = self.base
        buf = self.p_buf if primary else self.s_buf
        buf_end = base + len(buf)
        stop = start + len(payload)
        if stop <= buf_end:
            return False              # nothing new (already held or verified)
        if start <= buf_end:
            buf += payload[buf_end - start:] if start < buf_end else payload
            if pending:
                self._merge(buf, pending)
        else:
            insort(pending, (start, payload))
        return True

    # -- verifying ----------------------------------------------------------

    def advance(self) -> tuple[MiscompareCause, int] | None:
        """Verify as far as both sides go.  Returns None, or
        ``(cause, abs_seq)`` at the first divergence."""
        if not self.locked:
            return None
        p_buf, s_buf = self.p_buf, self.s_buf
        while True:
            base = self.base
            n_p, n_s = len(p_buf), len(s_buf)
            if n_p and n_s:
                # a prefix test without copying either buffer (in step, the
                # usual case, the two hold the same length: one comparison)
                if n_p == n_s:
                    n = n_p
                    same = p_buf == s_buf
                elif n_s < n_p:
                    n = n_s
                    same = p_buf.startswith(s_buf)
                else:
                    n = n_p
                    same = s_buf.startswith(p_buf)
                if not same:
                    i = first_difference(p_buf, s_buf)
                    skip_to = self._unknown_until(base + i)
                    if skip_to is not None:
                        # not captured on one side: step over what is unknown
                        n = min(n, skip_to - base)
                    elif self.masks is None:
                        return MiscompareCause.CONTENT, base + i
                    else:
                        hidden = self._hidden(i)
                        if hidden is None:
                            return MiscompareCause.CONTENT, base + i
                        if hidden == WAIT:
                            if not i:
                                return None       # a value that may go on: more bytes first
                            n = i
                        else:
                            n = min(n, i + hidden)
                if self.masks is not None:
                    self.p_seen = (self.p_seen + p_buf[:n])[-STREAM_LOOKBACK:]
                    self.s_seen = (self.s_seen + s_buf[:n])[-STREAM_LOOKBACK:]
                del p_buf[:n]
                del s_buf[:n]
                self.base = self.anchor = base + n
                continue
            p_fin, s_fin = self.p_fin, self.s_fin
            p_ended = p_fin == base      # (base is known here: never UNSET)
            s_ended = s_fin == base
            if p_ended and s_ended:
                self.base = base + 1   # both ended here: the FIN is verified
                continue
            p_pending, s_pending = self.p_pending, self.s_pending
            if (not p_buf and not s_buf and p_pending and s_pending
                    and p_pending[0][0] == s_pending[0][0] > base):
                # Both sides go on from the same place after the same hole: a
                # guest sends in order, so only a capture that lost packets
                # looks like this.  Nothing is known of the hole; skip it.
                gap_end = p_pending[0][0]
                self.gap_bytes += gap_end - base
                self.base = self.anchor = gap_end
                self.p_seen = self.s_seen = b""
                self._merge(p_buf, p_pending)
                self._merge(s_buf, s_pending)
                continue
            if (p_ended and s_buf) or (s_ended and p_buf):
                return MiscompareCause.STREAM_END, base
            return None

    def _hidden(self, i: int):
        """Whether the noise rules hide the difference ``i`` bytes past the
        verification point: see noise.stream_match.  Each side's text is
        what it verified last and what it sent since, up to MAX_HIDDEN bytes
        past the difference (a value longer than that is cut there)."""
        p_buf, s_buf = self.p_buf, self.s_buf
        base = self.base
        stop = i + MAX_HIDDEN
        p_ended = len(p_buf) > stop or self.p_fin == base + len(p_buf)
        s_ended = len(s_buf) > stop or self.s_fin == base + len(s_buf)
        p_text = self.p_seen + bytes(p_buf[:stop])
        s_text = self.s_seen + bytes(s_buf[:stop])
        return stream_match(self.masks, p_text, len(self.p_seen) + i, p_ended,
                            s_text, len(self.s_seen) + i, s_ended)

    def releasable(self, pkt: Packet) -> bool:
        """Whether the primary segment at the head of its (sequence-ordered)
        queue may leave now: every sequence number it covers is verified
        (its bytes, its SYN and FIN), the secondary reset too if it is an
        RST, and the ACK gate is open."""
        base = self.base
        if pkt.end_abs == pkt.seq_abs:
            # occupies no sequence space (pure ACK, bare RST): it only has
            # to wait for what was sent before it
            if base != UNSET and pkt.seq_abs > base:
                return False
        elif base == UNSET or pkt.end_abs > base:
            return False
        flags = pkt.flags
        if flags & SYN and not self.s_syn:
            return False
        if flags & RST and not self.s_rst:
            return False
        return self.ack_gate_open(pkt)

    def verified(self, pkt: Packet) -> bool:
        """Whether a queued secondary segment holds only verified bytes (it
        can be let go)."""
        base = self.base
        return base != UNSET and pkt.end_abs <= base

    def reset(self) -> None:
        """After a checkpoint: the secondary now holds the primary's state, so
        verification restarts at the primary's next sequence number."""
        self.p_buf = bytearray()
        self.s_buf = bytearray()
        self.p_pending = []
        self.s_pending = []
        self.s_max_ack = UNSET
        self.s_syn = self.s_rst = self.p_rst = self.p_rst_sent = False
        self.p_fin = self.s_fin = UNSET
        self.unknown = None
        self.p_first = self.s_first = UNSET
        if self.p_end_max != UNSET:
            self._lock(self.p_end_max)
        else:
            self.base = UNSET
            self.locked = False

    def skip_to_primary_end(self) -> None:
        """After a checkpoint of this connection alone
        (``Comparator.checkpoint_connection``): the primary's bytes so far
        have left unverified, so verification restarts at the primary's next
        sequence number; what the secondary sent beyond it (it was ahead) is
        kept, and what it sent below is forgotten.  Nothing else is reset:
        neither VM was, and the secondary's acks and flags still stand."""
        new_base = self.p_end_max
        assert new_base != UNSET
        old_base = self.base
        s_buf = self.s_buf
        ahead: bytes | bytearray
        if old_base != UNSET and self.locked and old_base + len(s_buf) > new_base:
            ahead = s_buf[new_base - old_base:] if new_base >= old_base else s_buf
        else:
            ahead = bytearray()
        pending = [(st, pl[max(0, new_base - st):] if st < new_base else pl)
                   for st, pl in self.s_pending if st + len(pl) > new_base]
        self.p_buf = bytearray()
        self.p_pending = []
        self.p_fin = UNSET
        self.p_seen = self.s_seen = b""
        if self.s_fin != UNSET and self.s_fin < new_base:
            self.s_fin = UNSET
        self.p_first = self.s_first = UNSET
        self.base = self.anchor = new_base
        if self.origin == UNSET:
            self.origin = new_base
        self.locked = True
        self.s_buf = bytearray(ahead)
        self.s_pending = [(max(st, new_base), pl) for st, pl in pending]
        if self.unknown:
            self.unknown = [r for r in self.unknown if r[1] > new_base] or None
        self._merge(self.s_buf, self.s_pending)

    @staticmethod
    def find(queue: Iterable[Packet], abs_seq: int) -> tuple[Packet | None, int]:
        """The queued segment whose payload holds ``abs_seq``, and the byte's
        offset inside the segment's data; ``(None, -1)`` if none does."""
        for pkt in queue:
            start = pkt.seq_abs + (1 if pkt.flags & SYN else 0)
            plen = pkt.cmp_end - pkt.cmp_off
            if start <= abs_seq < start + plen:
                return pkt, pkt.cmp_off + (abs_seq - start)
        return None, -1


def insert_segment(queue: list[Packet], pkt: Packet) -> None:
    """Keep a TCP queue in sequence order (stable for equal numbers)."""
    if not queue or queue[-1].seq_abs <= pkt.seq_abs:
        queue.append(pkt)
    else:
        insort(queue, pkt, key=_seq_key)


def datagrams_equal(p: Packet, s: Packet) -> bool:
    """Whether two datagrams compare equal (their L4 parts, or ARP bodies)."""
    length = p.cmp_end - p.cmp_off
    if s.cmp_end - s.cmp_off != length:
        return False
    a, b = p.data, s.data
    if p.cmp_end <= len(a) and s.cmp_end <= len(b):
        # both whole: the usual case
        return a[p.cmp_off:p.cmp_end] == b[s.cmp_off:s.cmp_end]
    # a capture cut one of them short (snaplen): the lengths in their headers
    # agree, so compare what both captured
    pa = a[p.cmp_off:p.cmp_end]
    sb = b[s.cmp_off:s.cmp_end]
    n = min(len(pa), len(sb))
    return pa[:n] == sb[:n]


def datagram_difference(p: Packet, s: Packet) -> tuple[MiscompareCause, int]:
    """(cause, offset in the compared region) for two unequal datagrams."""
    a = p.data[p.cmp_off:p.cmp_end]
    b = s.data[s.cmp_off:s.cmp_end]
    if p.cmp_end - p.cmp_off != s.cmp_end - s.cmp_off:
        return MiscompareCause.LENGTH, first_difference(a, b)
    n = min(len(a), len(b))
    return MiscompareCause.CONTENT, first_difference(a[:n], b[:n])
