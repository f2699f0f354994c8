"""Capture files: exact bytes written, every format variant read, hostile and
damaged files, and the third-party corpus in ../shared/corpus."""

import gzip
import io
import json
import os
import struct
import threading
import tracemalloc
from pathlib import Path

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from colo_cli.capture import (MAX_BLOCK_LEN, MAX_CAPLEN, CaptureError, PcapngWriter, PcapWriter,
                              describe_linktype, open_capture)
from colo_cli.linklayer import LINKTYPES_READ, describe_read
from colo_cli.testing import tcp_frame, udp_frame

FRAME_A = udp_frame(b"hello")
FRAME_B = tcp_frame(b"x" * 100)
FRAME_C = udp_frame(b"third", sport=7)


# ------------------------------------------------------------------ helpers

def read_bytes(data, **kw):
    """Open bytes as '-' and read everything: ([(ts_ns, data, orig_len)],
    reader).  (Frame numbers and link types have tests of their own.)"""
    reader = open_capture("-", stdin=io.BytesIO(data), **kw)
    with reader:
        return [(ts, frame, orig) for _n, ts, frame, orig, _lt in reader], reader


def pcap_header(magic=0xA1B2C3D4, order="<", version=(2, 4), snaplen=262144, linktype=1):
    return struct.pack(order + "IHHiIII", magic, version[0], version[1], 0, 0, snaplen, linktype)


def pcap_record(sec, frac, data, orig_len=None, order="<", caplen=None):
    caplen = len(data) if caplen is None else caplen
    return struct.pack(order + "IIII", sec, frac, caplen,
                       len(data) if orig_len is None else orig_len) + data


def pad4(b):
    return b + b"\0" * (-len(b) % 4)


def ng_block(btype, body, e="<"):
    body = pad4(body)
    n = len(body) + 12
    return struct.pack(e + "II", btype, n) + body + struct.pack(e + "I", n)


def ng_opt(code, value, e="<"):
    return struct.pack(e + "HH", code, len(value)) + pad4(value)


def ng_shb(e="<", version=(1, 0)):
    return ng_block(0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, version[0], version[1], -1), e)


def ng_idb(e="<", linktype=1, snaplen=0, tsresol=None, tsoffset=None):
    opts = b""
    if tsresol is not None:
        opts += ng_opt(9, bytes([tsresol]), e)
    if tsoffset is not None:
        opts += ng_opt(14, struct.pack(e + "q", tsoffset), e)
    if opts:
        opts += struct.pack(e + "HH", 0, 0)
    return ng_block(1, struct.pack(e + "HHI", linktype, 0, snaplen) + opts, e)


def ng_epb(ifid, ticks, data, e="<", orig_len=None):
    head = struct.pack(e + "IIIII", ifid, ticks >> 32, ticks & 0xFFFFFFFF, len(data),
                       len(data) if orig_len is None else orig_len)
    return ng_block(6, head + pad4(data), e)


def ng_pb(ifid, ticks, data, e="<"):
    head = struct.pack(e + "HHIIII", ifid, 0, ticks >> 32, ticks & 0xFFFFFFFF, len(data), len(data))
    return ng_block(2, head + pad4(data), e)


def ng_spb(data, e="<", orig_len=None):
    return ng_block(3, struct.pack(e + "I", len(data) if orig_len is None else orig_len) + pad4(data), e)


def pcapng_blocks(raw):
    """(type, whole block) for each block of a little-endian pcapng."""
    out, off = [], 0
    while off < len(raw):
        btype, blen = struct.unpack_from("<II", raw, off)
        out.append((btype, raw[off:off + blen]))
        off += blen
    return out


def written_pcap(records, **kw):
    f = io.BytesIO()
    w = PcapWriter(f, **kw)
    for rec in records:
        w.write(*rec)
    return f.getvalue()


def sample_pcap():
    return written_pcap([(1_000_000_000, FRAME_A), (2_500_000_000, FRAME_B), (3_000_000_000, FRAME_C)])


def sample_pcapng():
    f = io.BytesIO()
    w = PcapngWriter(f)
    w.add_interface("pvm")
    w.add_interface("svm")
    w.write(0, 10, FRAME_A, comment="first")
    w.write(1, 20, FRAME_B)
    w.write(0, 30, FRAME_C, comment="third")
    return f.getvalue()


def one_line(exc_info, name):
    msg = str(exc_info.value)
    assert "\n" not in msg
    assert msg.startswith(name + ": ")
    return msg


# ------------------------------------------------------------------ PcapWriter

def test_pcap_writer_exact_bytes_usec():
    raw = written_pcap([(0, b"\xaa\xbb"), (1_999_999_900, b"\xcc", 60)])
    assert raw == bytes.fromhex(
        "d4c3b2a1" "0200" "0400" "00000000" "00000000" "00000400" "01000000"   # snaplen 262144
        "00000000" "00000000" "02000000" "02000000" "aabb"
        # 1.9999999 s: truncated to 1 s + 999999 µs, never tv_usec = 1000000
        "01000000" "3f420f00" "01000000" "3c000000" "cc")


def test_pcap_writer_usec_round_trip():
    records = [(0, FRAME_A), (1_999_999_900, FRAME_B, 1514),
               (1_700_000_000_123_456_789, FRAME_C), (2**32 * 10**9 - 1, b"")]
    got, r = read_bytes(written_pcap(records))
    assert (r.format, r.linktype, r.nanosecond, r.snaplen, r.warnings) == ("pcap", 1, False, 262144, [])
    assert got == [(0, FRAME_A, len(FRAME_A)),
                   (1_999_999_000, FRAME_B, 1514),
                   (1_700_000_000_123_456_000, FRAME_C, len(FRAME_C)),
                   (2**32 * 10**9 - 1000, b"", 0)]
    assert r.packets == 4


