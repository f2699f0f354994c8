"""QEMU's socket framing: exact bytes, incremental decoding, hostile input."""

import struct

from hypothesis import given, settings, strategies as st

from colo_cli.core.framing import (MAX_RECORD_LEN, MSG_CHECKPOINT, MSG_DO_CHECKPOINT,
                                   MSG_PROXY_INIT, FrameDecoder, NotifyDecoder, encode,
                                   encode_notify)
from colo_cli.testing import udp_frame


def test_encode_plain_is_length_then_frame():
    assert encode(b"\x01\x02\x03") == b"\x00\x00\x00\x03\x01\x02\x03"


def test_encode_vnet_length_counts_the_header():
    # observed section 3: [len_total][vnet_len=10][10 hdr bytes + frame]
    frame = bytes(range(59))
    hdr = bytes(range(1, 11))
    wire = encode(frame, hdr)
    assert wire[:8] == bytes.fromhex("00000045" "0000000a")
    assert wire[8:18] == hdr and wire[18:] == frame


def test_encode_vnet_empty_header():
    assert encode(b"ab", b"") == bytes.fromhex("00000002 00000000".replace(" ", "")) + b"ab"


def test_decoder_returns_whole_wire_records():
    f1, f2 = udp_frame(b"one"), udp_frame(b"two")
    wire = encode(f1) + encode(f2)
    d = FrameDecoder()
    assert d.feed(wire) == [(encode(f1), 0), (encode(f2), 0)]
    assert d.pending_bytes == 0 and d.error is None and d.records == 2


def test_decoder_vnet_records_carry_their_header_length():
    frame = udp_frame(b"x")
    wire = encode(frame, b"\x01" * 12)
    d = FrameDecoder(vnet_hdr_support=True)
    ((rec, vnet_len),) = d.feed(wire)
    assert rec == wire and vnet_len == 12
    assert rec[8 + 12:] == frame


def test_decoder_byte_at_a_time():
    frames = [udp_frame(bytes([i]) * i) for i in range(1, 20)]
    wire = b"".join(encode(f) for f in frames)
    d = FrameDecoder()
    got = []
    for i in range(len(wire)):
        got.extend(d.feed(wire[i:i + 1]))
    assert [r[4:] for r, _ in got] == frames


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=20),
       st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=50),
       st.booleans())
def test_decoder_any_split_gives_same_records(frames, cuts, vnet):
    wire = b"".join(encode(f, b"" if vnet else None) for f in frames)
    d = FrameDecoder(vnet_hdr_support=vnet)
    got, pos, i = [], 0, 0
    while pos < len(wire):
        step = cuts[i % len(cuts)]
        got.extend(d.feed(wire[pos:pos + step]))
        pos += step
        i += 1
    hdr = 8 if vnet else 4
    assert [r[hdr:] for r, _ in got] == frames
    assert d.pending_bytes == 0


def test_zero_length_record_is_skipped_and_counted():
    # QEMU aborts on this (observed j3); we skip it and go on.
    f = udp_frame(b"after")
    d = FrameDecoder()
    assert d.feed(b"\0\0\0\0" + encode(f)) == [(encode(f), 0)]
    assert d.zero_length_records == 1 and d.error is None


def test_max_record_is_accepted_one_more_is_not():
    # observed j2: 69632 bytes is accepted, 69633 kills QEMU's input
    d = FrameDecoder()
    big = b"\xab" * MAX_RECORD_LEN
    assert len(d.feed(encode(big))) == 1
    d2 = FrameDecoder()
    assert d2.feed(encode(big + b"\0")) == []
    assert "69633" in d2.error and "69632" in d2.error


def test_hostile_length_is_refused_at_once_without_buffering():
    d = FrameDecoder()
    assert d.feed(struct.pack(">I", 0x7FFFFFFF)) == []
    assert d.error is not None and d.pending_bytes == 0
    # a dead decoder swallows nothing more (the adapter closes the connection)
    assert d.feed(encode(udp_frame(b"x"))) == []
    assert d.pending_bytes == 0


def test_records_before_a_hostile_length_are_delivered():
    f = udp_frame(b"ok")
    d = FrameDecoder()
    assert d.feed(encode(f) + b"\xff\xff\xff\xff") == [(encode(f), 0)]
    assert d.error


@settings(max_examples=300)
@given(st.binary(max_size=2000), st.booleans())
def test_decoder_never_raises_and_stays_bounded(junk, vnet):
    d = FrameDecoder(vnet_hdr_support=vnet)
    for i in range(0, len(junk), 97):
        d.feed(junk[i:i + 97])
        assert d.pending_bytes <= MAX_RECORD_LEN + 8


def test_notify_messages_exact_bytes():
    assert encode_notify(MSG_DO_CHECKPOINT) == b"\x00\x00\x00\x0dDO_CHECKPOINT"


def test_notify_decoder_plain_and_with_vnet_word():
    # Xen sends no vnet word; a QEMU-style peer with vnet on sends one (0).
    d = NotifyDecoder()
    plain = encode_notify(MSG_PROXY_INIT)
    vnet = struct.pack(">II", len(MSG_CHECKPOINT), 0) + MSG_CHECKPOINT
    assert d.feed(plain + vnet) == [MSG_PROXY_INIT, MSG_CHECKPOINT]


def test_notify_decoder_split_and_garbage():
    d = NotifyDecoder()
    wire = encode_notify(MSG_CHECKPOINT) * 3
    got = []
    for b in wire:
        got.extend(d.feed(bytes([b])))
    assert got == [MSG_CHECKPOINT] * 3
    bad = NotifyDecoder()
    assert bad.feed(b"\x7f\xff\xff\xff") == [] and bad.error
