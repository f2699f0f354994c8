"""serve's memory under a primary-only flood stays under the bound the man
page states as a function of its options (colo-compare-serve(1), MEMORY):

    RSS <= 48 MiB + 3.5 x --max-queued-mib + 1.5 x --outdev-buffer
           + 3 KiB x --max-connections

Measured as the process's peak RSS (VmHWM), with outdev reading and with
outdev not reading at all (its buffer fills, then drops are counted).
Before, a 322 MB flood of 8 KB frames on 40,000 flows took RSS to 480 MB
with the defaults; frames that had left were kept alive by the timeout
list, and neither limit counted what holding a frame costs beyond its
bytes.
"""

from __future__ import annotations

import pytest

from colo_cli.testing import tcp_frame, udp_frame
from serve_helpers import OutReader, connect, rec
from test_serve import env, unix_ep  # noqa: F401 - the fixture

QUEUED_MIB, OUTDEV_MIB, CONNECTIONS = 32, 16, 4096
BOUND_MIB = 48 + 3.5 * QUEUED_MIB + 1.5 * OUTDEV_MIB + 3 * CONNECTIONS / 1024


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def udp_flood():
    """~160 MB: 20,000 flows of 8 KB datagrams, twice each."""
    return (rec(udp_frame(b"%07d" % i + b"u" * 8180, sport=1024 + i % 20000, dport=9))
            for i in range(40_000))


def tcp_flood():
    """~145 MB: 100 connections of 1448-byte segments in sequence."""
    seqs = [1] * 100
    for i in range(100_000):
        f = i % 100
        yield rec(tcp_frame(b"t" * 1448, seq=seqs[f], sport=2000 + f))
        seqs[f] += 1448


@pytest.mark.slow
@pytest.mark.parametrize("flood", [udp_flood, tcp_flood], ids=["udp-8k", "tcp"])
@pytest.mark.parametrize("outdev_reads", [True, False], ids=["outdev-reads", "outdev-stalled"])
def test_rss_stays_under_the_stated_bound_under_a_primary_only_flood(env, flood, outdev_reads):
    p_ep, s_ep, o_ep = (unix_ep(env.workdir, n)[0] for n in ("p.sock", "s.sock", "o.sock"))
    srv = env.start(["--primary-in", p_ep, "--secondary-in", s_ep, "--outdev", o_ep,
                     "--max-queued-mib", str(QUEUED_MIB), "--outdev-buffer", str(OUTDEV_MIB),
                     "--max-connections", str(CONNECTIONS), "--max-queue-size", "100000",
                     "--compare-timeout", "600000"])
    p = env.track(connect(p_ep))
    env.track(connect(s_ep))                 # connected, and silent
    out = env.track(OutReader(connect(o_ep)))
    if not outdev_reads:
        out.pause()
    sent = 0
    batch = []
    for record in flood():
        batch.append(record)
        sent += 1
        if len(batch) == 256:
            p.sendall(b"".join(batch))
            batch = []
    p.sendall(b"".join(batch))
    st = srv.wait_stats(lambda st: st["frames_in"]["primary"] == sent, timeout=120,
                        what="serve to read the whole flood")
    peak = peak_rss_mib(srv.pid)
    assert peak <= BOUND_MIB, f"peak RSS {peak:.0f} MiB > {BOUND_MIB:.0f} MiB"
    # the limits did their work: memory-full flushes, and with a stalled
    # outdev, counted drops past its buffer
    assert st["queued_bytes_high_water"] <= QUEUED_MIB << 20
    assert st["checkpoint_requests"].get("memory-full", 0) > 0
    outdev = st["serve"]["links"]["outdev"]
    assert outdev["queued_bytes_high_water"] <= OUTDEV_MIB << 20
    if not outdev_reads:
        assert outdev["dropped_frames"] > 0
    srv.assert_running()
