"""DHCP (BOOTP) messages (RFC 2131, 2132) as fields, decoded with dpkt: the
fixed header (op, xid, addresses, client hardware address, server name,
boot file) and each option."""

from __future__ import annotations

import ipaddress

import dpkt

from . import Field

PORTS = frozenset((67, 68))
PROTOCOL = "dhcp"

_MAGIC = b"\x63\x82\x53\x63"
_MESSAGE_TYPES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK",
                  6: "NAK", 7: "RELEASE", 8: "INFORM"}
_OPTIONS = {1: "subnet mask", 3: "router", 6: "DNS servers", 12: "host name",
            15: "domain name", 28: "broadcast address", 42: "NTP servers",
            50: "requested address", 51: "lease time", 53: "message type",
            54: "server identifier", 55: "parameter request list", 58: "renewal time",
            59: "rebinding time", 60: "vendor class", 61: "client identifier",
            81: "client FQDN", 119: "domain search"}
_ADDRESS_OPTIONS = frozenset((1, 3, 6, 28, 42, 50, 54))
_SECONDS_OPTIONS = frozenset((51, 58, 59))
_TEXT_OPTIONS = frozenset((12, 15, 60))


def looks_like(payload: bytes) -> bool:
    return len(payload) >= 240 and payload[236:240] == _MAGIC and payload[0] in (1, 2)


def _addr(n: int) -> str:
    return str(ipaddress.IPv4Address(n))


def fields(payload: bytes) -> list[Field]:
    if len(payload) < 240:
        raise dpkt.NeedData("DHCP message")
    m = dpkt.dhcp.DHCP(payload)
    w = "DHCP"
    out = [Field("op", w, "op", m.op, {1: "request", 2: "reply"}.get(m.op, str(m.op))),
           Field("htype", w, "hardware type", m.hrd),
           Field("hops", w, "hops", m.hops),
           Field("xid", w, "transaction ID", m.xid, f"0x{m.xid:08x}"),
           Field("secs", w, "seconds", m.secs),
           Field("flags", w, "flags", m.flags, f"0x{m.flags:04x}"),
           Field("ciaddr", w, "client address", _addr(m.ciaddr)),
           Field("yiaddr", w, "your address", _addr(m.yiaddr)),
           Field("siaddr", w, "next server", _addr(m.siaddr)),
           Field("giaddr", w, "relay agent", _addr(m.giaddr)),
           Field("chaddr", w, "client hardware address", bytes(m.chaddr).hex(":")),
           Field("sname", w, "server name", bytes(m.sname).rstrip(b"\0").decode("latin-1")),
           Field("file", w, "boot file", bytes(m.file).rstrip(b"\0").decode("latin-1"))]
    seen: dict[int, int] = {}
    for code, data in m.opts:
        k = seen.get(code, 0)
        seen[code] = k + 1
        path = f"options.{code}" + (f"[{k}]" if k else "")
        where = f"DHCP option {code}" + (f" ({_OPTIONS[code]})" if code in _OPTIONS else "")
        out.append(Field(path, where, "", *_option_value(code, bytes(data))))
    return out


def _option_value(code: int, data: bytes):
    """(value, shown) of an option."""
    if code == 53 and len(data) == 1:
        return data[0], _MESSAGE_TYPES.get(data[0], str(data[0]))
    if code in _ADDRESS_OPTIONS and data and len(data) % 4 == 0:
        text = " ".join(str(ipaddress.IPv4Address(data[i:i + 4])) for i in range(0, len(data), 4))
        return text, text
    if code in _SECONDS_OPTIONS and len(data) == 4:
        n = int.from_bytes(data, "big")
        return n, f"{n:,} s"
    if code in _TEXT_OPTIONS and all(0x20 <= c < 0x7F for c in data):
        text = data.decode("ascii")
        return text, None
    return data, None
