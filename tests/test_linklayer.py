"""Captures of other link types than Ethernet: the link headers (exact byte
vectors), the core's entry point for a network header at a given offset
(``parse(data, l2, l3, ethertype)``, ``Comparator.receive(..., l3,
ethertype)``), and that a packet compares the same whatever link it was
captured on."""

import struct

import pytest
from hypothesis import given, settings, strategies as st

from colo_cli import linklayer
from colo_cli.core import PRIMARY, SECONDARY, Bypassed, Comparator, Config, Miscompare
from colo_cli.core import packet as pk
from colo_cli.core.packet import parse
from colo_cli.flows import format_key
from colo_cli.linklayer import INCOMING, OUTGOING, decoder
from colo_cli.testing import (arp_frame, gre_frame, icmp_frame, tcp_frame, udp_frame)

MAC = bytes.fromhex("525400000001")


# -- building the link headers (from their specifications, not from linklayer) -------

def sll(net: bytes, proto: int, pkttype: int = 4, hatype: int = 1) -> bytes:
    """Linux cooked v1: packet type, ARPHRD type, address length, 8 address
    bytes, protocol."""
    return struct.pack("!HHH8sH", pkttype, hatype, 6, MAC + b"\0\0", proto) + net


def sll2(net: bytes, proto: int, pkttype: int = 4, hatype: int = 1, ifindex: int = 3) -> bytes:
    """Linux cooked v2: protocol, reserved, interface index, ARPHRD type,
    packet type, address length, 8 address bytes."""
    return struct.pack("!HHIHBB8s", proto, 0, ifindex, hatype, pkttype, 6, MAC + b"\0\0") + net


def null(net: bytes, family: int, order: str = "<") -> bytes:
    return struct.pack(order + "I", family) + net


def split_ethernet(frame: bytes):
    """(EtherType, what follows the Ethernet header) of an untagged frame."""
    return struct.unpack_from("!H", frame, 12)[0], frame[14:]


FRAMES = {
    "udp4": udp_frame(b"hello"),
    "tcp4": tcp_frame(b"GET / HTTP/1.1\r\n", flags=0x18),
    "udp6": udp_frame(b"six", src="fd00::1", dst="fd00::2"),
    "tcp6": tcp_frame(b"data6", src="fd00::1", dst="fd00::2"),
    "icmp": icmp_frame(b"ping", ident=7),
    "gre": gre_frame(),
    "arp": arp_frame(pad_to=0),
}


# -- the link headers -----------------------------------------------------------------

def test_linux_cooked_v1_protocol_and_direction():
    etype, net = split_ethernet(FRAMES["udp4"])
    dec = decoder(113)
    assert dec(sll(net, etype, pkttype=4), 0) == (16, 0x0800, OUTGOING)
    for received in (0, 1, 2, 3):        # to us, broadcast, multicast, to another host
        assert dec(sll(net, etype, pkttype=received), 0) == (16, 0x0800, INCOMING)
    assert dec(sll(net, etype, pkttype=7), 0) == (16, 0x0800, None)
    # a leading vnet header of 12 bytes is skipped
    assert dec(b"v" * 12 + sll(net, 0x86DD), 12) == (28, 0x86DD, OUTGOING)
    # netlink: the protocol field is a netlink family, not an EtherType
    assert dec(sll(net, 0x0800, hatype=824), 0) == (16, 0, OUTGOING)
    # too short for its header: the network header would start past the end
    assert dec(b"\0\4\0\1", 0) == (16, 0, None)


def test_linux_cooked_v2_protocol_and_direction():
    etype, net = split_ethernet(FRAMES["tcp6"])
    dec = decoder(276)
    assert dec(sll2(net, etype, pkttype=4), 0) == (20, 0x86DD, OUTGOING)
    assert dec(sll2(net, etype, pkttype=0), 0) == (20, 0x86DD, INCOMING)
    assert dec(sll2(net, 0x0806, hatype=824), 0) == (20, 0, OUTGOING)
    assert dec(b"\x08\x00", 0) == (20, 0, None)


