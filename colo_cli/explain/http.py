"""HTTP/1.x messages in a TCP stream: the start line, each header, the body
(RFC 9112), decoded with dpkt.

The message is found around the differing byte: the last start line
(``HTTP/1.1 200 OK``, ``GET / HTTP/1.1``) at or before it, at the start of
a line.  The bytes before the differing one are the same on both sides, so
the message starts at the same place in both.
"""

from __future__ import annotations

import re
from io import BytesIO

import dpkt

from . import Field, compare_fields, difference

PORTS = frozenset((80, 591, 3128, 8000, 8008, 8080, 8081, 8888))
PROTOCOL = "http"

_METHODS = rb"(?:GET|HEAD|POST|PUT|DELETE|CONNECT|OPTIONS|TRACE|PATCH|PROPFIND|REPORT|MKCOL)"
_START = re.compile(rb"(?:HTTP/1\.[01] \d{3}(?: [^\r\n]*)?|" + _METHODS + rb" [^ \r\n]+ HTTP/1\.[01])\r\n")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")


def message_start(window: bytes, at: int) -> int | None:
    """Offset of the start line of the message holding ``window[at]``."""
    best = None
    for m in _START.finditer(window, 0, min(len(window), at + 8192)):
        if m.start() > at:
            break
        if m.start() == 0 or window[m.start() - 1] == 0x0A:
            best = m.start()
    return best


def looks_like(window: bytes, at: int) -> bool:
    return message_start(window, at) is not None


def explain_stream(p: bytes, s: bytes, at: int):
    """The differences around ``at`` (the same offset in both windows), or
    None when no HTTP message holds it."""
    start = message_start(p, at)
    if start is None or message_start(s, at) != start:
        return None
    line_end = p.find(b"\r\n", start)
    kind = "response" if p.startswith(b"HTTP/", start) else "request"
    if at < line_end + 2:
        return compare_fields(_start_line(p, start, kind), _start_line(s, start, kind))
    p_head = p.find(b"\r\n\r\n", start)
    if p_head < 0 or at < p_head + 2:
        return _header(p, s, start, at, kind)
    s_head = s.find(b"\r\n\r\n", start)
    if s_head != p_head:
        return _header(p, s, start, at, kind)
    body = p_head + 4
    where = f"HTTP {kind} body"
    headers = _headers(p[line_end + 2:body])
    length = headers.get("content-length")
    if isinstance(length, str) and length.isdigit():
        where += f" ({int(length):,} bytes)"
    elif headers.get("transfer-encoding"):
        where += f" ({headers['transfer-encoding']})"
    return [difference("body", where, "", p[at:at + 16], s[at:at + 16], offset=at - body)]


def _headers(block: bytes) -> dict:
    """The header block as dpkt parses it (lower-case names), or {}."""
    try:
        return dpkt.http.parse_headers(BytesIO(block))
    except dpkt.UnpackError:
        return {}


def _start_line(window: bytes, start: int, kind: str) -> list[Field]:
    end = window.find(b"\r\n", start)
    line = window[start:end if end >= 0 else len(window)]
    where = f"HTTP {kind} {'status' if kind == 'response' else 'request'} line"
    try:
        if kind == "response":
            m = dpkt.http.Response(line + b"\r\n\r\n")
            return [Field("start_line.version", where, "version", m.version),
                    Field("start_line.status", where, "status", m.status),
                    Field("start_line.reason", where, "reason", m.reason)]
        m = dpkt.http.Request(line + b"\r\n\r\n")
        return [Field("start_line.method", where, "method", m.method),
                Field("start_line.uri", where, "URI", m.uri),
                Field("start_line.version", where, "version", m.version)]
    except (dpkt.UnpackError, dpkt.NeedData, ValueError):
        return [Field("start_line", where, "", line.decode("latin-1"))]


def _header(p: bytes, s: bytes, start: int, at: int, kind: str):
    """The header line holding ``at``: its name, and each side's value."""
    line_start = p.rfind(b"\n", start, at) + 1
    p_line = _line(p, line_start)
    s_line = _line(s, line_start)
    number = p.count(b"\r\n", start, line_start)
    p_name, p_value = _split(p_line)
    s_name, s_value = _split(s_line)
    if p_name is None or s_name is None or p_name.lower() != s_name.lower():
        where = f"HTTP {kind} header line {number}"
        return [difference("headers.line", where, "", p_line.decode("latin-1"),
                           s_line.decode("latin-1"))]
    name = p_name.decode("ascii")
    same = p[start:line_start].lower().count(b"\n" + p_name.lower() + b":")
    path = f"headers.{name}" + (f"[{same}]" if same else "")
    where = f"HTTP {kind} header {name}"
    rule = "http.date" if name.lower() == "date" else f"http.header:{name}"
    return compare_fields([Field(path, where, "", p_value.decode("latin-1"), rule=rule)],
                          [Field(path, where, "", s_value.decode("latin-1"), rule=rule)])


def _line(window: bytes, start: int) -> bytes:
    end = window.find(b"\r\n", start)
    return window[start:end] if end >= 0 else window[start:] + b"..."


def _split(line: bytes):
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        return None, None
    return name, value.strip(b" \t")
