#!/usr/bin/env python3
"""What counting costs per frame: the share of the comparator's time spent
on the statistics it keeps (issue 4: "keep the per-packet cost of counting
negligible; measure it").

Counting is inlined in the comparator's hot paths, so it cannot be switched
off to compare.  Instead this measures, in one process:

1. the comparator alone (compact output, as serve runs it) on N identical
   UDP pairs over 1000 flows, secondary first then primary (the common
   case: one queued, one matched and released);
2. a loop doing exactly the counter updates the core makes for such a
   pair, on the same kinds of objects (the Stats, the Connection, the hold
   histogram), and nothing else;

and prints both per pair and the ratio.  The loop overhead of (2) is
subtracted with an empty loop of the same shape.

    python benchmarks/counting_cost.py [--pairs N] [--repeat R]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from colo_cli.core import PRIMARY, SECONDARY, Comparator, Config  # noqa: E402
from colo_cli.core.conntrack import Connection  # noqa: E402
from colo_cli.core.stats import Stats  # noqa: E402
from colo_cli.testing import udp_frame  # noqa: E402

FLOWS = 1000


def frames(n: int) -> list[bytes]:
    base = [udp_frame(bytes(958), sport=10000 + f) for f in range(FLOWS)]
    out = []
    for i in range(n):
        f = bytearray(base[i % FLOWS])
        f[42:50] = i.to_bytes(8, "big")    # a distinct payload per pair
        out.append(bytes(f))
    return out


def comparator_s(pairs: list[bytes]) -> float:
    c = Comparator(Config(compare_timeout_ms=None), compact=True)
    receive = c.receive
    released = 0
    t = time.perf_counter()
    for i, f in enumerate(pairs):
        receive(SECONDARY, f, i * 0.01)
        released += len(receive(PRIMARY, f, i * 0.01))
    elapsed = time.perf_counter() - t
    assert released == len(pairs), released
    return elapsed


def counting_s(pairs: list[bytes]) -> float:
    """The core's statistics work for one pair, secondary then primary:
    bytes and frames in per side, a queue high-water check, and on the match
    the compare/match/release counters, the hold histogram (zero: the
    primary left on arrival) and the released bytes."""
    stats = Stats()
    conns = [Connection(b"k%d" % i, 0, 0.0) for i in range(FLOWS)]
    depth = 1
    l2 = 0                       # where the Ethernet frame starts (as in receive)
    t = time.perf_counter()
    for i, f in enumerate(pairs):
        size = len(f)
        conn = conns[i % FLOWS]
        # secondary arrives, is queued
        index = stats.s_frames_in
        stats.s_frames_in = index + 1
        stats.s_bytes_in += size - l2
        if depth > stats.s_queue_high_water:
            stats.s_queue_high_water = depth
        if size > stats.queued_bytes_high_water:
            stats.queued_bytes_high_water = size
        # primary arrives, matches, leaves
        index = stats.p_frames_in
        stats.p_frames_in = index + 1
        stats.p_bytes_in += size - l2
        conn.compared += 1
        stats.secondary_matched += 1
        stats.released_match += 1
        conn.released += 1
        stats.hold.zero += 1
        stats.released_bytes += size - l2
    return time.perf_counter() - t


def empty_loop_s(pairs: list[bytes]) -> float:
    conns = [None] * FLOWS
    t = time.perf_counter()
    for i, f in enumerate(pairs):
        size = len(f)
        conn = conns[i % FLOWS]
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    pairs = frames(args.pairs)
    gc.freeze()      # as serve does (colo_cli.cli._tune_gc)
    comp, count, empty = [], [], []
    for _ in range(args.repeat):
        comp.append(comparator_s(pairs))
        count.append(counting_s(pairs))
        empty.append(empty_loop_s(pairs))
    n = args.pairs
    c_us = statistics.median(comp) / n * 1e6
    k_us = (statistics.median(count) - statistics.median(empty)) / n * 1e6
    print(f"pairs: {n:,} over {FLOWS} flows, median of {args.repeat}")
    print(f"comparator, per pair (2 frames in, 1 out):  {c_us:.3f} us")
    print(f"its counter updates alone, per pair:        {k_us:.3f} us")
    print(f"share of the comparator's time:             {k_us / c_us * 100:.1f} %")


if __name__ == "__main__":
    main()
