"""What captures do to traffic, and how the core copes: IP fragments
(reassembled per side, released as the original fragments), frames cut short
by a snaplen, holes left by capture loss, streams seen without their start.

QEMU compares none of this correctly: it keys each fragment as a datagram
(spec 16.3) and compares Ethernet padding and trailers (spec 16.4)."""

import struct

from colo_cli.core import Comparator, Config
from colo_cli.core.reassembly import (FAIL_INCOMPLETE, FAIL_INVALID, FAIL_OVERFLOW,
                                      FAIL_TIMEOUT, Reassembler)
from colo_cli.testing import ether, ipv4, ipv6, tcp, tcp_frame, udp, udp_frame

from scripts import P, S, bypasses, drops, miscompares, out_frames, releases, requests, run


def v4_fragments(l4: bytes, proto: int, ident: int, sizes, src="10.0.0.1", dst="10.0.0.2",
                 ip_ident=None):
    """Cut an L4 datagram into IPv4 fragments of the given payload sizes
    (multiples of 8 except the last)."""
    frames, off = [], 0
    for i, size in enumerate(sizes):
        piece = l4[off:off + size]
        more = 0x2000 if off + size < len(l4) else 0
        frames.append(ether(ipv4(piece, proto, src, dst, ident=ip_ident if ip_ident is not None else ident,
                                 flags_frag=more | (off // 8)), 0x0800))
        off += size
    assert off == len(l4)
    return frames


def v6_fragments(l4: bytes, nh: int, ident: int, sizes):
    frames, off = [], 0
    for size in sizes:
        piece = l4[off:off + size]
        more = 1 if off + size < len(l4) else 0
        fh = struct.pack(">BBHI", nh, 0, off | more, ident)
        frames.append(ether(ipv6(piece, 44, ext=fh), 0x86DD))
        off += size
    return frames


DGRAM = udp(b"D" * 3000)


# -- reassembly ---------------------------------------------------------------------

def test_fragmented_udp_reassembled_and_compared_released_as_original_fragments():
    p = v4_fragments(DGRAM, 17, ident=1, sizes=[1480, 1480, 48])
    s = v4_fragments(DGRAM, 17, ident=999, sizes=[1480, 1480, 48])   # own IP IDs
    c, events = run([(P, f, i) for i, f in enumerate(p)] + [(S, f, 10 + i) for i, f in enumerate(s)])
    assert releases(events) == [(f, "match") for f in p]
    assert c.stats.reassembled == [1, 1] and c.stats.fragments_in == [3, 3]


def test_different_fragmentation_of_the_same_datagram_matches():
    p = v4_fragments(DGRAM, 17, ident=1, sizes=[1480, 1480, 48])
    s = v4_fragments(DGRAM, 17, ident=2, sizes=[1000, 1000, 1008])
    _, events = run([(P, f, 0) for f in p] + [(S, f, 1) for f in s])
    assert out_frames(events) == p


def test_fragments_out_of_order_and_duplicated():
    p = v4_fragments(DGRAM, 17, ident=1, sizes=[1480, 1480, 48])
    s = v4_fragments(DGRAM, 17, ident=2, sizes=[1480, 1480, 48])
    script = [(P, p[2], 0), (P, p[0], 1), (P, p[0], 2), (P, p[1], 3),
              (S, s[1], 4), (S, s[2], 5), (S, s[0], 6)]
    _, events = run(script)
    # every primary frame leaves exactly once, in arrival order, the duplicate too
    assert out_frames(events) == [p[2], p[0], p[0], p[1]]


def test_overlapping_fragments_are_counted_in_stats_per_side():
    """A duplicated fragment overlaps by its whole length and agrees; a
    crafted one that rewrites 8 bytes disagrees there.  The first copy is
    the one compared, so the secondary still matches."""
    p = v4_fragments(DGRAM, 17, ident=1, sizes=[1480, 1480, 48])
    s = v4_fragments(DGRAM, 17, ident=2, sizes=[1480, 1480, 48])
    rewrite = ether(ipv4(b"X" * 8, 17, ident=1, flags_frag=0x2000 | 1), 0x0800)   # bytes 8..16
    script = [(P, p[0], 0), (P, p[0], 1), (P, rewrite, 2), (P, p[1], 3), (P, p[2], 4)]
    script += [(S, f, 10 + i) for i, f in enumerate(s)]
    c, events = run(script)
    assert releases(events) == [(f, "match") for f in (p[0], p[0], rewrite, p[1], p[2])]
    snap = c.snapshot()
    assert snap["fragment_overlap_bytes"] == {"primary": 1480 + 8, "secondary": 0}
    assert snap["fragment_conflict_bytes"] == {"primary": 8, "secondary": 0}


def test_fragmented_datagram_that_differs_is_a_miscompare_of_the_whole_datagram():
    bad = udp(b"D" * 2000 + b"X" + b"D" * 999)
    p = v4_fragments(DGRAM, 17, ident=1, sizes=[1480, 1480, 48])
    s = v4_fragments(bad, 17, ident=2, sizes=[1480, 1480, 48])
    _, events = run([(P, f, 0) for f in p] + [(S, f, 1) for f in s])
    (m,) = miscompares(events)
    assert m.kind == "udp" and m.stream_offset == 6     # the UDP checksum differs first
    assert out_frames(events) == []


def test_fragmented_tcp_segment_joins_its_stream():
    seg = tcp(b"T" * 2000, seq=1000)
    p = v4_fragments(seg, 6, ident=7, sizes=[1480, 540])
    s_whole = tcp_frame(b"T" * 2000, seq=1000)
    _, events = run([(P, f, 0) for f in p] + [(S, s_whole, 1)])
    assert out_frames(events) == p


def test_ipv6_fragments():
    l4 = udp(b"six" * 700, src="fd00::1", dst="fd00::2")
    p = v6_fragments(l4, 17, ident=0x11, sizes=[1232, len(l4) - 1232])
    s = v6_fragments(l4, 17, ident=0x22, sizes=[1000, len(l4) - 1000])
    _, events = run([(P, f, 0) for f in p] + [(S, f, 1) for f in s])
    assert out_frames(events) == p


def test_never_completed_datagram_times_out_into_a_bypass():
    p = v4_fragments(DGRAM, 17, ident=1, sizes=[1480, 1480, 48])
    s = v4_fragments(DGRAM, 17, ident=2, sizes=[1480, 1480, 48])
    script = [(P, p[0], 0), (P, p[1], 1), (S, s[0], 2), ("timer", 40_000)]
    c, events = run(script, fragment_timeout_ms=30_000)
    assert bypasses(events) == [(p[0], FAIL_TIMEOUT), (p[1], FAIL_TIMEOUT)]
    assert drops(events) == [(s[0], FAIL_TIMEOUT)]
    assert c.stats.bypassed[FAIL_TIMEOUT] == 2


def test_incomplete_datagram_at_the_end_is_bypassed():
    p = v4_fragments(DGRAM, 17, ident=1, sizes=[1480, 1480, 48])
    _, events = run([(P, p[0], 0), ("finish", 1)])
    assert bypasses(events) == [(p[0], FAIL_INCOMPLETE)]


def test_overlapping_fragments_first_bytes_win():
    r = Reassembler()
    dg = r.add("a", b"k", 0, 1, 17, b"A" * 16, 0)[0]
    assert dg is None
    r.add("b", b"k", 8, 1, 17, b"B" * 16, 1)             # overlaps [8,16)
    done, failed = r.add("c", b"k", 24, 0, 17, b"C" * 8, 2)
    assert failed == [] and done is not None
    assert done.assemble() == (b"A" * 16 + b"B" * 8 + b"C" * 8, 8, 8)
    assert done.fragments == ["a", "b", "c"]


def test_reassembly_bounds():
    r = Reassembler(max_datagrams=2, max_fragments=3)
    r.add("x", b"1", 0, 1, 17, b"a" * 8, 0)
    r.add("y", b"2", 0, 1, 17, b"a" * 8, 1)
    _, failed = r.add("z", b"3", 0, 1, 17, b"a" * 8, 2)
    assert [(d.key, why) for d, why in failed] == [(b"1", FAIL_OVERFLOW)]   # oldest given up
    r2 = Reassembler(max_fragments=3)
    for i in range(3):
        _, failed = r2.add(i, b"k", i * 8, 1, 17, b"a" * 8, i)
        assert failed == []
    _, failed = r2.add(3, b"k", 24, 1, 17, b"a" * 8, 3)
    assert failed[0][1] == FAIL_OVERFLOW and len(r2) == 0
    r3 = Reassembler()
    _, failed = r3.add(0, b"k", 65528, 1, 17, b"a" * 16, 0)     # beyond 64 KiB
    assert failed[0][1] == FAIL_INVALID
    r4 = Reassembler()
    r4.add(0, b"k", 16, 0, 17, b"a" * 8, 0)                      # ends at 24
    _, failed = r4.add(1, b"k", 32, 0, 17, b"a" * 8, 1)          # ends again at 40
    assert failed[0][1] == FAIL_INVALID


def test_reassembly_memory_bounded_by_bytes():
    r = Reassembler(max_bytes=100)
    failed = []
    for i in range(20):
        failed += r.add(i, bytes([i]), 0, 1, 17, b"a" * 40, i)[1]
    assert r.bytes <= 100 and len(failed) == 18


# -- frames cut short by the capture --------------------------------------------------

def test_udp_cut_by_snaplen_compares_the_captured_part():
    p, s = udp_frame(b"x" * 200), udp_frame(b"x" * 200)
    _, events = run([(P, p[:96], 0, "cut"), (S, s[:96], 1, "cut")])
    assert out_frames(events) == [p[:96]]
    _, events = run([(P, p[:96], 0, "cut"), (S, s, 1)])         # only one side cut
    assert out_frames(events) == [p[:96]]
    _, events = run([(P, p[:96], 0, "cut"), (S, udp_frame(b"y" + b"x" * 199)[:96], 1, "cut")])
    assert miscompares(events)                           # a captured byte differs


def test_ip_length_beyond_an_uncut_frame_is_malformed():
    # in serve nothing cuts frames: a frame shorter than its IP length lies
    p = udp_frame(b"x" * 200)[:96]
    _, events = run([(P, p, 0), (S, p, 1)])
    assert bypasses(events) == [(p, "ipv4-truncated")] and drops(events) == [(p, "ipv4-truncated")]


def test_tcp_cut_by_snaplen_with_different_segmentation():
    data = bytes(range(256)) * 8
    p = [tcp_frame(data[:1024], seq=1000), tcp_frame(data[1024:], seq=2024)]
    s = [tcp_frame(data[i:i + 512], seq=1000 + i) for i in range(0, 2048, 512)]
    script = ([(P, f[:100], i, "cut") for i, f in enumerate(p)]
              + [(S, f[:100], 10 + i, "cut") for i, f in enumerate(s)])
    c, events = run(script)
    assert out_frames(events) == [f[:100] for f in p] and miscompares(events) == []
    assert c.stats.truncated == [2, 4]


def test_difference_in_captured_bytes_of_a_cut_segment_is_found():
    p = tcp_frame(b"a" * 300, seq=1000)[:100]
    s = tcp_frame(b"a" * 20 + b"b" + b"a" * 279, seq=1000)[:100]
    _, events = run([(P, p, 0, "cut"), (S, s, 1, "cut")])
    assert miscompares(events)[0].stream_offset == 20


# -- streams seen without their start, holes ------------------------------------------

def test_stream_without_data_or_syn_still_verifies_its_fin():
    # zeek/ssh/ssh.pcap: the server side of a session seen from its last ACKs
    a, fin, after = (tcp_frame(b"", seq=648, ack=35, flags=0x10),
                     tcp_frame(b"", seq=648, ack=67, flags=0x11),
                     tcp_frame(b"", seq=649, ack=67, flags=0x10))
    script = [(P, a, 0), (S, a, 1), (P, fin, 2), (S, fin, 3), (P, after, 4), (S, after, 5)]
    _, events = run(script)
    assert out_frames(events) == [a, fin, after]


def test_hole_on_both_sides_is_skipped():
    # zeek/ldap/gap-data-missing.pcapng: the capture lost a segment on both
    a, c_ = tcp_frame(b"A" * 100, seq=1000), tcp_frame(b"C" * 100, seq=1200)
    c, events = run([(P, a, 0), (S, a, 1), (P, c_, 2), (S, c_, 3)])
    assert out_frames(events) == [a, c_]
    assert c.snapshot()["stream_gap_bytes"] == 100


def test_hole_on_one_side_only_is_waited_for():
    a, b, c_ = (tcp_frame(b"A" * 100, seq=1000), tcp_frame(b"B" * 100, seq=1100),
                tcp_frame(b"C" * 100, seq=1200))
    script = [(P, a, 0), (P, b, 1), (P, c_, 2), (S, a, 3), (S, c_, 4), ("timer", 5000)]
    _, events = run(script)
    assert out_frames(events)[:1] == [a] and requests(events) == ["timeout"]


def test_default_fragment_timeout_is_linux_ipfrag_time():
    assert Config().fragment_timeout_ms == 30_000
    assert Comparator().config.fragment_timeout_ms == 30_000
