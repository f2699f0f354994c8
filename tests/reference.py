"""A deliberately simple reference comparator, for differential tests of the
core (``colo_cli.core.Comparator``).

It states the comparison rules as plainly as possible, with no speed tricks
and no code shared with the core: frames are parsed with dpkt, each side's
TCP stream is a dict from stream position to byte, every decision is
recomputed from those.  It covers what ``test_reference.py`` generates:

* untagged IPv4 UDP and TCP, well formed, and frames too short to be
  Ethernet (not comparable: a primary one leaves at once);
* one TCP connection per 4-tuple, each side's segments sent in sequence
  order (a secondary may drop, repeat or resegment some), with or without a
  handshake and a FIN; no RST;
* no timeouts, no queue, table or memory bounds, no checkpoints
  (``CheckpointMode.EXTERNAL``); at the end, what is held leaves with reason
  ``end``.

The rules (``shared/design`` and ``core/compare.py``, in words):

* UDP: per flow, the i-th primary datagram is compared with the i-th
  secondary one, from the UDP header to the end of the IP payload; equal:
  the primary one leaves ("match") when the later of the two arrives; the
  first unequal pair is a miscompare (``length`` if the sizes differ, else
  ``content``, at the first differing byte, with the pair's index) and
  nothing more of that flow leaves before the end.
* TCP: a position of the stream is verified when both sides have sent a
  byte there and the bytes are equal, and every position before it is
  verified; a FIN is verified when both sides ended at the same position.
  The first position where both sides have a byte and the bytes differ is a
  ``content`` miscompare; a side that ended where the other has a byte is a
  ``stream-end`` miscompare; after a miscompare nothing more is verified.
  Positions count from the byte after the primary's SYN, or from the first
  byte of the stream when there is no handshake.  A primary segment leaves
  ("match"), in sequence order, as soon as every position it covers is
  verified (a segment with no payload: every position before it), the
  secondary has sent a SYN if it is a SYN, and, if it has the ACK flag, the
  secondary has acknowledged at least as much (the highest ack the
  secondary sent, in 32-bit serial-number order).
"""

from __future__ import annotations

import dpkt

MASK = 0xFFFFFFFF
HALF = 0x80000000

SYN = 0x02
FIN = 0x01
ACK = 0x10


def _serial_ge(a: int, b: int) -> bool:
    """a >= b in 32-bit serial-number arithmetic."""
    return ((a - b) & MASK) < HALF


class _UdpFlow:
    def __init__(self):
        self.primary = []      # (index, region) waiting
        self.secondary = []    # region waiting
        self.pairs = 0
        self.diverged = False


class _TcpFlow:
    def __init__(self):
        self.ref = None        # a raw sequence number: positions are relative to it
        self.origin = None
        self.p_first = None
        self.s_first = None
        self.p_bytes = {}      # position -> byte
        self.s_bytes = {}
        self.p_fin = None      # position where the primary ended
        self.s_fin = None
        self.s_syn = False
        self.s_max_ack = None
        self.base = None       # first position not verified
        self.diverged = False
        self.waiting = []      # primary segments: (index, start, end, flags, ack)

    def position(self, seq: int) -> int:
        if self.ref is None:
            self.ref = seq
        d = (seq - self.ref) & MASK
        return d - (1 << 32) if d >= HALF else d


