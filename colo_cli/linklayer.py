"""Link-layer headers of the captures ``replay`` reads.

A capture's link type says what comes before the network header: an
Ethernet header (QEMU's filter-dump, tcpdump on a tap or a bridge), a Linux
cooked header (``tcpdump -i any``: SLL, link type 113, or SLL2, 276, with
newer libpcap), nothing at all (raw IP: tun devices, many tools; 101, or
228/229 for IPv4/IPv6 only, or 12/14 where a system stored its own DLT_RAW
value), or a 4-byte address family (BSD loopback: NULL, 0, in the byte order
of the machine that wrote it; LOOP, 108, in network byte order).

None of these headers is the guest's output, so frames of every link type
are compared from the network layer: :func:`decoder` gives, per link type,
a function that reads a frame's link header and returns ``(l3, ethertype,
direction)``: where the network header starts, what it is (an EtherType:
IPv4, IPv6, ARP, or a VLAN TPID followed by its tag), and which way the
packet went when the link header says (``OUTGOING``/``INCOMING``; ``None``
otherwise).  The core takes ``l3`` and ``ethertype`` as they are
(``Comparator.receive``); Ethernet frames need no decoder (the core parses
them itself, on its fast path).

The direction is only known for Linux cooked captures, whose packet type is
"sent by us" (4, ``OUTGOING``) or one of "to us", "broadcast", "multicast",
"to another host" (0-3, ``INCOMING``).  ``tcpdump -i any`` on a replica sees
both what it sends and what it receives: ``replay`` compares the outgoing
packets only unless told otherwise (``--direction``).  Traffic on the
loopback device is captured once, marked received (libpcap drops the
outgoing copy, which it would see again coming in): it never left the host,
and is left out with the received packets.

Nothing here raises on bad input: a frame too short for its link header
gets an ``l3`` beyond its end, which the core counts as a short frame; an
unknown protocol gets EtherType 0, counted as ``unknown-ethertype``.
"""

from __future__ import annotations

import struct

__all__ = ["ETHERNET", "INCOMING", "LINKTYPES_READ", "OUTGOING", "decoder", "describe_read"]

ETHERNET = 1
SLL = 113
SLL2 = 276
RAW = 101
RAW_DLT12 = 12      # DLT_RAW on most BSDs, stored as is by some writers
RAW_DLT14 = 14      # DLT_RAW on OpenBSD
IPV4 = 228
IPV6 = 229
NULL = 0
LOOP = 108

OUTGOING = "out"
INCOMING = "in"

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD

#: Linux packet types (linux/if_packet.h): PACKET_HOST, BROADCAST,
#: MULTICAST, OTHERHOST are received; PACKET_OUTGOING was sent.  Others
#: (loopback's PACKET_LOOPBACK, 5, is never in a capture) have no direction.
_SLL_DIRECTION = {0: INCOMING, 1: INCOMING, 2: INCOMING, 3: INCOMING, 4: OUTGOING}
#: ARPHRD_NETLINK: the protocol field is a netlink family, not an EtherType.
_ARPHRD_NETLINK = 824

#: Address families in NULL/LOOP headers: AF_INET is 2 everywhere; AF_INET6
#: is 24 (NetBSD, OpenBSD, BSD/OS), 28 (FreeBSD, DragonFly), 30 (Darwin),
#: 10 (Linux) or 23 (Windows).
_AF_ETHERTYPE = {2: ETH_IPV4, 10: ETH_IPV6, 23: ETH_IPV6, 24: ETH_IPV6, 28: ETH_IPV6, 30: ETH_IPV6}

_u16 = struct.Struct(">H").unpack_from
_u32_le = struct.Struct("<I").unpack_from
_u32_be = struct.Struct(">I").unpack_from


def _sll(data: bytes, l2: int):
    # packet type (2), ARPHRD type (2), address length (2), address (8),
    # protocol (2).  libpcap puts a VLAN tag it took from the kernel's
    # metadata back after the header, with the protocol field as its TPID:
    # the core reads that as after an Ethernet header.
    if len(data) - l2 < 16:
        return l2 + 16, 0, None
    ptype, hatype = struct.unpack_from(">HH", data, l2)
    proto = 0 if hatype == _ARPHRD_NETLINK else _u16(data, l2 + 14)[0]
    return l2 + 16, proto, _SLL_DIRECTION.get(ptype)


def _sll2(data: bytes, l2: int):
    # protocol (2), reserved (2), interface index (4), ARPHRD type (2),
    # packet type (1), address length (1), address (8).
    if len(data) - l2 < 20:
        return l2 + 20, 0, None
    proto, hatype = _u16(data, l2)[0], _u16(data, l2 + 8)[0]
    if hatype == _ARPHRD_NETLINK:
        proto = 0
    return l2 + 20, proto, _SLL_DIRECTION.get(data[l2 + 10])


def _raw(data: bytes, l2: int):
    # The version nibble says which IP; anything else is parsed as IPv4 and
    # counted by the core as a bad version (or a short frame).
    if len(data) > l2 and data[l2] >> 4 == 6:
        return l2, ETH_IPV6, None
    return l2, ETH_IPV4, None


def _ipv4(data: bytes, l2: int):
    return l2, ETH_IPV4, None


def _ipv6(data: bytes, l2: int):
    return l2, ETH_IPV6, None


def _null(data: bytes, l2: int):
    # The writer's own byte order: a family above 0xFFFF was written by a
    # machine of the other byte order (as tcpdump reads it).
    if len(data) - l2 < 4:
        return l2 + 4, 0, None
    family = _u32_le(data, l2)[0]
    if family & 0xFFFF0000:
        family = _u32_be(data, l2)[0]
    return l2 + 4, _AF_ETHERTYPE.get(family, 0), None


def _loop(data: bytes, l2: int):
    if len(data) - l2 < 4:
        return l2 + 4, 0, None
    return l2 + 4, _AF_ETHERTYPE.get(_u32_be(data, l2)[0], 0), None


_DECODERS = {SLL: _sll, SLL2: _sll2, RAW: _raw, RAW_DLT12: _raw, RAW_DLT14: _raw,
             IPV4: _ipv4, IPV6: _ipv6, NULL: _null, LOOP: _loop}

#: Every link type replay reads: Ethernet, and those with a decoder.
LINKTYPES_READ = frozenset(_DECODERS) | {ETHERNET}


def decoder(linktype: int):
    """The link-header reader of ``linktype``: ``f(data, l2) -> (l3,
    ethertype, direction)``; None for Ethernet (the core reads it) and for
    link types that are not read (see ``LINKTYPES_READ``)."""
    return _DECODERS.get(linktype)


def describe_read() -> str:
    """The link types read, for messages and --help."""
    return ("Ethernet (1), Linux cooked SLL (113) and SLL2 (276), raw IP (101, 228, 229, "
            "12, 14), BSD loopback NULL (0) and LOOP (108)")