def test_pcap_writer_nsec_round_trip_is_exact():
    records = [(0, FRAME_A), (1_999_999_999, FRAME_B), (1_700_000_000_123_456_789, FRAME_C, 9000)]
    raw = written_pcap(records, nano=True)
    assert raw[:4] == bytes.fromhex("4d3cb2a1")
    got, r = read_bytes(raw)
    assert r.nanosecond
    assert got == [(0, FRAME_A, len(FRAME_A)), (1_999_999_999, FRAME_B, len(FRAME_B)),
                   (1_700_000_000_123_456_789, FRAME_C, 9000)]


def test_pcap_writer_output_reads_in_dpkt():
    raw = written_pcap([(1_999_999_900, FRAME_A), (5_000_001_000, FRAME_B)])
    got = [(ts, bytes(buf)) for ts, buf in dpkt.pcap.Reader(io.BytesIO(raw))]
    assert [buf for _, buf in got] == [FRAME_A, FRAME_B]
    assert got[0][0] == pytest.approx(1.999999) and got[1][0] == pytest.approx(5.000001)


def test_pcap_writer_honest_snaplen_and_linktype():
    raw = written_pcap([(0, b"abcdef")], snaplen=4, linktype=113)
    assert struct.unpack_from("<II", raw, 16) == (4, 113)
    got, _ = read_bytes(raw, linktypes=None)
    assert got == [(0, b"abcd", 6)]   # cut to the header's snaplen, original length kept


def test_pcap_writer_refuses_float_and_out_of_range_timestamps():
    w = PcapWriter(io.BytesIO())
    with pytest.raises(TypeError):
        w.write(1.5, b"x")
    with pytest.raises(ValueError):
        w.write(-1, b"x")
    with pytest.raises(ValueError):
        w.write(2**32 * 10**9, b"x")


# ------------------------------------------------------------------ PcapngWriter

def test_pcapng_writer_exact_epb_bytes():
    f = io.BytesIO()
    w = PcapngWriter(f, application="t")
    assert w.add_interface("e") == 0
    start = f.tell()
    w.write(0, 0x1_0000_0002, b"\x01\x02\x03", comment="ab")
    assert f.getvalue()[start:] == bytes.fromhex(
        "06000000" "30000000"                 # EPB, 48 bytes
        "00000000" "01000000" "02000000"      # interface 0, ts high, ts low
        "03000000" "03000000" "01020300"      # caplen, orig_len, data + pad
        "01000200" "61620000"                 # opt_comment "ab" + pad
        "00000000"                            # opt_endofopt
        "30000000")


def test_pcapng_writer_round_trip_own_reader():
    raw = sample_pcapng()
    got, r = read_bytes(raw)
    assert (r.format, r.linktype, r.nanosecond, r.snaplen, r.warnings) == ("pcapng", 1, True, 262144, [])
    assert got == [(10, FRAME_A, len(FRAME_A)), (20, FRAME_B, len(FRAME_B)), (30, FRAME_C, len(FRAME_C))]


def test_pcapng_writer_round_trip_dpkt():
    f = io.BytesIO()
    w = PcapngWriter(f, application="colo-compare 0.1")
    assert w.add_interface("pvm", description="primary") == 0
    assert w.add_interface("svm") == 1
    w.write(0, 1_700_000_000_123_456_789, FRAME_A, comment="miscompare: payload differs at byte 42")
    w.write(1, 1_700_000_000_223_456_789, FRAME_B, orig_len=1514)
    w.write(1, 1_700_000_000_323_456_789, FRAME_C, comment="ünïcode")
    raw = f.getvalue()

    got = [bytes(buf) for _, buf in dpkt.pcapng.Reader(io.BytesIO(raw))]
    assert got == [FRAME_A, FRAME_B, FRAME_C]

    blocks = pcapng_blocks(raw)
    assert [t for t, _ in blocks] == [0x0A0D0D0A, 1, 1, 6, 6, 6]
    shb = dpkt.pcapng.SectionHeaderBlockLE(blocks[0][1])
    assert [o.data for o in shb.opts if o.code == 4] == [b"colo-compare 0.1"]
    idb0 = dpkt.pcapng.InterfaceDescriptionBlockLE(blocks[1][1])
    idb1 = dpkt.pcapng.InterfaceDescriptionBlockLE(blocks[2][1])
    assert idb0.snaplen == idb1.snaplen == 262144 and idb0.linktype == 1
    assert {o.code: o.data for o in idb0.opts if o.code} == {2: b"pvm", 3: b"primary", 9: b"\x09"}
    assert {o.code: o.data for o in idb1.opts if o.code} == {2: b"svm", 9: b"\x09"}
    epbs = [dpkt.pcapng.EnhancedPacketBlockLE(b) for _, b in blocks[3:]]
    assert [e.iface_id for e in epbs] == [0, 1, 1]
    assert [e.pkt_len for e in epbs] == [len(FRAME_A), 1514, len(FRAME_C)]
    comments = [[o.text for o in e.opts if o.code == 1] for e in epbs]
    assert comments == [["miscompare: payload differs at byte 42"], [], ["ünïcode"]]
    assert [(e.ts_high << 32 | e.ts_low) for e in epbs] == [
        1_700_000_000_123_456_789, 1_700_000_000_223_456_789, 1_700_000_000_323_456_789]

    mine, r = read_bytes(raw)
    assert mine == [(1_700_000_000_123_456_789, FRAME_A, len(FRAME_A)),
                    (1_700_000_000_223_456_789, FRAME_B, 1514),
                    (1_700_000_000_323_456_789, FRAME_C, len(FRAME_C))]


