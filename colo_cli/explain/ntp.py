"""NTP messages (RFC 5905) as fields, decoded with dpkt: leap indicator,
version, mode, stratum, poll, precision, root delay and dispersion,
reference ID, and the four timestamps (which ``--ignore ntp.timestamps``
hides)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dpkt

from . import Field

PORTS = frozenset((123,))
PROTOCOL = "ntp"

_EPOCH = datetime(1900, 1, 1, tzinfo=timezone.utc)
_MODES = {1: "symmetric active", 2: "symmetric passive", 3: "client", 4: "server",
          5: "broadcast", 6: "control", 7: "private"}
_TIMESTAMPS = (("update_time", "reference_timestamp", "reference timestamp"),
               ("originate_time", "origin_timestamp", "origin timestamp"),
               ("receive_time", "receive_timestamp", "receive timestamp"),
               ("transmit_time", "transmit_timestamp", "transmit timestamp"))


def looks_like(payload: bytes) -> bool:
    """48 bytes or more, version 1 to 4, a mode from client to broadcast."""
    if len(payload) < 48:
        return False
    version, mode = (payload[0] >> 3) & 7, payload[0] & 7
    return 1 <= version <= 4 and 1 <= mode <= 5


def timestamp_text(raw: bytes) -> str:
    """An NTP timestamp (32.32 fixed point, seconds since 1900) in UTC."""
    value = int.from_bytes(raw, "big")
    if not value:
        return "0 (unset)"
    seconds = value / 2**32
    when = _EPOCH + timedelta(seconds=seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def fields(payload: bytes) -> list[Field]:
    if len(payload) < 48:
        raise dpkt.NeedData("NTP message")
    m = dpkt.ntp.NTP(payload)
    w = "NTP"
    out = [Field("leap", w, "leap indicator", m.li),
           Field("version", w, "version", m.v),
           Field("mode", w, "mode", m.mode, _MODES.get(m.mode, str(m.mode))),
           Field("stratum", w, "stratum", m.stratum),
           Field("poll", w, "poll", m.interval),
           Field("precision", w, "precision", m.precision),
           Field("root_delay", w, "root delay", m.delay, f"{m.delay / 65536:.6f} s"),
           Field("root_dispersion", w, "root dispersion", m.dispersion,
                 f"{m.dispersion / 65536:.6f} s"),
           Field("reference_id", w, "reference ID", bytes(m.id).hex(), _ref_id(bytes(m.id), m.stratum))]
    for attr, path, name in _TIMESTAMPS:
        raw = bytes(getattr(m, attr))
        text = timestamp_text(raw)
        out.append(Field(path, w, name, text, text, rule="ntp.timestamps"))
    if m.data:
        out.append(Field("extensions", w, "extension fields and MAC", bytes(m.data)))
    return out


def _ref_id(raw: bytes, stratum: int) -> str:
    if stratum <= 1 and all(0x20 <= c < 0x7F or c == 0 for c in raw):
        return '"' + raw.rstrip(b"\0").decode("ascii") + '"'
    return ".".join(str(b) for b in raw)
