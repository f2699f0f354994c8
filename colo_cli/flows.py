"""Flows and connections as people and JSON see them: the one-line form of a
connection key (``tcp 10.0.0.1:40000 > 10.0.0.2:80 vlan 5``), the dict form
of reports and the control socket, and a connection's summary.

Presentation, so it lives with the adapters and renderers, not in the
core: the core only builds keys (``core.packet.parse``) and counts."""

from __future__ import annotations

import ipaddress
from typing import Any

from .core import fragment_context

#: the ports field of a key for a protocol without ports
ZERO_PORTS = b"\0\0\0\0"

_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 47: "gre", 50: "esp",
                51: "ah", 58: "icmpv6", 59: "none", 132: "sctp", 136: "udplite",
                2: "igmp", 89: "ospf", 103: "pim", 112: "vrrp"}


def proto_name(proto: int) -> str:
    return _PROTO_NAMES.get(proto, f"ip-proto-{proto}")


def describe_key(key: bytes) -> dict:
    """A connection key as a dict for humans and JSON: protocol, src, dst,
    ports (when the protocol has them) and VLAN ids."""
    try:
        return _describe_key(key)
    except (IndexError, ValueError):
        return {"protocol": "unknown", "key": key.hex()}


def _vlan_ids(tags: bytes) -> list[int]:
    """VLAN ids from the raw 4-byte tags (TPID, TCI) kept in a key."""
    return [int.from_bytes(tags[i + 2:i + 4], "big") & 0x0FFF
            for i in range(0, len(tags) - 3, 4)]


def _describe_key(key: bytes) -> dict:
    """Keys end in their kind: b"4"/b"6" (IP: addresses, ports, protocol,
    tags) or b"a" (ARP: address length, sender and target, tags); a
    reassembly key starts with b"F"."""
    if key[:1] == b"F":
        version, tags, addrs = fragment_context(key)
        alen = len(addrs) // 2
        mk = ipaddress.IPv6Address if version == b"6" else ipaddress.IPv4Address
        rest = key[3 + len(tags) + 2 * alen:]
        return {"protocol": proto_name(rest[-1]) + "-fragment", "src": str(mk(addrs[:alen])),
                "dst": str(mk(addrs[alen:])), "vlan": _vlan_ids(tags),
                "ip_id": int.from_bytes(rest[:-1], "big")}
    kind = key[-1:]
    if kind in (b"4", b"6"):
        alen = 16 if kind == b"6" else 4
        mk = ipaddress.IPv6Address if kind == b"6" else ipaddress.IPv4Address
        ports = key[2 * alen:2 * alen + 4]
        proto = key[2 * alen + 4]
        out: dict[str, Any] = {"protocol": proto_name(proto), "src": str(mk(key[:alen])),
               "dst": str(mk(key[alen:2 * alen])), "vlan": _vlan_ids(key[2 * alen + 5:-1])}
        if proto in (1, 58) and ports != ZERO_PORTS:
            out["echo_id"] = int.from_bytes(ports[2:], "big")
        if proto in (6, 17, 33, 132, 136):
            out["sport"] = int.from_bytes(ports[:2], "big")
            out["dport"] = int.from_bytes(ports[2:], "big")
        return out
    if kind == b"a":
        plen = key[0]
        spa_raw, tpa_raw = key[1:1 + plen], key[1 + plen:1 + 2 * plen]
        vlans = _vlan_ids(key[1 + 2 * plen:-1])
        if plen == 4:
            spa, tpa = str(ipaddress.IPv4Address(spa_raw)), str(ipaddress.IPv4Address(tpa_raw))
        else:
            spa, tpa = spa_raw.hex(), tpa_raw.hex()
        return {"protocol": "arp", "src": spa, "dst": tpa, "vlan": vlans}
    return {"protocol": "unknown", "key": key.hex()}


def format_key(key: bytes) -> str:
    """One-line form: ``tcp 10.0.0.1:40000 > 10.0.0.2:80 vlan 5``."""
    d = describe_key(key)
    if "src" not in d:
        return f"{d['protocol']} {d.get('key', '')}".strip()
    src, dst = d["src"], d["dst"]
    if ":" in src and "sport" in d:
        src, dst = f"[{src}]", f"[{dst}]"
    if "sport" in d:
        src, dst = f"{src}:{d['sport']}", f"{dst}:{d['dport']}"
    text = f"{d['protocol']} {src} > {dst}"
    if "echo_id" in d:
        text += f" id {d['echo_id']}"
    if d.get("vlan"):
        text += " vlan " + ".".join(str(v) for v in d["vlan"])
    return text


def connection_summary(conn) -> dict:
    """A connection of the core's table (``Comparator.connections``,
    ``top_connections``) as a dict for JSON and the control socket."""
    d = {"flow": format_key(conn.key), **describe_key(conn.key),
         "queued_primary": conn.queued_primary, "queued_secondary": conn.queued_secondary,
         "diverged": conn.diverged, "miscompares": conn.miscompares,
         "released": conn.released,
         "hold_mean_ms": round(conn.hold_sum_ms / conn.released, 3) if conn.released else 0.0,
         "hold_max_ms": round(conn.hold_max_ms, 3)}
    if conn.tcp is not None:
        d["stream_offset"] = conn.tcp.stream_offset()
    return d
