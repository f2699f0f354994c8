"""``Comparator.receive_records``: a read's worth of framed records in one
call (serve's hot path) takes the same decisions, and gives the same events
in the same order, as one ``receive`` per record; a failure on one record
costs that record only."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from colo_cli.core import (Bypassed, CheckpointMode, Comparator, Config, Dropped, InternalError,
                           Matched, Miscompare, Released, encode)
from colo_cli.testing import tcp_frame, udp_frame

from scripts import P, S

HEADER = 4        # serve's framing without vnet headers: a be32 length word


def frame_for(kind: int, i: int, differ: bool) -> bytes:
    payload = b"x%d" % i + (b"!" if differ else b"")
    if kind == 0:
        return udp_frame(payload, sport=4000 + i % 5)
    if kind == 1:
        return tcp_frame(payload * 3, seq=1000 + 64 * i, ack=9, flags=0x18, sport=7000 + i % 2)
    return b"\x00" * (i % 20)                     # not a frame we can compare


@st.composite
def scripts(draw):
    """Per frame: which sides send it (either order), whether the secondary's
    copy differs; then cut into runs of one side, each run cut into reads."""
    items = []
    for i in range(draw(st.integers(1, 40))):
        kind = draw(st.integers(0, 2))
        differ = draw(st.integers(0, 9)) == 0
        order = draw(st.sampled_from(["ps", "sp", "p", "s"]))
        for side in order:
            items.append((P if side == "p" else S, frame_for(kind, i, differ and side == "s")))
    cuts = draw(st.lists(st.booleans(), min_size=len(items), max_size=len(items)))
    reads, current = [], []
    for (side, frame), cut in zip(items, cuts):
        if current and (cut or current[0][0] != side):
            reads.append(current)
            current = []
        current.append((side, frame))
    reads.append(current)
    return reads


def shape(events) -> list:
    out = []
    for e in events:
        if isinstance(e, Matched):
            out.append(("released", e.data, "match"))
        elif isinstance(e, Released):
            out.append(("released", e.packet.data, e.reason))
        elif isinstance(e, Bypassed):
            out.append(("bypassed", e.packet.data, e.reason))
        elif isinstance(e, Dropped):
            out.append(("dropped", e.packet.data, e.reason))
        elif isinstance(e, Miscompare):
            out.append(("miscompare", e.kind, e.cause, e.stream_offset))
        else:
            out.append((type(e).__name__,))
    return out


@settings(max_examples=200, deadline=None)
@given(reads=scripts(), compact=st.booleans(),
       mode=st.sampled_from([CheckpointMode.LOCAL, CheckpointMode.EXTERNAL]))
def test_one_call_per_read_decides_as_one_call_per_record(reads, compact, mode):
    one = Comparator(Config(), compact=compact, mode=mode)
    batched = Comparator(Config(), compact=compact, mode=mode)
    per_record, per_read = [], []
    for t, read in enumerate(reads):
        side = read[0][0]
        records = [(encode(frame), 0) for _, frame in read]
        for wire, _ in records:
            per_record += one.receive(side, wire, float(t), HEADER, 0)
        per_read += batched.receive_records(side, records, float(t), HEADER)
    assert shape(per_read) == shape(per_record)
    assert batched.stats.snapshot() == one.stats.snapshot()
    assert batched.queued_frames == one.queued_frames


class BoomComparator(Comparator):
    def _dispatch(self, pkt, primary, now_ms, out):
        if b"boom" in pkt.data:
            raise RuntimeError("injected")
        super()._dispatch(pkt, primary, now_ms, out)


def test_a_record_that_fails_costs_that_record_only():
    c = BoomComparator(Config())
    frames = [udp_frame(b"boom" if i == 2 else b"ok-%d" % i, sport=5000 + i) for i in range(5)]
    records = [(encode(f), 0) for f in frames]
    # the secondary's failing record is dropped; the others wait for twins
    first = c.receive_records(S, records, 0.0, HEADER)
    assert [type(e) for e in first] == [InternalError, Dropped]
    assert first[1].packet.data == encode(frames[2]) and first[1].reason == "internal-error"
    events = c.receive_records(P, records, 1.0, HEADER)
    (error,) = [e for e in events if isinstance(e, InternalError)]
    assert isinstance(error.error, RuntimeError)
    matched = [e.packet.data for e in events if isinstance(e, Released) and e.reason == "match"]
    bypassed = [e.packet.data for e in events if isinstance(e, Bypassed)]
    # the four good frames matched their twins, in order; the failing one left
    assert matched == [encode(f) for i, f in enumerate(frames) if i != 2]
    assert bypassed == [encode(frames[2])]
