"""``colo-compare replay``: the comparison core driven by two captures.

The clock is each capture's own timestamps, relative to its first packet:
QEMU's filter-dump stamps with the VM's virtual clock, so the two files'
time bases are unrelated (``notes/capture-pitfalls.md`` 1.9).  The two
relative timelines are merged and fed to the core as ``now_ms``; timer ticks
are run in between exactly as ``serve``'s event loop would, so the decisions
are those ``serve`` would have taken for the same arrival times.

A checkpoint request is answered the way a COLO system answers it, at once
(flush and reset), on the connection that raised it, so later divergences on
that connection are found and reported separately; other connections are
left alone: the core's ``CheckpointMode.LOCAL``.  ``hold=True`` instead holds
everything until the end (``CheckpointMode.EXTERNAL``, with nobody to
checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .core import (PRIMARY, SECONDARY, Bypassed, CheckpointMode, CheckpointRequested,
                   Comparator, Config, InternalError, Matched, Miscompare, Released)
from .core.events import RELEASE_END, RELEASE_MATCH
from .flows import format_key

#: miscompares kept with their frames for hexdumps and JSON; the rest are
#: counted only, so a capture pair that differs everywhere stays in bounded
#: memory.
DEFAULT_DETAIL_LIMIT = 1000


@dataclass
class SideInfo:
    name: str
    format: str = ""
    linktype: int = 1
    frames: int = 0
    bytes: int = 0
    first_ts_ns: int | None = None
    last_ts_ns: int | None = None
    warnings: list = field(default_factory=list)

    @property
    def duration_ms(self) -> float:
        if self.first_ts_ns is None:
            return 0.0
        return (self.last_ts_ns - self.first_ts_ns) / 1e6


@dataclass
class MiscompareRecord:
    """A miscompare as reported: the core's event plus where it happened."""
    event: Miscompare
    flow: str
    time_ms: float


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
        --vnet-hdr-len, a link type read wrongly); else ``match``."""
        if self.diverged:
            return "diverge"
        if self.primary.frames and self.compared_primary * 2 < self.primary.frames:
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
_MAX_JUMP_WARNINGS = 5


def _timeline(reader, info: SideInfo, side):
    """``(rel_ns, side, ts_ns, data, cut, offset_ns)`` from one capture, in
    file order: ``rel_ns`` is the frame's time on the capture's own timeline,
    relative to its first frame, never decreasing; ``offset_ns`` what the
    clock steps left out so far add to the capture's clock (``rel_ns ==
    ts_ns + offset_ns - first`` but for a corrupt timestamp).  Fills
    ``info`` as it goes; warnings name the frame."""
    first = None
    prev = 0                # rel of the frame before
    offset = 0
    held = None             # a frame far ahead of the one before: corrupt, or a real gap?
    warned = [0]

    def warn(text):
        warned[0] += 1
        if warned[0] <= _MAX_JUMP_WARNINGS:
            info.warnings.append(f"{info.name}: {text}")
        elif warned[0] == _MAX_JUMP_WARNINGS + 1:
            info.warnings.append(f"{info.name}: more clock jumps (not listed)")

    for number, ts_ns, data, orig_len, _linktype in reader:
        if first is None:
            first = ts_ns
            info.first_ts_ns = ts_ns
        info.last_ts_ns = ts_ns
        info.frames += 1
        info.bytes += len(data)
        rel = ts_ns + offset - first
        if held is not None:
            h_number, h_rel, h_ts, h_data, h_cut = held
            held = None
            if -JUMP_BACK_NS <= rel - prev <= JUMP_FORWARD_NS:
                # back to where the frame before the held one was: the held
                # one's timestamp is wrong, not the clock
                warn(f"frame {h_number}: its timestamp is {_span(h_rel - prev)} ahead of the "
                     "frames around it; taken as the time of the frame before")
                yield prev, side, h_ts, h_data, h_cut, offset
            else:
                warn(f"frame {h_number}: the clock jumps {_span(h_rel - prev)} forward")
                prev = h_rel
                yield h_rel, side, h_ts, h_data, h_cut, offset
        step = rel - prev
        if step > JUMP_FORWARD_NS and info.frames > 1:
            held = (number, rel, ts_ns, data, orig_len > len(data))
            continue
        if step < -JUMP_BACK_NS:
            warn(f"frame {number}: the clock jumps {_span(-step)} back; the timeline goes on "
                 "from the frame before")
            offset -= step
            rel = prev
        elif step < 0:
            rel = prev
        prev = rel
        yield rel, side, ts_ns, data, orig_len > len(data), offset
    if held is not None:
        h_number, h_rel, h_ts, h_data, h_cut = held
        warn(f"frame {h_number}: the clock jumps {_span(h_rel - prev)} forward")
        yield h_rel, side, h_ts, h_data, h_cut, offset


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
           on_miscompare=None) -> ReplayResult:
    """Compare two captures.

    ``on_release(ts_ns, data)`` is called for every primary frame in the
    order it would have left (matched, bypassed, flushed), with the time it
    would have left on the primary's clock; ``on_unmatched(ts_ns, data)`` for
    the primary frames that left without a match.  ``vnet_hdr_len`` bytes at
    the start of every captured frame are a header to keep but not compare
    (a filter-dump of a netdev with virtio-net headers).
    ``on_miscompare(number, record, p_ts_ns, s_ts_ns)`` is called for every
    miscompare (not only those kept in the result), with the capture times
    of its two frames.
    """
    config = config or Config()
    comparator = Comparator(config, compact=True,
                            mode=CheckpointMode.EXTERNAL if hold else CheckpointMode.LOCAL)
    p_info = SideInfo(getattr(primary_reader, "name", "primary"),
                      getattr(primary_reader, "format", ""), getattr(primary_reader, "linktype", 1))
    s_info = SideInfo(getattr(secondary_reader, "name", "secondary"),
                      getattr(secondary_reader, "format", ""), getattr(secondary_reader, "linktype", 1))
    result = ReplayResult(p_info, s_info, config, hold, vnet_hdr_len, comparator)
    merged = _merge(_timeline(primary_reader, p_info, PRIMARY),
                    _timeline(secondary_reader, s_info, SECONDARY))

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
                    record = MiscompareRecord(e, format_key(e.key), now_ms)
                    result.miscompares.append(record)
                if on_miscompare is not None:
                    record = record or MiscompareRecord(e, format_key(e.key), now_ms)
                    on_miscompare(result.miscompares_total, record,
                                  _capture_ts(p_info, e.primary), _capture_ts(s_info, e.secondary))
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
            if due is None or due > now_ms:
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
    for rel_ns, side, _ts_ns, data, cut, offset_ns in merged:
        if side == PRIMARY or p_clock_ns is None:
            p_clock_ns = (p_info.first_ts_ns - offset_ns if p_info.first_ts_ns is not None
                          else _ts_ns - rel_ns)
        now_ms = rel_ns / 1e6
        timer = comparator.get_timer()
        if timer is not None and timer <= now_ms:
            run_scans(now_ms)
        events = receive(side, data, now_ms, l2, vnet_hdr_len, cut)
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
    result.notes = _notes(result, vnet_hdr_len)
    return result


def _notes(result: ReplayResult, vnet_hdr_len: int) -> list:
    """Hints when the outcome says more about the input than the replicas."""
    notes = []
    bypassed = result.stats.bypassed
    total = result.primary.frames
    n = sum(bypassed.values())
    if total and n * 2 > total:
        reason, count = max(bypassed.items(), key=lambda kv: kv[1])
        hint = ""
        if reason in ("unknown-ethertype", "bad-vnet-header", "short-frame") and not vnet_hdr_len:
            hint = ("; if the frames start with a virtio-net header (filter-dump of a vnet "
                    "netdev), give its size with --vnet-hdr-len")
        notes.append(f"{n:,} of {total:,} primary frames could not be compared, most for "
                     f"'{reason}' ({count:,}); only the rest were compared{hint}")
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
