"""Noise rules: bytes that legitimately differ between two replicas and must
not count as a divergence (``--ignore``).

Rules, as written on the command line::

    dns.id              the DNS transaction ID (UDP, either port 53)
    http.date           the value of HTTP Date: headers (TCP, any port)
    udp.checksum        UDP checksums
    icmp.checksum       ICMP and ICMPv6 checksums
    udp:PORT:START-END  bytes START..END-1 of the UDP payload, either port PORT
                        ('*' for any port)
    icmp:START-END      bytes START..END-1 of ICMP/ICMPv6 messages, counted
                        from the ICMP header (an echo's data starts at 8; ping
                        puts its send time there)
    tcp:PORT:/REGEX/    bytes of the TCP payload that REGEX matches, on either
                        port PORT ('*' for any)

A rule that hides UDP or ICMP payload bytes hides the checksum too: the
checksum covers them.  Datagram rules are applied only when a datagram does
not match as it is, so they cost nothing on the hot path.  TCP rules mask the
matched bytes in each segment before the stream is compared (equal-length
values then compare equal); a value split across two segments is not
masked.  Every rule in force is named in every report, so a result can be
reproduced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .packet import KIND_ICMP, KIND_TCP, KIND_UDP


class RuleError(ValueError):
    """A rule that does not parse (one-line message)."""


SYNTAX = ("dns.id, http.date, udp.checksum, icmp.checksum, udp:PORT:START-END, "
          "icmp:START-END or tcp:PORT:/REGEX/")

_HTTP_DATE = rb"(?im)^Date:[ \t]*[^\r\n]*"


@dataclass(frozen=True)
class Rule:
    text: str                          # as given, for reports
    kind: int                          # KIND_UDP, KIND_TCP or KIND_ICMP
    port: int | None                   # either port of the flow; None: any
    ranges: tuple = ()                 # datagrams: (start, end) in the L4 part
    pattern: re.Pattern | None = None  # TCP: what to mask in each segment

    def applies(self, kind: int, sport: int | None, dport: int | None) -> bool:
        if kind != self.kind:
            return False
        return self.port is None or self.port in (sport, dport)


def _port(text: str, rule: str) -> int | None:
    if text == "*":
        return None
    try:
        port = int(text)
    except ValueError:
        raise RuleError(f"{rule!r}: port {text!r} is not a number or '*'") from None
    if not 0 < port < 65536:
        raise RuleError(f"{rule!r}: port {port} is out of range")
    return port


def parse_rule(text: str) -> Rule:
    name = text.strip()
    if name == "dns.id":
        # L4 part of UDP: 8-byte header, then the payload; the ID is payload 0-1
        return Rule(name, KIND_UDP, 53, ranges=((8, 10), (6, 8)))
    if name == "http.date":
        return Rule(name, KIND_TCP, None, pattern=re.compile(_HTTP_DATE))
    if name == "udp.checksum":
        return Rule(name, KIND_UDP, None, ranges=((6, 8),))
    if name == "icmp.checksum":
        return Rule(name, KIND_ICMP, None, ranges=((2, 4),))
    if name.startswith("udp:"):
        parts = name.split(":")
        if len(parts) != 3:
            raise RuleError(f"{text!r}: expected udp:PORT:START-END")
        port = _port(parts[1], text)
        start, dash, end = parts[2].partition("-")
        try:
            start_i, end_i = int(start), int(end)
        except ValueError:
            raise RuleError(f"{text!r}: expected udp:PORT:START-END with numbers") from None
        if not dash or start_i < 0 or end_i <= start_i:
            raise RuleError(f"{text!r}: START-END must be a range with START < END")
        return Rule(name, KIND_UDP, port, ranges=((8 + start_i, 8 + end_i), (6, 8)))
    if name.startswith("icmp:"):
        start, dash, end = name[5:].partition("-")
        try:
            start_i, end_i = int(start), int(end)
        except ValueError:
            raise RuleError(f"{text!r}: expected icmp:START-END with numbers") from None
        if not dash or start_i < 0 or end_i <= start_i:
            raise RuleError(f"{text!r}: START-END must be a range with START < END")
        return Rule(name, KIND_ICMP, None, ranges=((start_i, end_i), (2, 4)))
    if name.startswith("tcp:"):
        head, sep, rest = name[4:].partition(":")
        if not sep or len(rest) < 2 or not rest.startswith("/") or not rest.endswith("/"):
            raise RuleError(f"{text!r}: expected tcp:PORT:/REGEX/")
        port = _port(head, text)
        try:
            pattern = re.compile(rest[1:-1].encode("utf-8", "surrogateescape"))
        except re.error as e:
            raise RuleError(f"{text!r}: bad regular expression: {e}") from None
        if pattern.match(b""):
            raise RuleError(f"{text!r}: the regular expression matches nothing at all "
                            "(an empty match would hide nothing)")
        return Rule(name, KIND_TCP, port, pattern=pattern)
    raise RuleError(f"{text!r}: unknown rule; expected {SYNTAX}")


def ports_of(key: bytes):
    """(sport, dport) of an IP connection key, or (None, None)."""
    marker = key[-1:]
    if marker == b"4":
        ports = key[8:12]
    elif marker == b"6":
        ports = key[32:36]
    else:
        return None, None
    return int.from_bytes(ports[:2], "big"), int.from_bytes(ports[2:], "big")


def rules_for(rules, kind: int, key: bytes) -> tuple:
    if not rules:
        return ()
    sport, dport = ports_of(key)
    return tuple(r for r in rules if r.applies(kind, sport, dport))


def mask_datagram(region: bytes, rules) -> bytes:
    """The L4 part of a datagram with the rules' byte ranges zeroed."""
    buf = bytearray(region)
    for rule in rules:
        for start, end in rule.ranges:
            if start < len(buf):
                end = min(end, len(buf))
                buf[start:end] = bytes(end - start)
    return bytes(buf)


def mask_segment(payload: bytes, rules) -> bytes:
    """A TCP segment's payload with what the rules match zeroed (lengths are
    kept, so the stream keeps its shape)."""
    out = None
    for rule in rules:
        for m in rule.pattern.finditer(payload if out is None else bytes(out)):
            if m.end() > m.start():
                if out is None:
                    out = bytearray(payload)
                out[m.start():m.end()] = bytes(m.end() - m.start())
    return payload if out is None else bytes(out)
