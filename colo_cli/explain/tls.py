"""TLS records in a TCP stream (RFC 8446 5.1): content type, version and
length, decoded with dpkt; their data is encrypted, so a difference there is
shown as bytes.

Records are read from the start of the segments around the differing byte;
that start is a record boundary when the record headers chain through to
it (checked: every header must be a plausible one), which is how TLS stacks
usually cut their output.
"""

from __future__ import annotations

import struct

import dpkt

from . import Field, compare_fields

PORTS = frozenset((443, 465, 636, 853, 989, 990, 992, 993, 994, 995, 5061, 8443))
PROTOCOL = "tls"

_TYPES = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data",
          24: "heartbeat"}
_VERSIONS = {0x0300: "SSL 3.0", 0x0301: "TLS 1.0", 0x0302: "TLS 1.1", 0x0303: "TLS 1.2",
             0x0304: "TLS 1.3"}
_MAX_RECORD = 16384 + 2048


def _header(window: bytes, off: int):
    ctype, version, length = struct.unpack_from(">BHH", window, off)
    if ctype not in _TYPES or version not in _VERSIONS or length > _MAX_RECORD:
        return None
    return ctype, version, length


def record_at(window: bytes, at: int):
    """(start, index) of the record holding ``window[at]``, reading records
    from the window's start, or None when the window does not start at a
    record boundary as far as can be told."""
    off = index = 0
    while off + 5 <= len(window):
        head = _header(window, off)
        if head is None:
            return None
        end = off + 5 + head[2]
        if at < end:
            return off, index
        off, index = end, index + 1
    return None


def looks_like(window: bytes, at: int) -> bool:
    return record_at(window, at) is not None


def _fields(window: bytes, start: int, stream_start: int) -> list[Field]:
    try:
        record = dpkt.ssl.TLSRecord(window[start:])
        ctype, version, length, data = record.type, record.version, record.length, record.data
    except dpkt.NeedData:
        # the record goes on past these segments: its header is whole
        ctype, version, length = struct.unpack_from(">BHH", window, start)
        data = window[start + 5:]
    where = f"TLS {_TYPES.get(ctype, ctype)} record at stream offset {stream_start:,}"
    return [Field("record.content_type", where, "content type", ctype,
                  f"{ctype} ({_TYPES[ctype]})" if ctype in _TYPES else None),
            Field("record.version", where, "version", version,
                  _VERSIONS.get(version, f"0x{version:04x}")),
            Field("record.length", where, "length", length),
            Field("record.data", where, "data", bytes(data))]


def explain_stream(p: bytes, s: bytes, at: int, stream_at: int):
    found = record_at(p, at)
    if found is None:
        return None
    start, _index = found
    stream_start = stream_at - (at - start)
    if len(s) < start + 5 or _header(s, start) is None:
        s_fields = [Field("record.content_type", "TLS", "content type", None)]
    else:
        s_fields = _fields(s, start, stream_start)
    return compare_fields(_fields(p, start, stream_start), s_fields)
