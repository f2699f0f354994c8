"""``colo-compare replay``: the comparison core driven by two captures.

The clock is each capture's own timestamps, relative to its first packet:
QEMU's filter-dump stamps with the VM's virtual clock, so the two files'
time bases are unrelated (``docs/captures.md``, QEMU's filter-dump).  The two
relative timelines are merged and fed to the core as ``now_ms``; timer ticks
are run in between exactly as ``serve``'s event loop would, so the decisions
are those ``serve`` would have taken for the same arrival times.

A checkpoint request is answered the way a COLO system answers it, at once
(flush and reset), on the connection that raised it, so later divergences on
that connection are found and reported separately; other connections are
left alone: the core's ``CheckpointMode.LOCAL``.  ``hold=True`` instead holds
everything until the end (``CheckpointMode.EXTERNAL``, with nobody to
checkpoint).

Captures of every link type ``linklayer`` reads are compared from the
network layer: the link header is read here and the core told where the
network header starts.  A :class:`Selection` says which frames are compared
at all, the same for both captures: the direction (Linux cooked captures
record it), a libpcap filter, a time window on each capture's own timeline.
What it leaves out is counted per side and reason, never given to the core.
A record whose link type is not its capture's first (pcapng interfaces of
several link types) travels as a :class:`LinkFrame`, bytes that carry their
link type, so every output can write it under its own.
"""

from __future__ import annotations

import contextlib
import json
import sys
from array import array
from bisect import bisect_right
from dataclasses import dataclass, field

from . import linklayer
from .core import (PRIMARY, SECONDARY, Bypassed, CheckpointMode, CheckpointRequested,
                   Comparator, Config, InternalError, Matched, Miscompare, Released,
                   ReleaseReason)
from .errors import EXIT_DIVERGE, EXIT_SAME, EXIT_TROUBLE, one_line
from .flows import format_key
from .frames import MiscompareRecord
from .options import ReplayOptions

# (module names: the per-event path compares them without an attribute lookup)
RELEASE_MATCH = ReleaseReason.MATCH
RELEASE_END = ReleaseReason.END

#: miscompares kept with their frames for hexdumps and JSON; the rest are
#: counted only, so a capture pair that differs everywhere stays in bounded
#: memory.
DEFAULT_DETAIL_LIMIT = 1000


#: Why a captured frame was not given to the comparator (``SideInfo.left_out``).
LEFT_OUT_DIRECTION = "direction"
LEFT_OUT_FILTER = "filter"
LEFT_OUT_WINDOW = "window"


@dataclass
class Selection:
    """Which captured frames are compared; the same for both captures.

    ``direction``: ``"out"`` (the default) compares only what the captured
    host sent, where the capture says (Linux cooked captures, ``tcpdump -i
    any``: packet type "outgoing"); ``"in"`` only what it received; ``None``
    both.  Frames whose link type records no direction are always kept.
    ``bpf``: a ``bpf.BpfFilter`` (tcpdump expression); ``start_ns`` /
    ``end_ns``: a window on each capture's own timeline, relative to its
    first frame (``end_ns`` excluded)."""
    direction: str | None = linklayer.OUTGOING
    bpf: object = None
    start_ns: int | None = None
    end_ns: int | None = None


class LinkFrame(bytes):
    """A frame whose link type is not its capture's first: bytes with a
    ``linktype`` attribute, made only for such frames."""


@dataclass
class SideInfo:
    name: str
    format: str = ""
    linktype: int = 1
    frames: int = 0          # frames given to the comparator
    bytes: int = 0
    first_ts_ns: int | None = None
    last_ts_ns: int | None = None
    warnings: list = field(default_factory=list)
    compression: str = ""
    #: frames not compared, by reason (LEFT_OUT_*)
    left_out: dict = field(default_factory=dict)
    #: the capture was not read past --end (its timeline only goes forward)
    stopped_at_end: bool = False

    @property
    def duration_ms(self) -> float:
        if self.first_ts_ns is None:
            return 0.0
        return (self.last_ts_ns - self.first_ts_ns) / 1e6


