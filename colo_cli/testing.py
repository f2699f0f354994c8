"""Frame builders for tests, examples and benchmarks.

Plain ``struct`` packing, so every byte is known: tests compare exact byte
vectors, and the example captures are reproducible.  Checksums are computed
(IPv4 header, TCP/UDP/ICMP over the pseudo-header) unless a value is given.
"""

from __future__ import annotations

import ipaddress
import struct

MAC_A = bytes.fromhex("525400000001")
MAC_B = bytes.fromhex("525400000002")


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _addr(a) -> bytes:
    return ipaddress.ip_address(a).packed


def ether(payload: bytes, ethertype: int, src=MAC_A, dst=MAC_B, vlans=(), pad_to: int = 0) -> bytes:
    """An Ethernet frame; ``vlans`` is a list of (tpid, vid) outer-first."""
    tags = b"".join(struct.pack("!HH", tpid, vid) for tpid, vid in vlans)
    frame = dst + src + tags + struct.pack("!H", ethertype) + payload
    if len(frame) < pad_to:
        frame += b"\0" * (pad_to - len(frame))
    return frame


def ipv4(payload: bytes, proto: int, src="10.0.0.1", dst="10.0.0.2", ident=1, ttl=64,
         flags_frag=0x4000, options=b"", total_length=None, version_ihl=None) -> bytes:
    ihl = 5 + len(options) // 4
    total = total_length if total_length is not None else 20 + len(options) + len(payload)
    vihl = version_ihl if version_ihl is not None else (4 << 4) | ihl
    hdr = struct.pack("!BBHHHBBH4s4s", vihl, 0, total, ident, flags_frag, ttl, proto, 0,
                      _addr(src), _addr(dst)) + options
    cs = _csum(hdr)
    hdr = hdr[:10] + struct.pack("!H", cs) + hdr[12:]
    return hdr + payload


def ipv6(payload: bytes, nh: int, src="fd00::1", dst="fd00::2", hlim=64, ext=b"") -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(ext) + len(payload), nh, hlim,
                       _addr(src), _addr(dst)) + ext + payload


def _pseudo(src, dst, proto, length) -> bytes:
    s, d = _addr(src), _addr(dst)
    if len(s) == 4:
        return s + d + struct.pack("!BBH", 0, proto, length)
    return s + d + struct.pack("!IxxxB", length, proto)


def udp(payload: bytes, sport=5000, dport=6000, src="10.0.0.1", dst="10.0.0.2", checksum=None) -> bytes:
    length = 8 + len(payload)
    hdr = struct.pack("!HHHH", sport, dport, length, 0)
    cs = checksum if checksum is not None else (_csum(_pseudo(src, dst, 17, length) + hdr + payload) or 0xFFFF)
    return struct.pack("!HHHH", sport, dport, length, cs) + payload


def tcp(payload: bytes = b"", seq=1000, ack=5000, flags=0x18, sport=40000, dport=80,
        window=65535, options=b"", src="10.0.0.1", dst="10.0.0.2", checksum=None) -> bytes:
    doff = (20 + len(options)) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      doff << 4, flags, window, 0, 0) + options
    cs = checksum if checksum is not None else _csum(_pseudo(src, dst, 6, len(hdr) + len(payload)) + hdr + payload)
    return hdr[:16] + struct.pack("!H", cs) + hdr[18:] + payload


def icmp_echo(payload: bytes = b"ping", ident=1, seq=1, type_=0) -> bytes:
    hdr = struct.pack("!BBHHH", type_, 0, 0, ident, seq)
    cs = _csum(hdr + payload)
    return struct.pack("!BBHHH", type_, 0, cs, ident, seq) + payload


# Whole frames --------------------------------------------------------------

def udp_frame(payload: bytes, sport=5000, dport=6000, src="10.0.0.1", dst="10.0.0.2",
              ident=1, ttl=64, vlans=(), pad_to=0, checksum=None) -> bytes:
    if ":" in src:
        return ether(ipv6(udp(payload, sport, dport, src, dst, checksum), 17, src, dst),
                     0x86DD, vlans=vlans, pad_to=pad_to)
    return ether(ipv4(udp(payload, sport, dport, src, dst, checksum), 17, src, dst, ident, ttl),
                 0x0800, vlans=vlans, pad_to=pad_to)


def tcp_frame(payload: bytes = b"", seq=1000, ack=5000, flags=0x18, sport=40000, dport=80,
              src="10.0.0.1", dst="10.0.0.2", ident=1, ttl=64, window=65535, options=b"",
              vlans=(), pad_to=0) -> bytes:
    seg = tcp(payload, seq, ack, flags, sport, dport, window, options, src, dst)
    if ":" in src:
        return ether(ipv6(seg, 6, src, dst), 0x86DD, vlans=vlans, pad_to=pad_to)
    return ether(ipv4(seg, 6, src, dst, ident, ttl), 0x0800, vlans=vlans, pad_to=pad_to)


def icmp_frame(payload: bytes = b"ping", ident=1, seq=1, src="10.0.0.1", dst="10.0.0.2",
               ip_ident=1, ttl=64) -> bytes:
    return ether(ipv4(icmp_echo(payload, ident, seq), 1, src, dst, ip_ident, ttl), 0x0800)


def arp_frame(op=2, sha=MAC_A, spa="10.0.0.1", tha=MAC_B, tpa="10.0.0.2", pad_to=60) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, sha, _addr(spa), tha, _addr(tpa))
    return ether(body, 0x0806, pad_to=pad_to)


def gre_frame(payload: bytes = b"\0\0\x08\0gre!", src="10.0.0.1", dst="10.0.0.2", ident=1) -> bytes:
    return ether(ipv4(payload, 47, src, dst, ident), 0x0800)
