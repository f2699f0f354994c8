"""The packet parser: what is compared, the connection key, and every way a
frame can be malformed (classified, never raised)."""

import struct

from hypothesis import given, settings, strategies as st

from colo_cli.core import packet as pk
from colo_cli.core.packet import parse
from colo_cli.flows import describe_key, format_key
from colo_cli.testing import (arp_frame, ether, gre_frame, icmp_frame, ipv4, ipv6, tcp,
                              tcp_frame, udp, udp_frame)


def test_udp_compares_from_l4_header_to_ip_end_not_padding():
    f = udp_frame(b"hi", pad_to=60)          # 14+20+8+2 = 44 bytes, padded to 60
    kind, key, off, end, *_ = parse(f)
    assert kind == pk.KIND_UDP
    assert (off, end) == (34, 44)            # UDP header + payload, no padding
    assert f[off:end] == udp(b"hi")


def test_udp_key_is_addresses_proto_ports_as_they_arrive():
    f = udp_frame(b"x", sport=1234, dport=53, src="192.0.2.1", dst="198.51.100.7")
    key = parse(f)[1]
    # addresses and ports as one slice of the frame, then protocol and version
    assert key == bytes([192, 0, 2, 1, 198, 51, 100, 7]) + struct.pack(">HH", 1234, 53) + b"\x114"
    assert key[:12] == f[26:38]
    assert format_key(key) == "udp 192.0.2.1:1234 > 198.51.100.7:53"
    # the reverse direction is a different connection (no normalisation)
    rev = parse(udp_frame(b"x", sport=53, dport=1234, src="198.51.100.7", dst="192.0.2.1"))[1]
    assert rev != key


def test_tcp_fields_and_payload_bounds():
    f = tcp_frame(b"hello", seq=0xFFFFFFF0, ack=77, flags=0x18, options=b"\x01\x01\x01\x01", pad_to=80)
    kind, key, off, end, seq, ack, flags = parse(f)
    assert kind == pk.KIND_TCP
    assert f[off:end] == b"hello"
    assert (seq, ack, flags) == (0xFFFFFFF0, 77, 0x18)
    assert format_key(key) == "tcp 10.0.0.1:40000 > 10.0.0.2:80"


def test_tcp_with_ip_options():
    seg = tcp(b"data")
    f = ether(ipv4(seg, 6, options=b"\x01\x01\x01\x00"), 0x0800)
    kind, _, off, end, *_ = parse(f)
    assert kind == pk.KIND_TCP and f[off:end] == b"data"


def test_icmp_echo_keyed_by_identifier_and_compared_from_l4():
    f = icmp_frame(b"abc", ident=9)
    kind, key, off, end, *_ = parse(f)
    assert kind == pk.KIND_ICMP and off == 34 and end == len(f)
    assert parse(icmp_frame(b"zzz", ident=9, seq=5))[1] == key
    assert parse(icmp_frame(b"abc", ident=10))[1] != key       # another ping session
    assert format_key(key) == "icmp 10.0.0.1 > 10.0.0.2 id 9"


def test_other_icmp_keyed_by_address_pair_as_qemu():
    unreach = ether(ipv4(bytes([3, 1, 0, 0]) + b"\0" * 4 + b"orig", 1), 0x0800)
    other = ether(ipv4(bytes([11, 0, 0, 0]) + b"\0" * 4 + b"orig", 1), 0x0800)
    assert parse(unreach)[1] == parse(other)[1]


def test_other_ip_protocol_compares_ip_payload_only():
    f1, f2 = gre_frame(ident=1), gre_frame(ident=999)        # IP ID differs
    p1, p2 = parse(f1), parse(f2)
    assert p1[0] == pk.KIND_OTHER and p1[1] == p2[1]
    assert f1[p1[2]:p1[3]] == f2[p2[2]:p2[3]]                 # QEMU would miscompare (d5)
    assert format_key(p1[1]) == "gre 10.0.0.1 > 10.0.0.2"


def test_arp_body_without_padding():
    f = arp_frame()
    kind, key, off, end, *_ = parse(f)
    assert kind == pk.KIND_ARP and (off, end) == (14, 14 + 28) and len(f) == 60
    assert format_key(key) == "arp 10.0.0.1 > 10.0.0.2"


def test_vlan_single_and_stacked_are_parsed_and_keyed():
    plain = udp_frame(b"v")
    q = udp_frame(b"v", vlans=[(0x8100, 5)])
    qinq = udp_frame(b"v", vlans=[(0x88A8, 100), (0x8100, 5)])
    keys = {parse(f)[1] for f in (plain, q, qinq)}
    assert len(keys) == 3
    for f in (q, qinq):
        kind, key, off, end, *_ = parse(f)
        assert kind == pk.KIND_UDP and f[off:end] == udp(b"v")
    assert describe_key(parse(qinq)[1])["vlan"] == [100, 5]
    assert format_key(parse(qinq)[1]).endswith("vlan 100.5")


