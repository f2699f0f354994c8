"""The core under the faults a COLO pair really has: a silent or vanished
secondary, a clock that jumps, and a bug of ours on some frame.

Each of these failed on the code before: a timeout scan answered only the
connection of the oldest queued frame (N silent flows took N scans), the
timer woke every cycle whatever there was to do (a capture spanning 70 years
took 2.2e9 scans), and an exception inside the core escaped to the adapter.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colo_cli.core import (CheckpointDone, CheckpointMode, Comparator, Config,
                           InternalError, Released, SecondaryAbsent)
from colo_cli.testing import tcp_frame, udp_frame

from scripts import P, S, bypasses, out_frames, releases, requests


def flow_frame(i, n=0):
    """Frame ``n`` of flow ``i`` (distinct 5-tuples)."""
    return udp_frame(b"f%d-%d" % (i, n), sport=1000 + i % 60000, dport=2000 + i // 60000)


def in_flow_order(out, sent):
    """``out`` holds each frame of ``sent`` once, and each flow's frames in
    the order sent (the flow: bytes 34-38 of the frame, its UDP ports)."""
    def by_flow(frames):
        flows = {}
        for f in frames:
            flows.setdefault(f[34:38], []).append(f)
        return flows
    return sorted(out) == sorted(sent) and by_flow(out) == by_flow(sent)


def run_timers(c, until_ms):
    """Run every scan due by ``until_ms`` at its own tick, as serve's timer
    would; returns (events, number of scans run)."""
    events, scans = [], 0
    while (due := c.get_timer()) is not None and due <= until_ms:
        events += c.handle_timer(due)
        scans += 1
    return events, scans


# -- a silent secondary: every overdue connection is answered in one scan -----

def test_local_mode_scan_answers_every_overdue_connection_at_once():
    c = Comparator(Config(compare_timeout_ms=500, expired_scan_cycle_ms=100),
                   mode=CheckpointMode.LOCAL)
    frames = [flow_frame(i) for i in range(10_000)]
    for i, f in enumerate(frames):
        assert c.receive(P, f, i * 0.001) == []
    events, scans = run_timers(c, 10_000)
    # one scan (the first tick past 500 ms for the oldest, 10 ms for all)
    assert scans == 1
    assert sorted(out_frames(events)) == sorted(frames)
    assert {r for _, r in releases(events)} == {"checkpoint"}
    assert requests(events) == ["timeout"] * 10_000
    assert len([e for e in events if isinstance(e, CheckpointDone)]) == 10_000
    assert c.queued_frames == 0 and c.get_timer() is not None   # (idle housekeeping)


def test_external_mode_scan_raises_one_request_however_many_connections():
    # with a COLO system to checkpoint, one request is enough: the checkpoint
    # flushes every queue (QEMU raises one per scan too)
    c = Comparator(Config(compare_timeout_ms=500, expired_scan_cycle_ms=100))
    for i in range(1000):
        c.receive(P, flow_frame(i), 0)
    assert requests(c.handle_timer(600)) == ["timeout"]
    done = c.checkpoint(610)
    assert len(out_frames(done)) == 1000


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 2999)), min_size=1, max_size=200),
       st.sampled_from([(3000, 1000), (500, 100), (200, 70)]))
def test_every_twinless_primary_frame_leaves_within_the_bound(arrivals, timing):
    """Local mode: with a silent secondary, every primary frame leaves by
    its arrival + compare_timeout + 2 x expired_scan_cycle, whatever the
    number of flows, in per-connection order."""
    timeout, cycle = timing
    c = Comparator(Config(compare_timeout_ms=timeout, expired_scan_cycle_ms=cycle),
                   mode=CheckpointMode.LOCAL)
    arrivals = sorted(arrivals, key=lambda a: a[1])
    sent, left = {}, {}
    counts = {}
    for flow, t in arrivals:
        # scans due before this arrival, at their own ticks
        for e in run_timers(c, t)[0]:
            if isinstance(e, Released):
                left[e.packet.data] = e
        n = counts[flow] = counts.get(flow, -1) + 1
        frame = flow_frame(flow, n)
        sent[frame] = (flow, t)
        for e in c.receive(P, frame, t):
            assert not isinstance(e, Released)
    for e in run_timers(c, 10**7)[0]:
        if isinstance(e, Released):
            left[e.packet.data] = e
    assert set(left) == set(sent)
    for frame, (flow, t) in sent.items():
        assert left[frame].hold_ms <= timeout + 2 * cycle
    # per connection, in the order sent
    order = {}
    for frame in left:
        order.setdefault(sent[frame][0], []).append(frame)
    for flow, frames in order.items():
        assert frames == [flow_frame(flow, n) for n in range(len(frames))]


# -- a vanished secondary: comparing stops, primary frames pass -----------------

def test_secondary_gone_longer_than_the_timeout_stops_comparing():
    c = Comparator(Config(compare_timeout_ms=500, expired_scan_cycle_ms=100))
    queued = [flow_frame(i) for i in range(5)]
    for f in queued:
        c.receive(P, f, 0)
    c.receive(S, flow_frame(99), 0)            # a secondary frame with no twin yet
    assert c.secondary_lost(50) == []
    events, _ = run_timers(c, 700)
    (absent,) = [e for e in events if isinstance(e, SecondaryAbsent)]
    assert absent.entered and absent.released == 5 and absent.now_ms == 600
    # (the timeout request of the tick before came first, with nobody to answer)
    assert sorted(f for f, r in releases(events)) == sorted(queued)
    assert {r for _, r in releases(events)} == {"secondary-absent"}
    assert c.secondary_absent and c.queued_frames == 0
    later = flow_frame(7)
    assert bypasses(c.receive(P, later, 800)) == [(later, "secondary-absent")]
    assert c.stats.bypassed["secondary-absent"] == 1 and c.table.get(later[26:38]) is None
    assert c.get_timer() is None or requests(run_timers(c, 10**6)[0]) == []
    back = c.secondary_back(900)
    assert [type(e) for e in back] == [SecondaryAbsent] and not back[0].entered
    assert not c.secondary_absent and len(c.table) == 0
    # compared again, from a clean state
    c.receive(P, flow_frame(8), 1000)
    assert releases(c.receive(S, flow_frame(8), 1001)) == [(flow_frame(8), "match")]
    assert c.snapshot()["secondary_absent_periods"] == 1


def test_secondary_back_in_time_changes_nothing():
    c = Comparator(Config(compare_timeout_ms=500, expired_scan_cycle_ms=100))
    c.receive(P, flow_frame(1), 0)
    c.secondary_lost(10)
    assert c.secondary_back(400) == []
    assert releases(c.receive(S, flow_frame(1), 450)) == [(flow_frame(1), "match")]
    assert not c.secondary_absent and c.snapshot()["secondary_absent_periods"] == 0


def test_a_secondary_frame_ends_the_absence_too():
    c = Comparator(Config(compare_timeout_ms=100, expired_scan_cycle_ms=100))
    c.secondary_lost(0)
    run_timers(c, 500)
    assert c.secondary_absent
    events = c.receive(S, flow_frame(1), 600)
    assert [type(e) for e in events] == [SecondaryAbsent] and not c.secondary_absent
    assert releases(c.receive(P, flow_frame(1), 601)) == [(flow_frame(1), "match")]


def test_absence_bound_with_timeouts_off_is_qemus_default_timeout():
    c = Comparator(Config(compare_timeout_ms=None))
    c.receive(P, flow_frame(1), 0)
    c.secondary_lost(0)
    events, _ = run_timers(c, 10_000)
    (absent,) = [e for e in events if isinstance(e, SecondaryAbsent)]
    assert absent.now_ms == 4000 and c.absent_after_ms == 3000   # strictly over 3000 ms


# -- the clock: cost bounded by what happens, not by the time that passes -------

@pytest.mark.parametrize("mode", [CheckpointMode.LOCAL, CheckpointMode.EXTERNAL])
def test_timer_skips_ticks_with_nothing_to_do(mode):
    c = Comparator(Config(), mode=mode)
    c.receive(P, flow_frame(1), 0)
    c.receive(S, flow_frame(1), 1)
    seventy_years_ms = 70 * 365.25 * 86400e3
    events, scans = run_timers(c, seventy_years_ms)
    assert events == [] and scans == 1 and len(c.table) == 0    # the idle eviction
    assert c.get_timer() is None


def test_a_jump_of_seventy_years_costs_one_scan_per_decision():
    c = Comparator(Config(), mode=CheckpointMode.LOCAL)
    for i in range(100):
        c.receive(P, flow_frame(i), i)
    t = 70 * 365.25 * 86400e3
    events = c.handle_timer(t)                        # overdue scans collapse
    assert len(out_frames(events)) == 100
    c.receive(P, flow_frame(500), t)
    c.receive(S, flow_frame(500), t + 1)
    events, scans = run_timers(c, 2 * t)
    assert scans <= 2 and events == []


# -- a bug of ours costs one frame, not the comparator --------------------------

class BoomComparator(Comparator):
    """Fails on every frame with b"boom" in it: a datagram before it is
    queued (it leaves at once, bypassed or dropped), a TCP segment after it
    has joined its queue and stream (it leaves from there).  A subclass, not
    a monkeypatch: the compiled core's classes and functions cannot be
    patched, Python subclasses of Comparator can be made."""

    def _receive_datagram(self, conn, pkt, primary, now_ms, out):
        if b"boom" in pkt.data:
            raise RuntimeError("injected")
        super()._receive_datagram(conn, pkt, primary, now_ms, out)

    def _receive_tcp(self, conn, pkt, primary, now_ms, out):
        super()._receive_tcp(conn, pkt, primary, now_ms, out)
        if b"boom" in pkt.data:
            raise ZeroDivisionError("injected after queueing")


@pytest.mark.parametrize("mode", [CheckpointMode.LOCAL, CheckpointMode.EXTERNAL])
def test_an_exception_on_some_frames_costs_those_frames_only(mode):
    c = BoomComparator(Config(), mode=mode)
    events = []
    sent = []
    seq = 1000
    for i in range(30):
        payload = b"boom-%d" % i if i % 7 == 3 else b"ok-%d" % i
        udp = udp_frame(payload, sport=5000 + i % 3)
        tcp = tcp_frame(payload, seq=seq)
        seq += len(payload)
        for f in (udp, tcp):
            # the secondary first: the comparison happens on the primary
            events += c.receive(S, f, i)
            events += c.receive(P, f, i)
            sent.append(f)
    events += c.finish(100)
    out = out_frames(events)
    assert sorted(out) == sorted(sent)                 # every primary frame once
    errors = [e for e in events if isinstance(e, InternalError)]
    assert errors and all(isinstance(e.error, (RuntimeError, ZeroDivisionError)) for e in errors)
    # the frames that did not fail were compared and matched
    matched = [f for f, r in releases(events) if r == "match"]
    assert sum(b"ok-" in f for f in matched) >= 30
    assert len(errors) >= 4                            # each boom frame at least once
    assert c.queued_frames == 0 and c.queued_bytes == 0


def test_a_frame_that_failed_after_it_was_queued_leaves_from_its_queue():
    class FailAfterEnqueue(Comparator):
        fail = True

        def _enqueue(self, queue, pkt, primary):
            super()._enqueue(queue, pkt, primary)
            if self.fail:
                raise RuntimeError("injected after enqueue")

    c = FailAfterEnqueue(Config())
    frame = flow_frame(1)
    events = c.receive(P, frame, 0)
    assert [type(e) for e in events] == [InternalError]      # not bypassed: it is queued
    c.fail = False
    assert releases(c.receive(S, frame, 1)) == [(frame, "match")]   # and compared


def test_when_finishing_fails_every_queued_frame_still_leaves():
    class FailingFlush(Comparator):
        def _flush_connection(self, *args, **kwargs):
            raise RuntimeError("injected")

    c = FailingFlush(Config())
    frames = [flow_frame(1, n) for n in range(3)] + [flow_frame(2, 0)]
    for f in frames:
        c.receive(P, f, 0)
    events = c.finish(5)
    assert out_frames(events) == frames            # in per-connection order
    assert isinstance(events[0], InternalError)
    assert c.queued_frames == 0 and len(c.table) == 0


def test_an_exception_in_a_scan_is_an_event():
    class FailingScan(Comparator):
        _evict_idle = None      # not callable: the scan fails after its request

    c = FailingScan(Config(compare_timeout_ms=100, expired_scan_cycle_ms=100))
    c.receive(P, flow_frame(1), 0)
    events = c.handle_timer(200)
    (error,) = [e for e in events if isinstance(e, InternalError)]
    assert isinstance(error.error, TypeError) and error.side is None


# -- a scan that fails, what a flush remembers, a clock past 2**53 ms (each
#    was a gap of the core, held as a strict xfail until it was closed) ------

class FailingIdleScan(Comparator):
    """The periodic scan fails every time, in its idle eviction (which runs
    after the timeout requests).  A subclass: the compiled core's instances
    take no attributes."""
    _evict_idle = None      # not callable


class FailingTimeoutScan(Comparator):
    """The periodic scan fails every time, as it raises its first timeout
    request (before the request is made)."""

    def _request(self, cause, conn, now_ms, out, answered=False, key=None):
        if cause == "timeout" and not answered:
            raise RuntimeError("injected")
        super()._request(cause, conn, now_ms, out, answered, key)


@pytest.mark.parametrize("mode", [CheckpointMode.LOCAL, CheckpointMode.EXTERNAL])
@pytest.mark.parametrize("cls", [FailingIdleScan, FailingTimeoutScan])
def test_a_scan_that_keeps_failing_still_lets_the_overdue_frames_go(cls, mode):
    """A bug of ours in the periodic scan, on every scan: the frames past the
    timeout must still leave, each once, in per-connection order, within the
    timeout plus two scan cycles, as they would without the bug (the core
    checkpoints the connections concerned itself: a scan that fails before
    its request would otherwise never ask anyone).  Before, the scan raised
    its requests, failed, forgot them, and did the same on every later tick:
    nothing ever left."""
    c = cls(Config(compare_timeout_ms=100, expired_scan_cycle_ms=100), mode=mode)
    frames = [flow_frame(i, n) for n in range(2) for i in range(3)]
    for f in frames:
        assert c.receive(P, f, 0) == []
    late = flow_frame(7)
    assert c.receive(P, late, 150) == []
    events, _scans = run_timers(c, 300)
    assert any(isinstance(e, InternalError) for e in events)
    assert in_flow_order(out_frames(events), frames + [late])
    assert all(e.hold_ms <= 100 + 2 * 100 for e in events if isinstance(e, Released))
    assert c.queued_frames == 0
    # and the comparator goes on comparing
    assert releases(c.receive(P, flow_frame(8), 400) + c.receive(S, flow_frame(8), 401)) == [
        (flow_frame(8), "match")]


def test_when_the_scan_and_its_fallback_fail_every_queued_frame_leaves():
    class FailingEverywhere(FailingIdleScan):
        def _checkpoint_one(self, conn, now_ms, out):
            raise RuntimeError("injected")

    c = FailingEverywhere(Config(compare_timeout_ms=100, expired_scan_cycle_ms=100),
                          mode=CheckpointMode.LOCAL)
    frames = [flow_frame(i, n) for n in range(2) for i in range(3)]
    for f in frames:
        c.receive(P, f, 0)
    events = c.handle_timer(200)
    assert [type(e) for e in events].count(InternalError) == 2
    assert in_flow_order(out_frames(events), frames)
    assert c.queued_frames == 0 and len(c.table) == 0


def test_what_a_flush_remembers_for_late_twins_stays_within_the_memory_bound():
    """A silent secondary and a primary that sends each flow's datagrams in a
    burst: each burst fills the queued-bytes limit and is flushed (released)
    when the next comes.  What the comparator still holds afterwards must stay
    within max_queued_bytes (and a little per connection); today every
    flushed datagram's payload is kept as well, for its secondary twin that
    never comes."""
    import gc
    import tracemalloc
    limit = 2 << 20
    c = Comparator(Config(max_queued_bytes=limit, compare_timeout_ms=None,
                          max_queue_size=100_000), mode=CheckpointMode.LOCAL)
    # made before tracing: what is measured is what the comparator allocates
    # (the frames it queues are the test's, and not counted)
    flows, burst_len = 20, 600              # a burst: 1.3 MiB with its bookkeeping
    bursts = [[udp_frame(b"%05d" % n + b"d" * 2000, sport=1000 + flow) for n in range(burst_len)]
              for flow in range(flows)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for flow, burst in enumerate(bursts):
            for frame in burst:
                c.receive(P, frame, flow)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert c.stats.snapshot()["checkpoint_requests"].get("memory-full", 0) >= flows - 1
    assert held <= limit + flows * 4096, f"{held / 2**20:.1f} MiB held for a {limit >> 20} MiB bound"


def test_short_of_room_what_is_remembered_goes_before_any_queued_frame():
    """What a flushed flow remembers for late copies is forgotten, oldest
    first, before a queued frame is flushed for room: here flow 1's memory
    of 40 flushed datagrams makes room for flow 2's queue, which stays
    queued (no memory-full request) and is then compared as usual; flow 1's
    late copies, no longer recognised, are compared like any datagram."""
    def big(flow, n):
        return udp_frame(b"%d-%d" % (flow, n) + b"x" * 1000, sport=1000 + flow)

    limit = 60 * (len(big(1, 0)) + 256)
    c = Comparator(Config(max_queued_bytes=limit, compare_timeout_ms=None),
                   mode=CheckpointMode.LOCAL)
    first = [big(1, n) for n in range(40)]
    for f in first:
        c.receive(P, f, 0)
    key = c.connections()[0].key
    assert len(out_frames(c.checkpoint_connection(key, 1))) == 40
    # with room, a late copy is recognised (and absorbed) ...
    c.receive(S, first[0], 2)
    assert c.stats.secondary_absorbed == 1
    # ... 50 frames of another flow then need the room it holds
    second = [big(2, n) for n in range(50)]
    for f in second:
        assert c.receive(P, f, 3) == []
    assert c.stats.checkpoint_requests["memory-full"] == 0
    assert c.queued_frames == 50
    events = []
    for f in second:
        events += c.receive(S, f, 4)
    assert [r for _, r in releases(events)] == ["match"] * 50
    c.receive(S, first[1], 5)                   # no longer recognised: queued
    assert c.stats.secondary_absorbed == 1 and c.queued_frames == 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("PSck"), st.integers(0, 3), st.integers(0, 2),
                          st.integers(1, 1400)), max_size=120),
       st.integers(8_000, 60_000))
def test_what_is_remembered_is_all_counted_and_within_the_bound(ops, limit):
    """Random datagram traffic on four flows with checkpoints of one flow
    (k) or of all (c) and a small memory bound: after every call, every
    flow's memory of flushed datagrams is counted, the count is exact, and
    what is held (queued and remembered) stays within the bound, unless the
    queues alone exceed it (then a flush follows at the next frame)."""
    from colo_cli.core.conntrack import STALE_ENTRY_OVERHEAD, STALE_RECORD_OVERHEAD
    from colo_cli.core.comparator import QUEUED_FRAME_OVERHEAD
    c = Comparator(Config(max_queued_bytes=limit, compare_timeout_ms=None, max_queue_size=8,
                          max_connections=3), mode=CheckpointMode.LOCAL)
    for t, (op, flow, n, size) in enumerate(ops):
        frame = udp_frame(b"%d" % n + b"z" * size, sport=4000 + flow)
        if op in "PS":
            c.receive(P if op == "P" else S, frame, t)
        elif op == "k":
            c.checkpoint_connection(frame[26:38], t)
        else:
            c.checkpoint(t)
        stale = c._stale
        counted = len(stale.records) * STALE_RECORD_OVERHEAD + sum(
            len(b) + STALE_ENTRY_OVERHEAD for _, remembered in stale.records for b in remembered)
        assert stale.held_bytes == counted
        live = {id(remembered) for conn, remembered in stale.records if conn.stale is remembered}
        for conn in c.table:
            assert conn.stale is None or id(conn.stale) in live
        queued = c.queued_bytes + c.queued_frames * QUEUED_FRAME_OVERHEAD
        assert queued + stale.held_bytes <= max(limit, queued)


def test_the_timer_moves_on_whatever_the_clock_reads():
    c = Comparator(Config(compare_timeout_ms=100, expired_scan_cycle_ms=100),
                   mode=CheckpointMode.LOCAL)
    c.receive(P, flow_frame(1), 0)
    far = 2.0 ** 72                   # a pcapng if_tsoffset gone wrong, in ms
    c.receive(P, flow_frame(2), far)
    handled = []
    for _ in range(20):
        due = c.get_timer()
        if due is None or c.queued_frames == 0:
            break
        assert due not in handled, f"the timer came back to {due}"
        handled.append(due)
        c.handle_timer(due)
    assert c.queued_frames == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.floats(0, 2.0 ** 80, allow_nan=False),
                          st.integers(0, 10_000).map(float)), min_size=1, max_size=6),
       st.sampled_from([(100, 100), (3000, 1000), (0.5, 0.25)]))
def test_each_scan_is_later_than_the_last_and_every_frame_leaves(arrivals, timing):
    """Whatever the clock reads (here up to 2**80 ms), the timer never comes
    back to a tick it has handled, and a few scans let every frame go."""
    timeout, cycle = timing
    c = Comparator(Config(compare_timeout_ms=timeout, expired_scan_cycle_ms=cycle),
                   mode=CheckpointMode.LOCAL)
    sent = []
    for i, t in enumerate(sorted(arrivals)):
        sent.append(flow_frame(i))
        c.receive(P, sent[-1], t)
    out, last = [], None
    for _ in range(4 * len(sent) + 8):
        due = c.get_timer()
        if due is None or c.queued_frames == 0:
            break
        assert last is None or due > last
        out += c.handle_timer(due)
        last = due
    assert c.queued_frames == 0
    assert sorted(out_frames(out)) == sorted(sent)
