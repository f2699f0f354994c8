"""Raw frame -> what the comparator needs to know about it.

``parse(data, l2)`` looks at the Ethernet frame that starts at offset ``l2`` of
``data`` (the record may carry a length word and a vnet header in front).
Captures of other link types (Linux cooked, raw IP, BSD loopback) have no
Ethernet header: their adapter reads the link header and says where the
network header starts and what it is, ``parse(data, l2, l3, ethertype)``
with ``l3 >= 0``; from there on (VLAN tags, IP, ARP) the frame is parsed as
an Ethernet frame's payload of that EtherType would be, so the same packet
gets the same key and compared bytes whatever link it was captured on.
Either way ``parse`` returns a tuple:

* ``(kind, key, cmp_off, cmp_end, seq, ack, flags)`` for a comparable frame.
  ``kind`` is one of the ``KIND_*`` constants; ``key`` is the connection key
  (bytes, see below); ``data[cmp_off:cmp_end]`` is what is compared (for TCP:
  the payload, and ``seq``/``ack``/``flags`` are the TCP fields; for
  fragments ``seq`` is the fragment offset and MF flag).
* ``(None, reason)`` for a frame that cannot be compared (``REASON_*``).

The comparator calls ``parse_into`` instead, the one implementation of
both: it writes those seven fields into the frame's ``Packet`` and returns
the reason, or "" for a comparable frame, so that no tuple is built and no
number boxed per frame.

Nothing here raises on bad input: every malformed or truncated frame comes
back with a reason, so the comparator can count it and bypass it.

Connection keys are ``bytes`` rather than tuples: Python randomises the hash
of bytes (SipHash), so crafted traffic cannot flood one hash bucket, which it
could with tuples of small ints.  A key is the addresses and ports as they
sit in the frame (so an untagged IPv4 flow's key is one slice of it), then
the L4 protocol, the raw VLAN tags and a family byte; taken as they arrive:
no direction normalisation, since both inputs carry only guest-outbound
traffic (as in QEMU).

What is compared, per kind (``docs/qemu.md`` section 3):

* TCP: the payload, as a byte stream (headers, IP ID/TTL, window, options
  and checksums are not compared).
* UDP, ICMP, ICMPv6 and other IP protocols: from the L4 header to the end of
  the IP payload, checksum included, as QEMU does for UDP/ICMP.  Unlike QEMU
  the end is the IP total length, so Ethernet padding is never compared
  (QEMU compares it: observed a7), and "other" protocols are not compared on
  their Ethernet and IP headers (QEMU does, so they miscompare on IP ID:
  observed d5).
* ARP: the ARP body (without Ethernet padding).
* IP fragments are reassembled (per side) by the comparator and the whole
  datagram compared; here a fragment is only identified: its key is the
  reassembly key (addresses, protocol and IP ID), ``seq`` its offset in
  bytes, ``ack`` its more-fragments flag and ``flags`` the L4 protocol.
"""

from __future__ import annotations

import struct
from typing import Any, Final

KIND_TCP: Final = 1
KIND_UDP: Final = 2
KIND_ICMP: Final = 3      # ICMP and ICMPv6
KIND_OTHER: Final = 4     # any other IP protocol
KIND_ARP: Final = 5
KIND_FRAGMENT: Final = 6  # an IPv4 or IPv6 fragment (compared as a datagram)

KIND_NAMES = {KIND_TCP: "tcp", KIND_UDP: "udp", KIND_ICMP: "icmp",
              KIND_OTHER: "ip", KIND_ARP: "arp", KIND_FRAGMENT: "fragment"}

# TCP flags
FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
PSH: Final = 0x08
ACK: Final = 0x10

ETH_IPV4: Final = 0x0800
ETH_ARP: Final = 0x0806
ETH_IPV6: Final = 0x86DD
ETH_VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)
_TPID_BYTES = {tpid: tpid.to_bytes(2, "big") for tpid in ETH_VLAN_TPIDS}

