#!/usr/bin/env python3
"""Write the example capture pairs shipped in examples/.

    python examples/make_examples.py            # (re)writes examples/*.pcap
    python examples/make_examples.py DIR        # writes them into DIR

What the two "replicas" send is what a guest web/DNS server sends: the TCP
side of an HTTP exchange (SYN-ACK, response data, pure ACKs, FIN), DNS
answers over UDP, ping replies, an ARP reply, IPv6 and VLAN-tagged traffic.

* match-primary.pcap / match-secondary.pcap: the same output from two
  replicas, differing only where colo-compare must not care: IP ID and TTL,
  TCP window and timestamps, segmentation (one 2896-byte GSO frame against
  two MTU-sized segments), extra pure ACKs on the secondary, Ethernet padding,
  and timing (the secondary lags and its capture clock is unrelated).
  `colo-compare replay` exits 0.
* diverge-primary.pcap / diverge-secondary.pcap: the same, but the
  secondary's HTTP response carries a different Date header (one byte), one
  DNS answer has another TTL, and the secondary never sends the last ping
  reply.  `colo-compare replay` exits 1 and shows where.

The output is deterministic: the files in the repository are exactly what
this script writes (a test checks it).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from colo_cli.capture import PcapWriter  # noqa: E402
from colo_cli.testing import (arp_frame, icmp_frame, tcp_frame, udp_frame)  # noqa: E402

SERVER, CLIENT = "192.0.2.10", "198.51.100.7"
SA, PA, A, FA = 0x12, 0x18, 0x10, 0x11

BODY = (b"<html><body>" + b"colo-compare example page. " * 150 + b"</body></html>\n")
DATE = b"Date: Wed, 25 Nov 2026 20:00:00 GMT\r\n"


def http_response(date: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\n" + date + b"Content-Type: text/html\r\n"
            b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY)


def dns_answer(txid: int, ttl: int) -> bytes:
    # a DNS response for example.org A 192.0.2.10 (hand-built, enough for a demo)
    return (txid.to_bytes(2, "big") + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00"
            b"\x07example\x03org\x00\x00\x01\x00\x01"
            b"\xc0\x0c\x00\x01\x00\x01" + ttl.to_bytes(4, "big") + b"\x00\x04\xc0\x00\x02\x0a")


def replica(secondary: bool, diverge: bool) -> list[tuple[float, bytes]]:
    """(seconds, frame) for what one replica sent."""
    ident = 0x4000 if secondary else 0x1000

    def ip_id():
        nonlocal ident
        ident += 1
        return ident

    ttl = 63 if secondary else 64
    tcp_kw = dict(sport=80, dport=51000, src=SERVER, dst=CLIENT, ttl=ttl)
    isn, client_next = 3_000_000_000, 1_000_001
    out: list[tuple[float, bytes]] = []
    t = 0.0
    # TCP: the guest accepts a connection and serves one page
    out.append((t, tcp_frame(b"", seq=isn - 1 if not secondary else 77_777, ack=client_next,
                             flags=SA, ident=ip_id(), window=64240 if not secondary else 65160,
                             **tcp_kw)))
    # The client's request arrives (78 bytes): the guest acks it...
    client_next += 78
    t += 0.004
    out.append((t, tcp_frame(b"", seq=isn, ack=client_next, flags=A, ident=ip_id(), **tcp_kw)))
    if secondary:
        # ...and the secondary's stack sends one more window update
        out.append((t + 0.0005, tcp_frame(b"", seq=isn, ack=client_next, flags=A, window=501,
                                          ident=ip_id(), **tcp_kw)))
    response = http_response(DATE.replace(b"20:00:00", b"20:00:01") if (secondary and diverge) else DATE)
    t += 0.002
    seq = isn
    if secondary:
        # two MTU-sized segments and the rest...
        chunks = [response[:1448], response[1448:2896], response[2896:]]
    else:
        # ...where the primary sent one GSO super-frame and the rest
        chunks = [response[:2896], response[2896:]]
    for chunk in chunks:
        out.append((t, tcp_frame(chunk, seq=seq, ack=client_next, flags=PA, ident=ip_id(), **tcp_kw)))
        seq += len(chunk)
        t += 0.0003
    out.append((t + 0.01, tcp_frame(b"", seq=seq, ack=client_next, flags=FA, ident=ip_id(), **tcp_kw)))
    t += 0.05
    # UDP: three DNS answers
    for i, txid in enumerate((0x1a2b, 0x1a2c, 0x1a2d)):
        ttl_answer = 300 if not (secondary and diverge and i == 1) else 299
        out.append((t, udp_frame(dns_answer(txid, ttl_answer), sport=53, dport=40000 + i,
                                 src=SERVER, dst=CLIENT, ident=ip_id(), ttl=ttl,
                                 pad_to=64 if secondary else 0)))
        t += 0.01
    # ICMP: ping replies
    for n in range(1, 5):
        if secondary and diverge and n == 4:
            continue
        out.append((t, icmp_frame(b"abcdefghijklmnopqrstuvwabcdefghi", ident=0x77, seq=n,
                                  src=SERVER, dst=CLIENT, ip_ident=ip_id(), ttl=ttl)))
        t += 0.2
    # ARP reply, IPv6 NTP-like datagram, VLAN-tagged syslog datagram
    out.append((t, arp_frame(op=2, spa=SERVER, tpa=CLIENT)))
    out.append((t + 0.001, udp_frame(b"\x24\x01\x03\xe8" + b"\0" * 44, sport=123, dport=123,
                                     src="2001:db8::10", dst="2001:db8::7")))
    out.append((t + 0.002, udp_frame(b"<14>guest: service started", sport=514, dport=514,
                                     src=SERVER, dst="192.0.2.1", ident=ip_id(), ttl=ttl,
                                     vlans=[(0x8100, 42)])))
    if secondary:
        # the secondary lags a little, and its capture clock is its own
        out = [(ts * 1.02 + 0.003, f) for ts, f in out]
    return out


def write(path: str, frames: list[tuple[float, bytes]], epoch_s: int) -> None:
    with open(path, "wb") as f:
        w = PcapWriter(f)
        for ts, frame in frames:
            w.write(epoch_s * 10**9 + round(ts * 1e6) * 1000, frame)


def main() -> None:
    here = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    for name, diverge in (("match", False), ("diverge", True)):
        write(os.path.join(here, f"{name}-primary.pcap"), replica(False, diverge), 1_795_000_000)
        write(os.path.join(here, f"{name}-secondary.pcap"), replica(True, diverge), 1_795_654_321)
    print(f"wrote {here}/{{match,diverge}}-{{primary,secondary}}.pcap")


if __name__ == "__main__":
    main()
