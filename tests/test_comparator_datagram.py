"""Scripted sequences for datagrams (UDP, ICMP, other IP, ARP), bypass,
timeouts, checkpoints and resource limits.

Tests named ``..._qemu_...`` say which observed QEMU 7.2 behaviour
(``spec/qemu-7.2-observed.md``) the rule follows or departs from."""

from colo_cli.core import Comparator, Config
from colo_cli.testing import (arp_frame, ether, gre_frame, icmp_frame, tcp_frame, udp,
                              udp_frame)

from scripts import (P, S, bypasses, checkpoints_done, drops, miscompares, out_frames,
                     releases, requests, run)


def u(i, **kw):
    return udp_frame(b"payload-%d" % i, **kw)


# -- UDP ------------------------------------------------------------------------

def test_identical_udp_released_as_each_secondary_arrives_qemu_a1():
    script = [(P, u(0), 0), (S, u(0), 20), (P, u(1), 40), (S, u(1), 60)]
    c, events = run(script)
    assert releases(events) == [(u(0), "match"), (u(1), "match")]
    assert [e.hold_ms for e in events] == [20, 20]
    assert requests(events) == []


def test_primary_ahead_released_in_order_without_checkpoints_departs_from_qemu_a2():
    # QEMU 7.2 pops the newest primary first: P2 P1 P0 and two DO_CHECKPOINTs (a2).
    script = [(P, u(0), 0), (P, u(1), 20), (P, u(2), 40),
              (S, u(0), 161), (S, u(1), 181), (S, u(2), 201)]
    _, events = run(script)
    assert out_frames(events) == [u(0), u(1), u(2)]
    assert requests(events) == []


def test_secondary_ahead_qemu_a3():
    script = [(S, u(0), 0), (S, u(1), 20), (P, u(0), 161), (P, u(1), 181)]
    _, events = run(script)
    assert out_frames(events) == [u(0), u(1)]


def test_ip_id_and_ttl_are_not_compared_qemu_a5():
    _, events = run([(P, u(0, ident=1, ttl=64), 0), (S, u(0, ident=999, ttl=3), 1)])
    assert out_frames(events) == [u(0, ident=1, ttl=64)]


def test_udp_checksum_is_compared_qemu_a6():
    p = udp_frame(b"same", checksum=0x1111)
    s = udp_frame(b"same", checksum=0x2222)
    _, events = run([(P, p, 0), (S, s, 1)])
    (m,) = miscompares(events)
    assert (m.kind, m.cause, m.stream_offset, m.datagram_index) == ("udp", "content", 6, 0)
    assert m.primary.data == p and m.secondary.data == s
    assert p[m.primary_offset] != s[m.secondary_offset] and m.primary_offset == 34 + 6
    assert requests(events) == ["miscompare"] and out_frames(events) == []


def test_ethernet_padding_is_not_compared_departs_from_qemu_a7():
    # QEMU compares up to the end of the frame and miscompares on a trailer.
    _, events = run([(P, u(0), 0), (S, u(0, pad_to=80), 1)])
    assert out_frames(events) == [u(0)]


def test_different_length_is_a_length_miscompare_qemu_b2():
    _, events = run([(P, udp_frame(b"abcd"), 0), (S, udp_frame(b"abcde"), 1)])
    (m,) = miscompares(events)
    assert m.cause == "length" and m.stream_offset == 5   # the UDP length field's low byte


def test_mismatch_holds_later_matches_fifo_departs_from_qemu_b3():
    # QEMU releases P1 before P0 (no head-of-line order) and requests 3 checkpoints.
    script = [(P, u(0), 0), (S, udp_frame(b"other"), 20), (P, u(1), 40), (S, u(1), 61)]
    c, events = run(script)
    assert out_frames(events) == [] and requests(events) == ["miscompare"]
    _, events2 = run([("checkpoint", 100)], comparator=c)
    assert releases(events2) == [(u(0), "checkpoint"), (u(1), "checkpoint")]
    (done,) = checkpoints_done(events2)
    assert (done.released, done.discarded) == (2, 2)


def test_after_checkpoint_comparison_starts_clean_qemu_i3():
    script = [(P, u(0), 0), (S, udp_frame(b"x"), 21), ("checkpoint", 41),
              (P, u(1), 91), (S, u(1), 112)]
    _, events = run(script)
    assert releases(events) == [(u(0), "checkpoint"), (u(1), "match")]


def test_datagram_index_counts_compared_pairs():
    script = [(P, u(0), 0), (S, u(0), 1), (P, u(1), 2), (S, u(1), 3), (P, u(2), 4),
              (S, udp_frame(b"payload-X"), 5)]
    _, events = run(script)
    (m,) = miscompares(events)
    assert m.datagram_index == 2 and m.stream_offset == 6    # the UDP checksum differs first