def test_ipv6_udp_and_extension_headers():
    f = udp_frame(b"six", src="fd00::1", dst="fd00::2")
    kind, key, off, end, *_ = parse(f)
    assert kind == pk.KIND_UDP and f[off:end] == udp(b"six", src="fd00::1", dst="fd00::2")
    assert format_key(key) == "udp [fd00::1]:5000 > [fd00::2]:6000"
    # hop-by-hop (8 bytes of PadN) then destination options, then UDP
    seg = udp(b"ext", src="fd00::1", dst="fd00::2")
    hbh = bytes([60, 0, 1, 4, 0, 0, 0, 0])
    dst = bytes([17, 0, 1, 4, 0, 0, 0, 0])
    f2 = ether(ipv6(seg, 0, ext=hbh + dst), 0x86DD)
    kind, key2, off, end, *_ = parse(f2)
    assert kind == pk.KIND_UDP and f2[off:end] == seg and key2 == key


def test_ipv6_fragment_and_atomic_fragment():
    seg = udp(b"frag", src="fd00::1", dst="fd00::2")
    frag_hdr = struct.pack(">BBHI", 17, 0, (0 << 3) | 1, 0xABCD)    # offset 0, M=1
    f = ether(ipv6(seg, 44, ext=frag_hdr), 0x86DD)
    assert parse(f)[0] == pk.KIND_FRAGMENT
    atomic = struct.pack(">BBHI", 17, 0, 0, 0x1234)                  # offset 0, M=0
    f2 = ether(ipv6(seg, 44, ext=atomic), 0x86DD)
    assert parse(f2)[0] == pk.KIND_UDP


def test_ipv4_fragments_identified_for_reassembly():
    a = ether(ipv4(b"x" * 16, 17, ident=1, flags_frag=0x2000), 0x0800)          # MF, offset 0
    b = ether(ipv4(b"y" * 16, 17, ident=1, flags_frag=0x0002), 0x0800)          # offset 16
    c = ether(ipv4(b"x" * 16, 17, ident=2, flags_frag=0x2000), 0x0800)          # another datagram
    pa, pb, pc = parse(a), parse(b), parse(c)
    assert pa[0] == pb[0] == pk.KIND_FRAGMENT
    assert pa[1] == pb[1] != pc[1]                  # reassembly key has the IP ID
    assert (pa[4], pa[5], pa[6]) == (0, 1, 17)      # offset, more fragments, protocol
    assert (pb[4], pb[5]) == (16, 0)
    assert a[pa[2]:pa[3]] == b"x" * 16
    assert pk.fragment_context(pa[1]) == (b"4", b"", bytes([10, 0, 0, 1, 10, 0, 0, 2]))
    assert describe_key(pa[1])["ip_id"] == 1


def test_ipv6_jumbogram():
    seg = udp(b"J" * 100, src="fd00::1", dst="fd00::2")
    # Jumbo Payload option: type 0xC2, len 4, value = length after the IPv6 header
    hbh = bytes([17, 0, 0xC2, 4]) + struct.pack(">I", 8 + len(seg))
    raw = struct.pack("!IHBB16s16s", 6 << 28, 0, 0, 64, bytes(15) + b"\1", bytes(15) + b"\2") + hbh + seg
    f = ether(raw, 0x86DD)
    kind, _, off, end, *_ = parse(f)
    assert kind == pk.KIND_UDP and f[off:end] == seg


# -- malformed: every case classified, with a reason --------------------------

def _ip4(vihl=None, total=None, payload=b"\0" * 8, proto=17):
    return ether(ipv4(payload, proto, version_ihl=vihl, total_length=total), 0x0800)


MALFORMED = [
    (b"", pk.REASON_SHORT_FRAME),
    (b"\0" * 13, pk.REASON_SHORT_FRAME),
    (ether(b"", 0x8100)[:15], pk.REASON_SHORT_FRAME),                  # VLAN tag cut
    (ether(b"\0" * 30, 0x88CC), pk.REASON_UNKNOWN_ETHERTYPE),            # LLDP
    (ether(b"\0" * 30, 0x8864), pk.REASON_UNKNOWN_ETHERTYPE),            # PPPoE session
    (ether(b"\x45" + b"\0" * 10, 0x0800), pk.REASON_IPV4_TRUNCATED),
    (_ip4(vihl=0x65), pk.REASON_IPV4_BAD_VERSION),
    (_ip4(vihl=0x44), pk.REASON_IPV4_BAD_IHL),
    (_ip4(vihl=0x4F), pk.REASON_IPV4_BAD_LENGTH),                        # IHL 60 > total (28)
    (_ip4(total=10), pk.REASON_IPV4_BAD_LENGTH),
    (ether(b"\x46\0\0\x18" + b"\0" * 18, 0x0800), pk.REASON_IPV4_TRUNCATED),  # options cut
    (_ip4(payload=b"\0" * 4, proto=17), pk.REASON_UDP_TRUNCATED),
    (_ip4(payload=b"\0" * 19, proto=6), pk.REASON_TCP_TRUNCATED),
    (_ip4(payload=b"\0" * 12 + b"\x40" + b"\0" * 7, proto=6), pk.REASON_TCP_BAD_OFFSET),  # doff 4
    (_ip4(payload=b"\0" * 12 + b"\xf0" + b"\0" * 7, proto=6), pk.REASON_TCP_TRUNCATED),   # doff 15
    (_ip4(payload=b"\0" * 4, proto=1), pk.REASON_ICMP_TRUNCATED),
    (ether(b"\x60" + b"\0" * 20, 0x86DD), pk.REASON_IPV6_TRUNCATED),
    (ether(b"\x40" + b"\0" * 39, 0x86DD), pk.REASON_IPV6_BAD_VERSION),
    (ether(b"\0\1\x08\0\6\4", 0x0806), pk.REASON_ARP_TRUNCATED),
]


