"""Divergences explained in the protocol's own terms.

A miscompare names the first differing byte; a person wants the field:
``DNS answer 1 example.org A: TTL 300 vs 299``.  ``explain(event)`` decodes
the two frames of a ``Miscompare`` (for TCP, the application message around
the differing stream offset) with dpkt, one module per protocol as dpkt has
them, and says which fields differ and their two values.

Theory of operation
-------------------

* Only miscompares are explained, after the comparator has decided: nothing
  here runs for matching traffic, and nothing here changes a decision (the
  field noise rules that do are applied by the core, ``core/noise.py``).
* The protocol is chosen by port first (53 DNS, 123 NTP, 67/68 DHCP, 80 and
  the usual alternatives HTTP, 443 and the usual TLS ports), then by content
  (an HTTP response on port 8080 is still HTTP; a DHCP message carries its
  magic cookie; a TLS record header is recognisable).
* Each protocol module turns a message into an ordered list of ``Field``s
  (a stable path, where it is, what it is called, its value, and the noise
  rule that would hide it); the two lists are compared path by path, in
  wire order, and every field that differs becomes a ``Difference``.  TCP
  protocols (HTTP/1.x, TLS records) look at the stream around the differing
  byte instead: the two sides' bytes before it are the same (the comparator
  verified them), so a message that started in one side's segment started
  there in the other's too.
* Decoding never raises: a message that does not decode on either side is
  not explained (the report keeps its byte view); one that decodes on one
  side only says so.  Any error of a decoder is contained here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

#: differences listed per explanation; the rest are counted
MAX_DIFFERENCES = 8
#: characters of a value shown in prose (JSON has the value whole, or for
#: bytes a snippet from the first differing byte)
_SHOWN_MAX = 72
_SNIPPET_BYTES = 8


@dataclass(frozen=True)
class Field:
    """One decoded field of a message."""
    path: str                 # stable, for JSON and tests: "answers[0].ttl"
    where: str                # its place, for people: "DNS answer 1 example.org A"
    name: str                 # what it is ("TTL"); empty when ``where`` says it
    value: object             # what is compared: int, str, bytes or None
    shown: str | None = None  # how a person reads the value (default: derived)
    rule: str | None = None   # the --ignore rule that hides this field


@dataclass(frozen=True)
class Difference:
    """A field whose two values differ (None: the field is on one side only)."""
    path: str
    where: str
    name: str
    primary: object
    secondary: object
    primary_shown: str
    secondary_shown: str
    rule: str | None = None
    #: bytes values: the offset of the first differing byte within the value
    offset: int | None = None

    @property
    def text(self) -> str:
        what = f"{self.name} " if self.name else ""
        at = f"differs at byte {self.offset:,}: " if self.offset is not None else ""
        return f"{self.where}: {what}{at}{self.primary_shown} vs {self.secondary_shown}"

    def to_json(self) -> dict:
        d = {"field": self.path, "primary": _json_value(self.primary),
             "secondary": _json_value(self.secondary)}
        if self.offset is not None:
            d["offset"] = self.offset
        return d


@dataclass(frozen=True)
class Explanation:
    """What differs, in ``protocol``'s terms: the first difference (in wire
    order) and the others, up to MAX_DIFFERENCES."""
    protocol: str                       # "dns", "http", "ntp", "dhcp", "tls", "icmp", "udp"
    differences: tuple
    more: int = 0                       # differences beyond those listed
    #: the one --ignore rule that would hide every difference, if there is one
    rule: str | None = None

    @property
    def first(self) -> Difference:
        return self.differences[0]

    @property
    def text(self) -> str:
        others = len(self.differences) - 1 + self.more
        tail = f" (and {others:,} more field{'s' if others != 1 else ''})" if others else ""
        return self.first.text + tail

    @property
    def texts(self) -> list[str]:
        """Every listed difference in prose, then how many more there are."""
        lines = [d.text for d in self.differences]
        if self.more:
            lines.append(f"... and {self.more:,} more field{'s' if self.more != 1 else ''}")
        return lines

    def to_json(self) -> dict:
        first = self.first.to_json()
        return {"protocol": self.protocol, **first, "text": self.first.text,
                "rule": self.rule,
                "fields": [d.to_json() for d in self.differences],
                "fields_truncated": bool(self.more)}


def _json_value(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# -- showing values ----------------------------------------------------------

def quote(text: str) -> str:
    """A string as prose shows it: double-quoted, escaped, cut when long."""
    q = json.dumps(text, ensure_ascii=False)
    if len(q) > _SHOWN_MAX:
        q = q[:_SHOWN_MAX - 4] + '..."'
    return q


def _printable(b: bytes) -> bool:
    return all(0x20 <= c < 0x7F or c in (9, 10, 13) for c in b)


def snippet(b: bytes) -> str:
    if b and _printable(b):
        return quote(b.decode("ascii"))
    return b.hex(" ") if b else "(nothing)"


def _shown_pair(p, s) -> tuple[str, str, int | None, object, object]:
    """(primary shown, secondary shown, byte offset, primary value, secondary
    value) for two differing values; bytes are cut to a snippet at their
    first difference."""
    if isinstance(p, (bytes, bytearray)) and isinstance(s, (bytes, bytearray)):
        k = 0
        n = min(len(p), len(s))
        while k < n and p[k] == s[k]:
            k += 1
        ps, ss = bytes(p[k:k + _SNIPPET_BYTES]), bytes(s[k:k + _SNIPPET_BYTES])
        return snippet(ps), snippet(ss), k, ps, ss
    ps, ss = _show(p), _show(s)
    if isinstance(p, str) and isinstance(s, str):
        # a long common prefix is said once: "...20:00:01 GMT"
        k = 0
        n = min(len(p), len(s))
        while k < n and p[k] == s[k]:
            k += 1
        if k > 16:
            cut = max(p.rfind(" ", 0, k), p.rfind(",", 0, k)) + 1 or k
            if cut > 8:
                ss = quote("\u2026" + s[cut:]).replace("\u2026", "...")
    return ps, ss, None, p, s


def _show(value) -> str:
    if value is None:
        return "(absent)"
    if isinstance(value, bool):
        return "set" if value else "not set"
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, (bytes, bytearray)):
        return snippet(bytes(value[:_SNIPPET_BYTES]))
    return str(value)


def compare_fields(p_fields: list, s_fields: list) -> list[Difference]:
    """Every field that differs, in the primary's wire order, then fields
    only the secondary has."""
    s_by_path = {f.path: f for f in s_fields}
    p_paths = set()
    out = []
    for f in p_fields:
        p_paths.add(f.path)
        g = s_by_path.get(f.path)
        if g is None:
            out.append(_difference(f, f.value, None, f.shown, None))
        elif f.value != g.value:
            out.append(_difference(f, f.value, g.value, f.shown, g.shown))
    for g in s_fields:
        if g.path not in p_paths:
            out.append(_difference(g, None, g.value, None, g.shown))
    return out


def difference(path: str, where: str, name: str, p, s, rule: str | None = None,
               offset: int | None = None) -> Difference:
    """A Difference of two raw values (strings, or bytes cut to a snippet;
    ``offset`` says where the snippets start, when the caller cut them)."""
    ps, ss, k, pv, sv = _shown_pair(p, s)
    if offset is not None:
        k = offset if not k else offset + k
    return Difference(path, where, name, pv, sv, ps, ss, rule, k)


def _difference(f: Field, p, s, p_shown, s_shown) -> Difference:
    ps, ss, offset, pv, sv = _shown_pair(p, s)
    if offset is None:
        # a field's own way of showing itself, when it has one
        ps = p_shown if p_shown is not None and p is not None else ps
        ss = s_shown if s_shown is not None and s is not None else ss
    return Difference(f.path, f.where, f.name, pv, sv, ps, ss, f.rule, offset)


def explanation(protocol: str, differences: list) -> Explanation | None:
    if not differences:
        return None
    rules = {d.rule for d in differences}
    rule = rules.pop() if len(rules) == 1 else None
    listed = tuple(differences[:MAX_DIFFERENCES])
    return Explanation(protocol, listed, len(differences) - len(listed), rule)


def one_side(protocol: str, where: str, p_error: str | None, s_error: str | None) -> Explanation:
    """A message that decodes on one side only."""
    p = "does not decode: " + p_error if p_error else "decodes"
    s = "does not decode: " + s_error if s_error else "decodes"
    return Explanation(protocol, (Difference("message", where, "", p, s, p, s),))


# -- choosing the protocol ------------------------------------------------------

def explain(event) -> Explanation | None:
    """The explanation of a ``Miscompare``, or None (no protocol known, a
    message that decodes on neither side, a difference no field shows).
    Never raises."""
    try:
        return _explain(event)
    except Exception:   # noqa: BLE001 - a decoder's bug must not cost the report
        return None


def _explain(event):
    p, s = event.primary, event.secondary
    if p is None or s is None or event.cause not in ("content", "length"):
        return None
    if event.kind == "udp":
        from .udp import explain_udp
        return explain_udp(event, p, s)
    if event.kind == "icmp":
        from .icmp import explain_icmp
        return explain_icmp(event, p, s)
    if event.kind == "tcp":
        from .tcp import explain_tcp
        return explain_tcp(event, p, s)
    return None


__all__ = ["Field", "Difference", "Explanation", "explain", "compare_fields", "difference",
           "explanation", "one_side", "snippet", "MAX_DIFFERENCES"]