class FrameNumbers:
    """The frame number Wireshark gives each frame of one capture, from the
    core's index (which counts the frames fed to the core from 0).

    The two differ by one, and by the packets the reader skipped (on a
    pcapng interface that is not Ethernet): only the places where that
    difference changes are kept, so a capture read whole costs nothing and
    memory stays small whatever its size."""

    __slots__ = ("_starts", "_deltas")

    def __init__(self) -> None:
        self._starts = array("q")  # index where the difference changes
        self._deltas = array("q")  # frame number - index from there on (1 before any)

    def mark(self, index: int, delta: int) -> None:
        """From the frame of core ``index`` on, frame number = index + delta
        (the caller counts, and calls only when the difference changes)."""
        self._starts.append(index)
        self._deltas.append(delta)

    def __call__(self, index: int) -> int:
        k = bisect_right(self._starts, index)
        return index + (self._deltas[k - 1] if k else 1)


def _numbers(pkt, numbering) -> tuple:
    """The frame numbers of the frames a packet stands for (a reassembled
    datagram: its fragments), or () when there is no packet."""
    if pkt is None:
        return ()
    if pkt.fragments is not None:
        return tuple(numbering(f.index) for f in pkt.fragments)
    return (numbering(pkt.index),)


@dataclass
class ReplayResult:
    primary: SideInfo
    secondary: SideInfo
    config: Config
    hold: bool
    vnet_hdr_len: int
    comparator: Comparator
    miscompares: list = field(default_factory=list)   # MiscompareRecord, up to the detail limit
    miscompares_total: int = 0
    requests: list = field(default_factory=list)      # (time_ms, cause, flow), up to the limit
    requests_total: int = 0
    unmatched_primary: int = 0
    unmatched_secondary: int = 0
    internal_errors: int = 0     # frames the comparator failed on (let go, counted)
    # key -> {"miscompares": n, "timeouts": n, "unmatched": primary frames
    # that left without a match}
    per_flow: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)          # hints about the input
    #: per side: the core's frame index -> Wireshark's frame number
    frame_numbers: tuple = field(default_factory=lambda: (FrameNumbers(), FrameNumbers()))
    detail_limit: int = DEFAULT_DETAIL_LIMIT

    @property
    def stats(self):
        return self.comparator.stats

    @property
    def diverged(self) -> bool:
        return bool(self.miscompares_total or self.requests_total
                    or self.unmatched_primary or self.unmatched_secondary)

    @property
    def compared_primary(self) -> int:
        """Primary frames that were compared (not passed through unparsed)."""
        return self.primary.frames - sum(self.stats.bypassed.values())

    @property
    def verdict(self) -> str:
        """``diverge``; ``incomparable`` when less than half of the primary's
        frames could be compared at all (a match would say little: a wrong
        --vnet-hdr-len, a link type read wrongly), or when there was nothing
        to compare (two captures without a frame, or a --filter that
        selected none: that is not two replicas that agree); else ``match``."""
        if self.diverged:
            return "diverge"
        if self.compared_primary * 2 < self.primary.frames or not self.primary.frames:
            return "incomparable"
        return "match"


#: Steps of a capture's clock worth a warning.  Forward, time passed (a VM
#: paused over a weekend, a quiet night): kept, as both replicas' captures
#: share it, and cheap, since the core's timer skips the idle ticks.  A single
#: record dated far ahead of both its neighbours is a corrupt timestamp: it is
#: taken as the time of the frame before it.  Back, beyond JUMP_BACK_NS: a
#: clock step; the timeline goes on from the frame before, so the spacing of
#: what follows is kept.  Smaller backward steps (merged files, several
#: interfaces) count as no time at all.
JUMP_FORWARD_NS = 3600 * 10**9
JUMP_BACK_NS = 10**9
#: A step forward longer than this is no time that passed but a broken
#: clock (a pcapng if_tsoffset or a coarse if_tsresol gone wrong: 64-bit
#: nanoseconds reach 584 years): handled as a step back is.  Kept, it would
#: also take the timeline past what a float of milliseconds holds exactly
#: (2**53 ms, 285,000 years), where scan ticks no longer move on.
JUMP_BROKEN_NS = 1000 * 365 * 86400 * 10**9
_MAX_JUMP_WARNINGS = 5