def test_pcapng_writer_rejects_unknown_interface_and_float_ts():
    w = PcapngWriter(io.BytesIO())
    with pytest.raises(ValueError):
        w.write(0, 1, b"x")
    w.add_interface("e")
    with pytest.raises(TypeError):
        w.write(0, 1.0, b"x")


def test_pcapng_writer_cuts_a_huge_comment_on_a_character_boundary():
    f = io.BytesIO()
    w = PcapngWriter(f)
    w.add_interface("e")
    w.write(0, 1, b"x", comment="é" * 40000)   # 80000 bytes of UTF-8
    epb = dpkt.pcapng.EnhancedPacketBlockLE(pcapng_blocks(f.getvalue())[-1][1])
    text = [o.text for o in epb.opts if o.code == 1][0]
    assert text == "é" * 32767


# ------------------------------------------------------------------ sniffing

def test_pcapng_named_pcap_and_pcap_named_pcapng(tmp_path):
    a = tmp_path / "really-pcapng.pcap"
    a.write_bytes(sample_pcapng())
    b = tmp_path / "really-pcap.pcapng"
    b.write_bytes(sample_pcap())
    with open_capture(str(a)) as r:
        assert r.format == "pcapng" and len(list(r)) == 3
    with open_capture(str(b)) as r:
        assert r.format == "pcap" and len(list(r)) == 3


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("magic,frac,ts_ns", [(0xA1B2C3D4, 123456, 5_123_456_000),
                                             (0xA1B23C4D, 123456789, 5_123_456_789)])
def test_pcap_both_byte_orders_and_resolutions(order, magic, frac, ts_ns):
    raw = (pcap_header(magic, order) + pcap_record(5, frac, FRAME_A, 1000, order)
           + pcap_record(6, 0, b"", 0, order))
    got, r = read_bytes(raw)
    assert got == [(ts_ns, FRAME_A, 1000), (6_000_000_000, b"", 0)]
    assert r.nanosecond == (magic == 0xA1B23C4D)


@pytest.mark.parametrize("order", ["<", ">"])
def test_modified_pcap_has_24_byte_record_headers(order):
    extra = struct.pack(order + "IHBB", 3, 0x0800, 0, 0)   # ifindex, protocol, pkt_type, pad
    raw = pcap_header(0xA1B2CD34, order)
    raw += struct.pack(order + "IIII", 7, 250000, len(FRAME_A), len(FRAME_A)) + extra + FRAME_A
    raw += struct.pack(order + "IIII", 8, 0, len(FRAME_B), 1514) + extra + FRAME_B
    got, r = read_bytes(raw)
    assert r.format == "pcap" and not r.nanosecond
    assert got == [(7_250_000_000, FRAME_A, len(FRAME_A)), (8_000_000_000, FRAME_B, 1514)]


def test_pcap_versions_before_2_3_have_lengths_swapped_like_libpcap():
    # pre-2.3 files store (orig_len, caplen); 2.3 files may be either way round
    old = pcap_header(version=(2, 2)) + struct.pack("<IIII", 1, 0, 1514, 4) + b"abcd"
    assert read_bytes(old)[0] == [(1_000_000_000, b"abcd", 1514)]
    dgux = pcap_header(version=(543, 0)) + struct.pack("<IIII", 1, 0, 1514, 4) + b"abcd"
    assert read_bytes(dgux)[0] == [(1_000_000_000, b"abcd", 1514)]
    v23 = (pcap_header(version=(2, 3)) + struct.pack("<IIII", 1, 0, 1514, 4) + b"abcd"
           + struct.pack("<IIII", 2, 0, 2, 9) + b"ef")
    assert read_bytes(v23)[0] == [(1_000_000_000, b"abcd", 1514), (2_000_000_000, b"ef", 9)]


def test_pcap_linktype_is_the_low_16_bits():
    raw = pcap_header(linktype=0x30000001) + pcap_record(1, 0, FRAME_A)
    got, r = read_bytes(raw)
    assert r.linktype == 1 and len(got) == 1


@pytest.mark.parametrize("e", ["<", ">"])
def test_pcapng_both_byte_orders(e):
    raw = ng_shb(e) + ng_idb(e, snaplen=65535) + ng_epb(0, 1_000_000, FRAME_A, e, orig_len=999)
    got, r = read_bytes(raw)
    assert (r.format, r.linktype, r.snaplen, r.nanosecond) == ("pcapng", 1, 65535, False)
    assert got == [(1_000_000_000, FRAME_A, 999)]


def test_pcapng_sections_switch_byte_order_and_restart_interface_ids():
    raw = (ng_shb("<") + ng_idb("<", tsresol=9) + ng_epb(0, 5, FRAME_A, "<")
           + ng_shb(">") + ng_idb(">", tsresol=3) + ng_idb(">") + ng_epb(1, 7, FRAME_B, ">")
           + ng_epb(0, 7, FRAME_B, ">")
           + ng_shb("<") + ng_idb("<") + ng_epb(0, 9, FRAME_C, "<"))
    got, r = read_bytes(raw)
    assert r.warnings == []
    assert got == [(5, FRAME_A, len(FRAME_A)), (7000, FRAME_B, len(FRAME_B)),
                   (7_000_000, FRAME_B, len(FRAME_B)), (9000, FRAME_C, len(FRAME_C))]


