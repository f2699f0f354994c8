#!/usr/bin/env python3
"""Soak test: sustained, faulty traffic through ``colo-compare serve`` for
minutes, with its memory watched.

    python benchmarks/soak.py --duration 300        # five minutes
    python benchmarks/soak.py --duration 10 --json  # what the test suite runs

Traffic: identical UDP and TCP on many flows, at a steady rate, with faults
mixed in: divergences (the secondary sends other bytes), malformed frames on
both sides, zero-length records, flows that only the primary uses (they time
out), a secondary that sends a hostile length prefix and has to
reconnect, and secondary outages: every ``--outage-every`` seconds the
secondary falls silent (connected, sending nothing) or disconnects, by
turns, for ``--outage`` seconds, while the primary goes on.  Every primary
frame carries a serial number and its send time, so at the end the outdev
stream is checked: every primary frame out exactly once (released, flushed
or passed through), per-flow order kept, and no frame held longer than
``compare_timeout + 2 x expired_scan_cycle`` (by serve's own hold-time
counters; the client's send-to-outdev time is reported beside it).  serve's
resident memory is sampled every second; after a warm-up it must stay flat,
but for what serve's own counters say it held at most (the queues of a
silent spell, released frames waiting for a slow outdev reader).

Exit status 0 when everything holds, 1 otherwise; the summary says why.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from colo_cli.control import query  # noqa: E402
from colo_cli.core.framing import FrameDecoder, encode  # noqa: E402
from colo_cli.testing import ether, tcp_frame, udp_frame  # noqa: E402

MAGIC = b"SOAK"
TAG = struct.Struct(">QIQ")        # serial, flow, send time (monotonic ns)
COMPARE_TIMEOUT_MS, SCAN_CYCLE_MS = 500, 100
#: what a silent or vanished secondary may cost a primary frame (issue 13)
HOLD_BOUND_MS = COMPARE_TIMEOUT_MS + 2 * SCAN_CYCLE_MS


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def connect(path: str, timeout_s: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + timeout_s
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Reader(threading.Thread):
    """Reads outdev continuously and counts every primary serial number."""

    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock = sock
        self.decoder = FrameDecoder()
        # how often each serial number came out, one byte each: a dict or
        # set of millions of entries stalls this process (and with it the
        # sender thread, between its primary and secondary writes) for
        # hundreds of ms whenever it resizes, which made serve time out
        # frames whose twins the stalled client had not sent yet
        self.seen = bytearray(1 << 20)
        self.distinct = 0
        self.last_per_flow: dict[int, int] = {}
        self.reordered = 0
        self.frames = 0
        self.max_latency_ns = 0        # send -> read back from outdev
        self.stop = False

    def run(self):
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            now_ns = time.monotonic_ns()
            for wire, _ in self.decoder.feed(data):
                self.frames += 1
                at = wire.find(MAGIC)
                if at < 0:
                    continue
                serial, flow, sent_ns = TAG.unpack_from(wire, at + 4)
                if now_ns - sent_ns > self.max_latency_ns:
                    self.max_latency_ns = now_ns - sent_ns
                if serial >= len(self.seen):
                    self.seen.extend(bytes(max(serial + 1, 2 * len(self.seen)) - len(self.seen)))
                n = self.seen[serial]
                if n == 0:
                    self.distinct += 1
                if n < 255:
                    self.seen[serial] = n + 1
                if self.last_per_flow.get(flow, -1) > serial:
                    self.reordered += 1
                self.last_per_flow[flow] = serial


def counted_faults(st: dict, faults: dict) -> dict:
    """Each injected fault against the counter serve's stats keep for it.
    Exact where the fault is certain to reach serve; where a secondary
    connection replaced after a hostile length may have taken unread frames
    with it, those frames' primaries time out instead, so the counters are
    bounds."""
    errors = st["serve"]["input_errors"]
    timeouts = st["checkpoint_requests"].get("timeout", 0)
    miscompares = st["miscompares"].get("udp:content", 0)
    rows = {
        "zero_length": (errors["primary"]["zero_length"], faults["zero_length"] == errors["primary"]["zero_length"]),
        "hostile_length": (errors["secondary"]["oversized"],
                           faults["hostile_length"] == errors["secondary"]["oversized"]),
        "malformed": (st["bypassed"].get("unknown-ethertype", 0),
                      faults["malformed"] == st["bypassed"].get("unknown-ethertype", 0)),
    }
    # a disconnect longer than the compare timeout is one period of comparing
    # stopped (the hostile-length reconnects are immediate: none)
    absent = st.get("secondary_absent_periods", 0)
    rows["secondary_disconnected"] = (absent, faults["secondary_disconnected"] == absent)
    out = {k: {"injected": faults[k], "counted": n, "ok": ok} for k, (n, ok) in rows.items()}
    # A diverging datagram is a miscompare.  A datagram with no twin is one
    # too when the flow's next datagram comes before the compare timeout
    # (FIFO: it is compared with the lonely one's place), else a timeout.
    # Each raises one checkpoint request either way.
    injected = faults["divergence"] + faults["primary_only"]
    out["divergence+primary_only"] = {"injected": injected, "counted": miscompares + timeouts,
                                      "ok": miscompares > 0 and miscompares + timeouts >= injected}
    return out


def outage_at(t_s: float, every_s: float, length_s: float) -> str | None:
    """Which secondary outage is on at ``t_s`` seconds into the run: from
    ``every_s`` on, every ``every_s`` seconds, for ``length_s``, silent and
    disconnected by turns."""
    if every_s <= 0 or t_s < every_s:
        return None
    k = int(t_s // every_s)
    if t_s - k * every_s >= length_s:
        return None
    return "secondary_silent" if k % 2 else "secondary_disconnected"


def soak(duration_s: float, rate: int, flows: int, workdir: str, log,
         outage_every_s: float = 30.0, outage_s: float = 10.0) -> dict:
    paths = {n: os.path.join(workdir, n) for n in ("p", "s", "o", "ctl")}
    argv = [sys.executable, "-m", "colo_cli", "serve",
            "--primary-in", f"unix:{paths['p']},server", "--secondary-in", f"unix:{paths['s']},server",
            "--outdev", f"unix:{paths['o']},server", "--compare-timeout", str(COMPARE_TIMEOUT_MS),
            "--expired-scan-cycle", str(SCAN_CYCLE_MS), "--quiet", "--control", paths["ctl"]]
    err = open(os.path.join(workdir, "serve.err"), "wb")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=err, stderr=err)
    try:
        out = connect(paths["o"])
        pri = connect(paths["p"])
        sec = connect(paths["s"])
        reader = Reader(out)
        reader.start()
        serial = 0
        tcp_seq = {}
        sent_primary = 0          # every serial number 1..serial is a primary frame
        sent_secondary = 0
        faults = {"divergence": 0, "malformed": 0, "zero_length": 0, "primary_only": 0,
                  "hostile_length": 0, "secondary_silent": 0, "secondary_disconnected": 0}
        outage = None             # the outage on now, if any
        hostile_due = False
        samples = []
        start = time.monotonic()
        next_sample = start
        batch = max(1, rate // 100)           # sent every 10 ms
        tick = 0
        while time.monotonic() - start < duration_s:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}")
            now_outage = outage_at(time.monotonic() - start, outage_every_s, outage_s)
            if now_outage != outage:
                if now_outage is not None:
                    faults[now_outage] += 1
                    if now_outage == "secondary_disconnected":
                        sec.close()
                if outage == "secondary_disconnected":
                    sec = connect(paths["s"])
                outage = now_outage
            p_buf, s_buf = [], []
            sent_ns = time.monotonic_ns()
            for _ in range(batch):
                serial += 1
                flow = serial % flows
                tag = MAGIC + TAG.pack(serial, flow, sent_ns)
                if flow % 4 == 0:
                    seq = tcp_seq.get(flow, 1000)
                    frame = tcp_frame(tag + b"t" * 64, seq=seq, ack=7, sport=10000 + flow, dport=80)
                    tcp_seq[flow] = seq + len(tag) + 64
                else:
                    frame = udp_frame(tag + b"u" * 100, sport=10000 + flow, dport=53)
                p_buf.append(encode(frame))
                sent_primary += 1
                k = serial % 997
                if k == 1 and flow % 4:
                    # a divergence on a datagram flow: the primary wins
                    s_buf.append(encode(frame[:-1] + b"X"))
                    faults["divergence"] += 1
                elif k == 2 and flow % 4:
                    faults["primary_only"] += 1          # no twin: times out
                else:
                    s_buf.append(encode(frame))
            tick += 1
            if tick % 50 == 0 and outage is None:
                # malformed frames (passed through from the primary, dropped
                # from the secondary) and a zero-length record; not during an
                # outage, where every primary frame passes as secondary-absent
                # whatever it is, so that each shows in its own counter
                serial += 1
                junk = ether(MAGIC + TAG.pack(serial, flows + 1, sent_ns), 0x88B5)
                p_buf.append(encode(junk))
                s_buf.append(encode(junk))
                sent_primary += 1
                p_buf.append(b"\0\0\0\0")
                faults["malformed"] += 1
                faults["zero_length"] += 1
            pri.sendall(b"".join(p_buf))
            if outage is None:
                sec.sendall(b"".join(s_buf))
                sent_secondary += len(s_buf)
            if tick % 500 == 0:
                hostile_due = True       # (after the outage, if one is on)
            if hostile_due and outage is None:
                hostile_due = False
                # the secondary sends a hostile length and is cut off; it
                # reconnects (frames it sent meanwhile are lost with the
                # connection, so their primaries time out and are released)
                sec.sendall(b"\x7f\xff\xff\xff")
                faults["hostile_length"] += 1
                sec.close()
                sec = connect(paths["s"])
            now = time.monotonic()
            if now >= next_sample:
                samples.append((round(now - start, 1), rss_kib(proc.pid)))
                next_sample += 1.0
            time.sleep(max(0.0, start + tick * 0.01 - time.monotonic()))
        # let timeouts fire and outdev drain
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and reader.distinct < sent_primary:
            time.sleep(0.1)
        samples.append((round(time.monotonic() - start, 1), rss_kib(proc.pid)))
        reader.stop = True
        st = query(paths["ctl"], {"cmd": "stats"})["stats"]
        counted = counted_faults(st, faults)
        # secondary frames a cut-off connection took with it when its
        # replacement arrived before serve had read them all
        secondary_unread = sent_secondary - st["frames_in"]["secondary"]
        seen = bytes(reader.seen[1:sent_primary + 1].ljust(sent_primary, b"\0"))
        missing = seen.count(0)
        duplicated = sent_primary - missing - seen.count(1)
        hold_max_ms = st["hold_ms"]["max_ms"]
        rss = [kib for _, kib in samples if kib]
        warm = rss[len(rss) // 4:] if len(rss) >= 8 else rss
        growth = (max(warm) - min(warm)) / min(warm) if warm else 0.0
        # what serve held at most, by its own counters: the comparison queues
        # (a silent spell) and released frames outdev had not taken yet (the
        # reader falling behind on a loaded machine).  Growth beyond that is
        # what a leak would be; RSS rarely shrinks back, so it keeps the peak.
        held_kib = (st["queued_bytes_high_water"]
                    + st["serve"]["links"]["outdev"]["queued_bytes_high_water"]) // 1024
        unexplained = (max(0, max(warm) - min(warm) - held_kib) / min(warm)) if warm else 0.0
        result = {"duration_s": duration_s, "rate_frames_s": rate, "flows": flows,
                  "primary_frames": sent_primary, "out_frames": reader.frames,
                  "missing": missing, "duplicated": duplicated, "reordered": reader.reordered,
                  "faults": faults, "serve_alive": proc.poll() is None,
                  "rss_kib": {"first": rss[0] if rss else None, "last": rss[-1] if rss else None,
                              "max": max(rss) if rss else None},
                  "rss_growth_after_warmup": round(growth, 3),
                  "rss_growth_unexplained": round(unexplained, 3), "samples": len(samples),
                  "counted": counted, "secondary_unread": secondary_unread,
                  "checkpoint_requests": dict(st["checkpoint_requests"]),
                  "miscompares": dict(st["miscompares"]),
                  "released": dict(st["released"]), "bypassed": dict(st["bypassed"]),
                  "hold_max_ms": hold_max_ms, "hold_bound_ms": HOLD_BOUND_MS,
                  "held_high_water_kib": held_kib,
                  "client_latency_max_ms": round(reader.max_latency_ns / 1e6, 1)}
        result["ok"] = (not missing and not duplicated and not reader.reordered
                        and result["serve_alive"] and unexplained < 0.25
                        and hold_max_ms <= HOLD_BOUND_MS
                        and all(c["ok"] for c in counted.values()))
        return result
    finally:
        for s in ("pri", "sec", "out"):
            try:
                locals()[s].close()
            except Exception:  # noqa: BLE001
                pass
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        err.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of traffic (default 180)")
    ap.add_argument("--rate", type=int, default=20000, help="primary frames per second (default 20000)")
    ap.add_argument("--flows", type=int, default=2000, help="flows (default 2000)")
    ap.add_argument("--outage-every", type=float, default=30.0, metavar="S",
                    help="a secondary outage every S seconds, silent and disconnected by turns "
                         "(default 30; 0: none)")
    ap.add_argument("--outage", type=float, default=10.0, metavar="S",
                    help="how long each secondary outage lasts (default 10)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="colo-soak-", dir="/tmp") as d:
        result = soak(args.duration, args.rate, args.flows, d, log=print,
                      outage_every_s=args.outage_every, outage_s=args.outage)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{result['primary_frames']:,} primary frames in {args.duration:g} s "
              f"({args.rate:,}/s on {args.flows:,} flows); faults {result['faults']}")
        print(f"missing {result['missing']}, duplicated {result['duplicated']}, "
              f"reordered {result['reordered']}, serve alive: {result['serve_alive']}")
        print("counted by serve's stats: " + ", ".join(
            f"{k} {c['counted']:,} of {c['injected']:,}{'' if c['ok'] else ' (WRONG)'}"
            for k, c in result["counted"].items())
            + f"; secondary frames never read (cut-off connections): {result['secondary_unread']:,}")
        print(f"checkpoint requests by cause {result['checkpoint_requests']}, "
              f"miscompares {result['miscompares']}")
        print(f"released {result['released']}, bypassed {result['bypassed']}")
        print(f"longest hold {result['hold_max_ms']:.1f} ms (serve's counters; bound "
              f"{result['hold_bound_ms']} ms); longest send-to-outdev time seen by the client "
              f"{result['client_latency_max_ms']:.1f} ms")
        print(f"serve RSS KiB first {result['rss_kib']['first']}, last {result['rss_kib']['last']}, "
              f"max {result['rss_kib']['max']}; growth after warm-up "
              f"{result['rss_growth_after_warmup'] * 100:.1f} %, "
              f"{result['rss_growth_unexplained'] * 100:.1f} % beyond the "
              f"{result['held_high_water_kib']:,} KiB serve held at most")
        print("OK" if result["ok"] else "FAILED")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