def _timeline(reader, info: SideInfo, side, selection: Selection, numbers: FrameNumbers,
              vnet_hdr_len: int = 0):
    """``(rel_ns, side, ts_ns, data, cut, offset_ns, l3, ethertype)`` for
    the frames of one capture that are compared, in file order (each
    frame's Wireshark number goes to ``numbers`` as it is yielded):
    ``rel_ns`` is the frame's time on the capture's own timeline, relative
    to its first frame, never decreasing; ``offset_ns`` what the clock steps
    left out so far add to the capture's clock (``rel_ns == ts_ns +
    offset_ns - first`` but for a corrupt timestamp); ``l3``/``ethertype``
    what the core needs to read a frame that is not Ethernet (``l3`` -1 for
    Ethernet).  Fills
    ``info`` as it goes; warnings name the frame."""
    # An Ethernet pcap with nothing to select (the common case) costs
    # nothing more here; otherwise each frame goes through pick().
    pick = None
    if (selection.start_ns is not None or selection.end_ns is not None
            or selection.bpf is not None or getattr(reader, "format", "pcap") != "pcap"
            or info.linktype != linklayer.ETHERNET):
        pick = _picker(info, selection, vnet_hdr_len)
    frames = size = 0
    # the frame numbers' lead over the frames yielded so far (``frames``,
    # the core's next index), kept here so that the common case costs one
    # comparison
    lead = 1
    for number, rel, ts_ns, data, orig_len, linktype, offset in _clock(reader, info):
        item = (rel, side, ts_ns, data, orig_len > len(data), offset, -1, 0)
        if pick is not None:
            item = pick(item, orig_len, linktype)
            if item is None:
                continue
            if item is _STOP:
                return
        if number - frames != lead:
            lead = number - frames
            numbers.mark(frames, lead)
        frames += 1
        size += len(data)
        info.frames = frames
        info.bytes = size
        yield item