def test_pcapng_timestamp_resolution_is_per_interface():
    raw = (ng_shb() + ng_idb(tsresol=9) + ng_idb() + ng_idb(tsresol=0x88)
           + ng_idb(tsresol=12) + ng_idb(tsresol=0, tsoffset=1_600_000_000)
           + ng_epb(0, 1_700_000_000_123_456_789, FRAME_A)
           + ng_epb(1, 1_700_000_000_123_456, FRAME_A)
           + ng_epb(2, 3 * 256 + 1, FRAME_A)                     # 2^-8 s units
           + ng_epb(3, 12_345_678_901_234_567_891, FRAME_A)      # picoseconds
           + ng_epb(4, 5, FRAME_A))                              # seconds + if_tsoffset
    got, r = read_bytes(raw)
    assert r.nanosecond   # first interface is 10^-9
    assert [ts for ts, _, _ in got] == [1_700_000_000_123_456_789, 1_700_000_000_123_456_000,
                                        3_003_906_250, 12_345_678_901_234_567,
                                        1_600_000_005_000_000_000]


def test_pcapng_simple_packet_blocks_use_the_first_interface_snaplen():
    raw = ng_shb() + ng_idb(snaplen=8) + ng_spb(b"0123456789") + ng_spb(b"abc") + ng_spb(b"ab", orig_len=99)
    got, r = read_bytes(raw)
    # no timestamp in an SPB (libpcap reports 0); caplen = min(orig, block, snaplen)
    assert got == [(0, b"01234567", 10), (0, b"abc", 3), (0, b"ab\0\0", 99)]


def test_pcapng_obsolete_packet_block_and_unknown_blocks():
    raw = (ng_shb() + ng_block(4, b"\0\0\0\0") + ng_idb() + ng_block(0x00000BAD, b"custom")
           + ng_pb(0, 1, FRAME_A) + ng_block(5, b"\0" * 12) + ng_block(10, b"secrets!")
           + ng_epb(0, 2, FRAME_B))
    got, r = read_bytes(raw)
    assert got == [(1000, FRAME_A, len(FRAME_A)), (2000, FRAME_B, len(FRAME_B))]
    assert r.warnings == []


def test_pcapng_without_interfaces_is_empty_not_an_error():
    got, r = read_bytes(ng_shb() + ng_block(4, b"\0\0\0\0"))
    assert got == [] and r.linktype is None and r.warnings == []


def test_pcapng_version_1_2_is_accepted_like_libpcap():
    got, _ = read_bytes(ng_shb(version=(1, 2)) + ng_idb() + ng_epb(0, 1, FRAME_A))
    assert len(got) == 1


# ------------------------------------------------------------------ link types

READ_BY_DEFAULT = "it reads " + describe_read()


@pytest.mark.parametrize("linktype", sorted(LINKTYPES_READ))
def test_every_link_type_read_is_accepted(linktype):
    raw = pcap_header(linktype=linktype) + pcap_record(1, 0, b"x" * 16)
    got, r = read_bytes(raw)
    assert r.linktype == linktype and len(got) == 1


def test_a_link_type_not_read_is_refused_by_name():
    raw = pcap_header(linktype=105) + pcap_record(1, 0, b"x" * 16)
    with pytest.raises(CaptureError) as ei:
        read_bytes(raw)
    assert one_line(ei, "<stdin>") == (
        "<stdin>: link type IEEE802_11 (105) is not one colo-compare reads (%s)" % READ_BY_DEFAULT)
    got, r = read_bytes(raw, linktypes=None)
    assert r.linktype == 105 and len(got) == 1
    # a caller may ask for fewer
    with pytest.raises(CaptureError, match=r"LINUX_SLL \(113\) is not one"):
        read_bytes(pcap_header(linktype=113), linktypes={1})


def test_unknown_link_type_is_named_by_number():
    with pytest.raises(CaptureError) as ei:
        read_bytes(pcap_header(linktype=4000))
    assert "link type 4000 is not one colo-compare reads" in str(ei.value)
    assert describe_linktype(101) == "RAW (101)" and describe_linktype(276) == "LINUX_SLL2 (276)"


def test_pcapng_first_interface_not_read_is_refused():
    with pytest.raises(CaptureError) as ei:
        read_bytes(ng_shb() + ng_idb(linktype=127) + ng_idb() + ng_epb(1, 1, FRAME_A))
    assert "link type IEEE802_11_RADIOTAP (127) is not one colo-compare reads" in one_line(ei, "<stdin>")


def test_pcapng_later_interface_not_read_is_skipped_with_one_warning():
    raw = (ng_shb() + ng_idb() + ng_idb(linktype=105)
           + ng_epb(1, 1, b"r1") + ng_epb(0, 2, FRAME_A) + ng_epb(1, 3, b"r2")
           + ng_epb(1, 4, b"r3") + ng_pb(1, 5, b"r4") + ng_epb(0, 6, FRAME_B))
    got, r = read_bytes(raw)
    assert got == [(2000, FRAME_A, len(FRAME_A)), (6000, FRAME_B, len(FRAME_B))]
    assert r.warnings == ["<stdin>: skipped 4 packets on interface 1 (link type IEEE802_11 (105), "
                          "not one colo-compare reads)"]
    got, r = read_bytes(raw, linktypes=None)
    assert len(got) == 6 and r.warnings == []


