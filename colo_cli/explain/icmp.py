"""ICMP and ICMPv6 messages as fields, decoded with dpkt: type, code,
checksum, an echo's identifier and sequence number, and the rest (an echo's
data, an error's quoted datagram)."""

from __future__ import annotations

import dpkt

from . import Explanation, Field, compare_fields, explanation, one_side

PROTOCOL = "icmp"

_V4_TYPES = {0: "echo reply", 3: "destination unreachable", 4: "source quench", 5: "redirect",
             8: "echo request", 11: "time exceeded", 12: "parameter problem",
             13: "timestamp", 14: "timestamp reply"}
_V6_TYPES = {1: "destination unreachable", 2: "packet too big", 3: "time exceeded",
             4: "parameter problem", 128: "echo request", 129: "echo reply",
             133: "router solicitation", 134: "router advertisement",
             135: "neighbor solicitation", 136: "neighbor advertisement"}


def fields(message: bytes, v6: bool) -> list[Field]:
    if len(message) < 4:
        raise dpkt.NeedData("ICMP header")
    m = dpkt.icmp6.ICMP6(message) if v6 else dpkt.icmp.ICMP(message)
    name = "ICMPv6" if v6 else "ICMP"
    types = _V6_TYPES if v6 else _V4_TYPES
    out = [Field("type", name, "type", m.type, f"{m.type} ({types[m.type]})" if m.type in types else None),
           Field("code", name, "code", m.code),
           Field("checksum", name, "checksum", m.sum, f"0x{m.sum:04x}", rule="icmp.checksum")]
    echo = m.type in ((128, 129) if v6 else (0, 8))
    if echo and len(message) >= 8:
        where = f"{name} {types[m.type]}"
        out += [Field("echo.id", where, "identifier", m.data.id),
                Field("echo.seq", where, "sequence number", m.data.seq),
                Field("data", where, "data", message[8:])]
    else:
        out.append(Field("body", name, "message body", message[4:]))
    return out


def explain_icmp(event, p, s) -> Explanation | None:
    a = p.data[p.cmp_off:p.cmp_end]
    b = s.data[s.cmp_off:s.cmp_end]
    v6 = event.key[-1:] == b"6"
    errors = []
    decoded = []
    for msg in (a, b):
        try:
            decoded.append(fields(msg, v6))
            errors.append(None)
        except (dpkt.UnpackError, dpkt.NeedData) as e:
            decoded.append(None)
            errors.append(str(e) or type(e).__name__)
    if decoded[0] is None and decoded[1] is None:
        return None
    if decoded[0] is None or decoded[1] is None:
        return one_side(PROTOCOL, "ICMPv6" if v6 else "ICMP", errors[0], errors[1])
    diffs = compare_fields(*decoded)
    content = [d for d in diffs if d.path != "checksum"]
    # the checksum covers the rest: a changed checksum is news only alone
    return explanation(PROTOCOL, content or diffs)
