"""DNS messages (RFC 1035) as fields: the header, each question and each
resource record (name, type, class, TTL, data), decoded with dpkt.

dpkt's ``DNS`` refuses a whole message for one record type it does not
know (an HTTPS or CAA answer); here the message is walked record by record
with dpkt's own name and record decoders, and a record dpkt cannot decode
keeps its data as bytes.
"""

from __future__ import annotations

import ipaddress
import struct

import dpkt

from . import Field

PORTS = frozenset((53, 5353, 5355))      # DNS, mDNS, LLMNR
PROTOCOL = "dns"

_TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 13: "HINFO", 15: "MX", 16: "TXT",
          28: "AAAA", 33: "SRV", 35: "NAPTR", 39: "DNAME", 41: "OPT", 43: "DS", 46: "RRSIG",
          47: "NSEC", 48: "DNSKEY", 64: "SVCB", 65: "HTTPS", 255: "ANY", 257: "CAA"}
_CLASSES = {1: "IN", 3: "CH", 4: "HS", 255: "ANY"}
_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
_SECTIONS = (("answers", "answer"), ("authority", "authority record"),
             ("additional", "additional record"))
_MAX_RECORDS = 512


def type_name(t: int) -> str:
    return _TYPES.get(t, f"TYPE{t}")


def looks_like(payload: bytes) -> bool:
    """A DNS message by content: one question, a known opcode, and a walk
    that ends exactly at the end of the payload."""
    if len(payload) < 17:
        return False
    qd = struct.unpack_from(">H", payload, 4)[0]
    opcode = (payload[2] >> 3) & 0xF
    if qd != 1 or opcode not in (0, 1, 2, 4, 5):
        return False
    try:
        _, end = _walk(payload)
    except Exception:   # noqa: BLE001 - not DNS, then
        return False
    return end == len(payload)


def fields(payload: bytes) -> list[Field]:
    items, _end = _walk(payload)
    return items


def _walk(buf: bytes):
    if len(buf) < 12:
        raise dpkt.NeedData("DNS header")
    ident, op, qd, an, ns, ar = struct.unpack_from(">HHHHHH", buf, 0)
    h = "DNS header"
    qr = "response" if op & 0x8000 else "query"
    out = [Field("id", h, "ID", ident, f"0x{ident:04x}", rule="dns.id"),
           Field("flags.qr", h, "QR", qr, qr),
           Field("flags.opcode", h, "opcode", (op >> 11) & 0xF),
           Field("flags.aa", h, "AA", bool(op & 0x0400)),
           Field("flags.tc", h, "TC", bool(op & 0x0200)),
           Field("flags.rd", h, "RD", bool(op & 0x0100)),
           Field("flags.ra", h, "RA", bool(op & 0x0080)),
           Field("flags.z", h, "Z", (op >> 4) & 0x7),
           Field("flags.rcode", h, "rcode", op & 0xF, _RCODES.get(op & 0xF, str(op & 0xF))),
           Field("counts.questions", h, "questions", qd),
           Field("counts.answers", h, "answers", an),
           Field("counts.authority", h, "authority records", ns),
           Field("counts.additional", h, "additional records", ar)]
    off = 12
    for i in range(min(qd, _MAX_RECORDS)):
        name, off = dpkt.dns.unpack_name(buf, off)
        if off + 4 > len(buf):
            raise dpkt.NeedData("DNS question")
        qtype, qcls = struct.unpack_from(">HH", buf, off)
        off += 4
        where = f"DNS question {i + 1} {name or '.'} {type_name(qtype)}"
        path = f"questions[{i}]"
        out += [Field(path + ".name", where, "name", name),
                Field(path + ".type", where, "type", qtype, type_name(qtype)),
                Field(path + ".class", where, "class", qcls, _CLASSES.get(qcls, f"CLASS{qcls}"))]
    for (section, label), count in zip(_SECTIONS, (an, ns, ar)):
        for i in range(min(count, _MAX_RECORDS)):
            rr_fields, off = _record(buf, off, f"{section}[{i}]", f"DNS {label} {i + 1}")
            out += rr_fields
    return out, off


def _record(buf: bytes, off: int, path: str, label: str):
    name, off = dpkt.dns.unpack_name(buf, off)
    if off + 10 > len(buf):
        raise dpkt.NeedData("DNS record")
    rtype, rcls, ttl, rdlen = struct.unpack_from(">HHIH", buf, off)
    off += 10
    if off + rdlen > len(buf):
        raise dpkt.NeedData("DNS record data")
    where = f"{label} {name or '.'} {type_name(rtype)}"
    if rtype == 41:
        # EDNS: the class is the UDP payload size and the TTL the extended
        # rcode, version and flags (RFC 6891), not a time to live
        out = [Field(path + ".type", where, "type", rtype, "OPT"),
               Field(path + ".udp_size", where, "UDP payload size", rcls),
               Field(path + ".edns_flags", where, "extended rcode and flags", ttl, f"0x{ttl:08x}"),
               Field(path + ".data", where, "options", buf[off:off + rdlen])]
        return out, off + rdlen
    out = [Field(path + ".name", where, "name", name),
           Field(path + ".type", where, "type", rtype, type_name(rtype)),
           Field(path + ".class", where, "class", rcls, _CLASSES.get(rcls, f"CLASS{rcls}")),
           Field(path + ".ttl", where, "TTL", ttl, rule="dns.ttl"),
           _data(buf, off, rdlen, rtype, path, where)]
    return out, off + rdlen


def _data(buf: bytes, off: int, rdlen: int, rtype: int, path: str, where: str) -> Field:
    """A record's data as dpkt decodes it (an address, a name...), or its
    bytes when dpkt does not know the type."""
    rr = dpkt.dns.DNS.RR()
    rr.type = rtype
    rr.rdata = buf[off:off + rdlen]
    try:
        rr.unpack_rdata(buf, off)
    except (dpkt.UnpackError, dpkt.NeedData, struct.error, IndexError, ValueError,
            UnicodeDecodeError):
        return Field(path + ".data", where, "data", rr.rdata)
    if rtype == 1 and rdlen == 4:
        value = str(ipaddress.IPv4Address(rr.rdata))
    elif rtype == 28 and rdlen == 16:
        value = str(ipaddress.IPv6Address(rr.rdata))
    elif rtype == 2:
        value = rr.nsname
    elif rtype == 5:
        value = rr.cname
    elif rtype == 12:
        value = rr.ptrname
    elif rtype == 15:
        value = f"{rr.preference[0]} {rr.mxname}"
    elif rtype in (16, 13):
        value = " ".join(rr.text)
    elif rtype == 6:
        value = (f"{rr.mname} {rr.rname} {rr.serial} {rr.refresh} {rr.retry} "
                 f"{rr.expire} {rr.minimum}")
    elif rtype == 33:
        value = f"{rr.priority} {rr.weight} {rr.port} {rr.srvname}"
    else:
        return Field(path + ".data", where, "data", rr.rdata)
    return Field(path + ".data", where, "data", value)
