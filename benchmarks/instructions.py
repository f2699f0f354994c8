#!/usr/bin/env python3
"""Instructions per pair of frames through the core, for callgrind.

Wall-clock times on a shared 2-core VM drift by 10-30 % from run to run;
instruction counts do not.  This feeds N identical pairs (secondary first,
then its primary twin, compact output as serve and replay use) of one
workload to the comparator of the checkout beside this directory; run it
twice under callgrind, once with ``noop`` (everything but the pairs), and
divide the difference by N:

    valgrind --tool=callgrind --callgrind-out-file=run.out python benchmarks/instructions.py udp run
    valgrind --tool=callgrind --callgrind-out-file=noop.out python benchmarks/instructions.py udp noop
    callgrind_annotate run.out | grep TOTALS; callgrind_annotate noop.out | grep TOTALS

Workloads: ``udp`` (1000-byte frames over 1000 flows, as bench.py's
udp-1000) and ``tcp`` (one flow, 1448-byte payloads, as tcp-bulk).
``COLO_COMPARE_PURE=1`` measures the pure-Python build.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from colo_cli.core import PRIMARY, SECONDARY, Comparator, Config  # noqa: E402
from colo_cli.testing import tcp_frame, udp_frame  # noqa: E402

PAIRS = 20_000


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("udp", "tcp") or sys.argv[2] not in ("run", "noop"):
        sys.exit(f"usage: {sys.argv[0]} udp|tcp run|noop")
    if sys.argv[1] == "udp":
        base = [udp_frame(bytes(958), sport=10000 + f) for f in range(1000)]
        frames = []
        for i in range(PAIRS):
            f = bytearray(base[i % 1000])
            f[42:50] = i.to_bytes(8, "big")      # a distinct payload per pair
            frames.append(bytes(f))
    else:
        frames = [tcp_frame(bytes([i & 255]) * 1448, seq=1000 + 1448 * i, ack=5, flags=0x18)
                  for i in range(PAIRS)]
    c = Comparator(Config(compare_timeout_ms=None), compact=True)
    receive = c.receive
    if sys.argv[2] == "run":
        now = 0.0
        for f in frames:
            now += 0.001
            receive(SECONDARY, f, now)
            receive(PRIMARY, f, now)
        assert c.stats.released_match == PAIRS


if __name__ == "__main__":
    main()
