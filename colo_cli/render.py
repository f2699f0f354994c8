"""Presentation: the human report, side-by-side hexdumps, JSON documents.

The only module that imports rich.  Colour only on a terminal (or when
asked); without a terminal the same report is plain text.
"""

from __future__ import annotations

import sys

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from .core.packet import describe_key, format_key

#: version of the JSON documents (replay report, serve events, stats).
JSON_VERSION = 1

_BYTES_PER_LINE = 16
_HEADER_LINES = 4          # always show the first 64 bytes: Ethernet, IP, L4 headers
_CONTEXT_LINES = 2         # and this many lines either side of the first difference


def make_console(file=None, color: str = "auto") -> Console:
    """A console for results (stdout) or diagnostics (stderr).  ``color`` is
    auto (colour on a terminal), always or never."""
    file = file or sys.stdout
    tty = hasattr(file, "isatty") and file.isatty()
    use_color = color == "always" or (color == "auto" and tty)
    return Console(file=file, force_terminal=use_color or None, no_color=not use_color,
                   color_system="auto" if use_color else None, highlight=False,
                   soft_wrap=True, width=None if tty else 200, emoji=False)


def _table(console: Console, *headers, title=None) -> Table:
    styled = console.color_system is not None
    t = Table(*headers, box=box.SIMPLE_HEAD if styled else None, title=title,
              show_edge=False, pad_edge=False, header_style="bold" if styled else "",
              title_justify="left", title_style="bold" if styled else "")
    return t


def fmt_count(n) -> str:
    return f"{n:,}"


def fmt_ms(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.3f} s"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.3f} ms"