#: the largest virtio-net header (virtio_net_hdr_v1_hash); QEMU treats a
#: longer one as "load wrong" and so do we.
MAX_VNET_HDR_LEN: Final = 20

# Why a frame was not compared.  Stable strings: they appear in reports,
# JSON and metrics.
REASON_SHORT_FRAME = "short-frame"
REASON_BAD_VNET_HDR = "bad-vnet-header"
REASON_UNKNOWN_ETHERTYPE = "unknown-ethertype"
REASON_IPV4_BAD_VERSION = "ipv4-bad-version"
REASON_IPV4_BAD_IHL = "ipv4-bad-header-length"
REASON_IPV4_BAD_LENGTH = "ipv4-bad-total-length"
REASON_IPV4_TRUNCATED = "ipv4-truncated"
REASON_IPV6_BAD_VERSION = "ipv6-bad-version"
REASON_IPV6_TRUNCATED = "ipv6-truncated"
REASON_IPV6_BAD_EXTENSION = "ipv6-bad-extension-header"
REASON_TCP_TRUNCATED = "tcp-truncated"
REASON_TCP_BAD_OFFSET = "tcp-bad-data-offset"
REASON_UDP_TRUNCATED = "udp-truncated"
REASON_ICMP_TRUNCATED = "icmp-truncated"
REASON_ARP_TRUNCATED = "arp-truncated"


# Protocols whose first four L4 bytes are the source and destination ports
# (QEMU uses the same list: TCP, UDP, DCCP, SCTP, UDP-Lite), plus ESP, whose
# first four bytes are its SPI.
_PORT_PROTOS = frozenset((6, 17, 33, 50, 132, 136))
_AH: Final = 51

# IPv6 extension headers that we walk through.  ESP (50) is not one: what
# follows it is encrypted, so it is treated as the L4 protocol.
_V6_EXT = frozenset((0, 43, 60, 135, 139, 140, 253, 254))
_V6_FRAGMENT: Final = 44
_V6_NO_NEXT: Final = 59
_MAX_V6_EXT_HEADERS: Final = 16

_ZERO_PORTS: Final = b"\0\0\0\0"
_ECHO_TYPES = frozenset((0, 8, 128, 129))   # ICMP and ICMPv6 echo request/reply


def parse(data: bytes, l2: int = 0, l3: int = -1, ethertype: int = 0) -> tuple:
    """Classify the Ethernet frame at ``data[l2:]``; or, with ``l3 >= 0``,
    the network-layer packet of EtherType ``ethertype`` at ``data[l3:]`` (a
    VLAN TPID there means the tag's TCI and the inner EtherType come first,
    as after an Ethernet header).  See the module doc."""
    pkt = Packet(0, data, l2, 0, 0.0, 0)
    reason = parse_into(pkt, l3, ethertype)
    if reason:
        return None, reason
    return pkt.kind, pkt.key, pkt.cmp_off, pkt.cmp_end, pkt.seq, pkt.ack, pkt.flags


def parse_into(pkt: Packet, l3: int = -1, ethertype: int = 0) -> str:
    """``parse`` for the frame ``pkt.data[pkt.l2:]``, into ``pkt``: its
    ``kind``, ``key``, ``cmp_off``, ``cmp_end``, ``seq``, ``ack`` and
    ``flags`` are set, and "" returned, for a comparable frame; else the
    reason, and ``pkt`` is left as it was."""
    data = pkt.data
    end = len(data)
    if l3 < 0:
        off = pkt.l2 + 12
        if end - off < 2:
            return REASON_SHORT_FRAME
        etype = (data[off] << 8) | data[off + 1]
        l3 = off + 2
    elif l3 > end:
        return REASON_SHORT_FRAME     # cut inside its link header
    else:
        etype = ethertype
    tags = b""
    # 802.1Q / 802.1ad tags, stacked too.  The tags are part of the key, so
    # different VLANs are different connections; they are not compared.
    # A tag in the key is its TPID and TCI, as the frame carries them.
    while etype == 0x8100 or etype == 0x88A8 or etype == 0x9100:
        if end - l3 < 4:
            return REASON_SHORT_FRAME
        tags += _TPID_BYTES[etype] + data[l3:l3 + 2]
        etype = (data[l3 + 2] << 8) | data[l3 + 3]
        l3 += 4
    if etype == ETH_IPV4:
        return _parse_ipv4(pkt, data, l3, end, tags)
    if etype == ETH_IPV6:
        return _parse_ipv6(pkt, data, l3, end, tags)
    if etype == ETH_ARP:
        return _parse_arp(pkt, data, l3, end, tags)
    return REASON_UNKNOWN_ETHERTYPE