def test_pcapng_interfaces_of_several_link_types_read_keep_their_own():
    raw = (ng_shb() + ng_idb() + ng_idb(linktype=101) + ng_idb(linktype=113)
           + ng_epb(1, 1, b"r1") + ng_epb(0, 2, FRAME_A) + ng_epb(2, 3, b"s" * 16))
    with open_capture("-", stdin=io.BytesIO(raw)) as r:
        assert [(n, lt, data) for n, _ts, data, _o, lt in r] == [
            (1, 101, b"r1"), (2, 1, FRAME_A), (3, 113, b"s" * 16)]
        assert r.linktype == 1 and r.warnings == []


# ------------------------------------------------------------------ stdin / pipes

def _pipe_reader(payload, *, buffered, piece=None):
    rfd, wfd = os.pipe()

    def feed():
        with os.fdopen(wfd, "wb", buffering=0) as w:
            step = piece or len(payload) or 1
            for i in range(0, len(payload), step):
                w.write(payload[i:i + step])

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    return os.fdopen(rfd, "rb", buffering=-1 if buffered else 0), t


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
@pytest.mark.parametrize("buffered,piece", [(True, None), (False, None), (True, 7), (False, 5)])
def test_stdin_pipe(kind, buffered, piece):
    payload = sample_pcap() if kind == "pcap" else sample_pcapng()
    expected = read_bytes(payload)[0]
    pipe, t = _pipe_reader(payload, buffered=buffered, piece=piece)
    with pipe, open_capture("-", stdin=pipe) as r:
        assert r.name == "<stdin>" and r.format == kind
        assert [rec[1:4] for rec in r] == expected
    t.join(5)