def _clock(reader, info: SideInfo):
    """``(number, rel_ns, ts_ns, data, orig_len, linktype, offset_ns)`` for
    every frame of a capture, in file order, with its time on the capture's
    own timeline (see ``_timeline`` and JUMP_FORWARD_NS): a frame far ahead
    of the one before is held until the next shows whether the clock jumped
    or its timestamp is corrupt.  Clock jumps are warnings in ``info``."""
    first = None
    prev = 0                # rel of the frame before
    offset = 0
    held = None             # a frame far ahead of the one before: corrupt, or a real gap?
    warned = 0
    count = 0

    def warn(text):
        nonlocal warned
        warned += 1
        if warned <= _MAX_JUMP_WARNINGS:
            info.warnings.append(f"{info.name}: {text}")
        elif warned == _MAX_JUMP_WARNINGS + 1:
            info.warnings.append(f"{info.name}: more clock jumps (not listed)")

    def jumped(h_number, h_rel):
        """The held frame, ``h_rel`` far ahead of the frame before it, was a
        clock that jumped: by how much the timeline leaves out (0: the
        time passed, it stays)."""
        if h_rel - prev > JUMP_BROKEN_NS:
            warn(f"frame {h_number}: the clock jumps {_span(h_rel - prev)} forward, more "
                 "than any clock can; the timeline goes on from the frame before")
            return h_rel - prev
        warn(f"frame {h_number}: the clock jumps {_span(h_rel - prev)} forward")
        return 0

    for number, ts_ns, data, orig_len, linktype in reader:
        if first is None:
            first = ts_ns
            info.first_ts_ns = ts_ns
        info.last_ts_ns = ts_ns
        count += 1
        rel = ts_ns + offset - first
        if held is not None:
            h_number, h_rel, h_ts, h_data, h_orig, h_lt = held
            held = None
            if -JUMP_BACK_NS <= rel - prev <= JUMP_FORWARD_NS:
                # back to where the frame before the held one was: the held
                # one's timestamp is wrong, not the clock
                warn(f"frame {h_number}: its timestamp is {_span(h_rel - prev)} ahead of the "
                     "frames around it; taken as the time of the frame before")
                h_rel = prev
            else:
                left_out = jumped(h_number, h_rel)
                offset -= left_out
                rel -= left_out
                h_rel -= left_out
                prev = h_rel
            yield h_number, h_rel, h_ts, h_data, h_orig, h_lt, offset
        step = rel - prev
        if step > JUMP_FORWARD_NS and count > 1:
            held = (number, rel, ts_ns, data, orig_len, linktype)
            continue
        if step < -JUMP_BACK_NS:
            warn(f"frame {number}: the clock jumps {_span(-step)} back; the timeline goes on "
                 "from the frame before")
            offset -= step
            rel = prev
        elif step < 0:
            rel = prev
        prev = rel
        yield number, rel, ts_ns, data, orig_len, linktype, offset
    if held is not None:
        h_number, h_rel, h_ts, h_data, h_orig, h_lt = held
        left_out = jumped(h_number, h_rel)
        offset -= left_out
        yield h_number, h_rel - left_out, h_ts, h_data, h_orig, h_lt, offset


#: pick() says: past --end, read no further
_STOP = object()


def _picker(info: SideInfo, selection: Selection, vnet_hdr_len: int):
    """``pick(item, orig_len, linktype)``: the timeline item of a frame that
    is compared, with its link header read (``l3``, ``ethertype``); None
    for a frame the selection leaves out (counted in ``info.left_out``);
    ``_STOP`` past ``--end``.  A frame of another link type than its
    capture's first becomes a LinkFrame."""
    first_linktype = info.linktype
    decoders = {}
    start_ns, end_ns = selection.start_ns, selection.end_ns
    keep_direction = selection.direction
    bpf = selection.bpf
    left_out = info.left_out

    def pick(item, orig_len, linktype):
        rel, side, ts_ns, data, cut, offset, _l3, _etype = item
        if end_ns is not None and rel >= end_ns:
            # the timeline never goes back: nothing later is in the window
            info.stopped_at_end = True
            return _STOP
        if start_ns is not None and rel < start_ns:
            left_out[LEFT_OUT_WINDOW] = left_out.get(LEFT_OUT_WINDOW, 0) + 1
            return None
        if linktype == linklayer.ETHERNET:
            l3, ethertype, direction = -1, 0, None
        else:
            decode = decoders.get(linktype)
            if decode is None:
                decode = decoders[linktype] = linklayer.decoder(linktype)
            l3, ethertype, direction = decode(data, vnet_hdr_len)
        if direction is not None and keep_direction is not None and direction != keep_direction:
            left_out[LEFT_OUT_DIRECTION] = left_out.get(LEFT_OUT_DIRECTION, 0) + 1
            return None
        if bpf is not None and not bpf.matches(
                linktype, data[vnet_hdr_len:] if vnet_hdr_len else data, orig_len - vnet_hdr_len):
            left_out[LEFT_OUT_FILTER] = left_out.get(LEFT_OUT_FILTER, 0) + 1
            return None
        if linktype != first_linktype:
            data = LinkFrame(data)
            data.linktype = linktype
        return rel, side, ts_ns, data, cut, offset, l3, ethertype
    return pick