def test_flows_are_independent_qemu_a4():
    a = [udp_frame(b"a", sport=1), udp_frame(b"b", sport=2), udp_frame(b"c", sport=3)]
    script = [(P, f, i) for i, f in enumerate(a)] + [(S, f, 10 + i) for i, f in enumerate(a)]
    _, events = run(script)
    assert out_frames(events) == a


# -- ICMP, other protocols, ARP, IPv6, VLAN ----------------------------------------

def test_icmp_qemu_c1_c2_c3():
    _, ev1 = run([(P, icmp_frame(seq=1), 0), (S, icmp_frame(seq=1, ip_ident=5, ttl=9), 1)])
    assert len(out_frames(ev1)) == 1
    _, ev2 = run([(P, icmp_frame(seq=1), 0), (S, icmp_frame(seq=2), 1)])
    (m,) = miscompares(ev2)
    assert m.kind == "icmp" and m.stream_offset == 3     # the checksum's low byte differs first
    # a different echo id is another ping session: not compared with this one
    # (QEMU keys ICMP by address pair only and miscompares, c3)
    _, ev3 = run([(P, icmp_frame(ident=1), 0), (S, icmp_frame(ident=2), 1)])
    assert miscompares(ev3) == [] and out_frames(ev3) == []


def test_other_protocol_ignores_ip_id_departs_from_qemu_d5():
    # QEMU compares "other" protocols from the Ethernet header on: IP ID miscompares.
    _, events = run([(P, gre_frame(ident=1), 0), (S, gre_frame(ident=2), 1)])
    assert out_frames(events) == [gre_frame(ident=1)]
    _, events = run([(P, gre_frame(b"\0\0\x08\0A"), 0), (S, gre_frame(b"\0\0\x08\0B"), 1)])
    assert miscompares(events)[0].kind == "ip"


def test_arp_is_compared_departs_from_qemu_d1_d3():
    # QEMU passes primary ARP straight through and drops the secondary's (d1-d3).
    _, events = run([(P, arp_frame(), 0)])
    assert out_frames(events) == []                    # waits for the secondary
    _, events = run([(P, arp_frame(), 0), (S, arp_frame(pad_to=42), 1)])
    assert out_frames(events) == [arp_frame()]         # padding not compared
    _, events = run([(P, arp_frame(sha=b"\1" * 6), 0), (S, arp_frame(sha=b"\2" * 6), 1)])
    assert miscompares(events)[0].kind == "arp"


def test_ipv6_is_compared_departs_from_qemu_d1():
    p = udp_frame(b"v6", src="fd00::1", dst="fd00::2")
    _, events = run([(P, p, 0), (S, udp_frame(b"v7", src="fd00::1", dst="fd00::2"), 1)])
    assert miscompares(events) and out_frames(events) == []
    _, events = run([(P, p, 0), (S, p, 1)])
    assert releases(events) == [(p, "match")]


def test_vlan_is_compared_departs_from_qemu_d4():
    p = udp_frame(b"tagged", vlans=[(0x8100, 7)])
    _, events = run([(P, p, 0)])
    assert out_frames(events) == []
    _, events = run([(P, p, 0), (S, p, 1)])
    assert releases(events) == [(p, "match")]
    # the same datagram on another VLAN is another connection
    _, events = run([(P, p, 0), (S, udp_frame(b"tagged", vlans=[(0x8100, 8)]), 1)])
    assert out_frames(events) == [] and not miscompares(events)


# -- not comparable: bypass and drop ----------------------------------------------

def test_unknown_ethertype_bypassed_on_primary_dropped_on_secondary_qemu_d1_d2():
    lldp = ether(b"\2\7\4" + b"\0" * 40, 0x88CC)
    _, events = run([(P, lldp, 0), (S, lldp, 1)])
    assert bypasses(events) == [(lldp, "unknown-ethertype")]
    assert drops(events) == [(lldp, "unknown-ethertype")]


def test_short_frame_bypassed_qemu_j4():
    # QEMU calls anything under 18 bytes short (d4); a 16-byte frame has a
    # whole Ethernet header, so here it is an unknown EtherType instead.
    _, events = run([(P, b"\1" * 13, 0), (S, b"\1" * 10, 1)])
    assert bypasses(events) == [(b"\1" * 13, "short-frame")]
    assert drops(events) == [(b"\1" * 10, "short-frame")]
    _, events = run([(P, b"\1" * 16, 0)])
    assert bypasses(events) == [(b"\1" * 16, "unknown-ethertype")]


