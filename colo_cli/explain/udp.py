"""UDP datagrams: the checksum alone, or the application message (DNS, NTP,
DHCP), chosen by port and then by content."""

from __future__ import annotations

import struct

from ..core import ports_of
from . import Difference, Explanation, compare_fields, dhcp, dns, explanation, ntp, one_side

PROTOCOLS = (dns, ntp, dhcp)


def explain_udp(event, p, s) -> Explanation | None:
    a = p.data[p.cmp_off:p.cmp_end]
    b = s.data[s.cmp_off:s.cmp_end]
    if len(a) < 8 or len(b) < 8:
        return None
    if a[:6] == b[:6] and a[8:] == b[8:] and a[6:8] != b[6:8]:
        pc, sc = struct.unpack_from(">H", a, 6)[0], struct.unpack_from(">H", b, 6)[0]
        return Explanation("udp", (Difference("checksum", "UDP", "checksum", pc, sc,
                                              f"0x{pc:04x}", f"0x{sc:04x}", "udp.checksum"),),
                           rule="udp.checksum")
    pa, pb = a[8:], b[8:]
    ports = set(ports_of(event.key))
    by_port = [m for m in PROTOCOLS if m.PORTS & ports]
    by_content = [m for m in PROTOCOLS if m not in by_port and m.looks_like(pa) and m.looks_like(pb)]
    for module in by_port + by_content:
        result = decode_pair(module, pa, pb)
        if result is not None:
            return result
    return None


def decode_pair(module, a: bytes, b: bytes) -> Explanation | None:
    """Both payloads as ``module`` decodes them, compared."""
    decoded, errors = [], []
    for payload in (a, b):
        try:
            decoded.append(module.fields(payload))
            errors.append(None)
        except Exception as e:   # noqa: BLE001 - dpkt raises many kinds on bad input
            decoded.append(None)
            errors.append(str(e) or type(e).__name__)
    if decoded[0] is None and decoded[1] is None:
        return None
    if decoded[0] is None or decoded[1] is None:
        return one_side(module.PROTOCOL, module.PROTOCOL.upper(), errors[0], errors[1])
    return explanation(module.PROTOCOL, compare_fields(*decoded))
