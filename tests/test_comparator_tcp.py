"""TCP: byte-stream comparison by absolute sequence range, the ACK gate and
zero-payload segments, FIN/RST, checkpoints, wraparound.

Tests named ``..._qemu_...`` cite the observed QEMU 7.2 experiment
(``spec/qemu-7.2-observed.md`` section 5, e-i) the rule follows or departs
from."""

import pytest

from colo_cli.testing import tcp_frame

from scripts import P, S, miscompares, out_frames, releases, requests, run

A, PA, SA, F, R, FA = 0x10, 0x18, 0x12, 0x01, 0x04, 0x11
SYN = 0x02


def seg(data=b"", seq=1000, ack=5000, flags=PA, **kw):
    return tcp_frame(data, seq=seq, ack=ack, flags=flags, **kw)


BLOCK = bytes(range(256)) * 12   # 3072 bytes


# -- segmentation --------------------------------------------------------------

def test_one_big_segment_matches_two_small_qemu_e1():
    p = seg(BLOCK[:3000])
    s1, s2 = seg(BLOCK[:1500]), seg(BLOCK[1500:3000], seq=2500)
    _, events = run([(P, p, 0), (S, s1, 20), (S, s2, 41)])
    assert releases(events) == [(p, "match")]
    assert events[-1].hold_ms == 41


def test_two_small_segments_match_one_big_qemu_e2():
    p1, p2 = seg(BLOCK[:1500]), seg(BLOCK[1500:3000], seq=2500)
    _, events = run([(P, p1, 0), (P, p2, 20), (S, seg(BLOCK[:3000]), 41)])
    assert out_frames(events) == [p1, p2]


def test_first_half_verified_releases_first_segment_only():
    p1, p2 = seg(BLOCK[:1500]), seg(BLOCK[1500:3000], seq=2500)
    _, events = run([(P, p1, 0), (P, p2, 1), (S, seg(BLOCK[:2000]), 2)])
    assert out_frames(events) == [p1]