def _merge(primary, secondary):
    """The two timelines' items in time order, the primary's first at equal
    times (what heapq.merge on ``(rel_ns, side)`` gives, for two inputs at a
    fraction of its cost per frame)."""
    p = next(primary, None)
    s = next(secondary, None)
    while p is not None and s is not None:
        if s[0] < p[0]:
            yield s
            s = next(secondary, None)
        else:
            yield p
            p = next(primary, None)
    if p is not None:
        yield p
        yield from primary
    if s is not None:
        yield s
        yield from secondary


def _span(ns: int) -> str:
    s = ns / 1e9
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600),
                       ("minutes", 60)):
        value = f"{s / size:.3g}"
        if float(value) >= 1:
            return f"{value} {unit[:-1] if value == '1' else unit}"
    return f"{s:.3g} s"


def replay(primary_reader, secondary_reader, config: Config | None = None, *,
           hold: bool = False, vnet_hdr_len: int = 0,
           detail_limit: int = DEFAULT_DETAIL_LIMIT,
           on_release=None, on_unmatched=None, on_progress=None,
           on_miscompare=None, selection: Selection | None = None) -> ReplayResult:
    """Compare two captures (the frames ``selection`` selects; default: all
    but the incoming ones of captures that record a direction).

    ``on_release(ts_ns, data)`` is called for every primary frame in the
    order it would have left (matched, bypassed, flushed), with the time it
    would have left on the primary's clock; ``on_unmatched(ts_ns, data)`` for
    the primary frames that left without a match.  ``vnet_hdr_len`` bytes at
    the start of every captured frame are a header to keep but not compare
    (a filter-dump of a netdev with virtio-net headers).
    ``on_miscompare(number, record, p_ts_ns, s_ts_ns, s_on_primary_ns)`` is
    called for every miscompare (not only those kept in the result), with
    the capture times of its two frames, and the secondary's time on the
    primary's clock (the two captures' clocks are unrelated).
    """
    config = config or Config()
    selection = selection or Selection()
    comparator = Comparator(config, compact=True,
                            mode=CheckpointMode.EXTERNAL if hold else CheckpointMode.LOCAL)
    infos = []
    for reader, default in ((primary_reader, "primary"), (secondary_reader, "secondary")):
        linktype = getattr(reader, "linktype", None)
        infos.append(SideInfo(getattr(reader, "name", default), getattr(reader, "format", ""),
                              linklayer.ETHERNET if linktype is None else linktype,
                              compression=getattr(reader, "compression", "")))
    p_info, s_info = infos
    result = ReplayResult(p_info, s_info, config, hold, vnet_hdr_len, comparator,
                          detail_limit=detail_limit)
    p_numbers, s_numbers = result.frame_numbers
    merged = _merge(_timeline(primary_reader, p_info, PRIMARY, selection, p_numbers,
                              vnet_hdr_len),
                    _timeline(secondary_reader, s_info, SECONDARY, selection, s_numbers,
                              vnet_hdr_len))

    # the primary's own clock at timeline 0: its first frame's time, minus
    # what the clock jumps left out so far (see _timeline)
    p_clock_ns = None

    def emit(events, now_ms, now_ns=None):
        """Account for the core's events; ``now_ns`` is the exact relative
        time when there is one (``now_ms`` is a float)."""
        if now_ns is None:
            now_ns = round(now_ms * 1e6)
        for e in events:
            t = type(e)
            if t is Matched:
                # released on a match (the core's compact form)
                if on_release is not None:
                    on_release(p_clock_ns + now_ns, e.data)
            elif t is Released or t is Bypassed:
                pkt = e.packet
                if on_release is not None:
                    on_release(p_clock_ns + now_ns, pkt.data)
                if t is Released and e.reason is not RELEASE_MATCH:
                    if e.reason == RELEASE_END:
                        result.unmatched_primary += 1
                    _flow(result, pkt.key)["unmatched"] += 1
                    if on_unmatched is not None:
                        on_unmatched(p_clock_ns + now_ns, pkt.data)
            elif t is Miscompare:
                result.miscompares_total += 1
                _flow(result, e.key)["miscompares"] += 1
                record = None
                if len(result.miscompares) < detail_limit:
                    record = _record(e, now_ms, p_numbers, s_numbers)
                    result.miscompares.append(record)
                if on_miscompare is not None:
                    record = record or _record(e, now_ms, p_numbers, s_numbers)
                    on_miscompare(result.miscompares_total, record,
                                  _capture_ts(p_info, e.primary), _capture_ts(s_info, e.secondary),
                                  _capture_ts(p_info, e.secondary))
            elif t is CheckpointRequested:
                result.requests_total += 1
                if e.cause == "timeout" and e.key is not None:
                    _flow(result, e.key)["timeouts"] += 1
                if len(result.requests) < detail_limit:
                    result.requests.append((now_ms, e.cause,
                                            format_key(e.key) if e.key is not None else None))
            elif t is InternalError:
                result.internal_errors += 1

    def run_scans(now_ms):
        """The scans due by ``now_ms``, each at its own tick, as serve's
        timer would run them (the core skips the ticks with nothing to do, so
        a gap of days costs nothing).  Returns the time of the last one."""
        last = None
        while True:
            due = comparator.get_timer()
            if due is None or due > now_ms or due == last:
                # (the same tick again: the clock is past where float
                # milliseconds step by a scan cycle; never spin on it)
                if last is None:
                    next_scan = comparator.next_scan_ms
                    if next_scan is not None and next_scan <= now_ms:
                        # Ticks passed with nothing to decide: one scan with
                        # nothing to do (QEMU scans every tick) moves the
                        # grid on, so the frames up to the next tick need
                        # not ask get_timer() again.
                        emit(comparator.handle_timer(now_ms), now_ms)
                return last
            events = comparator.handle_timer(due)
            last = due
            if events:
                emit(events, due)
                if hold:
                    # held frames raise the same request every tick until
                    # the end: one collapsed scan stands for the rest
                    events = comparator.handle_timer(now_ms)
                    if events:
                        last = events[0].now_ms if hasattr(events[0], "now_ms") else now_ms
                        emit(events, last)
                    return last

    receive = comparator.receive
    l2 = vnet_hdr_len
    now_ms = 0.0
    count = 0
    for rel_ns, side, _ts_ns, data, cut, offset_ns, l3, ethertype in merged:
        if side == PRIMARY or p_clock_ns is None:
            p_clock_ns = (p_info.first_ts_ns - offset_ns if p_info.first_ts_ns is not None
                          else _ts_ns - rel_ns)
        now_ms = rel_ns / 1e6
        next_scan = comparator.next_scan_ms
        if next_scan is not None and next_scan <= now_ms:
            # (no scan is due before the next tick: get_timer() is asked
            # from there, not for every frame)
            run_scans(now_ms)
        events = receive(side, data, now_ms, l2, vnet_hdr_len, cut, l3, ethertype)
        if events:
            if len(events) == 1 and type(events[0]) is Matched:
                # the common case, without a call to emit: one frame matched
                if on_release is not None:
                    on_release(p_clock_ns + rel_ns, events[0].data)
            else:
                emit(events, now_ms, rel_ns)
        count += 1
        if on_progress is not None and not count & 0x3FFF:
            on_progress(count)
    if p_clock_ns is None:
        p_clock_ns = 0
    # Let the timeouts that would have fired after the last packet fire, so
    # a trailing unmatched frame is reported as a timeout like any other.
    if config.compare_timeout_ms is not None and comparator.queued_frames:
        deadline = now_ms + config.compare_timeout_ms + config.expired_scan_cycle_ms
        now_ms = max(now_ms, run_scans(deadline) or now_ms)
    before = comparator.stats.secondary_discarded
    emit(comparator.finish(now_ms), now_ms)
    result.unmatched_secondary = comparator.stats.secondary_discarded - before
    p_info.warnings = list(getattr(primary_reader, "warnings", [])) + p_info.warnings
    s_info.warnings = list(getattr(secondary_reader, "warnings", [])) + s_info.warnings
    result.notes = _notes(result, vnet_hdr_len, selection)
    return result


