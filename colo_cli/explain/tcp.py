"""TCP: the application message around the differing stream offset (HTTP/1.x,
TLS records), chosen by port and then by content.

The comparator reports the two segments that hold the first differing byte.
Their starts may differ (the replicas cut their streams differently), but
what precedes the differing byte is the same on both sides: so the later
segment is extended back with the earlier one's bytes, and both windows
then start at the same stream offset.
"""

from __future__ import annotations

from ..core import ports_of
from . import Explanation, explanation, http, tls


def windows(event, p, s):
    """(primary window, secondary window, offset of the differing byte in
    both), or None."""
    pa = p.data[p.cmp_off:p.cmp_end]
    sa = s.data[s.cmp_off:s.cmp_end]
    p_at = event.primary_offset - p.cmp_off
    s_at = event.secondary_offset - s.cmp_off
    if not (0 <= p_at < len(pa) and 0 <= s_at < len(sa)):
        return None
    if s_at > p_at:
        pa = sa[:s_at - p_at] + pa
    elif p_at > s_at:
        sa = pa[:p_at - s_at] + sa
    return bytes(pa), bytes(sa), max(p_at, s_at)


def explain_tcp(event, p, s) -> Explanation | None:
    found = windows(event, p, s)
    if found is None or event.stream_offset is None:
        return None
    pw, sw, at = found
    ports = set(ports_of(event.key))
    candidates = []
    if http.PORTS & ports or http.looks_like(pw, at):
        candidates.append(http)
    if tls.PORTS & ports or tls.looks_like(pw, at):
        candidates.append(tls)
    for module in candidates:
        if module is tls:
            diffs = tls.explain_stream(pw, sw, at, event.stream_offset)
        else:
            diffs = module.explain_stream(pw, sw, at)
        if diffs:
            return explanation(module.PROTOCOL, diffs)
    return None
