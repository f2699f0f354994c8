"""What randomised testing found, kept as plain tests so it stays fixed.

Each case names what found it (hypothesis property tests, the corpus sweep,
the atheris targets in fuzz/) and what was wrong."""

import io
import time

import pytest

from colo_cli.capture import CaptureError, PcapWriter, open_capture
from colo_cli.core import Comparator, Config, Matched, Released
from colo_cli.core.framing import FrameDecoder, encode
from colo_cli.replay import replay
from colo_cli.testing import icmp_frame, tcp_frame, udp_frame

from scripts import P, S, miscompares, out_frames, run


def _pcap(frames_with_ts):
    buf = io.BytesIO()
    w = PcapWriter(buf)
    for ts, frame in frames_with_ts:
        w.write(ts, frame)
    return buf.getvalue()


def test_capture_with_a_gap_of_decades_replays_at_once():
    """Corpus sweep, tcpdump/babel_update_oobr.pcap: timestamps jumping by
    decades made replay run the periodic scan once per second of capture
    time: it never finished.  Overdue scans now collapse."""
    f = udp_frame(b"x")
    data = _pcap([(0, f), (2_000_000_000 * 10**9, f), (10**9, f)])
    started = time.monotonic()
    res = replay(open_capture("-", stdin=io.BytesIO(data)), open_capture("-", stdin=io.BytesIO(data)))
    assert time.monotonic() - started < 10        # generous: it used to be forever
    assert res.stats.released_match == 3


def test_reused_four_tuple_with_the_secondary_a_whole_connection_ahead():
    """Hypothesis (decisions independent of interleaving): the secondary's
    next connection on the same 4-tuple, seen before the primary's first one
    finished, was lost and its twin timed out."""
    def conn(seq0):
        return [tcp_frame(b"\0", seq=seq0, ack=0, flags=0x18, sport=1),
                tcp_frame(b"", seq=seq0 + 1, ack=0, flags=0x11, sport=1)]
    first, second = conn(0), [tcp_frame(b"", seq=0, ack=0, flags=0x12, sport=1),
                              tcp_frame(b"\0", seq=1, ack=0, flags=0x18, sport=1)]
    orders = [
        [(P, f, 0) for f in first + second] + [(S, f, 1) for f in first + second],
        [(S, f, 0) for f in first + second] + [(P, f, 1) for f in first + second],
    ]
    results = [out_frames(run(o)[1]) for o in orders]
    assert results[0] == results[1] == first + second


def test_stray_low_sequence_number_does_not_move_the_stream_origin():
    """Hypothesis: the origin was the lowest position seen so far, so a
    secondary segment with a garbage sequence number, arriving before the
    primary's first one, moved it and nothing matched."""
    good = tcp_frame(b"\0", seq=0)
    stray = tcp_frame(b"\0", seq=4278190081)
    one = run([(P, good, 0), (S, good, 1), (S, stray, 2)])[1]
    two = run([(S, good, 0), (S, stray, 1), (P, good, 2)])[1]
    assert out_frames(one) == out_frames(two) == [good]


def test_ip_length_beyond_the_frame_is_malformed_unless_a_capture_cut_it():
    """Hypothesis: a lying IP total length was taken for a snaplen cut and its
    unknown tail made decisions depend on interleaving."""
    lying = bytearray(tcp_frame(b"\0", seq=0))
    lying[16:18] = b"\xff\x29"
    c = Comparator()
    (e,) = c.receive(P, bytes(lying), 0)
    assert e.reason == "ipv4-truncated"


def test_concurrent_ping_sessions_interleaved_differently():
    """Hypothesis: all ICMP between two hosts was one FIFO, so two ping
    sessions interleaved differently by the replicas miscompared."""
    a = [icmp_frame(b"a", ident=1, seq=i) for i in range(3)]
    b = [icmp_frame(b"b", ident=2, seq=i) for i in range(3)]
    script = ([(P, f, i) for i, f in enumerate(a + b)]
              + [(S, f, 10 + i) for i, f in enumerate(b + a)])
    _, events = run(script)
    assert miscompares(events) == [] and len(out_frames(events)) == 6


@pytest.mark.parametrize("cut", range(1, 24))
def test_decoder_and_reader_on_every_cut_of_a_record(cut):
    """The framing and capture targets' promise, on every cut of a small
    stream: no exception, nothing invented."""
    wire = encode(udp_frame(b"payload"))
    d = FrameDecoder()
    assert d.feed(wire[:cut]) == [] or cut >= len(wire)
    assert d.feed(wire[cut:])[0][0] == wire
    data = _pcap([(0, udp_frame(b"a")), (1000, udp_frame(b"b"))])
    try:
        reader = open_capture("-", stdin=io.BytesIO(data[:cut + 30]))
    except CaptureError:
        return
    assert len(list(reader)) <= 2


def test_every_primary_frame_leaves_once_with_fragments_in_the_queue():
    """Hypothesis (exactly once, secondary accounting): a reassembled
    secondary datagram was counted as one frame, not as its fragments."""
    from colo_cli.testing import ether, ipv4, udp
    dgram = udp(b"F" * 40)
    frags = [ether(ipv4(dgram[:24], 17, ident=5, flags_frag=0x2000), 0x0800),
             ether(ipv4(dgram[24:], 17, ident=5, flags_frag=3), 0x0800)]
    c, events = run([(P, frags[0], 0), (P, frags[1], 1), (S, frags[0], 2), (S, frags[1], 3)])
    assert [e.packet.data for e in events if isinstance(e, Released)] == frags
    assert c.stats.secondary_matched == 2


def test_compact_output_and_the_reference_model_agree_on_a_fixed_case():
    """The property test's fixed point: in-step UDP and TCP, in both output
    forms, against the reference model (tests/reference.py)."""
    from reference import ReferenceComparator
    frames = [udp_frame(b"u%d" % i, sport=i % 3) for i in range(6)]
    frames += [tcp_frame(b"t" * 10, seq=100 + 10 * i) for i in range(4)]
    script = [(P, f, 2 * i) for i, f in enumerate(frames)] + [(S, f, 2 * i + 1) for i, f in enumerate(frames)]
    ref = ReferenceComparator()
    for side, frame, now in script:
        ref.receive(side == P, frame, now)
    assert ref.released == {i: ("match", 2 * i + 1) for i in range(len(frames))}
    _, full = run(script, comparator=Comparator(Config()))
    _, compact = run(script, comparator=Comparator(Config(), compact=True))
    assert out_frames(full) == frames
    assert [e.data for e in compact if isinstance(e, Matched)] == frames
    assert [type(e) for e in compact] == [Matched] * len(frames)


def test_a_queued_syn_is_released_whichever_side_leads():
    """Hypothesis (decisions independent of interleaving): the old TCP fast
    path's release loop stopped at any SYN, even when the secondary had sent
    its own, so with the primary ahead its SYN-ACK and data stayed queued."""
    p = [tcp_frame(b"", seq=0, ack=0, flags=0x12, sport=2001),
         tcp_frame(b"\0", seq=1, ack=0, flags=0x18, sport=2001)]
    s = [tcp_frame(b"", seq=0, ack=4278190080, flags=0x12, sport=2001),
         tcp_frame(b"\0", seq=1, ack=0, flags=0x18, sport=2001)]
    primary_first = run([(P, f, 0) for f in p] + [(S, f, 1) for f in s])[1]
    secondary_first = run([(S, f, 0) for f in s] + [(P, f, 1) for f in p])[1]
    assert out_frames(primary_first) == out_frames(secondary_first) == p