def _parse_ipv4(pkt: Packet, data: bytes, l3: int, end: int, tags: bytes) -> str:
    if end - l3 < 20:
        return REASON_IPV4_TRUNCATED
    vihl = data[l3]
    total = (data[l3 + 2] << 8) | data[l3 + 3]
    if vihl >> 4 != 4:
        return REASON_IPV4_BAD_VERSION
    ihl = (vihl & 15) * 4
    if ihl < 20:
        return REASON_IPV4_BAD_IHL
    if total < ihl:
        return REASON_IPV4_BAD_LENGTH
    l4 = l3 + ihl
    if l4 > end:
        return REASON_IPV4_TRUNCATED
    ip_end = l3 + total
    proto = data[l3 + 9]
    frag = ((data[l3 + 6] << 8) | data[l3 + 7]) & 0x3FFF  # MF flag and fragment offset
    if frag:
        addrs = data[l3 + 12:l3 + 20]
        if ip_end > end:
            return REASON_IPV4_TRUNCATED   # a cut fragment cannot be reassembled
        # keyed for reassembly by the IP ID (within one side only: the
        # replicas' IDs differ); seq = offset in bytes, ack = more fragments
        pkt.classify(KIND_FRAGMENT, _fragment_key(b"4", tags, addrs, data[l3 + 4:l3 + 6], proto),
                     l4, ip_end, (frag & 0x1FFF) * 8, frag >> 13, proto)
        return ""
    # the addresses are read where they sit (see _parse_l4)
    return _parse_l4(pkt, data, b"", l3 + 12, tags + b"4" if tags else b"4", proto, l4, ip_end,
                     ip_end if ip_end < end else end, 1)


def _parse_ipv6(pkt: Packet, data: bytes, l3: int, end: int, tags: bytes) -> str:
    if end - l3 < 40:
        return REASON_IPV6_TRUNCATED
    if data[l3] >> 4 != 6:
        return REASON_IPV6_BAD_VERSION
    plen = (data[l3 + 4] << 8) | data[l3 + 5]
    nh = data[l3 + 6]
    off = l3 + 40
    if plen == 0 and nh == 0:
        # Possibly a jumbogram: the real length is in a Hop-by-Hop option.
        jumbo_end = _jumbo_end(data, off, end)
        if jumbo_end is None:
            return REASON_IPV6_BAD_EXTENSION
        ip_end = jumbo_end
    else:
        ip_end = off + plen
    return _parse_v6_chain(pkt, data, data[l3 + 8:l3 + 40], tags, nh, off, ip_end,
                           ip_end if ip_end < end else end)


