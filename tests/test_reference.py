"""The core against an independent model: ``reference.ReferenceComparator``.

Hypothesis writes two replicas' output (UDP and TCP flows, the secondary
identical or changed: a flipped payload byte, a dropped, repeated or
resegmented frame, other acks) and interleaves them at random into a script
of ``(side, frame, now_ms)``.  The core, in both its output forms (full
``Released`` events and the compact ``Matched`` ones the adapters use), must
decide exactly as the model: for every primary frame, whether it left on a
match or at the end, and at what ``now_ms``; the order frames left in, per
flow; and every miscompare (flow, cause, offset, datagram index, time).

These replace the tests that held the old hand-inlined fast path to the
general one: there is one implementation now, and it is held to a second,
deliberately simple one that shares no code with it.
"""

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colo_cli.core import (PRIMARY, SECONDARY, Bypassed, Comparator, Config, Matched,
                           Miscompare, Released)
from colo_cli.testing import tcp_frame, udp_frame
from reference import ReferenceComparator
from scripts import interleave

SETTINGS = settings(max_examples=int(os.environ.get("COLO_HYPOTHESIS_EXAMPLES", "150")),
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SYN_ACK, PSH_ACK, ACK, FIN_ACK = 0x12, 0x18, 0x10, 0x11


# -- two replicas ---------------------------------------------------------------

@st.composite
def udp_flow(draw, n):
    sport = 20000 + n
    payloads = draw(st.lists(st.binary(max_size=30), min_size=1, max_size=6))
    return [udp_frame(b"%d:" % n + p, sport=sport) for p in payloads], None


@st.composite
def tcp_flow(draw, n):
    """One connection, in sequence: optional handshake, data in pieces with
    pure ACKs between them, optional FIN.  Returns (frames, (isn, data, acks))."""
    sport = 30000 + n
    isn = draw(st.integers(0, 0xFFFFFFFF))
    ack = draw(st.integers(0, 0xFFFFFFFF))
    data = draw(st.binary(min_size=1, max_size=300))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=5))))
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)]) if b > a]
    frames, seq = [], isn
    syn = draw(st.booleans())
    if syn:
        frames.append(tcp_frame(b"", seq=seq, ack=ack, flags=SYN_ACK, sport=sport))
        seq = (seq + 1) & 0xFFFFFFFF
    for piece in pieces:
        frames.append(tcp_frame(piece, seq=seq, ack=ack, flags=PSH_ACK, sport=sport))
        seq = (seq + len(piece)) & 0xFFFFFFFF
        if draw(st.booleans()):
            ack = (ack + draw(st.integers(0, 50))) & 0xFFFFFFFF
            frames.append(tcp_frame(b"", seq=seq, ack=ack, flags=ACK, sport=sport))
    if draw(st.booleans()):
        frames.append(tcp_frame(b"", seq=seq, ack=ack, flags=FIN_ACK, sport=sport))
    return frames, (sport, (isn + 1) & 0xFFFFFFFF if syn else isn, data)


def _flip_payload(draw, frame):
    """The frame with one payload byte changed (headers untouched)."""
    start = 54 if frame[23] == 6 else 42       # TCP or UDP payload
    if len(frame) <= start:
        return frame
    f = bytearray(frame)
    f[draw(st.integers(start, len(f) - 1))] ^= 0xFF
    return bytes(f)


@st.composite
def flow_pair(draw, n):
    kind = draw(st.sampled_from(["udp", "tcp", "tcp", "junk"]))
    if kind == "junk":
        return [draw(st.binary(max_size=13))], []      # not Ethernet: bypassed
    p, info = draw(udp_flow(n) if kind == "udp" else tcp_flow(n))
    s = list(p)
    how = draw(st.sampled_from(["same", "same", "flip", "drop", "extra", "resegment", "acks"]))
    i = draw(st.integers(0, len(s) - 1))
    if how == "flip":
        s[i] = _flip_payload(draw, s[i])
    elif how == "drop":
        del s[i]
    elif how == "extra":
        s.insert(i, s[i])
    elif how == "resegment" and kind == "tcp":
        # the secondary sends the same bytes in one segment, after its
        # segments without payload
        sport, start, data = info
        s = [f for f in s if len(f) <= 54] + [tcp_frame(data, seq=start, ack=0, flags=PSH_ACK,
                                                        sport=sport)]
    elif how == "acks" and kind == "tcp":
        # the secondary acknowledges other numbers (behind or ahead)
        delta = draw(st.sampled_from([-100, -1, 1, 100]))
        s = [tcp_frame(f[54:], seq=int.from_bytes(f[38:42], "big"),
                       ack=(int.from_bytes(f[42:46], "big") + delta) & 0xFFFFFFFF,
                       flags=f[47], sport=int.from_bytes(f[34:36], "big")) for f in s]
    return p, s


