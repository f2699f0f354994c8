#!/usr/bin/env python3
"""What a checkpoint costs a client with ``serve --qmp``: the added latency
of a diverged packet, on a real QEMU 7.2 COLO pair with no guest.

For each of N divergences, one at a time, the benchmark writes the
secondary's frame and then the primary's (different payloads, one UDP flow
each) on serve's inputs, and times the primary frame from the moment its
write returned to the moment it arrived on outdev: serve sees the
divergence, asks QEMU over QMP (``x-checkpoint-delay`` re-sent), QEMU
checkpoints (STOP ... RESUME), and serve releases the frame at the RESUME.
The same is done for N matched pairs first: the difference of the two
medians is what the checkpoint adds.  A third monitor on the primary
records QEMU's own STOP and RESUME timestamps, so the wait splits into
serve's part and QEMU's.

The migration channel is a unix socket, or TCP on loopback (what two hosts
use); QEMU's checkpoints take much longer over TCP here (about 90 ms against
half a millisecond; see benchmarks/README.md).

    python benchmarks/qmp_latency.py                     # both channels, 100 each
    python benchmarks/qmp_latency.py --migration tcp --divergences 30 --json out.json

Needs qemu-system-x86_64 (Debian's 7.2); the product under test is the
colo_cli beside this directory.  Every wait is bounded; QEMU and serve are
killed by PID at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from colo_cli.testing import udp_frame  # noqa: E402
from colo_pair import ColoPair  # noqa: E402
from serve_helpers import OutReader, ServeProc, connect, rec, unix_ep  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summary(values_ms: list[float]) -> dict:
    return {"n": len(values_ms), "p50_ms": round(statistics.median(values_ms), 3),
            "p90_ms": round(pct(values_ms, 0.9), 3), "min_ms": round(min(values_ms), 3),
            "max_ms": round(max(values_ms), 3)}


def arrival(out: OutReader, index: int) -> float:
    data = out.data()
    pos = 0
    for _ in range(index + 1):
        pos += 4 + int.from_bytes(data[pos:pos + 4], "big")
    with out.lock:
        return next(t for t, total in out.chunks if total >= pos)


def run(migration: str, n: int, gap_s: float) -> dict:
    workdir = tempfile.mkdtemp(prefix="colo-qmpbench-", dir="/tmp")
    uri = f"tcp:127.0.0.1:{free_port()}" if migration == "tcp" else None
    pair = ColoPair(workdir, migration_uri=uri)
    serve = out = p = s = None
    try:
        pair.start()
        p_ep, _ = unix_ep(workdir, "p.sock")
        s_ep, _ = unix_ep(workdir, "s.sock")
        o_ep, _ = unix_ep(workdir, "o.sock")
        ctl = os.path.join(workdir, "ctl.sock")
        serve = ServeProc(workdir, ["--primary-in", p_ep, "--secondary-in", s_ep, "--outdev", o_ep,
                                    "--qmp", f"unix:{pair.serve_qmp_path}", "--control", ctl, "-q",
                                    "--compare-timeout", "60000"], control=ctl)
        serve.wait_ready(verbose=False)
        out = OutReader(connect(o_ep))
        p, s = connect(p_ep), connect(s_ep)
        pair.enter_colo()
        serve.wait_stats(lambda st: st["serve"]["qmp"]["policy_now"] == "qmp")
        released = 0
        matched, diverged = [], []
        for i in range(n):                                  # matched pairs: the baseline
            f = udp_frame(b"match %06d" % i, sport=20000 + i % 50)
            s.sendall(rec(f))
            p.sendall(rec(f))
            t = time.monotonic()
            released += 1
            out.wait_records(released, 10)
            matched.append((arrival(out, released - 1) - t) * 1000)
            time.sleep(gap_s)
        since = time.monotonic()
        for i in range(n):
            s.sendall(rec(udp_frame(b"SECONDARY %06d" % i, sport=30000 + i % 50)))
            p.sendall(rec(udp_frame(b"primary   %06d" % i, sport=30000 + i % 50)))
            t = time.monotonic()
            released += 1
            out.wait_records(released, 30)
            diverged.append((arrival(out, released - 1) - t) * 1000)
            time.sleep(gap_s)
        time.sleep(0.2)
        pairs = pair.checkpoints(since)
        q = serve.stats()["serve"]["qmp"]
        assert q["checkpoints"]["requested"] == q["checkpoints"]["completed"] == n, q["checkpoints"]
        assert len(pairs) == n, f"{len(pairs)} QEMU checkpoints for {n} divergences"
        qemu_ms = [(r.qemu_ts - st_.qemu_ts) * 1000 for st_, r in pairs]
        wait = q["request_to_resume_ms"]
        return {"migration": migration, "divergences": n,
                "matched_release_ms": summary(matched),
                "diverged_release_ms": summary(diverged),
                "added_ms_p50": round(statistics.median(diverged) - statistics.median(matched), 3),
                "qemu_stop_to_resume_ms": summary(qemu_ms),
                "serve_request_to_resume_ms": {k: wait[k] for k in
                                               ("count", "p50_ms", "p90_ms", "max_ms")}}
    finally:
        for sock in (p, s):
            if sock is not None:
                sock.close()
        if serve is not None:
            serve.kill_hard()
        if out is not None:
            out.close()
        pair.close()
        shutil.rmtree(workdir, ignore_errors=True)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True).stdout.splitlines()[0]
    return f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, {qemu}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--migration", choices=["unix", "tcp", "both"], default="both")
    ap.add_argument("--divergences", type=int, default=100, metavar="N")
    ap.add_argument("--gap-ms", type=float, default=20.0,
                    help="pause between two pairs (default 20 ms)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if shutil.which("qemu-system-x86_64") is None:
        print("qmp_latency: qemu-system-x86_64 is not installed", file=sys.stderr)
        return 2
    results = []
    for m in (["unix", "tcp"] if args.migration == "both" else [args.migration]):
        print(f"qmp_latency: {args.divergences} divergences, migration over {m} ...",
              file=sys.stderr)
        results.append(run(m, args.divergences, args.gap_ms / 1000))
    doc = {"date": datetime.date.today().isoformat(), "machine": machine(), "results": results}
    print(f"{doc['date']}, {doc['machine']}")
    print(f"{'migration':<10} {'matched p50':>12} {'diverged p50':>13} {'p90':>9} {'max':>9} "
          f"{'added p50':>10} {'QEMU STOP->RESUME p50':>22} {'serve request->RESUME p50':>26}")
    for r in results:
        d = r["diverged_release_ms"]
        print(f"{r['migration']:<10} {r['matched_release_ms']['p50_ms']:>9.3f} ms "
              f"{d['p50_ms']:>10.3f} ms {d['p90_ms']:>6.3f} ms {d['max_ms']:>6.3f} ms "
              f"{r['added_ms_p50']:>7.3f} ms {r['qemu_stop_to_resume_ms']['p50_ms']:>19.3f} ms "
              f"{r['serve_request_to_resume_ms']['p50_ms']:>23.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