def _record(e, now_ms, p_numbers, s_numbers) -> MiscompareRecord:
    return MiscompareRecord(e, format_key(e.key), now_ms, _numbers(e.primary, p_numbers),
                            _numbers(e.secondary, s_numbers))


def _notes(result: ReplayResult, vnet_hdr_len: int, selection: Selection | None = None) -> list:
    """Hints when the outcome says more about the input than the replicas."""
    notes = []
    for info in (result.primary, result.secondary):
        if info.left_out or info.stopped_at_end:
            notes.append(_left_out_note(info, selection or Selection()))
    bypassed = result.stats.bypassed
    total = result.primary.frames
    if not total:
        notes.append("the primary capture has no frames: there was nothing to compare")
    n = sum(bypassed.values())
    if total and n * 2 > total:
        reason, count = max(bypassed.items(), key=lambda kv: kv[1])
        hint = ""
        if reason in ("unknown-ethertype", "bad-vnet-header", "short-frame") and not vnet_hdr_len:
            hint = ("; if the frames start with a virtio-net header (filter-dump of a vnet "
                    "netdev), give its size with --vnet-hdr-len")
        notes.append(f"{n:,} of {total:,} primary frames could not be compared, most for "
                     f"'{reason}' ({count:,}); only the rest were compared{hint}")
    gap = result.stats.stream_gap_bytes
    if gap:
        notes.append(f"{gap:,} TCP bytes are missing from both captures at the same places "
                     "(lost by the captures): they were skipped, not compared")
    for what, kept, total in (("miscompares", len(result.miscompares), result.miscompares_total),
                              ("checkpoint requests", len(result.requests), result.requests_total)):
        if kept < total:
            notes.append(f"{what}: the first {kept:,} of {total:,} are listed with their "
                         "details; all are counted")
    return notes


