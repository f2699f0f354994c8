#!/usr/bin/env python3
"""Coverage-guided fuzzing of the parts that read untrusted bytes.

    pip install atheris
    python fuzz/fuzz_targets.py framing  [libFuzzer options, e.g. -max_total_time=600]
    python fuzz/fuzz_targets.py packet   ...
    python fuzz/fuzz_targets.py capture  ...
    python fuzz/fuzz_targets.py core     ...
    python fuzz/fuzz_targets.py qmp      ...
    python fuzz/fuzz_targets.py qmp-policy ...

Not run in CI (it runs until stopped); what it finds is fixed and kept as a
regression test (tests/test_fuzz_regressions.py, whose cases are the inputs
found here).  Each target checks the module's promise, not just "no crash":

* framing: the decoder never raises, holds at most one record, and re-encoding
  the records it returns gives back exactly the bytes they came from;
* packet: the parser never raises and its offsets stay inside the frame;
* capture: the reader raises nothing but CaptureError, never hangs, and yields
  records no longer than the input;
* core: the comparator never raises, every primary frame leaves exactly once
  (after finish), and memory stays within the configured bounds;
* qmp: the QMP codec never raises, holds at most one line, and every reply it
  returns answers a command that was sent;
* qmp-policy: whatever QEMU and the comparator do, at most one checkpoint
  request is outstanding, held frames always have a deadline while a request
  is in flight, and nothing is in flight outside COLO state.
"""

import io
import sys

import atheris

with atheris.instrument_imports():
    from colo_cli.capture import CaptureError, open_capture
    from colo_cli.core import PRIMARY, SECONDARY, Bypassed, Comparator, Config, Matched, Released
    from colo_cli.core.framing import MAX_RECORD_LEN, FrameDecoder, NotifyDecoder
    from colo_cli.core.packet import parse
    from colo_cli.qmp import QmpClient, Reply
    from colo_cli.qmp_policy import Checkpointed, QmpCheckpointPolicy, SendRequest
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
        reader = open_capture("-", stdin=io.BytesIO(data), linktypes=None)
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


def qmp(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    c = QmpClient(max_line_bytes=fdp.ConsumeIntInRange(16, 4096))
    sent = set()
    if fdp.ConsumeBool():
        # past the greeting at once, so that replies and events get fuzzed too
        c.receive(b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}}, '
                  b'"capabilities": []}}\n')
    while fdp.remaining_bytes():
        if fdp.ConsumeBool() and c.greeting is not None and c.error is None and c.pending < 32:
            sent.add(c.command("query-status")[0])
            continue
        for msg in c.receive(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 200))):
            if isinstance(msg, Reply):
                assert msg.id in sent
                sent.discard(msg.id)
        assert len(c._buf) <= c.max_line_bytes
        assert c.error is None or "\n" not in c.error


def qmp_policy(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    p = QmpCheckpointPolicy(fdp.ConsumeIntInRange(1, 5000))
    now = 0
    names = ["STOP", "MIGRATION_PASS", "RESUME", "COLO_EXIT", "MIGRATION", "OTHER"]
    statuses = ["colo", "completed", "setup", "active", "failed", None]
    while fdp.remaining_bytes():
        now += fdp.ConsumeIntInRange(0, 3000)
        op = fdp.ConsumeIntInRange(0, 7)
        outstanding = p._outstanding_ms is not None
        if op == 0:
            out = p.request(now)
        elif op == 1:
            name = names[fdp.ConsumeIntInRange(0, len(names) - 1)]
            out = p.qmp_event(name, {"status": statuses[fdp.ConsumeIntInRange(0, 5)]}, now)
        elif op == 2:
            out = p.handle_timer(now)
        elif op == 3:
            out = p.disconnected(now, "lost")
        elif op == 4:
            p.connected(now)
            out = p.state_known(statuses[fdp.ConsumeIntInRange(0, 5)],
                                ["primary", "secondary", "none", None][fdp.ConsumeIntInRange(0, 3)],
                                fdp.ConsumeBool(), now)
        elif op == 5:
            out = p.refused(fdp.ConsumeIntInRange(0, p._seq + 1), "no", now)
        elif op == 6:
            p.capabilities_known(fdp.ConsumeBool())
            out = []
        else:
            due = p.get_timer()
            out = p.handle_timer(due if due is not None else now)
        sends = [a for a in out if isinstance(a, SendRequest)]
        assert len(sends) <= 1
        done = [a for a in out if isinstance(a, Checkpointed)]
        if sends and not done:
            assert not outstanding
        if p.in_flight:
            assert p.active and p.get_timer() is not None
        if not p.active:
            assert not p.in_flight and p.get_timer() is None
    assert p.completed <= p.requested and p.completed == p.wait_ms.count


TARGETS = {"framing": framing, "packet": packet, "capture": capture, "core": core, "qmp": qmp,
           "qmp-policy": qmp_policy}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(TARGETS)} [libFuzzer options]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
