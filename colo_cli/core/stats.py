"""Counters and histograms kept by the comparator.

Both adapters read the same ``Stats`` object, so ``serve`` and ``replay``
count the same way.  The hot path only does attribute increments and one
histogram insert per released frame; everything else (percentiles, dicts for
JSON) is computed in ``snapshot()``.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import ClassVar

#: bump when the snapshot's keys change incompatibly.
SNAPSHOT_VERSION = 1

_SUB_BUCKETS = 8  # per power of two: about 9 % relative error on quantiles

#: Upper bounds of the cumulative hold-time buckets, in seconds, as
#: Prometheus names them (``le``): powers of two from 0.125 ms to 16.4 s,
#: which are exact edges of the log histogram below, so the counts are exact.
HOLD_BOUNDS_S = [2.0 ** k / 1000 for k in range(-3, 15)]
_frexp = math.frexp


class Histogram:
    """A log-scale histogram of non-negative values (milliseconds here).

    Buckets are powers of two split into eight, so a quantile is exact to
    within about 9 %; ``max``, ``count`` and ``sum`` are exact.  Memory is a
    few hundred integers at most, whatever is recorded.
    """
    __slots__ = ("buckets", "counted", "zero", "sum", "max", "min")

    #: values at or below this are recorded in one "zero" bucket
    FLOOR: ClassVar[float] = 1e-3

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.counted = 0
        #: values of exactly zero, counted with a bare increment (a frame
        #: released the moment it arrives) and folded into the lowest bucket
        #: when read
        self.zero = 0
        self.sum = 0.0
        self.max = 0.0
        self.min = math.inf

    @property
    def count(self) -> int:
        return self.counted + self.zero

    def _fold_zero(self) -> None:
        if self.zero:
            idx = -(1 << 20)
            self.buckets[idx] = self.buckets.get(idx, 0) + self.zero
            self.counted += self.zero
            self.min = 0.0
            self.zero = 0

    def add(self, value: float) -> None:
        if value == 0.0:
            # released the moment it arrived (the frame that completes a
            # pair): the common case, one increment
            self.zero += 1
            return
        self.counted += 1
        self.sum += value
        if value > self.max:
            self.max = value
        if value < self.min:
            self.min = value
        if value <= self.FLOOR:
            idx = -(1 << 20)
        else:
            m, e = _frexp(value)
            idx = e * _SUB_BUCKETS + int((m - 0.5) * 2 * _SUB_BUCKETS)
        b = self.buckets
        b[idx] = b.get(idx, 0) + 1

    @staticmethod
    def bucket_upper(idx: int) -> float:
        if idx == -(1 << 20):
            return Histogram.FLOOR
        e, sub = divmod(idx, _SUB_BUCKETS)
        return math.ldexp(0.5 + (sub + 1) / (2 * _SUB_BUCKETS), e)

    def quantile(self, q: float) -> float:
        """The value below which a fraction ``q`` of the recorded values fall
        (the upper edge of the bucket holding it, capped by the true max)."""
        self._fold_zero()
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for idx in sorted(self.buckets):
            seen += self.buckets[idx]
            if seen >= rank:
                if idx == -(1 << 20):
                    return 0.0      # at most a microsecond: none, as far as ms go
                return min(self.bucket_upper(idx), self.max)
        return self.max

    def cumulative(self, bounds) -> list[int]:
        """Counts of values <= each bound (for Prometheus ``le`` buckets);
        values are attributed by their bucket's upper edge."""
        self._fold_zero()
        items = sorted((self.bucket_upper(i), n) for i, n in self.buckets.items())
        out = []
        for bound in bounds:
            out.append(sum(n for upper, n in items if upper <= bound))
        return out

    def to_cumulative(self, bounds_s=HOLD_BOUNDS_S) -> dict:
        """Prometheus-style buckets of values in ms, bounds in seconds:
        ``{"buckets": {"0.000125": n, ..., "+Inf": count}, "count": n,
        "sum": seconds}``, each count the values at or below its bound."""
        counts = self.cumulative([b * 1000 for b in bounds_s])
        buckets = {repr(b): n for b, n in zip(bounds_s, counts)}
        buckets["+Inf"] = self.count
        return {"buckets": buckets, "count": self.count, "sum": round(self.sum / 1000, 9)}

    def to_dict(self) -> dict:
        self._fold_zero()
        return {"count": self.count, "sum_ms": round(self.sum, 6),
                "min_ms": round(self.min, 6) if self.count else 0.0,
                "max_ms": round(self.max, 6),
                "p50_ms": round(self.quantile(0.50), 6),
                "p90_ms": round(self.quantile(0.90), 6),
                "p99_ms": round(self.quantile(0.99), 6),
                "buckets": {repr(self.bucket_upper(i)): n
                            for i, n in sorted(self.buckets.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> "Histogram":
        h = cls()
        h.counted = int(d.get("count", 0))
        h.sum = float(d.get("sum_ms", 0.0))
        h.max = float(d.get("max_ms", 0.0))
        h.min = float(d.get("min_ms", 0.0)) if h.count else math.inf
        for upper, n in d.get("buckets", {}).items():
            u = float(upper)
            if u <= cls.FLOOR:
                idx = -(1 << 20)
            else:
                # the upper edge lies inside the bucket's own range only at
                # its top; step down a hair to land in it.
                m, e = _frexp(u * (1 - 1e-12))
                idx = e * _SUB_BUCKETS + int((m - 0.5) * 2 * _SUB_BUCKETS)
            h.buckets[idx] = h.buckets.get(idx, 0) + int(n)
        return h


class Stats:
    """Everything the comparator counts.  Plain attributes for the per-frame
    counters (cheap to bump: one per side rather than a list indexed by
    side, whose items the compiled core would box), Counters for the rare,
    keyed ones."""

    def __init__(self) -> None:
        self.p_frames_in = 0             # frames in, primary and secondary
        self.s_frames_in = 0
        self.p_bytes_in = 0              # Ethernet frame bytes (no length word, no vnet header)
        self.s_bytes_in = 0
        # primary frames out
        self.released_match = 0
        self.released_flushed: Counter[str] = Counter()   # by reason: checkpoint, queue-full, ...
        self.released_bytes = 0          # Ethernet frame bytes, as bytes_in
        self.bypassed: Counter[str] = Counter()           # primary, by reason
        # secondary frames: consumed by a match, absorbed (pure ACKs,
        # duplicates of compared data), discarded at a checkpoint, dropped
        # (not comparable, by reason)
        self.secondary_matched = 0
        self.secondary_absorbed = 0
        self.secondary_discarded = 0
        self.dropped: Counter[str] = Counter()            # "side:reason"
        self.miscompares: Counter[str] = Counter()        # "kind:cause"
        self.checkpoint_requests: Counter[str] = Counter()  # by cause
        self.checkpoints = 0
        self.connections_created = 0
        # connections evicted, by reason (connections_evicted): idle ones
        # in a plain int, as with many short flows one goes per new flow
        self.evicted_idle = 0
        self.evicted_other: Counter[str] = Counter()  # table-full, secondary-absent
        self.p_queue_high_water = 0         # longest queue of any connection, per side
        self.s_queue_high_water = 0
        self.queued_bytes_high_water = 0
        self.hold = Histogram()             # ms each released primary frame waited
        self.truncated = [0, 0]             # frames compared on their captured part only
        self.ignored: Counter[str] = Counter()            # noise rule -> datagrams it let match
        self.fragments_in = [0, 0]
        self.reassembled = [0, 0]           # datagrams put back together
        # fragment bytes that overlapped others (a datagram's fragments
        # sent twice, or crafted), and those of them whose contents
        # disagreed (the first copy was kept): by side
        self.fragment_overlap_bytes = [0, 0]
        self.fragment_conflict_bytes = [0, 0]
        # TCP bytes missing from both sides at the same place (the
        # captures lost them): skipped, never compared
        self.stream_gap_bytes = 0
        self.secondary_absent_periods = 0   # times comparing stopped for want of a secondary

    @property
    def frames_in(self) -> list[int]:
        """Frames in, [primary, secondary] (a copy)."""
        return [self.p_frames_in, self.s_frames_in]

    @property
    def bytes_in(self) -> list[int]:
        """Frame bytes in, [primary, secondary] (a copy)."""
        return [self.p_bytes_in, self.s_bytes_in]

    @property
    def queue_high_water(self) -> list[int]:
        """Longest queue of any connection, [primary, secondary] (a copy)."""
        return [self.p_queue_high_water, self.s_queue_high_water]

    @property
    def connections_evicted(self) -> Counter[str]:
        """Connections evicted, by reason (a copy: count in ``evicted_idle``
        and ``evicted_other``)."""
        evicted = Counter(self.evicted_other)
        if self.evicted_idle:
            evicted["idle"] = self.evicted_idle
        return evicted

    @property
    def released_total(self) -> int:
        return self.released_match + sum(self.released_flushed.values())

    def snapshot(self) -> dict:
        """A JSON-ready dict with stable keys."""
        return {
            "version": SNAPSHOT_VERSION,
            "frames_in": {"primary": self.p_frames_in, "secondary": self.s_frames_in},
            "bytes_in": {"primary": self.p_bytes_in, "secondary": self.s_bytes_in},
            "released": {"match": self.released_match, **dict(sorted(self.released_flushed.items())),
                         "total": self.released_total},
            "released_bytes": self.released_bytes,
            "bypassed": dict(sorted(self.bypassed.items())),
            "secondary": {"matched": self.secondary_matched,
                          "absorbed": self.secondary_absorbed,
                          "discarded": self.secondary_discarded},
            "dropped": dict(sorted(self.dropped.items())),
            "miscompares": dict(sorted(self.miscompares.items())),
            "checkpoint_requests": dict(sorted(self.checkpoint_requests.items())),
            "checkpoints": self.checkpoints,
            "secondary_absent_periods": self.secondary_absent_periods,
            "connections": {"created": self.connections_created,
                            "evicted": dict(sorted(self.connections_evicted.items()))},
            "queue_high_water": {"primary": self.p_queue_high_water,
                                 "secondary": self.s_queue_high_water},
            "queued_bytes_high_water": self.queued_bytes_high_water,
            "hold_ms": self.hold.to_dict(),
            "hold_seconds": self.hold.to_cumulative(),
            "truncated": {"primary": self.truncated[0], "secondary": self.truncated[1]},
            "ignored": dict(sorted(self.ignored.items())),
            "fragments": {"in": {"primary": self.fragments_in[0], "secondary": self.fragments_in[1]},
                          "reassembled": {"primary": self.reassembled[0],
                                          "secondary": self.reassembled[1]}},
            "fragment_overlap_bytes": {"primary": self.fragment_overlap_bytes[0],
                                       "secondary": self.fragment_overlap_bytes[1]},
            "fragment_conflict_bytes": {"primary": self.fragment_conflict_bytes[0],
                                        "secondary": self.fragment_conflict_bytes[1]},
            "stream_gap_bytes": self.stream_gap_bytes,
        }
