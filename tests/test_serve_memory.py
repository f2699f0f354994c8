"""serve's memory under a primary-only flood stays under the bound the man
page states as a function of its options (colo-compare-serve(1), MEMORY):

    RSS <= 48 MiB + 3.5 x --max-queued-mib + 1.5 x --outdev-buffer
           + 4 KiB x --max-connections

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


def bound_mib(queued_mib: float, outdev_mib: float, connections: int) -> float:
    """The bound colo-compare-serve(1) states."""
    return 48 + 3.5 * queued_mib + 1.5 * outdev_mib + 4 * connections / 1024


BOUND_MIB = bound_mib(QUEUED_MIB, OUTDEV_MIB, CONNECTIONS)


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


@pytest.mark.slow
def test_rss_stays_under_the_stated_bound_with_a_large_connection_table(env):
    """--max-connections large and tiny frames, the other limits small: the
    connections are most of the memory.  200,000 flows of one 60-byte
    datagram each, the secondary connected and silent, so that every flow
    is flushed by a timeout (and keeps what it flushed).  Measured
    2026-12-07: about 3.3 KiB a connection (300,000: 984 MiB peak), over the
    3 KiB the man page said."""
    connections = 200_000
    p_ep, s_ep, o_ep = (unix_ep(env.workdir, n)[0] for n in ("p.sock", "s.sock", "o.sock"))
    srv = env.start(["--primary-in", p_ep, "--secondary-in", s_ep, "--outdev", o_ep,
                     "--max-queued-mib", "1", "--outdev-buffer", "1",
                     "--max-connections", str(connections),
                     "--compare-timeout", "100", "--expired-scan-cycle", "50"])
    p = env.track(connect(p_ep))
    env.track(connect(s_ep))                 # connected, and silent
    env.track(OutReader(connect(o_ep)))
    batch = []
    for i in range(connections):
        batch.append(rec(udp_frame(b"%07d" % i, sport=1024 + i % 60000, dport=9 + i // 60000)))
        if len(batch) == 1024:
            p.sendall(b"".join(batch))
            batch = []
    p.sendall(b"".join(batch))
    st = srv.wait_stats(lambda st: st["released"]["total"] == connections, timeout=180,
                        what="every primary frame released")
    assert st["connections"]["now"] == connections       # none evicted: all are in the table
    peak = peak_rss_mib(srv.pid)
    bound = bound_mib(1, 1, connections)
    assert peak <= bound, f"peak RSS {peak:.0f} MiB > {bound:.0f} MiB"
    srv.assert_running()