class ReferenceComparator:
    """Feed it ``receive(primary, frame, now_ms)`` then ``finish(now_ms)``;
    ``released`` maps each primary frame's index to ``(reason, now_ms)`` and
    ``miscompares`` lists ``(flow, cause, offset, datagram_index, now_ms)``."""

    def __init__(self):
        self.flows = {}
        self.index = [0, 0]
        self.released = {}
        self.order = {}        # flow -> primary indexes in the order they left
        self.miscompares = []

    # -- input ------------------------------------------------------------

    def receive(self, primary: bool, frame: bytes, now_ms: float) -> None:
        side = 0 if primary else 1
        index = self.index[side]
        self.index[side] += 1
        if len(frame) < 14:
            if primary:
                self._leave(None, index, "bypass", now_ms)
            return
        ip = dpkt.ethernet.Ethernet(frame).data
        assert isinstance(ip, dpkt.ip.IP) and ip.hl == 5, "outside the reference's scope"
        l4 = ip.data
        raw_l4 = frame[14 + 20:14 + ip.len]
        flow = (ip.src, ip.dst, l4.sport, l4.dport, ip.p)
        if ip.p == 17:
            self._udp(flow, primary, index, raw_l4, now_ms)
        else:
            payload = raw_l4[l4.off * 4:]
            self._tcp(flow, primary, index, l4.seq, l4.ack, l4.flags, payload, now_ms)

    def finish(self, now_ms: float) -> None:
        for flow, state in self.flows.items():
            if isinstance(state, _UdpFlow):
                for index, _ in state.primary:
                    self._leave(flow, index, "end", now_ms)
            else:
                for index, *_ in state.waiting:
                    self._leave(flow, index, "end", now_ms)

    def _leave(self, flow, index, reason, now_ms):
        assert index not in self.released
        self.released[index] = (reason, now_ms)
        self.order.setdefault(flow, []).append(index)

    # -- UDP --------------------------------------------------------------

    def _udp(self, flow, primary, index, region, now_ms):
        state = self.flows.setdefault(flow, _UdpFlow())
        if primary:
            state.primary.append((index, region))
        else:
            state.secondary.append(region)
        while not state.diverged and state.primary and state.secondary:
            p_index, p_region = state.primary[0]
            s_region = state.secondary[0]
            if p_region == s_region:
                state.primary.pop(0)
                state.secondary.pop(0)
                state.pairs += 1
                self._leave(flow, p_index, "match", now_ms)
                continue
            at = next((i for i, (a, b) in enumerate(zip(p_region, s_region)) if a != b),
                      min(len(p_region), len(s_region)))
            cause = "length" if len(p_region) != len(s_region) else "content"
            self.miscompares.append((flow, cause, at, state.pairs, now_ms))
            state.diverged = True

    # -- TCP --------------------------------------------------------------

    def _tcp(self, flow, primary, index, seq, ack, flags, payload, now_ms):
        state = self.flows.setdefault(flow, _TcpFlow())
        pos = state.position(seq)
        start = pos + 1 if flags & SYN else pos
        end = start + len(payload)
        if primary:
            if flags & SYN and state.origin is None:
                state.origin = start
            if state.p_first is None:
                state.p_first = start
            for i, b in enumerate(payload):
                state.p_bytes.setdefault(start + i, b)
            if flags & FIN:
                state.p_fin = end
            state.waiting.append((index, pos, end + (1 if flags & FIN else 0), flags, ack))
        else:
            if flags & SYN:
                state.s_syn = True
            elif state.s_first is None:
                state.s_first = start
            if flags & ACK and (state.s_max_ack is None or _serial_ge(ack, state.s_max_ack)):
                state.s_max_ack = ack
            for i, b in enumerate(payload):
                state.s_bytes.setdefault(start + i, b)
            if flags & FIN:
                state.s_fin = end
        if state.origin is None and state.p_first is not None and state.s_first is not None:
            state.origin = min(state.p_first, state.s_first)
        if state.origin is None:
            return
        if state.base is None:
            state.base = state.origin
        self._verify(flow, state, now_ms)
        while state.waiting and self._may_leave(state, *state.waiting[0][1:]):
            self._leave(flow, state.waiting.pop(0)[0], "match", now_ms)

    def _verify(self, flow, state, now_ms):
        while not state.diverged:
            b = state.base
            if b in state.p_bytes and b in state.s_bytes:
                if state.p_bytes[b] != state.s_bytes[b]:
                    self.miscompares.append((flow, "content", b - state.origin, None, now_ms))
                    state.diverged = True
                    return
                state.base = b + 1
            elif state.p_fin == b and state.s_fin == b:
                state.base = b + 1           # both ended here
            elif (state.p_fin == b and b in state.s_bytes) or (state.s_fin == b and b in state.p_bytes):
                self.miscompares.append((flow, "stream-end", b - state.origin, None, now_ms))
                state.diverged = True
                return
            else:
                return

    @staticmethod
    def _may_leave(state, pos, end, flags, ack):
        base = state.base
        if end == pos:
            if pos > base:
                return False          # sent after bytes not yet verified
        elif end > base:
            return False
        if flags & SYN and not state.s_syn:
            return False
        if flags & ACK and (state.s_max_ack is None or not _serial_ge(state.s_max_ack, ack)):
            return False
        return True
