"""A miscompare as reported (:class:`MiscompareRecord`), where its two
frames differ, and how a frame is named in JSON: the parts of the report
that serve's event log needs too, kept free of rich (serve imports this at
its first miscompare, on the hot path of the checkpoint request that
follows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from .core import Miscompare

_MERGE_GAP = 8             # differing bytes closer than this are one region


@dataclass
class FrameDiff:
    """Where the two frames of a miscompare differ, in each frame's own
    offsets (the Ethernet header at 0).

    ``shift`` aligns them: byte ``i`` of the primary frame is compared with
    byte ``i + shift`` of the secondary (the compared parts: a datagram's L4
    part, the TCP payload at the same stream offsets).  ``regions`` are the
    runs of differing bytes, in primary offsets (secondary ones when there is
    no primary frame).  ``p_mark``/``s_mark`` point at the byte that matters:
    the first differing one, or, when only a checksum differs before it
    because the payload does, the payload's first differing byte."""
    p_frame: bytes
    s_frame: bytes
    shift: int = 0
    regions: list = field(default_factory=list)
    differing: set = field(default_factory=set)     # primary offsets of differing bytes
    p_only: tuple = (0, 0)      # primary bytes the secondary has no twin for
    s_only: tuple = (0, 0)      # and the other way round (secondary offsets)
    p_mark: int = -1
    s_mark: int = -1
    checksum: str = ""          # "UDP checksum" / "ICMP checksum" when it follows the payload
    payload_offset: int | None = None   # of p_mark, in the L4 part (datagrams)


_CHECKSUMS = {"udp": (6, 8), "icmp": (2, 4)}


def payload_marks(e) -> tuple:
    """(primary, secondary frame offset of the first differing byte that is
    not a checksum, and the checksum's name when one differs before it).
    A UDP or ICMP checksum differs whenever the payload does: the byte that
    matters is the payload's."""
    p, s = e.primary, e.secondary
    p_mark = e.primary_offset - p.l2 if p is not None and e.primary_offset >= 0 else None
    s_mark = e.secondary_offset - s.l2 if s is not None and e.secondary_offset >= 0 else None
    span = _CHECKSUMS.get(e.kind)
    if span is None or p is None or s is None or e.stream_offset is None \
            or not span[0] <= e.stream_offset < span[1]:
        return p_mark, s_mark, ""
    a = p.data[p.cmp_off:p.cmp_end]
    b = s.data[s.cmp_off:s.cmp_end]
    n = min(len(a), len(b))
    k = span[1]
    while k < n and a[k] == b[k]:
        k += 1
    if k == n and len(a) == len(b):
        return None, None, ""       # only the checksum differs
    name = "UDP checksum" if e.kind == "udp" else (
        "ICMPv6 checksum" if e.key[-1:] == b"6" else "ICMP checksum")
    return p.cmp_off - p.l2 + k, s.cmp_off - s.l2 + k, name


def frame_diff(e) -> FrameDiff:
    p, s = e.primary, e.secondary
    p_frame = p.data[p.l2:] if p is not None else b""
    s_frame = s.data[s.l2:] if s is not None else b""
    d = FrameDiff(p_frame, s_frame)
    d.p_mark = e.primary_offset - p.l2 if p is not None and e.primary_offset >= 0 else -1
    d.s_mark = e.secondary_offset - s.l2 if s is not None and e.secondary_offset >= 0 else -1
    if p is None or s is None:
        return d
    p_lo, p_hi = p.cmp_off - p.l2, min(p.cmp_end - p.l2, len(p_frame))
    s_lo, s_hi = s.cmp_off - s.l2, min(s.cmp_end - s.l2, len(s_frame))
    if d.p_mark >= 0 and d.s_mark >= 0:
        d.shift = d.s_mark - d.p_mark
    else:
        d.shift = s_lo - p_lo
    shift = d.shift
    lo, hi = max(p_lo, s_lo - shift), min(p_hi, s_hi - shift)
    diff = _differing(p_frame, s_frame, lo, hi, shift)
    if e.kind != "tcp" or e.cause != "content":
        # one side longer: its extra bytes differ too (a stream's segments
        # merely end in different places)
        if p_hi > max(hi, lo):
            d.p_only = (max(hi, lo), p_hi)
        if s_hi > max(hi, lo) + shift:
            d.s_only = (max(hi, lo) + shift, s_hi)
    d.differing = set(diff)
    positions = diff + list(range(*d.p_only))
    start = prev = None
    for i in positions:
        if start is None:
            start = prev = i
        elif i - prev > _MERGE_GAP:
            d.regions.append((start, prev + 1))
            start = prev = i
        else:
            prev = i
    if start is not None:
        d.regions.append((start, prev + 1))
    if not d.regions and d.s_only[1] > d.s_only[0]:
        d.regions.append((d.s_only[0] - shift, d.s_only[1] - shift))
    # a checksum that differs because the payload does: point at the payload
    p_mark, s_mark, d.checksum = payload_marks(e)
    if d.checksum:
        d.p_mark, d.s_mark = p_mark, s_mark
        d.payload_offset = p_mark - p_lo
    return d


#: differing bytes looked at per hexdump (a frame that differs everywhere
#: shows its first regions, and "more")
_MAX_DIFFERING = 4096


def _differing(a: bytes, b: bytes, lo: int, hi: int, shift: int) -> list[int]:
    """Offsets i in [lo, hi) where a[i] != b[i + shift]: equal 64-byte
    blocks are skipped whole, so a 64 KiB frame with one change is cheap."""
    out = []
    block = 64
    for start in range(lo, hi, block):
        stop = min(start + block, hi)
        if a[start:stop] == b[start + shift:stop + shift]:
            continue
        out.extend(i for i in range(start, stop) if a[i] != b[i + shift])
        if len(out) >= _MAX_DIFFERING:
            break
    return out


def frame_json(pkt, offset, numbers, payload_offset, with_hex: bool = True) -> dict | None:
    """One side of a miscompare in JSON: its frame's number (Wireshark's,
    from 1), length, the offset of the first differing byte, of the first
    differing byte that is not a checksum, and the frame in hex."""
    if pkt is None:
        return None
    frame = pkt.data[pkt.l2:]
    d = {"frame_number": numbers[0] if numbers else None, "length": len(frame),
         "offset": offset - pkt.l2 if offset >= 0 else None,
         "payload_offset": payload_offset}
    if len(numbers) > 1:
        d["fragment_frame_numbers"] = list(numbers)
    if with_hex:
        d["frame_hex"] = frame.hex()
    return d


@dataclass
class MiscompareRecord:
    """A miscompare as reported: the core's event plus where it happened.

    ``primary_frames``/``secondary_frames`` are the frame numbers of the
    frames holding the differing byte, numbered from 1 as Wireshark numbers
    them in that capture (``serve``: in arrival order on that input); more
    than one for a datagram reassembled from fragments, none when that side
    has no frame there."""
    event: Miscompare
    flow: str
    time_ms: float
    primary_frames: tuple = ()
    secondary_frames: tuple = ()

    @cached_property
    def explanation(self):
        """What differs in protocol terms (``colo_cli.explain``), or None;
        decoded once, and only for a miscompare that is reported."""
        from .explain import explain
        return explain(self.event)