@pytest.mark.parametrize("linktype", [101, 12, 14])
def test_raw_ip_takes_the_version_from_the_header(linktype):
    dec = decoder(linktype)
    assert dec(split_ethernet(FRAMES["udp4"])[1], 0) == (0, 0x0800, None)
    assert dec(split_ethernet(FRAMES["udp6"])[1], 0) == (0, 0x86DD, None)
    # neither: parsed as IPv4, where the core counts a bad version
    assert dec(b"\x10" + b"\0" * 30, 0) == (0, 0x0800, None)
    assert dec(b"", 0) == (0, 0x0800, None)


def test_ipv4_and_ipv6_link_types_say_which():
    assert decoder(228)(b"anything", 0) == (0, 0x0800, None)
    assert decoder(229)(b"anything", 0) == (0, 0x86DD, None)


@pytest.mark.parametrize("family,etype", [(2, 0x0800), (24, 0x86DD), (28, 0x86DD), (30, 0x86DD),
                                          (10, 0x86DD), (23, 0x86DD), (7, 0), (0x1234, 0)])
def test_bsd_loopback_families(family, etype):
    net = b"\x45" + b"\0" * 19
    # NULL: the writer's byte order, either one
    assert decoder(0)(null(net, family, "<"), 0) == (4, etype, None)
    assert decoder(0)(null(net, family, ">"), 0) == (4, etype, None)
    # LOOP: network byte order only
    assert decoder(108)(null(net, family, ">"), 0) == (4, etype, None)
    assert decoder(0)(b"\2\0", 0) == (4, 0, None)
    assert decoder(108)(b"", 0) == (4, 0, None)


def test_link_types_read():
    assert linklayer.LINKTYPES_READ == {1, 113, 276, 101, 12, 14, 228, 229, 0, 108}
    assert decoder(1) is None and decoder(105) is None


# -- the core: a network header at a given offset ----------------------------------

def on_links(frame: bytes):
    """The packet of an untagged Ethernet ``frame`` as each other link type
    captures it: [(name, data, l3, ethertype)], the link header read by
    linklayer."""
    etype, net = split_ethernet(frame)
    out = [("sll", sll(net, etype), 113), ("sll2", sll2(net, etype), 276),
           ("loop", null(net, 2 if etype == 0x0800 else 30, ">"), 108),
           ("null", null(net, 2 if etype == 0x0800 else 24, "<"), 0)]
    if etype in (0x0800, 0x86DD):
        out += [("raw", net, 101), ("ipv%d" % (4 if etype == 0x0800 else 6), net,
                                     228 if etype == 0x0800 else 229)]
    result = []
    for name, data, linktype in out:
        if etype == 0x0806 and linktype in (0, 108):
            continue                      # no address family for ARP
        l3, ethertype, _ = decoder(linktype)(data, 0)
        result.append((name, data, l3, ethertype))
    return result


def same_parse(eth: bytes, data: bytes, l3: int, ethertype: int) -> None:
    """The same kind, key, compared bytes and TCP fields from both."""
    a, b = parse(eth), parse(data, 0, l3, ethertype)
    assert a[0] == b[0]
    if a[0] is None:
        assert a[1] == b[1]
        return
    assert a[1] == b[1]                                   # the key
    assert eth[a[2]:a[3]] == data[b[2]:b[3]]              # what is compared
    assert a[3] - a[2] == b[3] - b[2]
    assert a[4:] == b[4:]                                 # seq, ack, flags


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_every_link_gives_the_same_key_and_compared_bytes(name):
    frame = FRAMES[name]
    for _link, data, l3, ethertype in on_links(frame):
        same_parse(frame, data, l3, ethertype)


