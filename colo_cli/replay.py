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

import heapq
from dataclasses import dataclass, field

from .core import (PRIMARY, SECONDARY, Bypassed, CheckpointMode, CheckpointRequested,
                   Comparator, Config, InternalError, Miscompare, Released)
from .core.events import RELEASE_END, RELEASE_MATCH
from .core.packet import format_key

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


def _relative(reader, info: SideInfo, side):
    """(now_ns, side, ts_ns, data, cut) from one capture, time relative to
    its first packet; fills ``info`` as it goes."""
    first = None
    for _number, ts_ns, data, orig_len, _linktype in reader:
        if first is None:
            first = ts_ns
            info.first_ts_ns = ts_ns
        info.last_ts_ns = ts_ns
        info.frames += 1
        info.bytes += len(data)
        # a capture may step back in time (clock adjustments, merged files):
        # never let its relative clock run backwards
        rel = ts_ns - first
        yield rel, side, ts_ns, data, orig_len > len(data)


def _monotonic(stream):
    last = 0
    for rel, side, ts_ns, data, cut in stream:
        if rel < last:
            rel = last
        last = rel
        yield rel, side, ts_ns, data, cut


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
    merged = heapq.merge(_monotonic(_relative(primary_reader, p_info, PRIMARY)),
                         _monotonic(_relative(secondary_reader, s_info, SECONDARY)),
                         key=lambda item: (item[0], item[1]))

    p_base_ns = None

    def emit(events, now_ms, now_ns=None):
        """Account for the core's events; ``now_ns`` is the exact relative
        time when there is one (``now_ms`` is a float)."""
        if now_ns is None:
            now_ns = round(now_ms * 1e6)
        for e in events:
            t = type(e)
            if t is bytes:
                # released on a match (the core's compact form)
                if on_release is not None:
                    on_release(p_base_ns + now_ns, e)
            elif t is Released or t is Bypassed:
                pkt = e.packet
                if on_release is not None:
                    on_release(p_base_ns + now_ns, pkt.data)
                if t is Released and e.reason is not RELEASE_MATCH:
                    if e.reason == RELEASE_END:
                        result.unmatched_primary += 1
                    _flow(result, pkt.key)["unmatched"] += 1
                    if on_unmatched is not None:
                        on_unmatched(p_base_ns + now_ns, pkt.data)
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
    for rel_ns, side, _ts_ns, data, cut in merged:
        if p_base_ns is None:
            p_base_ns = p_info.first_ts_ns if p_info.first_ts_ns is not None else _ts_ns - rel_ns
        now_ms = rel_ns / 1e6
        timer = comparator.get_timer()
        if timer is not None and timer <= now_ms:
            run_scans(now_ms)
        events = receive(side, data, now_ms, l2, vnet_hdr_len, cut)
        if events:
            emit(events, now_ms, rel_ns)
        count += 1
        if on_progress is not None and not count & 0x3FFF:
            on_progress(count)
    if p_base_ns is None:
        p_base_ns = 0
    # Let the timeouts that would have fired after the last packet fire, so
    # a trailing unmatched frame is reported as a timeout like any other.
    if config.compare_timeout_ms is not None and comparator.queued_frames:
        deadline = now_ms + config.compare_timeout_ms + config.expired_scan_cycle_ms
        now_ms = max(now_ms, run_scans(deadline) or now_ms)
    before = comparator.stats.secondary_discarded
    emit(comparator.finish(now_ms), now_ms)
    result.unmatched_secondary = comparator.stats.secondary_discarded - before
    p_info.warnings = list(getattr(primary_reader, "warnings", []))
    s_info.warnings = list(getattr(secondary_reader, "warnings", []))
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
                     f"'{reason}' ({count:,}): a match says little{hint}")
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
