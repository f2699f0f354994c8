"""Where a protocol field sits in a datagram: locators for field noise rules.

A field rule (``--ignore dns.ttl``) hides a field that is not at a fixed
offset: a DNS message has one TTL per resource record, after names of any
length.  The comparator cannot use a decoder for that (it is sans-IO and
dependency-free, and a decoder that rejects an unusual message would hide
nothing), so each such rule has a locator here: a small pure function from
the compared bytes of a datagram (its L4 part: the UDP header, then the
payload) to the ``(start, end)`` spans of the field, in the same offsets.

A locator never raises and never reads past the bytes it is given: a
malformed or truncated message yields the spans found before the damage (so
a rule hides no more than what is surely the field).  The protocol's meaning
of the field, and how it is shown, is the explanation's business
(``colo_cli.explain``), outside the core.
"""

from __future__ import annotations

_UDP_HEADER = 8
_DNS_HEADER = 12
_DNS_OPT = 41          # EDNS pseudo-record: its "TTL" is extended flags
_MAX_RECORDS = 512     # no DNS message over UDP holds more


def _skip_name(buf: bytes, off: int) -> int:
    """Offset after the (possibly compressed) name at ``off``, or -1.  The
    name is skipped in place, never followed: a compression pointer ends it."""
    end = len(buf)
    for _ in range(128):          # 255 bytes of name: at most 127 labels
        if off >= end:
            return -1
        n = buf[off]
        if n == 0:
            return off + 1
        if n & 0xC0 == 0xC0:
            return off + 2 if off + 2 <= end else -1
        if n & 0xC0:
            return -1             # reserved label types
        off += 1 + n
    return -1


def dns_ttl_spans(l4: bytes) -> list[tuple[int, int]]:
    """The TTL of every resource record of the DNS message in a UDP
    datagram's L4 part (answers, authority and additional records; not the
    EDNS OPT record, whose TTL field holds flags)."""
    buf = l4[_UDP_HEADER:]
    if len(buf) < _DNS_HEADER:
        return []
    qd = int.from_bytes(buf[4:6], "big")
    records = (int.from_bytes(buf[6:8], "big") + int.from_bytes(buf[8:10], "big")
               + int.from_bytes(buf[10:12], "big"))
    off = _DNS_HEADER
    for _ in range(min(qd, _MAX_RECORDS)):
        off = _skip_name(buf, off)
        if off < 0 or off + 4 > len(buf):
            return []
        off += 4                   # type, class
    spans = []
    for _ in range(min(records, _MAX_RECORDS)):
        off = _skip_name(buf, off)
        if off < 0 or off + 10 > len(buf):
            break
        rtype = int.from_bytes(buf[off:off + 2], "big")
        rdlen = int.from_bytes(buf[off + 8:off + 10], "big")
        if rtype != _DNS_OPT:
            spans.append((_UDP_HEADER + off + 4, _UDP_HEADER + off + 8))
        off += 10 + rdlen
        if off > len(buf):
            break
    return spans