def test_every_malformed_frame_has_its_reason():
    for frame, reason in MALFORMED:
        assert parse(frame) == (None, reason), (frame.hex(), reason)


def test_captured_short_of_its_ip_length_is_still_compared():
    # snaplen: the L4 header is whole, the payload cut.  cmp_end says where
    # the payload really ends; only the captured part can be compared.
    f = udp_frame(b"z" * 100)[:60]
    kind, key, off, end, *_ = parse(f)
    assert kind == pk.KIND_UDP and off == 34 and end == 34 + 108 and end > len(f)
    t = tcp_frame(b"q" * 100)[:70]
    kind, key, off, end, *_ = parse(t)
    assert kind == pk.KIND_TCP and end - off == 100
    # but not when even the L4 header was cut
    assert parse(udp_frame(b"z" * 100)[:38]) == (None, pk.REASON_UDP_TRUNCATED)


def test_ipv6_extension_chain_that_overruns():
    bad_ext = bytes([17, 200, 0, 0, 0, 0, 0, 0])       # claims 1608 bytes
    f = ether(ipv6(b"\0" * 8, 60, ext=bad_ext), 0x86DD)
    assert parse(f) == (None, pk.REASON_IPV6_BAD_EXTENSION)


def test_ipv6_endless_extension_chain_is_bounded():
    ext = bytes([60, 0, 1, 4, 0, 0, 0, 0]) * 40        # 40 destination-options headers
    f = ether(ipv6(b"", 60, ext=ext), 0x86DD)
    assert parse(f) == (None, pk.REASON_IPV6_BAD_EXTENSION)


def test_parse_at_an_offset_skips_length_words_and_vnet_header():
    frame = udp_frame(b"off")
    data = b"\0\0\0\0" + b"V" * 12 + frame
    kind, key, off, end, *_ = parse(data, 16)
    assert kind == pk.KIND_UDP and data[off:end] == udp(b"off")


@settings(max_examples=2000)
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=4))
def test_parser_never_raises_on_garbage(data, l2):
    result = parse(data, l2)
    assert result[0] is None or len(result) == 7
    if result[0] is not None:
        _, key, off, end, *_ = result
        assert l2 <= off <= len(data) and off <= end
        assert isinstance(key, bytes)
        format_key(key)


@settings(max_examples=500)
@given(st.integers(min_value=0, max_value=199), st.integers(min_value=0, max_value=255),
       st.sampled_from([udp_frame(b"u" * 30), tcp_frame(b"t" * 30, options=b"\1" * 8),
                        icmp_frame(), arp_frame(), udp_frame(b"6", src="fd00::1", dst="fd00::2"),
                        udp_frame(b"q", vlans=[(0x88A8, 1), (0x8100, 2)])]))
def test_parser_never_raises_on_mutated_real_frames(pos, value, frame):
    data = bytearray(frame)
    data[pos % len(data)] = value
    for cut in (len(data), pos % len(data)):
        result = parse(bytes(data[:cut]))
        if result[0] is not None:
            assert result[2] <= cut and result[2] <= result[3]
            format_key(result[1])


def test_connection_keys_hash_with_a_per_process_secret():
    """Issue 7 (hash flooding): connection keys are bytes, whose hash is
    SipHash keyed per process, so traffic crafted to collide in one run's
    table does not collide in another's.  (Tuples of ints would hash the
    same everywhere.)"""
    import subprocess
    import sys
    key = parse(udp_frame(b"x", sport=1234, dport=53))[1]
    assert type(key) is bytes
    code = ("import sys; sys.path.insert(0, %r); from colo_cli.core.packet import parse; "
            "from colo_cli.testing import udp_frame; "
            "print(hash(parse(udp_frame(b'x', sport=1234, dport=53))[1]))") % sys.path[0]
    hashes = set()
    for _ in range(3):
        env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONHASHSEED"}
        hashes.add(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  env=env, check=True).stdout)
    assert len(hashes) == 3