def test_bypass_counted_by_reason():
    c, _ = run([(P, b"\1" * 10, 0), (P, ether(b"", 0x88CC), 1), (P, b"", 2)])
    assert c.stats.bypassed == {"short-frame": 2, "unknown-ethertype": 1}


def test_bad_vnet_header_length_bypassed_qemu_j7():
    c = Comparator()
    frame = u(0)
    data = b"\0" * 21 + frame
    events = c.receive(P, data, 0, l2=21, vnet_hdr_len=21)
    assert bypasses(events) == [(data, "bad-vnet-header")]


def test_vnet_header_is_kept_not_compared_qemu_j8():
    c = Comparator()
    frame = u(0)
    p = b"\1" * 12 + frame
    s = b"\2" * 12 + frame
    c.receive(P, p, 0, l2=12, vnet_hdr_len=12)
    (rel,) = c.receive(S, s, 1, l2=12, vnet_hdr_len=12)
    assert rel.packet.data == p and rel.packet.vnet_header == b"\1" * 12


# -- timeouts --------------------------------------------------------------------

def test_timeout_requests_at_the_first_tick_past_the_timeout_then_every_tick_qemu_h1():
    c = Comparator(Config())
    c.receive(P, u(0), 0)
    # the timer names the first tick that decides something (ticks with
    # nothing to do are skipped); a scan run at an earlier tick decides nothing
    assert c.get_timer() == 4000
    got = {}
    for t in range(1000, 7000, 1000):
        assert c.get_timer() == max(t, 4000)
        got[t] = requests(c.handle_timer(t))
    # age must exceed 3000 ms strictly: the tick at 3000 does not fire
    assert got == {1000: [], 2000: [], 3000: [], 4000: ["timeout"], 5000: ["timeout"],
                   6000: ["timeout"]}


def test_fast_timeouts_qemu_h2():
    c, events = run([(P, u(0), 0)] + [("timer", t) for t in range(100, 1001, 100)],
                    compare_timeout_ms=500, expired_scan_cycle_ms=100)
    assert requests(events) == ["timeout"] * 5     # at 600, 700, 800, 900, 1000


def test_secondary_only_frames_time_out_too_qemu_h3():
    _, events = run([(S, u(0), 0), ("timer", 600)], compare_timeout_ms=500,
                    expired_scan_cycle_ms=100)
    assert requests(events) == ["timeout"]


def test_timeouts_never_release_and_stop_after_checkpoint_qemu_b4():
    script = [(P, u(0), 0), (S, udp_frame(b"zz"), 1), ("timer", 4000), ("timer", 5000),
              ("checkpoint", 5100), ("timer", 6000)]
    _, events = run(script)
    assert requests(events) == ["miscompare", "timeout", "timeout"]
    assert releases(events) == [(u(0), "checkpoint")]


def test_timeouts_off():
    _, events = run([(P, u(0), 0), ("timer", 100000)], compare_timeout_ms=None)
    assert requests(events) == []


def test_matched_frames_do_not_time_out():
    _, events = run([(P, u(0), 0), (S, u(0), 1), ("timer", 10000)])
    assert requests(events) == []


def test_timer_not_needed_when_idle():
    c = Comparator()
    assert c.get_timer() is None
    c.receive(P, u(0), 0)
    c.receive(S, u(0), 1)
    # idle-connection housekeeping only: the tick at which the connection
    # has been idle for idle_timeout_ms (120 s), not every cycle
    assert c.get_timer() == 121000
    assert c.handle_timer(121000) == [] and len(c.table) == 0 and c.get_timer() is None


# -- resource limits: never a silent drop ---------------------------------------------

def test_full_queue_flushes_the_connection_and_requests_departs_from_qemu_k1():
    # QEMU keeps max_queue_size+1 and silently drops the rest (k1: 75 of 1100 lost).
    frames = [u(i) for i in range(5)]
    c, events = run([(P, f, i) for i, f in enumerate(frames)], max_queue_size=3)
    assert releases(events) == [(f, "queue-full") for f in frames[:4]]
    assert requests(events) == ["queue-full"]
    _, events2 = run([("checkpoint", 10)], comparator=c)
    assert releases(events2) == [(frames[4], "checkpoint")]


def test_full_secondary_queue_discards_and_requests():
    c, events = run([(S, u(i), i) for i in range(3)], max_queue_size=2)
    assert requests(events) == ["queue-full"]
    assert c.stats.secondary_discarded == 3 and c.queued_frames == 0