@st.composite
def scripts(draw):
    """Both sides' frames, flows interleaved at random within a side (each
    flow in its own order), then the two sides interleaved at random."""
    pairs = [draw(flow_pair(n)) for n in range(draw(st.integers(1, 5)))]
    # every primary frame its own object, so the compact form (Matched, which
    # carries the frame's bytes only) can be traced back to its index
    primary = [bytes(bytearray(f)) for f in interleave(draw, [p for p, _ in pairs])]
    secondary = interleave(draw, [s for _, s in pairs])
    script, now, p, s = [], 0, list(primary), list(secondary)
    while p or s:
        now += draw(st.integers(0, 5))
        side = draw(st.sampled_from(([PRIMARY] if p else []) + ([SECONDARY] if s else [])))
        script.append((side, (p if side == PRIMARY else s).pop(0), now))
    return primary, script


# -- running both -----------------------------------------------------------------

def _flow(frame):
    import dpkt
    ip = dpkt.ethernet.Ethernet(frame).data
    return ip.src, ip.dst, ip.data.sport, ip.data.dport, ip.p


def run_core(primary, script, compact, end_ms):
    c = Comparator(Config(compare_timeout_ms=None, max_queue_size=10_000,
                          max_connections=10_000, max_queued_bytes=1 << 30), compact=compact)
    index_of = {id(f): i for i, f in enumerate(primary)}
    released, order, found = {}, {}, []

    def account(events, now):
        for e in events:
            if type(e) is Matched:
                i, reason, flow = index_of[id(e.data)], "match", _flow(e.data)
            elif type(e) is Released:
                i, reason, flow = e.packet.index, str(e.reason), _flow(e.packet.data)
            elif type(e) is Bypassed:
                i, reason, flow = e.packet.index, "bypass", None
            else:
                if type(e) is Miscompare:
                    found.append((_flow(e.primary.data if e.primary is not None
                                        else e.secondary.data),
                                  str(e.cause), e.stream_offset, e.datagram_index, e.now_ms))
                continue
            assert i not in released, "a primary frame left twice"
            released[i] = (reason, now)
            order.setdefault(flow, []).append(i)

    for side, frame, now in script:
        account(c.receive(side, frame, now), now)
    account(c.finish(end_ms), end_ms)
    assert c.queued_frames == 0 and c.queued_bytes == 0
    return released, order, found


def run_reference(script, end_ms):
    ref = ReferenceComparator()
    for side, frame, now in script:
        ref.receive(side == PRIMARY, frame, now)
    ref.finish(end_ms)
    return ref.released, ref.order, ref.miscompares


@SETTINGS
@given(scripts())
def test_the_core_decides_as_the_reference_model(case):
    primary, script = case
    end_ms = (script[-1][2] if script else 0) + 1
    expected = run_reference(script, end_ms)
    assert sorted(expected[0]) == list(range(len(primary)))    # the model itself: each once
    for compact in (False, True):
        released, order, found = run_core(primary, script, compact, end_ms)
        assert released == expected[0]
        assert order == expected[1]
        assert sorted(found) == sorted(expected[2])


# -- fixed cases, the model's own sanity ----------------------------------------

def test_the_model_matches_identical_replicas_and_finds_a_flipped_byte():
    p = [tcp_frame(b"hello ", seq=100, ack=7, flags=PSH_ACK),
         tcp_frame(b"world", seq=106, ack=7, flags=PSH_ACK)]
    s = [p[0], tcp_frame(b"wOrld", seq=106, ack=7, flags=PSH_ACK)]
    script = [(PRIMARY, p[0], 0), (PRIMARY, p[1], 1), (SECONDARY, s[0], 2), (SECONDARY, s[1], 3)]
    released, _, found = run_reference(script, 9)
    assert released == {0: ("match", 2), 1: ("end", 9)}
    assert [(cause, offset) for _, cause, offset, _, _ in found] == [("content", 7)]
    assert run_core(p, script, True, 9)[0] == released


def test_the_model_holds_a_segment_behind_the_ack_gate():
    p = [tcp_frame(b"data", seq=100, ack=500, flags=PSH_ACK)]
    s_behind = [tcp_frame(b"data", seq=100, ack=400, flags=PSH_ACK)]
    s_ack = tcp_frame(b"", seq=104, ack=500, flags=ACK)
    script = [(PRIMARY, p[0], 0), (SECONDARY, s_behind[0], 1), (SECONDARY, s_ack, 2)]
    released, _, found = run_reference(script, 9)
    assert released == {0: ("match", 2)} and found == []        # left with the ACK
    assert run_core(p, script, False, 9)[0] == released
