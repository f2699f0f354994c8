#!/usr/bin/env python3
"""Coverage-guided fuzzing of the parts that read untrusted bytes.

    pip install atheris
    python fuzz/fuzz_targets.py framing  [libFuzzer options, e.g. -max_total_time=600]
    python fuzz/fuzz_targets.py packet   ...
    python fuzz/fuzz_targets.py capture  ...
    python fuzz/fuzz_targets.py core     ...

Not run in CI (it runs until stopped); what it finds is fixed and kept as a
regression test (tests/test_fuzz_regressions.py, whose cases are the inputs
found here).  Each target checks the module's promise, not just "no crash":

* framing: the decoder never raises, holds at most one record, and re-encoding
  the records it returns gives back exactly the bytes they came from;
* packet: the parser never raises and its offsets stay inside the frame;
* capture: the reader raises nothing but CaptureError, never hangs, and yields
  records no longer than the input;
* core: the comparator never raises, every primary frame leaves exactly once
  (after finish), and memory stays within the configured bounds.
"""

import io
import sys

import atheris

with atheris.instrument_imports():
    from colo_cli.capture import CaptureError, open_capture
    from colo_cli.core import PRIMARY, SECONDARY, Bypassed, Comparator, Config, Matched, Released
    from colo_cli.core.framing import MAX_RECORD_LEN, FrameDecoder, NotifyDecoder
    from colo_cli.core.packet import parse
    from colo_cli.testing import tcp_frame, udp_frame, ether, ipv4

# Valid beginnings for the core target, so fuzzed frames reach the comparison
# rules instead of stopping at the Ethernet header.
TEMPLATES = [
    udp_frame(b"0123456789abcdef"),
    udp_frame(b"0123456789abcdef", sport=6000, dport=5000),
    tcp_frame(b"segment-payload!", seq=1000, ack=5000),
    tcp_frame(b"", seq=1016, ack=5000, flags=0x10),
    tcp_frame(b"", seq=999, ack=0, flags=0x02),
    tcp_frame(b"", seq=1016, ack=5000, flags=0x11),
    udp_frame(b"six", src="fd00::1", dst="fd00::2"),
    ether(ipv4(b"\0" * 16, 17, flags_frag=0x2000), 0x0800),
    ether(ipv4(b"\0" * 16, 17, flags_frag=0x0002), 0x0800),
]


def framing(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    vnet = fdp.ConsumeBool()
    chunk = fdp.ConsumeIntInRange(1, 300)
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    d = FrameDecoder(vnet_hdr_support=vnet)
    records = []
    for i in range(0, len(stream), chunk):
        records += d.feed(stream[i:i + chunk])
        assert d.pending_bytes <= MAX_RECORD_LEN + 8
    joined = b"".join(r for r, _ in records)
    assert joined in stream or not records or d.zero_length_records
    NotifyDecoder().feed(stream)


def packet(data: bytes) -> None:
    for l2 in (0, 4):
        r = parse(data, l2)
        if r[0] is not None:
            assert l2 <= r[2] <= len(data) and r[2] <= r[3], r
            assert isinstance(r[1], bytes)


def capture(data: bytes) -> None:
    try:
        reader = open_capture("-", stdin=io.BytesIO(data), require_ethernet=False)
    except CaptureError:
        return
    total = 0
    for _number, ts, frame, orig, _linktype in reader:
        assert isinstance(ts, int)
        total += len(frame)
        assert total <= len(data)
    reader.close()


def core(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    config = Config(compare_timeout_ms=fdp.ConsumeIntInRange(1, 1000), expired_scan_cycle_ms=50,
                    max_queue_size=fdp.ConsumeIntInRange(1, 8),
                    max_connections=fdp.ConsumeIntInRange(1, 8),
                    max_queued_bytes=fdp.ConsumeIntInRange(64, 20000),
                    normalize_seq=fdp.ConsumeBool())
    c = Comparator(config, compact=fdp.ConsumeBool())
    now = 0
    sent = 0
    left = []
    while fdp.remaining_bytes() > 2:
        op = fdp.ConsumeIntInRange(0, 9)
        now += fdp.ConsumeIntInRange(0, 300)
        if op == 8:
            events = c.handle_timer(now)
        elif op == 9:
            events = c.checkpoint(now)
        else:
            side = PRIMARY if op < 5 else SECONDARY
            frame = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
            if fdp.ConsumeBool():
                # a template, cut somewhere, with fuzzed bytes written over it
                t = TEMPLATES[fdp.ConsumeIntInRange(0, len(TEMPLATES) - 1)]
                at = fdp.ConsumeIntInRange(14, len(t))
                frame = t[:at] + frame + t[at + len(frame):]
            if side == PRIMARY:
                sent += 1
            events = c.receive(side, frame, now)
        left += [e for e in events if isinstance(e, (Matched, Released, Bypassed))]
        assert c.queued_bytes <= config.max_queued_bytes
        assert len(c.table) <= config.max_connections
    left += [e for e in c.finish(now) if isinstance(e, (Matched, Released, Bypassed))]
    assert len(left) == sent, (len(left), sent)


TARGETS = {"framing": framing, "packet": packet, "capture": capture, "core": core}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(TARGETS)} [libFuzzer options]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