def test_full_table_evicts_least_recent_releasing_its_frames_departs_from_qemu_l1():
    # QEMU clears the whole table and frees every queued packet (l1).
    a, b, d = (udp_frame(b"x", sport=n) for n in (1, 2, 3))
    c, events = run([(P, a, 0), (P, b, 1), (P, d, 2)], max_connections=2)
    assert releases(events) == [(a, "table-full")]
    assert requests(events) == ["table-full"]
    assert len(c.table) == 2 and c.stats.connections_evicted["table-full"] == 1


def test_full_table_prefers_forgetting_an_idle_connection():
    a, b, d = (udp_frame(b"x", sport=n) for n in (1, 2, 3))
    c, events = run([(P, a, 0), (S, a, 1), (P, b, 2), (P, d, 3)], max_connections=2)
    assert releases(events) == [(a, "match")] and requests(events) == []
    assert c.stats.connections_evicted["idle"] == 1


def test_memory_bound_flushes_oldest_connection():
    from colo_cli.core.comparator import QUEUED_FRAME_OVERHEAD as cost
    frames = [udp_frame(b"m" * 500, sport=n) for n in range(4)]
    # room for two frames and what holding them costs, not three
    limit = 2 * (len(frames[0]) + cost) + 100
    c, events = run([(P, f, i) for i, f in enumerate(frames)], max_queued_bytes=limit)
    assert releases(events) == [(frames[0], "memory-full"), (frames[1], "memory-full")]
    assert requests(events) == ["memory-full", "memory-full"]   # one per overflowing arrival
    assert c.queued_bytes + c.queued_frames * cost <= limit and c.queued_frames == 2


def test_tiny_frames_cannot_multiply_the_memory_bound():
    """47-byte frames: before, a 1 MiB bound let 20,000 of them (and 5 MiB
    of their bookkeeping) queue; what holding each costs now counts too."""
    from colo_cli.core.comparator import QUEUED_FRAME_OVERHEAD as cost
    c, _ = run([(P, udp_frame(b"%d" % i, sport=i % 50), i) for i in range(20_000)],
               max_queued_bytes=1 << 20, max_queue_size=10**6)
    assert c.queued_bytes + c.queued_frames * cost <= 1 << 20
    assert c.queued_frames < 4000 and c.stats.checkpoint_requests["memory-full"] > 0


def test_idle_connections_are_forgotten():
    c, _ = run([(P, u(0), 0), (S, u(0), 1), ("timer", 200_000)], idle_timeout_ms=100_000)
    assert len(c.table) == 0 and c.stats.connections_evicted["idle"] == 1


# -- end of input ------------------------------------------------------------------------

def test_finish_flushes_unmatched_with_reason_end():
    _, events = run([(P, u(0), 0), (S, u(1), 1), (P, u(2), 2), ("finish", 3)])
    assert releases(events) == [(u(0), "end"), (u(2), "end")]


def test_stats_account_for_every_secondary_frame():
    script = [(P, u(0), 0), (S, u(0), 1), (S, u(1), 2), (S, b"\0" * 5, 3),
              (S, tcp_frame(b"", flags=0x10), 4), ("checkpoint", 5)]
    c, _ = run(script)
    st = c.stats
    assert st.frames_in[1] == 4
    assert (st.secondary_matched, st.secondary_discarded, st.secondary_absorbed,
            sum(st.dropped.values())) == (1, 1, 1, 1)


def test_udp_helper_sanity():
    assert udp(b"") [4:6] == b"\0\x08"


def test_late_secondary_copies_of_flushed_frames_are_absorbed_departs_from_qemu_i1():
    # QEMU discards the secondaries at a checkpoint and then cannot match the
    # late twins (i1: timeouts).  Here the copies of frames flushed at the
    # checkpoint are recognised, so comparison goes on cleanly.
    script = [(P, u(0), 0), (P, u(1), 1), (P, u(2), 2), (S, udp_frame(b"bad"), 3),
              ("checkpoint", 4), (S, u(1), 5), (S, u(2), 6), (P, u(3), 7), (S, u(3), 8)]
    c, events = run(script)
    assert len(miscompares(events)) == 1
    assert releases(events)[-1] == (u(3), "match")
    assert c.stats.secondary_absorbed == 2


def test_stale_copies_only_absorbed_in_order_then_forgotten():
    script = [(P, u(0), 0), (P, u(1), 1), ("checkpoint", 2),
              (S, u(5), 3),                     # not a copy: stop expecting copies
              (P, u(5), 4), (S, u(1), 5), (P, u(6), 6)]
    c, events = run(script)
    assert releases(events)[2] == (u(5), "match")
    (m,) = miscompares(events)                 # u(1) now pairs with u(6)
    assert m.datagram_index == 1