def test_the_l3_entry_point_on_exact_bytes():
    net = split_ethernet(FRAMES["udp4"])[1]
    kind, key, off, end, *_ = parse(b"XX" + net, 0, 2, 0x0800)
    assert kind == pk.KIND_UDP
    assert (off, end) == (2 + 20, 2 + len(net))
    assert key == net[12:20] + net[20:24] + b"\x114"
    # a VLAN TPID as the protocol: the tag's TCI and the inner type follow,
    # and the tag is in the key as a tagged Ethernet frame's would be
    tagged = udp_frame(b"hello", vlans=[(0x8100, 5)])
    data = sll(tagged[14:], 0x8100)
    assert parse(data, 0, 16, 0x8100)[1] == parse(tagged)[1]
    assert format_key(parse(data, 0, 16, 0x8100)[1]).endswith("vlan 5")
    # cut inside the link header, or the tag
    assert parse(b"\0" * 10, 0, 16, 0x0800) == (None, pk.REASON_SHORT_FRAME)
    assert parse(b"\0" * 18, 0, 16, 0x8100) == (None, pk.REASON_SHORT_FRAME)
    assert parse(net, 0, 0, 0x1234) == (None, pk.REASON_UNKNOWN_ETHERTYPE)
    assert parse(net + b"\0" * 20, 0, 0, 0x86DD) == (None, pk.REASON_IPV6_BAD_VERSION)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60), st.sampled_from(sorted(FRAMES)), st.integers(0, 80),
       st.integers(0, 255), st.booleans())
def test_mutated_packets_parse_alike_on_every_link(payload, name, pos, value, cut):
    """Whatever the bytes after the link header (truncated, flipped), the
    network layer is read alike: the same result, or the same reason."""
    frame = bytearray(FRAMES[name] + payload)
    if 14 + pos < len(frame):
        frame[14 + pos] = value
    if cut:
        frame = frame[:14 + pos]
    frame = bytes(frame)
    for link, data, l3, ethertype in on_links(frame):
        if link == "raw" and pos == 0:
            # raw IP has nothing but the version nibble to say which IP it
            # is: there the EtherType and the version cannot disagree
            assert ethertype == (0x86DD if data[:1] and data[0] >> 4 == 6 else 0x0800)
            continue
        same_parse(frame, data, l3, ethertype)


def test_a_packet_matches_across_link_types():
    """The primary captured with Ethernet headers, the secondary as
    tcpdump -i any writes it: the same output, a match; one byte changed, a
    miscompare."""
    frames = [FRAMES[n] for n in ("udp4", "tcp4", "udp6", "icmp", "arp", "gre")]
    for corrupt in (False, True):
        c = Comparator(Config(compare_timeout_ms=None))
        events = []
        for i, frame in enumerate(frames):
            events += c.receive(PRIMARY, frame, i)
            etype, net = split_ethernet(frame)
            if corrupt and i == 0:
                net = net[:-1] + b"!"
            events += c.receive(SECONDARY, sll(net, etype), i, 0, 0, False, 16, etype)
        released = [e for e in events if type(e).__name__ == "Released"]
        if not corrupt:
            assert len(released) == len(frames)
            assert all(e.reason == "match" for e in released)
            assert not any(isinstance(e, Miscompare) for e in events)
        else:
            (m,) = [e for e in events if isinstance(e, Miscompare)]
            assert format_key(m.key) == "udp 10.0.0.1:5000 > 10.0.0.2:6000"
            # the secondary's frame, link header and all, is what it is
            assert m.secondary.data[:2] == b"\0\4"


def test_a_frame_cut_in_its_link_header_is_a_counted_short_frame():
    c = Comparator(Config(compare_timeout_ms=None))
    (e,) = c.receive(PRIMARY, b"\0\4\0\1\0\6", 0, 0, 0, False, 16, 0)
    assert isinstance(e, Bypassed) and e.reason == pk.REASON_SHORT_FRAME
    assert c.stats.bypassed == {pk.REASON_SHORT_FRAME: 1}