def _capture_ts(info: SideInfo, pkt):
    """The capture timestamp of a frame, from its side's relative clock."""
    if pkt is None or info.first_ts_ns is None:
        return None
    return info.first_ts_ns + round(pkt.arrival_ms * 1e6)


def _flow(result: ReplayResult, key) -> dict:
    entry = result.per_flow.get(key)
    if entry is None:
        entry = result.per_flow[key] = {"miscompares": 0, "timeouts": 0, "unmatched": 0}
    return entry


def _left_out_note(info: SideInfo, selection: Selection) -> str:
    """'a.pcap: 12 frames not compared: 10 not outgoing (--direction out),
    2 outside --filter; not read after --end'."""
    parts = []
    n = info.left_out.get(LEFT_OUT_DIRECTION, 0)
    if n:
        way = "outgoing" if selection.direction == linklayer.OUTGOING else "incoming"
        parts.append(f"{n:,} not {way} (--direction {selection.direction})")
    n = info.left_out.get(LEFT_OUT_FILTER, 0)
    if n:
        parts.append(f"{n:,} outside --filter")
    n = info.left_out.get(LEFT_OUT_WINDOW, 0)
    if n:
        parts.append(f"{n:,} before --start")
    total = sum(info.left_out.values())
    text = f"{info.name}: {total:,} {'frame' if total == 1 else 'frames'} not compared"
    if parts:
        text += ": " + ", ".join(parts)
    if info.stopped_at_end:
        text += "; not read past --end"
    return text


# -- the command ---------------------------------------------------------------------

def selection_of(options: ReplayOptions) -> Selection:
    """The frames ``options`` has compared.  A filter libpcap cannot compile
    (or no libpcap) fails here, before anything is read."""
    bpf = None
    if options.filter_expr is not None:
        from .bpf import BpfFilter
        bpf = BpfFilter(options.filter_expr)
    return Selection(direction=options.direction, bpf=bpf, start_ns=options.start_ns,
                     end_ns=options.end_ns)