def breakdown(counter) -> str:
    """``a 2, b 1`` from a dict of counts, largest first."""
    items = sorted(((k, v) for k, v in dict(counter).items() if v), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{k} {v:,}" for k, v in items)


# -- hexdumps --------------------------------------------------------------------

def _line_starts(length: int, mark: int) -> list[int]:
    """Offsets of the 16-byte lines to show: the headers, then the lines
    around ``mark``."""
    lines = set(range(0, min(length, _HEADER_LINES * _BYTES_PER_LINE), _BYTES_PER_LINE))
    if mark >= 0:
        centre = mark - mark % _BYTES_PER_LINE
        for k in range(-_CONTEXT_LINES, _CONTEXT_LINES + 1):
            start = centre + k * _BYTES_PER_LINE
            if 0 <= start < length:
                lines.add(start)
    return sorted(lines)


def hexdump_pair(p_frame: bytes | None, s_frame: bytes | None, p_mark: int, s_mark: int,
                 color: bool) -> list:
    """Side-by-side hexdump lines (rich ``Text``) of two frames.

    Each side shows its own offsets: the headers, and the lines around its
    first differing byte (``p_mark``/``s_mark``, or -1).  Bytes that differ
    from the other side, aligned at the first difference, are highlighted;
    without colour a caret line marks them.
    """
    p_frame = p_frame or b""
    s_frame = s_frame or b""
    p_lines = _line_starts(len(p_frame), p_mark)
    s_lines = _line_starts(len(s_frame), s_mark)
    rows = []
    width = 6 + 3 * _BYTES_PER_LINE

    def differs(side_frame, other_frame, mark, other_mark, i):
        if mark < 0 or i < mark:
            return False
        j = other_mark + (i - mark)
        if other_mark < 0 or j >= len(other_frame):
            return True
        return side_frame[i] != other_frame[j]

    def render(frame, starts, idx, mark, other, other_mark, prev):
        text = Text()
        carets = [" "] * width
        has_caret = False
        if idx >= len(starts):
            text.append(" " * width)
            return text, "".join(carets), False, prev
        start = starts[idx]
        text.append(f"{start:04x}  ", style="dim" if color else "")
        for k in range(_BYTES_PER_LINE):
            i = start + k
            if i < len(frame):
                diff = differs(frame, other, mark, other_mark, i)
                style = ("bold red" if i == mark else "red") if (diff and color) else ""
                text.append(f"{frame[i]:02x}", style=style)
                if diff:
                    pos = 6 + 3 * k
                    carets[pos] = carets[pos + 1] = "^"
                    has_caret = True
            else:
                text.append("  ")
            text.append(" ")
        return text, "".join(carets), has_caret, start

    n = max(len(p_lines), len(s_lines))
    p_prev = s_prev = None
    for idx in range(n):
        p_gap = idx < len(p_lines) and p_prev is not None and p_lines[idx] != p_prev + _BYTES_PER_LINE
        s_gap = idx < len(s_lines) and s_prev is not None and s_lines[idx] != s_prev + _BYTES_PER_LINE
        if p_gap or s_gap:
            rows.append(Text("  ..." + " " * (width - 5) + " |  ..."))
        pt, pc, ph, p_prev = render(p_frame, p_lines, idx, p_mark, s_frame, s_mark, p_prev)
        st, sc, sh, s_prev = render(s_frame, s_lines, idx, s_mark, p_frame, p_mark, s_prev)
        row = Text()
        row.append_text(pt)
        row.append("|  ")
        row.append_text(st)
        rows.append(row)
        if (ph or sh) and not color:
            rows.append(Text((pc + "   " + sc).rstrip()))
    return rows


def miscompare_title(number: int, total: int, rec) -> str:
    e = rec.event
    where = _where(e)
    return (f"Miscompare {number} of {total:,} at {fmt_ms(rec.time_ms)}: {rec.flow}: "
            f"{_cause_text(e.cause)} {where}")


def _cause_text(cause: str) -> str:
    return {"content": "content differs", "length": "lengths differ",
            "stream-end": "one side ended the stream"}.get(cause, cause)


def _where(e) -> str:
    if e.kind == "tcp":
        off = "?" if e.stream_offset is None else f"{e.stream_offset:,}"
        return f"at stream offset {off} (seq {e.raw_seq})"
    return f"in datagram {e.datagram_index:,} at byte {e.stream_offset} of the {e.kind} part"


def print_hexdump(console: Console, rec, number: int, total: int) -> None:
    e = rec.event
    color = console.color_system is not None
    console.print(Text(miscompare_title(number, total, rec), style="bold" if color else ""))
    p, s = e.primary, e.secondary
    p_frame = p.data[p.l2:] if p is not None else None
    s_frame = s.data[s.l2:] if s is not None else None
    p_mark = e.primary_offset - p.l2 if p is not None and e.primary_offset >= 0 else -1
    s_mark = e.secondary_offset - s.l2 if s is not None and e.secondary_offset >= 0 else -1
    p_desc = f"primary frame #{p.index} ({len(p_frame)} bytes)" if p is not None else "primary: no frame holds this byte"
    s_desc = f"secondary frame #{s.index} ({len(s_frame)} bytes)" if s is not None else "secondary: no frame holds this byte"
    width = 6 + 3 * _BYTES_PER_LINE
    console.print(Text(f"{p_desc:<{width}}|  {s_desc}"))
    for row in hexdump_pair(p_frame, s_frame, p_mark, s_mark, color):
        console.print(row)
    console.print()


# -- the replay report -------------------------------------------------------------

def print_replay_report(console: Console, result, hexdump_limit: int) -> None:
    st = result.stats
    color = console.color_system is not None
    verdict = "DIVERGE" if result.diverged else "MATCH"
    title = Text(f"colo-compare replay: {result.primary.name} vs {result.secondary.name}: ")
    title.append(verdict, style=("bold red" if result.diverged else "bold green") if color else "")
    console.print(title)
    for w in result.primary.warnings + result.secondary.warnings:
        console.print(Text("warning: " + w, style="yellow" if color else ""))
    console.print()

    t = _table(console, "", "primary", "secondary")
    t.add_row("frames", fmt_count(result.primary.frames), fmt_count(result.secondary.frames))
    t.add_row("bytes", fmt_count(result.primary.bytes), fmt_count(result.secondary.bytes))
    t.add_row("duration", fmt_ms(result.primary.duration_ms), fmt_ms(result.secondary.duration_ms))
    console.print(t)
    console.print()

    flushed = dict(st.released_flushed)
    at_end = flushed.pop("end", 0)
    rows = [
        ("released on a match", st.released_match, ""),
        ("flushed at checkpoints", flushed.get("checkpoint", 0), ""),
        ("flushed by limits", sum(v for k, v in flushed.items() if k != "checkpoint"),
         breakdown({k: v for k, v in flushed.items() if k != "checkpoint"})),
        ("unmatched primary (at the end)", at_end, ""),
        ("unmatched secondary (at the end)", result.unmatched_secondary, ""),
        ("bypassed, not comparable", sum(st.bypassed.values()), breakdown(st.bypassed)),
        ("secondary not comparable", sum(st.dropped.values()), breakdown(st.dropped)),
        ("miscompares", result.miscompares_total, breakdown(st.miscompares)),
        ("checkpoint requests", result.requests_total, breakdown(st.checkpoint_requests)),
        ("checkpoints performed", st.checkpoints, "held to the end" if result.hold else ""),
        ("connections", st.connections_created, breakdown({"evicted " + k: v for k, v in st.connections_evicted.items()})),
    ]
    always = {"released on a match", "miscompares", "checkpoint requests", "connections"}
    t = _table(console, "", "count", "by kind")
    for label, n, detail in rows:
        if n or label in always:
            t.add_row(label, fmt_count(n), detail)
    console.print(t)
    h = st.hold
    if h.count:
        console.print(Text(f"hold time of released primary frames: p50 {fmt_ms(h.quantile(.5))}, "
                           f"p90 {fmt_ms(h.quantile(.9))}, p99 {fmt_ms(h.quantile(.99))}, "
                           f"max {fmt_ms(h.max)}"))
    top = top_divergent(result, 10)
    if top:
        console.print()
        t = _table(console, "flow", "miscompares", "timeouts", "left unmatched",
                   title="Most divergent connections")
        for flow, m, to, u in top:
            t.add_row(flow, fmt_count(m), fmt_count(to), fmt_count(u))
        console.print(t)
    if result.miscompares and hexdump_limit:
        console.print()
        for i, rec in enumerate(result.miscompares[:hexdump_limit], 1):
            print_hexdump(console, rec, i, result.miscompares_total)
        rest = result.miscompares_total - min(hexdump_limit, len(result.miscompares))
        if rest > 0:
            noun = "miscompare" if rest == 1 else "miscompares"
            console.print(Text(f"({rest:,} more {noun} not shown; see --hexdump N or --json)"))


def top_divergent(result, n: int) -> list[tuple[str, int, int, int]]:
    """(flow, miscompares, timeouts, primary frames left unmatched), worst first."""
    items = [(format_key(k), v["miscompares"], v["timeouts"], v["unmatched"])
             for k, v in result.per_flow.items() if any(v.values())]
    items.sort(key=lambda x: (-x[1], -x[2], -x[3], x[0]))
    return items[:n]


def _frame_json(pkt, offset) -> dict | None:
    if pkt is None:
        return None
    frame = pkt.data[pkt.l2:]
    return {"index": pkt.index, "length": len(frame),
            "offset": offset - pkt.l2 if offset >= 0 else None,
            "frame_hex": frame.hex()}


def miscompare_json(rec) -> dict:
    e = rec.event
    return {"time_ms": round(rec.time_ms, 6), "flow": rec.flow, **_flow_fields(e.key),
            "protocol": e.kind, "cause": e.cause,
            "stream_offset": e.stream_offset, "raw_seq": e.raw_seq,
            "datagram_index": e.datagram_index,
            "primary": _frame_json(e.primary, e.primary_offset),
            "secondary": _frame_json(e.secondary, e.secondary_offset)}


def _flow_fields(key) -> dict:
    d = describe_key(key)
    return {"src": d.get("src"), "dst": d.get("dst"), "sport": d.get("sport"),
            "dport": d.get("dport"), "vlan": d.get("vlan", [])}


def replay_json(result) -> dict:
    st = result.stats
    cfg = result.config

    def side(info):
        return {"file": info.name, "format": info.format, "frames": info.frames,
                "bytes": info.bytes, "duration_ms": round(info.duration_ms, 6),
                "warnings": info.warnings}
    return {
        "version": JSON_VERSION,
        "tool": f"colo-compare {__version__}",
        "command": "replay",
        "result": "diverge" if result.diverged else "match",
        "inputs": {"primary": side(result.primary), "secondary": side(result.secondary)},
        "settings": {"compare_timeout_ms": cfg.compare_timeout_ms,
                     "expired_scan_cycle_ms": cfg.expired_scan_cycle_ms,
                     "max_queue_size": cfg.max_queue_size,
                     "max_connections": cfg.max_connections,
                     "checkpoints": "hold" if result.hold else "immediate",
                     "vnet_hdr_len": result.vnet_hdr_len},
        "stats": result.comparator.snapshot(),
        "unmatched": {"primary": result.unmatched_primary, "secondary": result.unmatched_secondary},
        "miscompares_total": result.miscompares_total,
        "miscompares": [miscompare_json(r) for r in result.miscompares],
        "checkpoint_requests_total": result.requests_total,
        "checkpoint_requests": [{"time_ms": round(t, 6), "cause": c, "flow": f}
                                for t, c, f in result.requests],
        "top_divergent": [{"flow": f, "miscompares": m, "timeouts": to, "unmatched": u}
                          for f, m, to, u in top_divergent(result, 20)],
    }