def test_stdin_subprocess_pipe(tmp_path):
    import subprocess
    import sys
    path = tmp_path / "in.pcapng"
    path.write_bytes(sample_pcapng())
    code = ("import sys; from colo_cli.capture import open_capture\n"
            "r = open_capture('-'); print(r.format, sum(1 for _ in r), r.warnings)")
    with open(path, "rb") as f:
        out = subprocess.run([sys.executable, "-c", code], stdin=f, capture_output=True,
                             text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "pcapng 3 []"


# ------------------------------------------------------------------ open errors

def test_missing_file(tmp_path):
    p = str(tmp_path / "nope.pcap")
    with pytest.raises(CaptureError) as ei:
        open_capture(p)
    assert one_line(ei, p) == p + ": cannot open: no such file or directory"


def test_directory(tmp_path):
    with pytest.raises(CaptureError) as ei:
        open_capture(str(tmp_path))
    assert one_line(ei, str(tmp_path)).endswith(": cannot open: is a directory")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads anything")
def test_permission_denied(tmp_path):
    p = tmp_path / "secret.pcap"
    p.write_bytes(sample_pcap())
    p.chmod(0)
    with pytest.raises(CaptureError) as ei:
        open_capture(str(p))
    assert one_line(ei, str(p)).endswith("permission denied")


@pytest.mark.parametrize("content,message", [
    (b"", "empty file (0 bytes), not a pcap or pcapng capture"),
    (b"\x7fEL", "too short to be a capture (3 bytes: 7f454c)"),
    (b"\x7fELF\x02\x01\x01" + b"\0" * 40, "not a pcap or pcapng file (first bytes 7f454c46)"),
    (b"\x1f\x8b\x08\x00rest", "gzip data cut short (the file ends inside the compressed stream)"),
    (gzip.compress(b"hello, world"), "not a pcap or pcapng file (gzip-compressed; decompressed, "
                                     "its first bytes are 68656c6c)"),
    (gzip.compress(b""), "empty gzip-compressed file, not a pcap or pcapng capture"),
    (gzip.compress(pcap_header()[:10]), "pcap file header cut short (10 of 24 bytes)"),
    (b"\x1f\x8b\x08\x00" + b"\xff" * 40, "corrupt gzip data (Error -3 while decompressing data: "
                                          "invalid block type)"),
    (b"BZh91AY&SY" + b"\0" * 20, "not a pcap or pcapng file (first bytes 425a6839: looks "
                                 "bzip2-compressed; decompress it first)"),
    (pcap_header()[:10], "pcap file header cut short (10 of 24 bytes)"),
    (pcap_header(version=(2, 5)), "unsupported pcap version 2.5 (libpcap reads 2.0 to 2.4)"),
    (pcap_header(version=(1, 4)), "unsupported pcap version 1.4 (libpcap reads 2.0 to 2.4)"),
    (ng_shb(version=(1, 1)) + ng_idb(), "unsupported pcapng version 1.1 (libpcap reads 1.0 and 1.2)"),
    (ng_shb()[:20], "truncated Section Header Block at offset 0 (file ends 20 of 28 bytes into it)"),
    (ng_shb()[:10], "truncated Section Header Block at offset 0 (file ends 10 bytes into it)"),
    (ng_shb() + ng_idb()[:-4], "truncated Interface Description Block at offset 28 "
                               "(file ends 16 of 20 bytes into it)"),
    (ng_shb()[:8] + b"XXXX" + ng_shb()[12:], "Section Header Block at offset 0 has a bad "
                                             "byte-order magic (58585858)"),
    (ng_shb()[:-4] + b"\0\0\0\0", "corrupt Section Header Block at offset 0 (trailing length 0, "
                                  "leading length 28)"),
    (ng_shb() + ng_epb(0, 1, FRAME_A), "Enhanced Packet Block at offset 28 comes before any "
                                       "Interface Description Block"),
])
def test_unreadable_files_raise_one_line(tmp_path, content, message):
    p = tmp_path / "primary.pcap"
    p.write_bytes(content)
    with pytest.raises(CaptureError) as ei:
        open_capture(str(p))
    assert one_line(ei, str(p)) == "%s: %s" % (p, message)


# ------------------------------------------------------------------ damaged tails

def test_pcap_cut_in_record_header():
    raw = sample_pcap()
    got, r = read_bytes(raw + b"\x01" * 7)
    assert [d for _, d, _ in got] == [FRAME_A, FRAME_B, FRAME_C]
    assert r.warnings == ["<stdin>: truncated record at packet 4 (file ends 7 bytes into its header); "
                          "compared the 3 packets before it"]


def test_pcap_cut_in_record_data():
    raw = sample_pcap()[:-5]
    got, r = read_bytes(raw)
    assert [d for _, d, _ in got] == [FRAME_A, FRAME_B]
    assert r.warnings == ["<stdin>: truncated record at packet 3 (file ends %d of %d bytes into its data); "
                          "compared the 2 packets before it" % (len(FRAME_C) - 5, len(FRAME_C))]


def test_pcap_cut_in_first_record_yields_nothing_with_a_warning(tmp_path):
    p = tmp_path / "p.pcap"
    p.write_bytes(pcap_header() + b"\0" * 3)
    with open_capture(str(p)) as r:
        assert list(r) == []
        assert r.warnings == [f"{p}: truncated record at packet 1 (file ends 3 bytes into its header); "
                              "compared the 0 packets before it"]


def test_pcap_hostile_caplen_stops_without_allocating():
    raw = pcap_header() + pcap_record(1, 0, FRAME_A) + struct.pack("<IIII", 2, 0, 0xFFFFFFF0, 60)
    got, r = read_bytes(raw)
    assert len(got) == 1
    assert r.warnings == ["<stdin>: corrupt record header at packet 2, offset %d (captured length "
                          "4294967280 is above 262144); compared the 1 packet before it"
                          % (24 + 16 + len(FRAME_A))]


def test_pcap_caplen_above_snaplen_or_orig_len_is_still_yielded():
    raw = (pcap_header(snaplen=20) + pcap_record(1, 0, FRAME_B, orig_len=len(FRAME_B))
           + pcap_record(2, 0, b"abcdef", orig_len=2))
    got, r = read_bytes(raw)
    assert got == [(1_000_000_000, FRAME_B, len(FRAME_B)), (2_000_000_000, b"abcdef", 2)]
    assert r.warnings == []


def test_pcap_records_up_to_max_caplen_are_fine():
    big = bytes(range(256)) * (MAX_CAPLEN // 256)
    got, r = read_bytes(pcap_header() + pcap_record(1, 0, big) + pcap_record(2, 0, FRAME_A))
    assert [d for _, d, _ in got] == [big, FRAME_A] and r.warnings == []


def test_pcapng_cut_inside_a_block():
    raw = sample_pcapng()
    got, r = read_bytes(raw[:-10])
    assert [d for _, d, _ in got] == [FRAME_A, FRAME_B]
    assert len(r.warnings) == 1
    assert r.warnings[0].startswith("<stdin>: truncated Enhanced Packet Block at offset ")
    assert r.warnings[0].endswith("; compared the 2 packets before it")


def test_pcapng_trailing_length_mismatch_is_corruption():
    bad = bytearray(ng_epb(0, 2, FRAME_B))
    bad[-1] ^= 0x40
    good = ng_shb() + ng_idb() + ng_epb(0, 1, FRAME_A)
    got, r = read_bytes(good + bytes(bad) + ng_epb(0, 3, FRAME_C))
    assert len(got) == 1
    assert r.warnings == ["<stdin>: corrupt Enhanced Packet Block at offset %d (trailing length %d, "
                          "leading length %d); compared the 1 packet before it"
                          % (len(good), len(bad) | 0x40000000, len(bad))]


@pytest.mark.parametrize("length", [8, 30, MAX_BLOCK_LEN + 4, 0xFFFFFFFC])
def test_pcapng_bad_block_length_is_corruption(length):
    good = ng_shb() + ng_idb() + ng_epb(0, 1, FRAME_A)
    got, r = read_bytes(good + struct.pack("<II", 6, length) + b"\0" * 64)
    assert len(got) == 1
    assert r.warnings == ["<stdin>: corrupt Enhanced Packet Block at offset %d (block length %d); "
                          "compared the 1 packet before it" % (len(good), length)]


def test_pcapng_packet_on_undefined_interface_is_corruption():
    good = ng_shb() + ng_idb() + ng_epb(0, 1, FRAME_A)
    got, r = read_bytes(good + ng_epb(3, 2, FRAME_B) + ng_epb(0, 3, FRAME_C))
    assert len(got) == 1
    assert r.warnings == ["<stdin>: corrupt Enhanced Packet Block at offset %d (interface 3, but the "
                          "section defines 1 interface); compared the 1 packet before it" % len(good)]


def test_pcapng_caplen_beyond_its_block_is_corruption():
    epb = bytearray(ng_epb(0, 2, FRAME_B))
    struct.pack_into("<I", epb, 20, len(FRAME_B) + 100)
    got, r = read_bytes(ng_shb() + ng_idb() + ng_epb(0, 1, FRAME_A) + bytes(epb))
    assert len(got) == 1 and "captured length %d in a %d-byte block" % (len(FRAME_B) + 100, len(epb)) \
        in r.warnings[0]


def test_pcapng_unsupported_later_section_stops_with_a_warning():
    good = ng_shb() + ng_idb() + ng_epb(0, 1, FRAME_A)
    got, r = read_bytes(good + ng_shb(version=(2, 0)) + ng_idb() + ng_epb(0, 2, FRAME_B))
    assert len(got) == 1
    assert r.warnings == ["<stdin>: unsupported pcapng version 2.0 in the section at offset %d "
                          "(libpcap reads 1.0 and 1.2); compared the 1 packet before it" % len(good)]


# ------------------------------------------------------------------ reader mechanics

def test_packets_counts_as_it_goes_and_close_releases_the_file(tmp_path):
    p = tmp_path / "p.pcap"
    p.write_bytes(sample_pcap())
    r = open_capture(str(p))
    it = iter(r)
    next(it)
    assert r.packets == 1
    next(it)
    assert r.packets == 2
    r.close()
    assert r._file.closed
    assert list(r) == []
    r.close()   # idempotent


class FailingStream:
    """A stream that hands out some bytes, then fails like a dying disk."""

    def __init__(self, data):
        self.data = data

    def read1(self, n):
        if self.data is None:
            raise OSError(5, "Input/output error")
        chunk, self.data = self.data, None
        return chunk


def test_read_error_mid_file_raises_capture_error():
    r = open_capture("-", stdin=FailingStream(sample_pcap()[:-5]))
    it = iter(r)
    assert next(it)[2] == FRAME_A and next(it)[2] == FRAME_B
    with pytest.raises(CaptureError) as ei:
        next(it)
    assert one_line(ei, "<stdin>") == "<stdin>: read error after 2 packets: input/output error"


def test_path_objects_are_accepted(tmp_path):
    p = tmp_path / "p.pcap"
    p.write_bytes(sample_pcap())
    with open_capture(p) as r:
        assert r.name == str(p) and len(list(r)) == 3


def test_memory_does_not_grow_with_file_size(tmp_path):
    p = tmp_path / "big.pcap"
    frame = bytes(1400)
    with open(p, "wb") as f:
        w = PcapWriter(f)
        for i in range(12_000):   # ~17 MiB
            w.write(i, frame)
    tracemalloc.start()
    try:
        with open_capture(str(p)) as r:
            n = sum(1 for _ in r)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 12_000
    assert peak < 5 * 1024 * 1024, peak


# ------------------------------------------------------------------ fuzz

def drain(data, only_read=False):
    """Read bytes fully; only CaptureError may escape, and iteration ends."""
    try:
        reader = open_capture("-", stdin=io.BytesIO(data),
                              linktypes=LINKTYPES_READ if only_read else None)
    except CaptureError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("<stdin>: ")
        return None
    n = 0
    with reader:
        for number, ts_ns, frame, orig_len, linktype in reader:
            assert type(number) is int and number > n and type(linktype) is int
            assert type(ts_ns) is int and type(frame) is bytes and type(orig_len) is int
            n += 1
            assert n <= len(data)   # every record consumes bytes: no endless loop
    assert all("\n" not in w and w.startswith("<stdin>: ") for w in reader.warnings)
    assert not any("internal parse error" in w for w in reader.warnings), reader.warnings
    return n, reader.warnings


def fuzz_samples():
    nano = written_pcap([(1, FRAME_A), (2, FRAME_B)], nano=True)
    mixed = (ng_shb(">") + ng_idb(">", tsresol=0x88) + ng_idb(">", linktype=101) + ng_spb(FRAME_A, ">")
             + ng_epb(1, 5, FRAME_B, ">") + ng_shb("<") + ng_idb("<", tsoffset=-5)
             + ng_block(5, b"\0" * 12) + ng_pb(0, 7, FRAME_C))
    return [sample_pcap(), nano, sample_pcapng(), mixed]


def test_every_cut_of_valid_files():
    for sample in fuzz_samples():
        full = drain(sample)
        assert full is not None and full[1] == []
        clean_ends = record_ends(sample)
        for cut in range(len(sample)):
            result = drain(sample[:cut])
            if result is not None:
                n, warnings = result
                assert n <= full[0]
                # a warning exactly when the cut is not between two records
                assert bool(warnings) == (cut not in clean_ends), (cut, warnings)


def record_ends(sample):
    """Offsets where a file may end cleanly: after the header or a record/block."""
    ends = set()
    if sample[:4] == b"\x0a\x0d\x0d\x0a":
        off, e = 0, "<"
        while off < len(sample):
            if sample[off:off + 4] == b"\x0a\x0d\x0d\x0a":
                e = "<" if sample[off + 8:off + 12] == b"\x4d\x3c\x2b\x1a" else ">"
            off += struct.unpack_from(e + "I", sample, off + 4)[0]
            ends.add(off)
    else:
        e = "<" if sample[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        off = 24
        ends.add(off)
        while off < len(sample):
            off += 16 + struct.unpack_from(e + "I", sample, off + 8)[0]
            ends.add(off)
    return ends


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(4)), st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255)),
                                           min_size=1, max_size=6), st.booleans())