def _parse_v6_chain(pkt: Packet, data: bytes, addrs: bytes, tags: bytes, nh: int, off: int,
                    ip_end: int, cap_end: int) -> str:
    """Walk IPv6 extension headers from ``off`` (next header ``nh``) to the
    L4 header.  ``cap_end`` is where the captured bytes stop (before
    ``ip_end`` when the capture was cut short)."""
    for _ in range(_MAX_V6_EXT_HEADERS):
        if nh in _V6_EXT:
            if cap_end - off < 8:
                return REASON_IPV6_BAD_EXTENSION if cap_end == ip_end else REASON_IPV6_TRUNCATED
            nh, hlen = data[off], (data[off + 1] + 1) * 8
        elif nh == _AH:
            if cap_end - off < 8:
                return REASON_IPV6_BAD_EXTENSION if cap_end == ip_end else REASON_IPV6_TRUNCATED
            nh, hlen = data[off], (data[off + 1] + 2) * 4
        elif nh == _V6_FRAGMENT:
            if cap_end - off < 8:
                return REASON_IPV6_BAD_EXTENSION if cap_end == ip_end else REASON_IPV6_TRUNCATED
            frag = (data[off + 2] << 8) | data[off + 3]
            if frag & 0xFFF9:
                if cap_end < ip_end:
                    return REASON_IPV6_TRUNCATED
                inner = data[off]
                pkt.classify(KIND_FRAGMENT,
                             _fragment_key(b"6", tags, addrs, data[off + 4:off + 8], inner),
                             off + 8, ip_end, frag & 0xFFF8, frag & 1, inner)
                return ""
            # An atomic fragment (offset 0, M clear) is a whole datagram.
            nh, hlen = data[off], 8
        else:
            break
        off += hlen
        if off > ip_end:
            return REASON_IPV6_BAD_EXTENSION
        if off > cap_end:
            return REASON_IPV6_TRUNCATED
    else:
        return REASON_IPV6_BAD_EXTENSION
    tail = tags + b"6"
    if nh == _V6_NO_NEXT:
        pkt.classify(KIND_OTHER, addrs + _ZERO_PORTS + b"\x3b" + tail, off, ip_end, 0, 0, 0)
        return ""
    return _parse_l4(pkt, data, addrs, 0, tail, nh, off, ip_end, cap_end, 58)


def _jumbo_end(data: bytes, off: int, end: int) -> int | None:
    """End of an IPv6 jumbogram, from its Hop-by-Hop Jumbo Payload option."""
    if end - off < 8:
        return None
    hlen = (data[off + 1] + 1) * 8
    opt, stop = off + 2, min(off + hlen, end)
    while opt + 1 < stop:
        otype = data[opt]
        if otype == 0:            # Pad1
            opt += 1
            continue
        olen = data[opt + 1]
        if otype == 0xC2 and olen == 4 and opt + 6 <= stop:
            return off + struct.unpack_from(">I", data, opt + 2)[0]
        opt += 2 + olen
    return None


