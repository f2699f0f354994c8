#!/usr/bin/env python3
"""Play two captures into a running ``colo-compare serve``, at their pace.

    python examples/feed_serve.py PRIMARY.pcap SECONDARY.pcap \\
        --primary-in unix:/tmp/colo/p.sock --secondary-in unix:/tmp/colo/s.sock \\
        --outdev unix:/tmp/colo/out.sock [--speed 1.0] [--linger 4]

It does what the two VMs' filter-mirror/filter-redirector would do: connects
to serve's listening primary-in and secondary-in (and to its outdev, as the
primary's redirector would), sends each capture's frames in QEMU's framing
(4-byte big-endian length, then the frame) at the times the capture recorded
them (relative to each capture's first frame; ``--speed 2`` is twice as
fast), then waits ``--linger`` seconds for late releases and timeouts, and
prints how many frames outdev returned.  For trying serve on recorded
traffic, and for the README's tour.

Endpoints as serve's own, without ``,server``: this script is the client.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from colo_cli.capture import CaptureError, open_capture  # noqa: E402
from colo_cli.core.framing import FrameDecoder, encode  # noqa: E402
from colo_cli.endpoints import parse_endpoint  # noqa: E402


def endpoint(text: str):
    try:
        ep = parse_endpoint(text)
    except ValueError as e:
        sys.exit(f"feed_serve: {e}")
    if ep.server:
        sys.exit(f"feed_serve: {text}: this script connects; give serve's endpoint without ',server'")
    return ep


def connect(text: str, timeout_s: float = 10.0) -> socket.socket:
    ep = endpoint(text)
    family = socket.AF_UNIX if ep.kind == "unix" else (
        socket.AF_INET6 if ":" in ep.host else socket.AF_INET)
    deadline = time.monotonic() + timeout_s
    while True:
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.connect(ep.address)
            return s
        except OSError as e:
            s.close()
            if time.monotonic() > deadline:
                sys.exit(f"feed_serve: {text}: {e.strerror or e}")
            time.sleep(0.1)


def frames(path: str, side: int) -> list:
    try:
        with open_capture(path) as reader:
            recs = [(ts, data) for _n, ts, data, _orig, _lt in reader]
    except CaptureError as e:
        sys.exit(f"feed_serve: {e}")
    if not recs:
        return []
    t0 = recs[0][0]
    return [(ts - t0, side, data) for ts, data in recs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("primary")
    ap.add_argument("secondary")
    ap.add_argument("--primary-in", required=True, metavar="EP")
    ap.add_argument("--secondary-in", required=True, metavar="EP")
    ap.add_argument("--outdev", metavar="EP", help="read what serve releases (else nobody does)")
    ap.add_argument("--speed", type=float, default=1.0, help="time factor (default 1: as captured)")
    ap.add_argument("--linger", type=float, default=4.0,
                    help="seconds to wait after the last frame (default 4: past the 3 s timeout)")
    args = ap.parse_args()
    if args.speed <= 0:
        ap.error("--speed must be positive")
    for text in (args.primary_in, args.secondary_in, args.outdev):
        if text is not None:
            endpoint(text)           # bad syntax: one line, before anything is read

    # secondary first at equal times, as in replay: a primary frame is then
    # compared the moment it arrives
    merged = sorted(frames(args.primary, 0) + frames(args.secondary, 1), key=lambda r: (r[0], -r[1]))
    out = connect(args.outdev) if args.outdev else None
    pri, sec = connect(args.primary_in), connect(args.secondary_in)
    decoder = FrameDecoder()
    released = 0

    def drain(wait_s: float) -> None:
        nonlocal released
        if out is None:
            time.sleep(wait_s)
            return
        out.settimeout(wait_s)
        try:
            data = out.recv(1 << 16)
        except (socket.timeout, BlockingIOError):
            return
        released += len(decoder.feed(data))

    start = time.monotonic()
    for ts_ns, side, data in merged:
        due = start + ts_ns / 1e9 / args.speed
        while (delay := due - time.monotonic()) > 0:
            drain(delay)
        (sec if side else pri).sendall(encode(data))
    end = time.monotonic() + args.linger
    while (left := end - time.monotonic()) > 0:
        drain(left)
    sent = sum(1 for _, side, _ in merged if side == 0)
    if out is not None:
        print(f"feed_serve: {sent} primary frames sent, {released} released by serve")
    else:
        print(f"feed_serve: {sent} primary frames sent")
    for s in (pri, sec, out):
        if s is not None:
            s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