def test_gso_super_frame_against_mtu_segments():
    big = BLOCK * 20                                    # 61440 bytes in one frame
    p = seg(big)
    script = [(P, p, 0)] + [(S, seg(big[i:i + 1448], seq=1000 + i), 1 + i // 1448)
                            for i in range(0, len(big), 1448)]
    _, events = run(script)
    assert out_frames(events) == [p]


def test_primary_out_of_order_released_in_sequence_order_qemu_e5():
    p1, p2 = seg(BLOCK[:1500]), seg(BLOCK[1500:3000], seq=2500)
    script = [(P, p2, 0), (P, p1, 20), (S, seg(BLOCK[:1500]), 41), (S, seg(BLOCK[1500:3000], seq=2500), 61)]
    _, events = run(script)
    assert out_frames(events) == [p1, p2]


def test_secondary_out_of_order():
    p = seg(BLOCK[:3000])
    _, events = run([(P, p, 0), (S, seg(BLOCK[1500:3000], seq=2500), 1), (S, seg(BLOCK[:1500]), 2)])
    assert out_frames(events) == [p]


def test_only_part_of_the_segment_from_secondary_waits_then_times_out_qemu_e6():
    script = [(P, seg(BLOCK[:3000]), 0), (S, seg(BLOCK[:1500]), 21)] + \
             [("timer", t) for t in range(100, 701, 100)]
    _, events = run(script, compare_timeout_ms=500, expired_scan_cycle_ms=100)
    assert out_frames(events) == [] and requests(events) == ["timeout", "timeout"]


def test_retransmission_of_verified_data_released_at_once_qemu_e7():
    # QEMU waits for *some* secondary packet first; the bytes are already verified.
    p = seg(BLOCK[:1500])
    _, events = run([(P, p, 0), (S, p, 20), (P, p, 41)])
    assert out_frames(events) == [p, p]
    _, events = run([(P, p, 0), (S, p, 20), (P, p, 41), (S, p, 61)])
    assert requests(events) == []


def test_partly_overlapping_retransmission_does_not_miscompare():
    # QEMU overlays positions and miscompares here (spec 7.1: "a retransmission
    # that partially overlaps already-compared data ... false miscompare").
    data = BLOCK[:3000]
    script = [(P, seg(data[:1000]), 0), (S, seg(data[:1000]), 1),       # verified to 2000
              (S, seg(data[500:1500], seq=1500), 2),                    # overlaps [1500,2000)
              (P, seg(data[1000:2000], seq=2000), 3),
              (P, seg(data[900:2500], seq=1900), 4),                    # primary overlap too
              (S, seg(data[1500:2500], seq=2500), 5)]
    _, events = run(script)
    assert miscompares(events) == [] and len(out_frames(events)) == 3


# -- headers are not compared ----------------------------------------------------

def test_header_only_differences_match_qemu_f1_to_f4():
    p = seg(b"x" * 17, seq=100, ack=1)
    for s in (seg(b"x" * 17, seq=100, ack=1, ident=77, ttl=3),
              seg(b"x" * 17, seq=100, ack=1, window=1),
              seg(b"x" * 17, seq=100, ack=1, flags=A),
              seg(b"x" * 17, seq=100, ack=1, options=b"\x01\x01\x08\x0a" + b"\0" * 8)):
        _, events = run([(P, p, 0), (S, s, 1)])
        assert out_frames(events) == [p], s.hex()


def test_one_payload_byte_differs_qemu_f5():
    p = seg(b"hello, world!", seq=100, ack=1)
    s = seg(b"hello, World!", seq=100, ack=1)
    _, events = run([(P, p, 0), (S, s, 20)])
    (m,) = miscompares(events)
    assert (m.kind, m.cause, m.stream_offset, m.raw_seq) == ("tcp", "content", 7, 107)
    assert m.primary.data == p and m.secondary.data == s
    assert p[m.primary_offset:m.primary_offset + 1] == b"w"
    assert s[m.secondary_offset:m.secondary_offset + 1] == b"W"
    assert requests(events) == ["miscompare"] and out_frames(events) == []


# The in-step case (a segment's twin is all the other side holds) is
# verified in the frame, without buffering: the same decisions as buffering.

def test_in_step_pairs_either_side_first_release_each_segment_at_its_twin():
    segs = [BLOCK[i:i + 1000] for i in range(0, 3000, 1000)]
    script, expected = [], []
    for k, data in enumerate(segs):
        p, s = seg(data, seq=1000 + 1000 * k), seg(data, seq=1000 + 1000 * k)
        first, second = ((P, p), (S, s)) if k % 2 else ((S, s), (P, p))
        script += [(*first, 2 * k), (*second, 2 * k + 1)]
        expected.append(p)
    c, events = run(script)
    assert out_frames(events) == expected and not miscompares(events)
    assert c.stats.secondary_matched == 3 and c.queued_frames == 0


def test_in_step_twin_that_differs_is_a_miscompare_at_the_first_different_byte():
    p0, s0 = seg(BLOCK[:1000]), seg(BLOCK[:1000])
    bad = bytearray(BLOCK[1000:2000])
    bad[123] ^= 0xFF
    p1, s1 = seg(BLOCK[1000:2000], seq=2000), seg(bytes(bad), seq=2000)
    for order in ([(S, s0, 0), (P, p0, 1), (S, s1, 2), (P, p1, 3)],
                  [(S, s0, 0), (P, p0, 1), (P, p1, 2), (S, s1, 3)]):
        _, events = run(order)
        (m,) = miscompares(events)
        assert (m.cause, m.stream_offset) == ("content", 1123)
        assert out_frames(events) == [p0]


def test_in_step_verification_then_a_primary_gap_filled_later():
    """The primary's third segment waits beyond a gap while the first pair
    is verified in step; the second fills the gap and joins it."""
    d = [BLOCK[i:i + 1000] for i in range(0, 3000, 1000)]
    p = [seg(x, seq=1000 + 1000 * k) for k, x in enumerate(d)]
    s = [seg(x, seq=1000 + 1000 * k) for k, x in enumerate(d)]
    script = [(P, p[2], 0), (S, s[0], 1), (P, p[0], 2), (P, p[1], 3), (S, s[1], 4), (S, s[2], 5)]
    _, events = run(script)
    assert out_frames(events) == p and not miscompares(events)


def test_different_sequence_numbers_never_match_departs_from_qemu_f6():
    # QEMU overlays positions and releases (f6); here the bytes are at
    # different places in the stream, so nothing is verified.
    _, events = run([(P, seg(b"q" * 17, seq=100), 0), (S, seg(b"q" * 17, seq=200), 20)])
    assert out_frames(events) == [] and miscompares(events) == []


def test_stream_offset_counts_from_the_byte_after_syn():
    isn = 7000
    data = b"A" * 100 + b"B" + b"C" * 50
    bad = b"A" * 100 + b"X" + b"C" * 50
    script = [(P, seg(seq=isn, ack=1, flags=SYN | A), 0), (S, seg(seq=90000, ack=1, flags=SYN | A), 1),
              (P, seg(data[:60], seq=isn + 1, ack=1), 2), (P, seg(data[60:], seq=isn + 61, ack=1), 3),
              (S, seg(bad, seq=isn + 1, ack=1), 4)]
    _, events = run(script)
    (m,) = miscompares(events)
    assert (m.stream_offset, m.raw_seq) == (100, isn + 1 + 100)
    # the byte is in the second primary segment, 40 bytes into its payload
    assert m.primary.data.endswith(data[60:]) and m.primary.data[m.primary_offset] == ord("B")


def test_stream_offset_mid_stream_counts_from_first_byte_seen():
    _, events = run([(P, seg(b"abcdef", seq=555), 0), (S, seg(b"abcxef", seq=555), 1)])
    assert miscompares(events)[0].stream_offset == 3


# -- zero-payload segments and the ACK gate ----------------------------------------

def test_identical_pure_ack_released_qemu_g1():
    a = seg(flags=A)
    _, events = run([(P, a, 0), (S, a, 20)])
    assert out_frames(events) == [a]


def test_pure_ack_alone_waits_then_times_out_qemu_g2():
    script = [(P, seg(flags=A), 0)] + [("timer", t) for t in range(100, 701, 100)]
    _, events = run(script, compare_timeout_ms=500, expired_scan_cycle_ms=100)
    assert out_frames(events) == [] and requests(events) == ["timeout", "timeout"]


def test_pure_ack_released_when_secondary_acked_as_much_qemu_g3():
    _, events = run([(P, seg(ack=10, flags=A), 0), (S, seg(ack=20, flags=A, window=7), 20)])
    assert len(out_frames(events)) == 1


def test_pure_ack_ahead_of_the_secondary_waits_departs_from_qemu_g3():
    # QEMU releases a primary pure ACK when *any* secondary packet exists.
    # Releasing it would acknowledge client data the secondary has not.
    p = seg(ack=20, flags=A)
    _, events = run([(P, p, 0), (S, seg(ack=10, flags=A), 20)])
    assert out_frames(events) == []
    _, events = run([(P, p, 0), (S, seg(ack=10, flags=A), 20), (S, seg(ack=20, flags=A), 30)])
    assert out_frames(events) == [p]


def test_pure_ack_with_secondary_data_segment_qemu_g4():
    p = seg(ack=5000, flags=A)
    s = seg(b"data", ack=5000)
    _, events = run([(P, p, 0), (S, s, 20)])
    assert out_frames(events) == [p]     # the secondary acked 5000 too


def test_syn_released_when_secondary_sent_a_syn_isns_differ_qemu_g5():
    p_syn = seg(seq=1000, ack=0, flags=SYN)
    _, events = run([(P, p_syn, 0)])
    assert out_frames(events) == []
    _, events = run([(P, p_syn, 0), (S, seg(seq=99999, ack=0, flags=SYN), 21)])
    assert out_frames(events) == [p_syn]


def test_one_secondary_ack_releases_every_primary_ack_it_covers_departs_from_qemu_g6():
    # QEMU releases one queued pure ACK per secondary packet (g6).
    acks = [seg(ack=a, flags=A) for a in (100, 200, 300)]
    _, events = run([(P, acks[0], 0), (P, acks[1], 20), (P, acks[2], 40), (S, seg(ack=300, flags=A), 161)])
    assert out_frames(events) == acks


def test_ack_gate_is_a_wait_not_a_miscompare_departs_from_qemu_e3_e4():
    # e3: QEMU requests a checkpoint at once; e4: QEMU releases without checking.
    p1, p2 = seg(BLOCK[:1500], ack=6000), seg(BLOCK[1500:3000], seq=2500, ack=6000)
    script = [(P, p1, 0), (P, p2, 20), (S, seg(BLOCK[:3000], ack=5000), 41)]
    _, events = run(script)
    assert out_frames(events) == [] and requests(events) == [] and miscompares(events) == []
    _, events = run(script + [(S, seg(seq=4000, ack=6000, flags=A), 60)])
    assert out_frames(events) == [p1, p2]


def test_pure_ack_is_not_released_ahead_of_data_sent_before_it():
    d = seg(b"z" * 100, seq=1000, ack=50)
    a = seg(seq=1100, ack=60, flags=A)
    _, events = run([(P, d, 0), (P, a, 1), (S, seg(seq=1100, ack=60, flags=A), 2)])
    assert out_frames(events) == []               # the data is not verified yet
    _, events = run([(P, d, 0), (P, a, 1), (S, seg(seq=1100, ack=60, flags=A), 2),
                     (S, seg(b"z" * 100, seq=1000, ack=50), 3)])
    assert out_frames(events) == [d, a]


def test_extra_secondary_pure_acks_are_absorbed_not_queued():
    script = [(S, seg(ack=a, flags=A), a) for a in range(1, 3000)]
    c, events = run(script, max_queue_size=10)
    assert requests(events) == [] and c.queued_frames == 0
    assert c.stats.secondary_absorbed == 2999


# -- FIN and RST ---------------------------------------------------------------------

def test_fin_at_the_same_offset_is_verified():
    p = seg(b"bye", seq=1000, flags=FA | 0x08)
    _, events = run([(P, p, 0), (S, seg(b"bye", seq=1000, flags=FA | 0x08), 1)])
    assert out_frames(events) == [p]


def test_separate_fin_segments():
    d, fin = seg(b"bye", seq=1000), seg(seq=1003, flags=FA)
    _, events = run([(P, d, 0), (P, fin, 1), (S, seg(b"bye", seq=1000), 2)])
    assert out_frames(events) == [d]
    _, events = run([(P, d, 0), (P, fin, 1), (S, seg(b"bye", seq=1000), 2), (S, seg(seq=1003, flags=FA), 3)])
    assert out_frames(events) == [d, fin]


def test_primary_ends_where_secondary_goes_on_is_a_stream_end_miscompare():
    _, events = run([(P, seg(b"abc", seq=1000, flags=FA), 0), (S, seg(b"abcdef", seq=1000), 1)])
    (m,) = miscompares(events)
    assert (m.cause, m.stream_offset) == ("stream-end", 3)


def test_secondary_ends_early_is_a_stream_end_miscompare():
    _, events = run([(P, seg(b"abcdef", seq=1000), 0), (S, seg(b"abc", seq=1000, flags=FA), 1)])
    (m,) = miscompares(events)
    assert (m.cause, m.stream_offset) == ("stream-end", 3)
    assert m.secondary is None and m.secondary_offset == -1


def test_rst_released_only_when_secondary_reset_too():
    r = seg(seq=1000, flags=R | A)
    _, events = run([(P, r, 0), (S, seg(b"x", seq=1000), 1)])
    assert r not in out_frames(events)
    _, events = run([(P, r, 0), (S, seg(seq=1000, flags=R | A), 1)])
    assert out_frames(events) == [r]


def test_port_reuse_after_close_compares_the_new_connection():
    first = [(P, seg(b"one", seq=1000), 0), (S, seg(b"one", seq=1000), 1),
             (P, seg(seq=1003, flags=FA), 2), (S, seg(seq=1003, flags=FA), 3)]
    second = [(S, seg(seq=777777, ack=1, flags=SYN | A), 10), (P, seg(seq=500000, ack=1, flags=SYN | A), 11),
              (P, seg(b"two", seq=500001, ack=1), 12), (S, seg(b"two", seq=500001, ack=1), 13)]
    _, events = run(first + second)
    assert len(out_frames(events)) == 4 and miscompares(events) == []


# -- sequence wraparound ---------------------------------------------------------------

def test_stream_across_the_32_bit_wrap():
    start = 0xFFFFFF00
    data = BLOCK[:1024]
    p1, p2 = seg(data[:512], seq=start), seg(data[512:], seq=(start + 512) & 0xFFFFFFFF)
    s = [seg(data[i:i + 100], seq=(start + i) & 0xFFFFFFFF) for i in range(0, 1024, 100)]
    _, events = run([(P, p1, 0), (P, p2, 1)] + [(S, f, 2 + i) for i, f in enumerate(s)])
    assert out_frames(events) == [p1, p2]


def test_miscompare_after_the_wrap_reports_offset_and_raw_seq():
    start = 0xFFFFFFF0
    p = seg(b"a" * 64, seq=start)
    s = seg(b"a" * 40 + b"b" + b"a" * 23, seq=start)
    _, events = run([(P, p, 0), (S, s, 1)])
    (m,) = miscompares(events)
    assert (m.stream_offset, m.raw_seq) == (40, (start + 40) & 0xFFFFFFFF)


# -- checkpoints ---------------------------------------------------------------------

def test_checkpoint_flushes_tcp_in_sequence_order():
    a, b = seg(b"1" * 10, seq=1010), seg(b"0" * 10, seq=1000)
    _, events = run([(P, a, 0), (P, b, 1), ("checkpoint", 2)])
    assert releases(events) == [(b, "checkpoint"), (a, "checkpoint")]


def test_state_reset_at_checkpoint_departs_from_qemu_i4():
    # QEMU keeps its compare state and overlays the late S(100) on P(104) (i4).
    p100, s100 = seg(b"abcd", seq=100, ack=1), seg(b"abcd", seq=100, ack=1)
    p104, s104 = seg(b"efgh", seq=104, ack=1), seg(b"efgh", seq=104, ack=1)
    script = [(P, p100, 0), ("checkpoint", 20), (S, s100, 71), (P, p104, 91), (S, s104, 111)]
    _, events = run(script)
    assert releases(events) == [(p100, "checkpoint"), (p104, "match")]
    assert requests(events) == []


def test_divergence_then_checkpoint_then_clean_comparison():
    script = [(P, seg(b"aaaa", seq=100), 0), (S, seg(b"aaab", seq=100), 1),
              ("checkpoint", 2),
              (P, seg(b"cccc", seq=104), 3), (S, seg(b"cccc", seq=104), 4),
              (P, seg(b"dddd", seq=108), 5), (S, seg(b"dxdd", seq=108), 6)]
    _, events = run(script)
    ms = miscompares(events)
    assert [(m.stream_offset, m.raw_seq) for m in ms] == [(3, 103), (9, 109)]


def test_queue_full_on_tcp_flushes_and_resets():
    frames = [seg(b"x" * 10, seq=1000 + 10 * i) for i in range(4)]
    c, events = run([(P, f, i) for i, f in enumerate(frames)], max_queue_size=3)
    assert releases(events) == [(f, "queue-full") for f in frames]
    # the secondary's copies of flushed bytes arrive later: absorbed, no miscompare
    _, events = run([(S, f, 10 + i) for i, f in enumerate(frames)], comparator=c)
    assert miscompares(events) == [] and c.queued_frames == 0


@pytest.mark.parametrize("acks", ["equal", "secondary-behind", "secondary-ahead"])
@pytest.mark.parametrize("batch", [1, 3])
def test_secondary_ahead_bulk_decides_as_the_reference_model(acks, batch):
    """In-sequence bulk data with the secondary leading by ``batch``
    segments (the old fast path once left these to the general path, with
    different speed per side): the releases, their times and the miscompare
    are those of the reference model (tests/reference.py), in both output
    forms, including the ACK gate (a secondary that acknowledged less holds
    the primary back)."""
    from colo_cli.core import Comparator, Config, Matched, Released
    from reference import ReferenceComparator
    from scripts import run

    n = 12
    p = [tcp_frame(bytes([i]) * 100, seq=1000 + 100 * i, ack=5000, flags=0x18) for i in range(n)]
    s_ack = {"equal": 5000, "secondary-behind": 4000, "secondary-ahead": 6000}[acks]
    s = [tcp_frame(bytes([i]) * 100, seq=1000 + 100 * i, ack=s_ack, flags=0x18) for i in range(n)]
    s[7] = tcp_frame(b"X" + bytes([7]) * 99, seq=1700, ack=s_ack, flags=0x18)   # one divergence
    script = []
    t = 0
    for i in range(0, n, batch):
        script += [(S, f, (t := t + 1)) for f in s[i:i + batch]]
        script += [(P, f, (t := t + 1)) for f in p[i:i + batch]]
    ref = ReferenceComparator()
    for side, frame, now in script:
        ref.receive(side == P, frame, now)
    matched = sorted((now, i) for i, (reason, now) in ref.released.items() if reason == "match")
    assert [(cause, offset) for _, cause, offset, _, _ in ref.miscompares] == [("content", 700)]
    if acks == "secondary-behind":
        assert matched == []        # the ACK gate: nothing could leave on a match
    else:
        assert len(matched) >= 7 - batch
    for compact in (False, True):
        c = Comparator(Config(compare_timeout_ms=None), compact=compact)
        _, events = run(script, comparator=c)
        left = [e.data if type(e) is Matched else e.packet.data
                for e in events if type(e) in (Matched, Released)]
        assert left == [p[i] for _, i in matched]
        assert [(e.cause, e.stream_offset) for e in miscompares(events)] == [("content", 700)]