def test_overdue_scans_collapse_into_the_last_due_tick():
    # a loop that slept, or a capture with a gap: the decision is the last
    # due tick's, with the ages as they were at that tick
    c = Comparator()
    c.receive(P, u(0), 0)
    assert requests(c.handle_timer(3500)) == []        # last due tick 3000: age 3000
    assert c.get_timer() == 4000
    assert requests(c.handle_timer(10**12)) == ["timeout"]   # one request, not a billion
    assert c.get_timer() == 10**12 + 1000


def test_frames_that_left_are_not_kept_for_the_timeout_scan():
    """They used to stay in the scan's list until the next scan (a second of
    frames: memory, and a stall when freed at once), and with timeouts off
    for ever (replay --no-timeout grew without bound)."""
    for timeout in (3000, None):
        c = Comparator(Config(compare_timeout_ms=timeout))
        for i in range(20000):
            f = u(i, sport=1 + i % 100)
            c.receive(P, f, i * 0.01)
            c.receive(S, f, i * 0.01)
        assert c.queued_frames == 0 and len(c._held_arrivals()) <= 1


def test_table_eviction_stays_cheap_with_many_flows():
    """A full table evicting the oldest idle connection for every new flow:
    constant work per eviction (a plain dict's front of deleted slots made
    it quadratic)."""
    c = Comparator(Config(max_connections=1000))
    for i in range(60000):
        f = udp_frame(b"x", sport=1 + i % 60000)
        c.receive(P, f, i)
        c.receive(S, f, i)
    assert len(c.table) <= 1000 and c.stats.connections_evicted["idle"] == 59000
    # the eviction order holds live entries only, and not many more than
    # the table: each eviction takes one off its front
    assert len(c.table._order) <= 2 * len(c.table) + 1024


def test_flow_churn_through_a_full_table_decides_as_the_reference_model():
    """Many short UDP flows through a table of 4: the oldest idle connection
    is turned into the new one in place.  The releases are those of the
    reference model (tests/reference.py, which has no table bound: evicting
    idle connections must not change a decision), with a TCP connection and
    a busy one in the table that must not be recycled."""
    from colo_cli.core import Comparator, Config
    from colo_cli.testing import tcp_frame
    from reference import ReferenceComparator

    script = [(P, tcp_frame(b"tcp", seq=1), 0), (S, tcp_frame(b"tcp", seq=1), 0)]   # idle TCP
    for i in range(40):
        if i == 20:
            script += [(P, udp_frame(b"held", sport=999), 1 + 2 * i)]  # busy: its twin comes last
        f = udp_frame(b"flow %d" % i, sport=2000 + i % 13)
        script += [(S, f, 2 + 2 * i), (P, f, 3 + 2 * i)]
    script += [(S, udp_frame(b"held", sport=999), 100)]
    ref = ReferenceComparator()
    for side, frame, now in script:
        ref.receive(side == P, frame, now)
    ref.finish(100)
    primary = [f for side, f, _ in script if side == P]
    expected = [primary[i] for i in sorted(ref.released, key=lambda i: (ref.released[i][1], i))]
    assert all(reason == "match" for reason, _ in ref.released.values())
    for compact in (False, True):
        c = Comparator(Config(compare_timeout_ms=None, max_connections=4), compact=compact)
        comparator, events = run(script + [("finish", 100)], comparator=c)
        left = [e.data if type(e).__name__ == "Matched" else e.packet.data
                for e in events if type(e).__name__ in ("Matched", "Released", "Bypassed")]
        assert left == expected
        snap = comparator.snapshot()
        assert snap["released"]["match"] == 42 and snap["connections"]["evicted"]["idle"] > 30


def test_bytes_in_and_released_bytes_count_frame_bytes_only():
    """Counted as replay counts them: a vnet header (and serve's length
    word, passed as part of l2) is not frame bytes; a vnet length that runs
    past the record leaves no frame bytes at all, never a negative count."""
    c = Comparator()
    frame = u(0)
    c.receive(P, b"\1" * 12 + frame, 0, l2=12, vnet_hdr_len=12)
    c.receive(S, b"\0\0\0\0" + b"\2" * 12 + frame, 1, l2=16, vnet_hdr_len=12)
    c.receive(P, b"\0" * 30, 2, l2=40, vnet_hdr_len=36)          # l2 beyond the record
    snap = c.snapshot()
    assert snap["bytes_in"] == {"primary": len(frame), "secondary": len(frame)}
    assert snap["released_bytes"] == len(frame)