def test_flipped_header_bytes_never_raise_anything_else(which, flips, only_read):
    data = bytearray(fuzz_samples()[which])
    for pos, value in flips:   # the first 120 bytes: file/section/interface/record headers
        if pos < len(data):
            data[pos] = value
    drain(bytes(data), only_read)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([b"\xd4\xc3\xb2\xa1\x02\x00\x04\x00",
                                                 b"\x0a\x0d\x0d\x0a", b"\xa1\xb2\xcd\x34\x00\x02\x00\x04"]))
def test_random_bytes_after_a_magic(tail, head):
    drain(head + tail)


# ------------------------------------------------------------------ third-party corpus

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
MANIFEST = (json.loads((CORPUS / "manifest.json").read_text())
            if (CORPUS / "manifest.json").is_file() else [])
CORPUS_ENTRIES = ([pytest.param(e, id=e["path"]) for e in MANIFEST]
                  or [pytest.param(None, marks=pytest.mark.skip(reason="no corpus at %s" % CORPUS))])


@pytest.fixture
def corpus():
    if not MANIFEST:
        pytest.skip("no corpus at %s" % CORPUS)
    return CORPUS


def first_linktype(entry):
    lt = entry["linktype"]
    return lt[0] if isinstance(lt, list) else lt


@pytest.mark.parametrize("entry", CORPUS_ENTRIES)
def test_corpus_file_reads_like_the_manifest(entry):
    path = str(CORPUS / entry["path"])
    try:
        with open_capture(path, linktypes=None) as r:
            records = list(r)
            warnings = r.warnings
    except CaptureError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(path + ": ")
        assert entry["unreadable_reason"], "manifest says it parses: %s" % exc
        assert entry["packets"] == 0
        return
    if entry["unreadable_reason"] is None:
        assert warnings == []
        assert len(records) == entry["packets"]
    else:
        # the manifest's strict reader stopped too; we may stop earlier, never later
        assert len(warnings) == 1 and warnings[0].startswith(path + ": ")
        if len(records) != entry["packets"]:
            print("%s: %d packets, manifest %d (%s)" % (entry["path"], len(records), entry["packets"],
                                                        entry["unreadable_reason"]))
        assert len(records) <= entry["packets"]
    assert r.format == entry["format"]
    if first_linktype(entry) is not None:
        assert r.linktype == first_linktype(entry)
    for _number, ts_ns, frame, orig_len, _linktype in records:
        assert type(ts_ns) is int and ts_ns >= 0
        assert type(frame) is bytes and len(frame) <= MAX_CAPLEN