def _parse_l4(pkt: Packet, data: bytes, addrs: bytes, addr_at: int, tail: bytes, proto: int,
              l4: int, ip_end: int, cap_end: int, icmp_proto: int) -> str:
    """The L4 part.  ``ip_end`` is where the IP payload ends by its header;
    ``cap_end`` where the captured bytes stop.  A frame captured short of
    its IP length (snaplen) is still compared when its L4 header is whole:
    ``cmp_end`` is then beyond the data, and only the captured part can be
    compared (the comparator knows).

    The key is addresses + ports + protocol + VLAN tags + IP version
    (``tail``).  ``addrs`` are the addresses, or b"" when they are the 8
    bytes at ``addr_at`` in ``data`` (IPv4): with a 20-byte IP header they
    and the ports are then one slice of the frame."""
    avail = cap_end - l4
    if not addrs and (proto == 6 or proto == 17) and addr_at + 8 == l4 and avail >= 4:
        head = data[addr_at:l4 + 4]       # addresses and ports, in one piece
    else:
        if not addrs:
            addrs = data[addr_at:addr_at + 8]
        head = addrs + data[l4:l4 + 4]
    if proto == 6:
        if avail < 20:
            return REASON_TCP_TRUNCATED
        hlen = (data[l4 + 12] >> 4) * 4
        if hlen < 20:
            return REASON_TCP_BAD_OFFSET
        if hlen > avail:
            return REASON_TCP_TRUNCATED
        pkt.classify(KIND_TCP, head + _proto_tail(6, tail), l4 + hlen, ip_end,
                     (data[l4 + 4] << 24) | (data[l4 + 5] << 16) | (data[l4 + 6] << 8) | data[l4 + 7],
                     (data[l4 + 8] << 24) | (data[l4 + 9] << 16) | (data[l4 + 10] << 8)
                     | data[l4 + 11],
                     data[l4 + 13])
        return ""
    if proto == 17:
        if avail < 8:
            return REASON_UDP_TRUNCATED
        pkt.classify(KIND_UDP, head + _proto_tail(17, tail), l4, ip_end, 0, 0, 0)
        return ""
    if proto == icmp_proto:
        # ICMP's header is 8 bytes, ICMPv6's fixed part 4.
        if avail < (8 if icmp_proto == 1 else 4):
            return REASON_ICMP_TRUNCATED
        # Echo requests and replies are keyed by their identifier, so two ping
        # sessions between the same hosts are compared separately and their
        # interleaving does not matter.  Other ICMP between two addresses is
        # one connection, compared in order, as in QEMU (no ports for ICMP).
        if data[l4] in _ECHO_TYPES and avail >= 8:
            ports = b"\0\0" + data[l4 + 4:l4 + 6]
        else:
            ports = _ZERO_PORTS
        pkt.classify(KIND_ICMP, addrs + ports + _proto_tail(proto, tail), l4, ip_end, 0, 0, 0)
        return ""
    if proto in _PORT_PROTOS and avail >= 4:
        ports = data[l4:l4 + 4]
    elif proto == _AH and avail >= 8:
        ports = data[l4 + 4:l4 + 8]   # the SPI, as QEMU keys AH
    else:
        ports = _ZERO_PORTS
    pkt.classify(KIND_OTHER, addrs + ports + _proto_tail(proto, tail), l4, ip_end, 0, 0, 0)
    return ""


#: the last bytes of an untagged flow's key: its protocol and IP version
_V4_TAILS: Final = [bytes((proto,)) + b"4" for proto in range(256)]
_V6_TAILS: Final = [bytes((proto,)) + b"6" for proto in range(256)]


def _proto_tail(proto: int, tail: bytes) -> bytes:
    """The protocol byte and ``tail`` (VLAN tags and IP version)."""
    if tail == b"4":
        return _V4_TAILS[proto]
    if tail == b"6":
        return _V6_TAILS[proto]
    return bytes((proto,)) + tail


def _fragment_key(version: bytes, tags: bytes, addrs: bytes, ident: bytes, proto: int) -> bytes:
    """A reassembly key: b"F", the IP version, the tags (with their length),
    the addresses, the IP ID and the protocol; ``fragment_context`` reads it
    back."""
    return b"F" + version + bytes((len(tags),)) + tags + addrs + ident + bytes((proto,))


def fragment_context(key: bytes) -> tuple[bytes, bytes, bytes]:
    """(version, tags, addresses) of a reassembly key."""
    version = key[1:2]
    ntags = key[2]
    alen = 32 if version == b"6" else 8
    return version, key[3:3 + ntags], key[3 + ntags:3 + ntags + alen]


def parse_reassembled(whole: Packet, key: bytes, proto: int) -> str:
    """Parse a reassembled IP payload (``whole.data``, which starts at what
    followed the IPv4 header, or the IPv6 Fragment header) into ``whole`` as
    ``parse_into`` would a whole datagram; ``key`` is its fragments'
    reassembly key."""
    version, tags, addrs = fragment_context(key)
    payload = whole.data
    end = len(payload)
    if version == b"6":
        reason = _parse_v6_chain(whole, payload, addrs, tags, proto, 0, end, end)
        if not reason and whole.kind == KIND_FRAGMENT:
            whole.kind = 0
            return REASON_IPV6_BAD_EXTENSION   # a fragment inside a fragment
        return reason
    return _parse_l4(whole, payload, addrs, 0, tags + b"4", proto, 0, end, end, 1)


