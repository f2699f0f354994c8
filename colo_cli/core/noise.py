"""Noise rules: bytes that legitimately differ between two replicas and must
not count as a divergence (``--ignore``).

Rules, as written on the command line::

    dns.id              the DNS transaction ID (UDP, either port 53)
    dns.ttl             the TTL of every DNS resource record (UDP, port 53)
    ntp.timestamps      the four NTP timestamps (UDP, either port 123)
    http.header:NAME    the value of HTTP NAME: header lines (TCP, any port)
    http.date           the same as http.header:Date
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
not match as it is, so they cost nothing on the hot path; a field that is not
at a fixed offset (a DNS record's TTL) is found by a locator of
``fields.py``.

TCP rules apply to the byte stream, not to segments, and only where the two
streams differ (``StreamMatch``): at the first differing byte, a rule whose
match covers that byte on both sides, starting at the same stream offset and
of the same length, makes the match equal (equal-length values compare
equal).  The match is found in the stream around the byte, so a value split
across segments, however the two replicas cut their streams, is hidden too.
Every rule in force is named in every report, so a result can be reproduced.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ColoError
from .fields import dns_ttl_spans
from .packet import KIND_ICMP, KIND_TCP, KIND_UDP


class RuleError(ColoError, ValueError):
    """A rule that does not parse (one-line message)."""


SYNTAX = ("dns.id, dns.ttl, ntp.timestamps, http.header:NAME, http.date, udp.checksum, "
          "icmp.checksum, udp:PORT:START-END, icmp:START-END or tcp:PORT:/REGEX/")

#: an HTTP header name (RFC 9110 token)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
#: NTP's reference, originate, receive and transmit timestamps: bytes 16-47
#: of the NTP message, after the 8-byte UDP header
_NTP_TIMESTAMPS = (8 + 16, 8 + 48)


def _header_pattern(name: str) -> re.Pattern:
    """A header line's name and value, up to the end of its line."""
    return re.compile(rb"(?im)^" + re.escape(name.encode("ascii")) + rb":[ \t]*[^\r\n]*")


@dataclass(frozen=True)
class Rule:
    text: str                          # as given, for reports
    kind: int                          # KIND_UDP, KIND_TCP or KIND_ICMP
    port: int | None                   # either port of the flow; None: any
    ranges: tuple = ()                 # datagrams: (start, end) in the L4 part
    pattern: re.Pattern | None = None  # TCP: what a value looks like in the stream
    #: datagrams: a locator (fields.py) of spans that are not at fixed offsets
    locate: Callable | None = None

    def spans(self, region: bytes) -> tuple:
        """The (start, end) spans the rule hides in a datagram's L4 part."""
        if self.locate is None:
            return self.ranges
        return self.ranges + tuple(self.locate(region))

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
    if name == "dns.ttl":
        return Rule(name, KIND_UDP, 53, ranges=((6, 8),), locate=dns_ttl_spans)
    if name == "ntp.timestamps":
        return Rule(name, KIND_UDP, 123, ranges=(_NTP_TIMESTAMPS, (6, 8)))
    if name == "http.date":
        return Rule(name, KIND_TCP, None, pattern=_header_pattern("Date"))
    if name.startswith("http.header:"):
        header = name[len("http.header:"):]
        if not _TOKEN.fullmatch(header):
            raise RuleError(f"{text!r}: expected http.header:NAME with an HTTP header name "
                            "(letters, digits and !#$%&'*+.^_`|~-)")
        return Rule(name, KIND_TCP, None, pattern=_header_pattern(header))
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
        for start, end in rule.spans(region):
            if start < len(buf):
                end = min(end, len(buf))
                buf[start:end] = bytes(end - start)
    return bytes(buf)


#: how far before a differing byte a TCP rule's match may start (the
#: verified stream keeps this much of each side to look back into)
STREAM_LOOKBACK = 256

#: what ``stream_match`` says when a match reaches the end of what a side has
#: sent so far: the value may go on, so the bytes must wait for more
WAIT = "wait"


def _covering(patterns, text: bytes, at: int):
    """The first match of any pattern that covers ``text[at]`` (searching
    from STREAM_LOOKBACK bytes before it), as (start, end), or None."""
    for pattern in patterns:
        for m in pattern.finditer(text, max(0, at - STREAM_LOOKBACK)):
            if m.start() > at:
                break
            if m.end() > at:
                return m.start(), m.end()
    return None


def stream_match(patterns, p_text: bytes, p_at: int, p_ended: bool,
                 s_text: bytes, s_at: int, s_ended: bool):
    """Whether the noise rules hide the difference at ``p_text[p_at]`` and
    ``s_text[s_at]`` (the same stream offset on each side; each text is what
    that side verified last, then what it sent since).

    Returns how many bytes from the differing one on are hidden (the rest of
    a match that covers it on both sides, at the same place and of the same
    length); ``WAIT`` when a covering match reaches the end of a side's text
    (``*_ended``: that side's stream ends there, so it cannot grow); or None
    when the difference stands.  A pure function of the stream's bytes, so
    how either side cut its stream into segments changes nothing."""
    p = _covering(patterns, p_text, p_at)
    s = _covering(patterns, s_text, s_at)
    if (p is not None and p[1] == len(p_text) and not p_ended) or \
            (s is not None and s[1] == len(s_text) and not s_ended):
        return WAIT
    if p is None or s is None:
        return None
    if p[0] - p_at != s[0] - s_at or p[1] - p_at != s[1] - s_at:
        return None
    return p[1] - p_at