def run(options: ReplayOptions) -> int:
    """``colo-compare replay``: compare the two captures, write the outputs
    asked for (each whole or not at all), print the report; returns the exit
    status: 0 match, 1 diverge, and for captures that could not be
    compared 1 when some frames were, 2 when none was (said on stderr, even
    with -q)."""
    from .capture import LikeInputWriter, open_capture
    from .outputs import open_output, stdout_guard, terminate_as_interrupt

    o = options
    selection = selection_of(o)
    quiet = o.verbose < 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(terminate_as_interrupt())
        p_reader = stack.enter_context(open_capture(o.primary))
        s_reader = stack.enter_context(open_capture(o.secondary))
        if selection.bpf is not None:
            # compiled for each capture's link type now: an expression that
            # makes no sense there fails before the comparison
            for reader in (p_reader, s_reader):
                selection.bpf.compile(_first_linktype(reader))

        def like_primary(path):
            # the primary's own format and link type (see LikeInputWriter)
            return LikeInputWriter(stack.enter_context(open_output(path)),
                                   format=p_reader.format, linktype=_first_linktype(p_reader)).write
        on_release = like_primary(o.out_path) if o.out_path else None
        on_unmatched = like_primary(o.diverged_path) if o.diverged_path else None
        on_miscompare = None
        if o.evidence_path:
            from .evidence import evidence_writer
            from .render import evidence_section_comment
            on_miscompare = evidence_writer(
                stack.enter_context(open_output(o.evidence_path)),
                evidence_section_comment(p_reader.name, s_reader.name, o.config, o.hold,
                                         o.vnet_hdr_len),
                _first_linktype(p_reader), _first_linktype(s_reader))
        progress = None
        if not (quiet or o.as_json):
            # (rich, through render, only when something is shown: ~40 ms a start)
            from .render import replay_progress
            progress = stack.enter_context(replay_progress(p_reader, False))
        result = replay(p_reader, s_reader, o.config, hold=o.hold, vnet_hdr_len=o.vnet_hdr_len,
                        on_release=on_release, on_unmatched=on_unmatched,
                        on_progress=progress, on_miscompare=on_miscompare,
                        selection=selection)
    verdict = result.verdict
    if verdict == "incomparable":
        # never a quiet "match": the exit status and stderr say it, even with -q
        status = EXIT_DIVERGE if result.compared_primary else EXIT_TROUBLE
        # (with -q there is no report: the line says why by itself)
        print(one_line(f"colo-compare: {_incomparable_text(result)}"), file=sys.stderr)
    else:
        status = EXIT_DIVERGE if verdict == "diverge" else EXIT_SAME
    if not quiet:
        from .render import make_console, print_replay_report, replay_json
        with stdout_guard():
            if o.as_json:
                print(json.dumps(replay_json(result), indent=1))
            else:
                # with --out -, stdout carries the pcap: the report goes to stderr
                console = make_console(sys.stderr if o.out_path == "-" else None, color=o.color)
                print_replay_report(console, result, o.hexdump, verbose=o.verbose > 0)
    else:
        for w in result.primary.warnings + result.secondary.warnings:
            print(one_line(f"colo-compare: warning: {w}"), file=sys.stderr)
    return status


def _incomparable_text(result: ReplayResult) -> str:
    if result.primary.frames:
        why, n = max(result.stats.bypassed.items(), key=lambda kv: kv[1])
        return (f"only {result.compared_primary:,} of {result.primary.frames:,} primary "
                f"frames could be compared ({n:,} not, for '{why}'): not a match")
    if result.primary.left_out:
        why = ", ".join(f"{n:,} left out by {k}" for k, n in result.primary.left_out.items())
        return f"no primary frame was selected for comparison ({why}): not a match"
    return "the primary capture has no frames: nothing to compare, not a match"


def _first_linktype(reader) -> int:
    """A capture's (first) link type; Ethernet for a pcapng with no interface."""
    return linklayer.ETHERNET if reader.linktype is None else reader.linktype