@pytest.mark.parametrize("entry", CORPUS_ENTRIES)
def test_corpus_file_with_the_link_types_read(entry):
    path = str(CORPUS / entry["path"])
    lt = first_linktype(entry)
    if lt is None or lt in LINKTYPES_READ:
        try:
            with open_capture(path) as r:
                for _ in r:
                    pass
        except CaptureError:
            assert entry["unreadable_reason"]
        return
    name = entry["linktype_name"]
    name = name[0] if isinstance(name, list) else name
    with pytest.raises(CaptureError) as ei:
        open_capture(path)
    # the manifest names link types independently of our table
    assert str(ei.value) == ("%s: link type %s (%d) is not one colo-compare reads (%s)"
                             % (path, name, lt, READ_BY_DEFAULT))


def test_corpus_multi_interface_timestamps_are_not_1970(corpus):
    with open_capture(str(corpus / "zeek/pcapng-multi-interface.pcapng")) as r:
        stamps = [ts for _n, ts, _, _, _lt in r]
    assert len(stamps) == 6
    # dpkt divides the µs interface's ticks by 10^9 and dates those packets 1970
    assert all(1_700_000_000 * 10**9 < ts < 1_900_000_000 * 10**9 for ts in stamps), stamps


def test_corpus_simple_packet_blocks(corpus):
    with open_capture(str(corpus / "pcapng-test-generator/output_le/basic/test010.pcapng")) as r:
        records = list(r)
    assert [(len(d), o) for _n, _ts, d, o, _lt in records] == [(314, 314), (342, 342), (314, 314), (342, 342)]


def test_corpus_byte_order_twins_read_the_same(corpus):
    for sub in ("basic/test001.pcapng", "difficult/test202.pcapng"):
        le = list(open_capture(str(corpus / "pcapng-test-generator/output_le" / sub), linktypes=None))
        be = list(open_capture(str(corpus / "pcapng-test-generator/output_be" / sub), linktypes=None))
        assert le == be and len(le) in (4, 8)


def test_corpus_mixed_link_types(corpus):
    path = str(corpus / "pcapng-test-generator/output_le/difficult/test202.pcapng")
    with open_capture(path) as r:
        records = list(r)
    # frame numbers count the custom blocks Wireshark shows as frames (1, 7
    # and 10) too
    assert [(n, lt) for n, _ts, _d, _o, lt in records] == [
        (2, 1), (3, 1), (4, 0), (5, 1), (6, 1), (8, 1), (9, 1), (11, 0)]
    assert r.warnings == []
    # when only Ethernet is asked for, the others are skipped and counted;
    # frame numbers count the skipped packets too
    with open_capture(path, linktypes={1}) as r:
        records = list(r)
    assert [n for n, *_ in records] == [2, 3, 5, 6, 8, 9]
    assert r.warnings == [
        path + ": skipped 1 packet on interface 1 of section 1 (link type NULL (0), not one "
               "colo-compare reads)",
        path + ": skipped 1 packet on interface 1 of section 3 (link type NULL (0), not one "
               "colo-compare reads)"]


def test_corpus_pcapng_named_pcap(corpus):
    with open_capture(str(corpus / "chrissanders-packets/dns.pcap")) as r:
        assert r.format == "pcapng" and len(list(r)) == 7
    with open_capture(str(corpus / "scapy/pfcp.pcap")) as r:
        assert r.format == "pcapng" and r.linktype == 101 and len(list(r)) == 200