def _parse_arp(pkt: Packet, data: bytes, l3: int, end: int, tags: bytes) -> str:
    if end - l3 < 8:
        return REASON_ARP_TRUNCATED
    hlen, plen = data[l3 + 4], data[l3 + 5]
    body_end = l3 + 8 + 2 * (hlen + plen)
    if body_end > end:
        return REASON_ARP_TRUNCATED
    spa = data[l3 + 8 + hlen:l3 + 8 + hlen + plen]
    tpa = data[l3 + 8 + 2 * hlen + plen:body_end]
    # Keyed by who asks about whom, so requests for different addresses are
    # compared separately and in order.
    pkt.classify(KIND_ARP, bytes((plen,)) + spa + tpa + tags + b"a", l3, body_end, 0, 0, 0)
    return ""


class Packet:
    """One frame as the comparator holds it.

    ``data`` is the record exactly as it arrived (for ``serve`` the whole wire
    record, length words included, so it can be written to outdev as is; for
    ``replay`` the captured bytes) and the frame, from its link-layer header
    (Ethernet, or a capture's own), starts at ``l2``.
    ``index`` numbers the frames of one side from 0, in arrival order.

    What ``parse`` found is set by ``classify`` (``kind`` stays 0 for a frame
    that was not comparable); ``seq_abs``/``end_abs`` are the 64-bit stream
    positions the TCP comparison gives a segment; ``left`` turns True when
    the frame has left the comparator (released, consumed, discarded), which
    is how the arrival list knows what is still held; ``conn`` is the
    connection holding it.  A reassembled IP datagram is a Packet too: its
    ``data`` is the reassembled IP payload (``l2`` 0) and ``fragments`` the
    frames it arrived in.
    """
    __slots__ = ("side", "data", "l2", "vnet_hdr_len", "arrival_ms", "index",
                 "kind", "key", "cmp_off", "cmp_end", "seq", "ack", "flags",
                 "seq_abs", "end_abs", "left", "conn", "fragments")

    side: int
    data: bytes
    l2: int
    vnet_hdr_len: int
    arrival_ms: float
    index: int
    kind: int
    key: bytes | None
    cmp_off: int
    cmp_end: int
    seq: int
    ack: int
    flags: int
    seq_abs: int
    end_abs: int
    left: bool
    conn: Any
    fragments: list[Packet] | None

    def __init__(self, side: int, data: bytes, l2: int, vnet_hdr_len: int, arrival_ms: float,
                 index: int) -> None:
        self.side = side
        self.data = data
        self.l2 = l2
        self.vnet_hdr_len = vnet_hdr_len
        self.arrival_ms = arrival_ms
        self.index = index
        self.kind = 0
        self.key = None
        self.cmp_off = self.cmp_end = 0
        self.seq = self.ack = self.flags = 0
        self.seq_abs = self.end_abs = 0
        self.left = False
        self.conn = None
        self.fragments = None   # for a reassembled datagram: the frames it came in

    def classify(self, kind: int, key: bytes, cmp_off: int, cmp_end: int, seq: int, ack: int,
                 flags: int) -> None:
        """Take what ``parse`` found (its seven fields, in order)."""
        self.kind = kind
        self.key = key
        self.cmp_off = cmp_off
        self.cmp_end = cmp_end
        self.seq = seq
        self.ack = ack
        self.flags = flags

    @property
    def frame(self) -> bytes:
        """The frame alone, from its link-layer header (no length words, no
        vnet header)."""
        return self.data[self.l2:]

    @property
    def vnet_header(self) -> bytes:
        return self.data[self.l2 - self.vnet_hdr_len:self.l2]

    @property
    def compared(self) -> bytes:
        """What is compared of it (for TCP: the payload)."""
        return self.data[self.cmp_off:self.cmp_end]

    @property
    def frames(self) -> int:
        """How many frames it stands for (a reassembled datagram came in
        several)."""
        return 1 if self.fragments is None else len(self.fragments)

    def __repr__(self) -> str:
        return f"Packet({self.side!r}, #{self.index}, {len(self.data)} B)"
