"""Presentation: the human report, side-by-side hexdumps, JSON documents.

The only module that imports rich.  Colour only on a terminal (or when
asked); without a terminal the same report is plain text.
"""

from __future__ import annotations

import contextlib
import os
import sys
import textwrap

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import schema
from .core import Config
from .flows import describe_key, format_key
from .frames import FrameDiff, frame_diff, frame_json, payload_marks  # noqa: F401 - re-exported

#: version of the replay report (``replay --json``); see schema.py
JSON_VERSION = schema.REPORT_VERSION

_BYTES_PER_LINE = 16
_HEADER_LINES = 4          # always show the first 64 bytes: Ethernet, IP, L4 headers
_CONTEXT_LINES = 2         # and this many lines either side of the first difference


def make_console(file=None, color: str = "auto") -> Console:
    """A console for results (stdout) or diagnostics (stderr).  ``color`` is
    auto (colour on a terminal), always or never."""
    file = file or sys.stdout
    tty = hasattr(file, "isatty") and file.isatty()
    # https://no-color.org: NO_COLOR turns automatic colour off
    use_color = color == "always" or (color == "auto" and tty and "NO_COLOR" not in os.environ)
    console = Console(file=file, force_terminal=use_color or None, no_color=not use_color,
                      color_system="auto" if use_color else None, highlight=False,
                      soft_wrap=True, width=None if tty else 200, emoji=False)

    def broken_pipe() -> None:
        # rich's default exits 1 here, which would read as "diverge": the
        # reader went away (| head), so send the rest nowhere and carry on
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, file.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
    console.on_broken_pipe = broken_pipe
    # prose is wrapped at word boundaries on a terminal only: a file or a
    # pipe gets whole lines (see prose)
    console.wrap_prose = bool(tty)
    return console


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

_BYTES_PER_LINE = 16
_HEADER_LINES = 4          # always the first 64 bytes: Ethernet, IP, L4 headers
_MAX_REGIONS = 8           # differing regions shown per hexdump; the rest are counted
_MAX_REGION_LINES = 4      # lines of one region shown (with a line of context either side)
#: a side's hexdump line: "0000  " + 16 hex cells + " " + 16 ASCII columns
_SIDE_WIDTH = 6 + 3 * _BYTES_PER_LINE + 1 + _BYTES_PER_LINE
_SEPARATOR = " |  "
#: the side-by-side layout needs this many columns; narrower, the two frames
#: are stacked, primary above secondary
SIDE_BY_SIDE_WIDTH = 2 * _SIDE_WIDTH + len(_SEPARATOR)


def _hex_line(frame: bytes, start: int, marks: set, mark: int, color: bool, off_w: int):
    """One hexdump line of ``frame`` from ``start`` (which may lie outside
    it: blank cells): (Text, caret string or "")."""
    text = Text()
    carets = []
    any_caret = False
    if start < 0 or start >= len(frame):
        return Text(" " * (off_w + 2 + 3 * _BYTES_PER_LINE + 1 + _BYTES_PER_LINE)), ""
    text.append(f"{start:0{off_w}x}  ", style="dim" if color else "")
    carets.append(" " * (off_w + 2))
    ascii_cells = []
    for k in range(_BYTES_PER_LINE):
        i = start + k
        if 0 <= i < len(frame):
            hit = i in marks
            style = ("bold reverse red" if i == mark else "bold red") if (hit and color) else ""
            text.append(f"{frame[i]:02x}", style=style)
            c = frame[i]
            ascii_cells.append((chr(c) if 0x20 <= c < 0x7F else ".", style))
            carets.append("^^ " if hit else "   ")
            any_caret = any_caret or hit
        else:
            text.append("  ")
            ascii_cells.append((" ", ""))
            carets.append("   ")
        text.append(" ")
    text.append(" ")
    carets.append(" ")
    for ch, style in ascii_cells:
        text.append(ch, style=style)
    carets.append("".join("^" if start + k in marks else " " for k in range(_BYTES_PER_LINE)))
    return text, ("".join(carets).rstrip() if any_caret else "")


def _line_plan(d: FrameDiff):
    """Blocks of (primary line start, secondary line start) pairs, the
    headers first, then each differing region with a line of context either
    side; and how many regions were left out."""
    p_len, s_len = len(d.p_frame), len(d.s_frame)
    n = _BYTES_PER_LINE
    blocks = []
    head = [(k, k) for k in range(0, _HEADER_LINES * n, n) if k < max(p_len, s_len)]
    if p_len and s_len:
        regions = d.regions[:_MAX_REGIONS]
        left = len(d.regions) - len(regions)
        for a, b in regions:
            first = a - a % n - n
            last = (b - 1) - (b - 1) % n + n
            lines = list(range(max(first, 0), last + 1, n))
            if len(lines) > _MAX_REGION_LINES + 2:
                lines = lines[:_MAX_REGION_LINES + 1] + [None] + lines[-1:]
            block = [(k, k + d.shift) if k is not None else None for k in lines]
            if blocks and block[0] and blocks[-1][-1] and block[0][0] <= blocks[-1][-1][0] + n:
                seen = {pair[0] for pair in blocks[-1] if pair}
                blocks[-1] += [pair for pair in block if pair is None or pair[0] not in seen]
            else:
                blocks.append(block)
    else:
        # one side only: its lines around its own mark
        left = 0
        frame_len = p_len or s_len
        mark = d.p_mark if p_len else d.s_mark
        if mark >= 0:
            centre = mark - mark % n
            blocks.append([(k, k) for k in range(max(centre - n, 0), min(centre + 2 * n, frame_len), n)])
    if blocks:
        first = blocks[0][0][0]
        head = [pair for pair in head if pair[0] < first]
        if head and head[-1][0] + n == first and blocks[0][0][1] == first:
            blocks[0] = head + blocks[0]
            head = []
    plan = ([head] if head else []) + blocks

    def shown(pair):
        return pair is None or 0 <= pair[0] < p_len or 0 <= pair[1] < s_len
    plan = [kept for kept in ([pair for pair in block if shown(pair)] for block in plan) if kept]
    return plan, left


def hexdump_rows(d: FrameDiff, color: bool, stacked: bool, p_desc: str, s_desc: str) -> list:
    """The hexdump of a FrameDiff as rich ``Text`` rows: side by side, or
    stacked (primary above secondary).  Differing bytes are highlighted
    (in colour) or marked with carets on the line below."""
    plan, left = _line_plan(d)
    off_w = max(4, len(f"{max(len(d.p_frame), len(d.s_frame), 1) - 1:x}"))
    width = off_w + 2 + 3 * _BYTES_PER_LINE + 1 + _BYTES_PER_LINE
    p_marks = d.differing | set(range(*d.p_only))
    s_marks = {i + d.shift for i in d.differing} | set(range(*d.s_only))
    gap = "  ..."

    def side_rows(frame, which, marks, mark):
        rows = []
        for bi, block in enumerate(plan):
            if bi:
                rows.append((Text(gap), ""))
            for pair in block:
                if pair is None:
                    rows.append((Text(gap), ""))
                    continue
                start = pair[which]
                if not frame:
                    rows.append((Text(""), ""))
                    continue
                rows.append(_hex_line(frame, start, marks, mark, color, off_w))
        return rows

    p_rows = side_rows(d.p_frame, 0, p_marks, d.p_mark)
    s_rows = side_rows(d.s_frame, 1, s_marks, d.s_mark)
    out = []
    if stacked:
        for desc, rows in ((p_desc, p_rows), (s_desc, s_rows)):
            out.append(Text(desc))
            for text, carets in rows:
                out.append(text)
                if carets and not color:
                    out.append(Text(carets))
    else:
        out.append(Text(f"{p_desc:<{width}}{_SEPARATOR}{s_desc}"))
        for (pt, pc), (st, sc) in zip(p_rows, s_rows):
            row = Text()
            row.append_text(pt)
            row.append(" " * max(0, width - len(pt.plain)))
            row.append(_SEPARATOR)
            row.append_text(st)
            out.append(row)
            if (pc or sc) and not color:
                out.append(Text((f"{pc:<{width}}" + " " * len(_SEPARATOR) + sc).rstrip()))
    if left:
        out.append(Text(f"({left:,} more differing region{'s' if left != 1 else ''} not shown; "
                        "the JSON report has both frames whole)"))
    return out


def miscompare_title(number: int, total: int, rec, d: FrameDiff | None = None) -> str:
    e = rec.event
    at = d.payload_offset if d is not None and d.checksum else None
    return (f"Miscompare {number:,} of {total:,} at {fmt_ms(rec.time_ms)}: {rec.flow}: "
            f"{_cause_text(e.cause)} {_where(e, at)}")


def _cause_text(cause: str) -> str:
    return {"content": "content differs", "length": "lengths differ",
            "stream-end": "one side ended the stream"}.get(cause, cause)


def _where(e, payload_at: int | None = None) -> str:
    """Where the difference is: a stream offset, or a datagram and a byte of
    its L4 part (``payload_at``: the payload's first differing byte, when a
    checksum differs before it)."""
    if e.kind == "tcp":
        off = "?" if e.stream_offset is None else f"{e.stream_offset:,}"
        return f"at stream offset {off} (seq {e.raw_seq})"
    at = e.stream_offset if payload_at is None else payload_at
    return (f"in datagram {e.datagram_index + 1:,} of its flow at byte {at:,} of the "
            f"{e.kind} part")


def frame_label(side: str, numbers: tuple, length: int) -> str:
    """``primary frame 7 (87 bytes)``; a reassembled datagram names its
    fragments' frames."""
    if not numbers:
        return f"{side}: no frame holds this byte"
    if len(numbers) == 1:
        return f"{side} frame {numbers[0]:,} ({length:,} bytes)"
    return (f"{side} frames {', '.join(f'{n:,}' for n in numbers)} "
            f"(a datagram of {length:,} bytes reassembled from them)")


def print_hexdump(console: Console, rec, number: int, total: int) -> None:
    """A miscompare for people: what and where, the explanation in protocol
    terms, and the hexdump of both frames."""
    e = rec.event
    color = console.color_system is not None
    d = frame_diff(e)
    prose(console, miscompare_title(number, total, rec, d), style="bold" if color else "")
    explanation = rec.explanation
    if explanation is not None:
        for line in explanation.texts:
            prose(console, "  " + line)
    if d.checksum:
        prose(console, f"  the {d.checksum} differs because the payload does; the payload's first "
                       f"differing byte is marked (primary frame offset 0x{d.p_mark:x})")
    p_desc = frame_label("primary", rec.primary_frames, len(d.p_frame))
    s_desc = frame_label("secondary", rec.secondary_frames, len(d.s_frame))
    stacked = console.width < SIDE_BY_SIDE_WIDTH
    for row in hexdump_rows(d, color, stacked, p_desc, s_desc):
        console.print(row, soft_wrap=True, overflow="ignore", crop=False)
    console.print()


def prose(console: Console, text: str, style: str = "") -> None:
    """A line of prose, wrapped at spaces to the console's width (a terminal
    would cut words in two); continuation lines are indented under it.  A
    word longer than the width (an IPv6 flow) is kept whole."""
    if not getattr(console, "wrap_prose", True):
        console.print(Text(text, style=style), soft_wrap=True)
        return
    indent = " " * (len(text) - len(text.lstrip(" ")) + 4)
    lines = textwrap.wrap(text, width=max(console.width, 20), subsequent_indent=indent,
                          break_long_words=False, break_on_hyphens=False,
                          drop_whitespace=True) or [""]
    for line in lines:
        console.print(Text(line, style=style), soft_wrap=True)


# -- the replay report -------------------------------------------------------------

def print_replay_report(console: Console, result, hexdump_limit: int | None,
                        verbose: bool = False) -> None:
    """The report for people.  ``hexdump_limit``: hexdumps of the first N
    miscompares (None: every one kept); ``verbose``: every setting, and
    every kept miscompare in a line of its own."""
    st = result.stats
    color = console.color_system is not None
    verdict = result.verdict.upper()
    title = Text(f"colo-compare replay: {result.primary.name} vs {result.secondary.name}: ")
    style = {"diverge": "bold red", "match": "bold green"}.get(result.verdict, "bold yellow")
    title.append(verdict, style=style if color else "")
    console.print(title, soft_wrap=not getattr(console, "wrap_prose", True))
    for w in result.primary.warnings + result.secondary.warnings:
        prose(console, "warning: " + w, style="yellow" if color else "")
    for note in result.notes:
        prose(console, "note: " + note, style="yellow" if color else "")
    settings = describe_settings(result.config, result.hold, result.vnet_hdr_len, every=verbose)
    if settings:
        prose(console, "settings: " + settings)
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
        prose(console, f"hold time of released primary frames: p50 {fmt_ms(h.quantile(.5))}, "
                       f"p90 {fmt_ms(h.quantile(.9))}, p99 {fmt_ms(h.quantile(.99))}, "
                       f"max {fmt_ms(h.max)}")
    top = top_divergent(result, 10)
    if top:
        console.print()
        t = _table(console, "flow", "miscompares", "timeouts", "left unmatched",
                   title="Most divergent connections")
        for flow, m, to, u in top:
            t.add_row(flow, fmt_count(m), fmt_count(to), fmt_count(u))
        console.print(t)
    if verbose and result.miscompares:
        console.print()
        t = _table(console, "#", "time", "flow", "what differs", title="Miscompares")
        for i, rec in enumerate(result.miscompares, 1):
            e = rec.event
            what = rec.explanation.text if rec.explanation is not None else \
                f"{_cause_text(e.cause)} {_where(e)}"
            t.add_row(fmt_count(i), fmt_ms(rec.time_ms), rec.flow, what)
        console.print(t)
        if len(result.miscompares) < result.miscompares_total:
            prose(console, f"(the first {len(result.miscompares):,} of "
                           f"{result.miscompares_total:,} miscompares)")
    shown = len(result.miscompares) if hexdump_limit is None else min(hexdump_limit,
                                                                       len(result.miscompares))
    if result.miscompares and shown:
        console.print()
        for i, rec in enumerate(result.miscompares[:shown], 1):
            print_hexdump(console, rec, i, result.miscompares_total)
    rest = result.miscompares_total - shown
    if rest > 0 and (hexdump_limit or 0) != 0:
        noun = "miscompare" if rest == 1 else "miscompares"
        prose(console, f"({rest:,} more {noun} not shown; see --hexdump N or --json)")


def describe_settings(config, hold=False, vnet_hdr_len=0, every: bool = False) -> str:
    """What was not the default (``every``: every setting), so a report says
    how to reproduce it."""
    parts = []
    default = Config()
    if config.compare_timeout_ms is None:
        parts.append("no timeouts")
    elif every or config.compare_timeout_ms != default.compare_timeout_ms:
        parts.append(f"compare timeout {config.compare_timeout_ms:g} ms")
    if every or config.expired_scan_cycle_ms != default.expired_scan_cycle_ms:
        parts.append(f"scan cycle {config.expired_scan_cycle_ms:g} ms")
    if every or config.max_queue_size != default.max_queue_size:
        parts.append(f"max queue size {config.max_queue_size}")
    if every or config.max_connections != default.max_connections:
        parts.append(f"max connections {config.max_connections}")
    if every or config.max_queued_bytes != default.max_queued_bytes:
        parts.append(f"max queued {config.max_queued_bytes / 1048576:g} MiB")
    if config.normalize_seq:
        parts.append("relative TCP sequence numbers")
    if hold:
        parts.append("held to the end")
    elif every:
        parts.append("checkpoints at once")
    if vnet_hdr_len or every:
        parts.append(f"{vnet_hdr_len}-byte vnet headers")
    if config.ignore:
        parts.append("ignoring " + ", ".join(r.text for r in config.ignore))
    elif every:
        parts.append("no noise rules")
    return "; ".join(parts)


def print_learned(console: Console, result, primary: str, secondary: str) -> None:
    color = console.color_system is not None
    console.print(Text(f"colo-compare replay --learn-noise: {primary} vs {secondary}",
                       style="bold" if color else ""))
    console.print(Text(f"checkpoint requests {result.requests_before:,} -> {result.requests_after:,}, "
                       f"miscompares {result.miscompares_before:,} -> {result.miscompares_after:,} "
                       f"with the suggestions below ({result.rounds} replays)"))
    console.print()
    if result.learned or result.normalize_seq:
        t = _table(console, "rule", "explains", "checkpoints avoided", "example")
        if result.normalize_seq:
            t.add_row("--normalize-seq", "", fmt_count(result.normalize_avoided),
                      "TCP streams offset by their replicas' own ISNs")
        for l in result.learned:
            t.add_row(l.text, fmt_count(l.explains), fmt_count(l.avoided), l.example)
        console.print(t)
        console.print()
        console.print(Text("to use them: colo-compare replay " + result.command_line() + " ..."))
    else:
        console.print(Text("no rule found: the differences are not of a kind a rule can hide"))
    if result.unexplained:
        console.print()
        t = _table(console, "left unexplained", "miscompares")
        for what, n in result.unexplained.most_common(10):
            t.add_row(what, fmt_count(n))
        console.print(t)


def top_divergent(result, n: int) -> list[tuple[str, int, int, int]]:
    """(flow, miscompares, timeouts, primary frames left unmatched), worst first."""
    items = [(format_key(k), v["miscompares"], v["timeouts"], v["unmatched"])
             for k, v in result.per_flow.items() if any(v.values())]
    items.sort(key=lambda x: (-x[1], -x[2], -x[3], x[0]))
    return items[:n]


def miscompare_json(rec) -> dict:
    e = rec.event
    p_mark, s_mark, _checksum = payload_marks(e)
    explanation = rec.explanation
    return {"time_ms": round(rec.time_ms, 6), "flow": rec.flow, **_flow_fields(e.key),
            "protocol": e.kind, "cause": e.cause,
            "stream_offset": e.stream_offset, "raw_seq": e.raw_seq,
            "datagram_index": e.datagram_index,
            "explanation": explanation.to_json() if explanation is not None else None,
            "primary": frame_json(e.primary, e.primary_offset, rec.primary_frames, p_mark),
            "secondary": frame_json(e.secondary, e.secondary_offset, rec.secondary_frames, s_mark)}


def _flow_fields(key) -> dict:
    d = describe_key(key)
    return {"src": d.get("src"), "dst": d.get("dst"), "sport": d.get("sport"),
            "dport": d.get("dport"), "vlan": d.get("vlan", [])}


def replay_json(result) -> dict:
    cfg = result.config

    def side(info):
        return {"file": info.name, "format": info.format, "frames": info.frames,
                "bytes": info.bytes, "duration_ms": round(info.duration_ms, 6),
                "warnings": info.warnings, "linktype": info.linktype,
                "compression": info.compression or None, "left_out": info.left_out,
                "not_read_past_end": info.stopped_at_end}
    top = top_divergent(result, 21)
    doc = {
        "version": JSON_VERSION,
        "tool": schema.tool(),
        "command": "replay",
        "result": result.verdict,
        "inputs": {"primary": side(result.primary), "secondary": side(result.secondary)},
        "settings": {"compare_timeout_ms": cfg.compare_timeout_ms,
                     "expired_scan_cycle_ms": cfg.expired_scan_cycle_ms,
                     "max_queue_size": cfg.max_queue_size,
                     "max_connections": cfg.max_connections,
                     "max_queued_mib": cfg.max_queued_bytes / 1048576,
                     "checkpoints": "hold" if result.hold else "immediate",
                     "vnet_hdr_len": result.vnet_hdr_len,
                     "normalize_seq": cfg.normalize_seq,
                     "ignore": [r.text for r in cfg.ignore]},
        "stats": result.comparator.snapshot(),
        "unmatched": {"primary": result.unmatched_primary, "secondary": result.unmatched_secondary},
        "miscompares_total": result.miscompares_total,
        "miscompares": [miscompare_json(r) for r in result.miscompares],
        "miscompares_truncated": len(result.miscompares) < result.miscompares_total,
        "checkpoint_requests_total": result.requests_total,
        "checkpoint_requests": [{"time_ms": round(t, 6), "cause": c, "flow": f}
                                for t, c, f in result.requests],
        "checkpoint_requests_truncated": len(result.requests) < result.requests_total,
        "top_divergent": [{"flow": f, "miscompares": m, "timeouts": to, "unmatched": u}
                          for f, m, to, u in top[:20]],
        "top_divergent_truncated": len(top) > 20,
        "notes": result.notes,
    }
    schema.audit("report", doc)
    return doc


# -- colo-compare stats ------------------------------------------------------------

def _duration(seconds: float) -> str:
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def stats_renderables(console: Console, doc: dict, verbose: bool = False) -> list:
    """The stats view (a running serve, or a saved report) as rich
    renderables: a summary table, links, and the top connections
    (``verbose``: and the hold-time histogram)."""
    from .core import Histogram
    st = doc["stats"]
    serve = st.get("serve")
    color = console.color_system is not None
    parts = []
    if serve:
        qmp = serve.get("qmp")
        fallback = (f" (now release: {qmp['fallback_reason']})"
                    if qmp and qmp.get("fallback_reason") else "")
        head = (f"colo-compare serve {serve['version']}: up {_duration(serve['uptime_s'])}, "
                f"checkpoint policy {serve['policy']}{fallback}"
                + (", vnet headers" if serve.get("vnet_hdr_support") else ""))
    else:
        head = f"colo-compare replay report {doc.get('file', '')}: {doc.get('result', '')}"
    parts.append(Text(head, style="bold" if color else ""))
    t = _table(console, "", "primary", "secondary", "")
    t.add_row("frames in", fmt_count(st["frames_in"]["primary"]), fmt_count(st["frames_in"]["secondary"]), "")
    t.add_row("bytes in", fmt_count(st["bytes_in"]["primary"]), fmt_count(st["bytes_in"]["secondary"]), "")
    queued = st.get("queued")
    if queued:
        t.add_row("queued now", fmt_count(queued["primary"]), fmt_count(queued["secondary"]),
                  f"{fmt_count(queued['bytes'])} bytes")
    t.add_row("queue high water", fmt_count(st["queue_high_water"]["primary"]),
              fmt_count(st["queue_high_water"]["secondary"]), "frames, longest connection queue")
    parts.append(t)
    rel = dict(st["released"])
    total = rel.pop("total", 0)
    match = rel.pop("match", 0)
    checkpoint = rel.pop("checkpoint", 0)
    t = _table(console, "", "count", "by kind")
    t.add_row("released", fmt_count(total), f"match {match:,}" + (f", {breakdown(rel)}" if rel else ""))
    t.add_row("flushed at checkpoints", fmt_count(checkpoint), "")
    t.add_row("bypassed", fmt_count(sum(st["bypassed"].values())), breakdown(st["bypassed"]))
    t.add_row("dropped", fmt_count(sum(st["dropped"].values())), breakdown(st["dropped"]))
    sec = st["secondary"]
    t.add_row("secondary consumed", fmt_count(sec["matched"] + sec["absorbed"] + sec["discarded"]),
              breakdown(sec))
    t.add_row("miscompares", fmt_count(sum(st["miscompares"].values())), breakdown(st["miscompares"]))
    t.add_row("checkpoint requests", fmt_count(sum(st["checkpoint_requests"].values())),
              breakdown(st["checkpoint_requests"]))
    by = breakdown(serve["checkpoints_by"]) if serve else ""
    t.add_row("checkpoints performed", fmt_count(st["checkpoints"]), by)
    conns = st["connections"]
    now = conns.get("now")
    t.add_row("connections", fmt_count(now) if now is not None else "-",
              f"total {conns['created']:,}" + (f", evicted {breakdown(conns['evicted'])}"
                                                if conns["evicted"] else ""))
    overlap, conflict = st.get("fragment_overlap_bytes"), st.get("fragment_conflict_bytes")
    if overlap and (overlap["primary"] or overlap["secondary"]):
        t.add_row("fragment overlap", fmt_count(overlap["primary"] + overlap["secondary"]),
                  f"bytes (primary {overlap['primary']:,}, secondary {overlap['secondary']:,}); "
                  f"{conflict['primary'] + conflict['secondary']:,} of them disagreed, the "
                  "first copy kept")
    if st.get("stream_gap_bytes"):
        t.add_row("TCP bytes lost", fmt_count(st["stream_gap_bytes"]),
                  "missing on both sides (capture loss): skipped, not compared")
    hold = Histogram.from_dict(st["hold_ms"])
    if hold.count:
        t.add_row("hold time", fmt_ms(hold.quantile(0.5)),
                  f"p50; p90 {fmt_ms(hold.quantile(0.9))}, p99 {fmt_ms(hold.quantile(0.99))}, "
                  f"max {fmt_ms(hold.max)}")
    if serve:
        errs = {f"{side} {kind}": n for side, kinds in serve["input_errors"].items()
                for kind, n in kinds.items() if n}
        t.add_row("input errors", fmt_count(sum(errs.values())), breakdown(errs))
        if serve.get("secondary_absent") or st.get("secondary_absent_periods"):
            # (comparing stops while --secondary-in has had no peer for longer than the timeout)
            t.add_row("secondary absent", fmt_count(st.get("secondary_absent_periods", 0)),
                      "now: comparing stopped, primary frames pass uncompared"
                      if serve.get("secondary_absent") else "times; back now")
        if serve.get("internal_errors"):
            t.add_row("internal errors", fmt_count(serve["internal_errors"]),
                      "frames let go on a bug of ours (please report it)")
        notify = serve["notify"]
        if "notify-dev" in serve["links"]:
            t.add_row("notify-dev", fmt_count(notify["do_checkpoint_sent"]),
                      f"DO_CHECKPOINT sent; COLO_CHECKPOINT received "
                      f"{notify['colo_checkpoint_received']:,}")
        if serve.get("qmp"):
            _qmp_rows(t, serve["qmp"])
    parts.append(t)
    if serve:
        t = _table(console, "link", "endpoint", "peer", "connections", "in/out")
        for name, d in serve["links"].items():
            state = d["peer"] if d["connected"] else (f"(none: {d['last_error']})" if d["last_error"] else "(none)")
            io = fmt_count(d["bytes_in"]) + " B in"
            if name == "qmp":
                io += f", {d['frames_out']:,} commands out"
            elif "frames_out" in d:
                io = (f"{d['frames_out']:,} frames out, {d['queued_frames']:,} queued"
                      + (f", {d['dropped_frames']:,} dropped" if d["dropped_frames"] else ""))
            t.add_row(name, d["endpoint"], state, fmt_count(d["connections"]), io)
        parts.append(t)
    top = doc.get("top_connections") or {}
    worst = top.get("by_miscompares") or []
    if worst and "timeouts" in worst[0]:
        # from a replay report: divergence per flow
        t = _table(console, "flow", "miscompares", "timeouts", "left unmatched",
                   title="Most divergent connections")
        for c in worst:
            t.add_row(c["flow"], fmt_count(c["miscompares"]), fmt_count(c["timeouts"]),
                      fmt_count(c["unmatched"]))
        parts.append(t)
    elif worst:
        t = _table(console, "flow", "miscompares", title="Top connections by miscompares")
        for c in worst:
            t.add_row(c["flow"], fmt_count(c["miscompares"]))
        parts.append(t)
    if top.get("by_hold"):
        t = _table(console, "flow", "max hold", "mean hold", "released",
                   title="Top connections by hold time")
        for c in top["by_hold"]:
            t.add_row(c["flow"], fmt_ms(c["hold_max_ms"]), fmt_ms(c["hold_mean_ms"]),
                      fmt_count(c["released"]))
        parts.append(t)
    cut = [k.replace("by_", "by ") for k, v in (doc.get("top_connections_truncated") or {}).items() if v]
    if cut:
        parts.append(Text(f"(the connection lists {' and '.join(cut)} go on: see --top N)"))
    if verbose:
        buckets = (st.get("hold_seconds") or {}).get("buckets") or {}
        if buckets:
            t = _table(console, "held at most (s)", "frames", title="Hold time histogram (cumulative)")
            for le, n in buckets.items():
                t.add_row(le, fmt_count(n))
            parts.append(t)
    return parts


def _qmp_rows(t, q: dict) -> None:
    """serve --qmp: QEMU's checkpoints and COLO state, two rows."""
    from .core import Histogram
    c = q["checkpoints"]
    detail = (f"requested {c['requested']:,}, completed {c['completed']:,}, periodic "
              f"{c['periodic']:,}, timed out {c['timed_out']:,}, failed {c['failed']:,}")
    wait = Histogram.from_dict(q["request_to_resume_ms"])
    if wait.count:
        detail += f"; request to RESUME p50 {fmt_ms(wait.quantile(0.5))}, max {fmt_ms(wait.max)}"
    t.add_row("QEMU checkpoints", fmt_count(c["completed"] + c["periodic"]), detail)
    if q["policy_now"] == "qmp":
        state = "in COLO state: checkpoints asked of QEMU"
    else:
        state = f"release until COLO state: {q['fallback_reason']}"
    if q["fallbacks"]:
        state += f"; fallbacks {breakdown(q['fallbacks'])}"
    link = ("ready" if q["ready"] else "connected") if q["connected"] else "not connected"
    t.add_row("QMP", link, state)


def watch_stats(fetch, interval_s: float, color: str = "auto", verbose: bool = False) -> None:
    """``stats --watch``: the table of ``fetch()``'s document, redrawn in
    place every ``interval_s`` until interrupted (KeyboardInterrupt is the
    caller's to catch)."""
    import time

    from rich.console import Group
    from rich.live import Live
    console = make_console(color=color)
    with Live(Group(*stats_renderables(console, fetch(), verbose)), console=console,
              auto_refresh=False, screen=False) as live:
        while True:
            time.sleep(interval_s)
            live.update(Group(*stats_renderables(console, fetch(), verbose)), refresh=True)


def print_stats(console: Console, doc: dict, verbose: bool = False) -> None:
    for part in stats_renderables(console, doc, verbose):
        console.print(part)
        console.print()


# -- progress --------------------------------------------------------------------

@contextlib.contextmanager
def replay_progress(reader, silent):
    """A progress bar on stderr for long captures, on a terminal only."""
    total = 0
    if not silent and sys.stderr.isatty() and reader.name != "<stdin>":
        with contextlib.suppress(OSError):
            total = os.path.getsize(reader.name)
    if total < 50 * 1024 * 1024:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("comparing"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeRemainingColumn(), console=make_console(sys.stderr), transient=True) as bar:
        task = bar.add_task("replay", total=total)
        yield lambda _count: bar.update(task, completed=reader.bytes_read)


# -- evidence for Wireshark ----------------------------------------------------------

def evidence_comment(number: int, rec, side: str, pkt, offset: int, payload_offset=None,
                     original_ts_ns: int | None = None) -> str:
    """The comment on one side's frame of a miscompare in an evidence file:
    which miscompare, which frame of its capture, what differs (in protocol
    terms when known) and where in this frame."""
    e = rec.event
    numbers = rec.primary_frames if side == "primary" else rec.secondary_frames
    where = ""
    if numbers:
        where = (f" frame {numbers[0]:,}" if len(numbers) == 1 else
                 f" frames {', '.join(f'{n:,}' for n in numbers)}")
    payload_at = None
    if pkt is not None and offset >= 0 and payload_offset is not None \
            and payload_offset != offset - pkt.l2:
        payload_at = payload_offset - (pkt.cmp_off - pkt.l2)
    text = (f"miscompare {number} ({side}{where} of its capture): {_cause_text(e.cause)} in "
            f"{rec.flow} {_where(e, payload_at)}")
    if rec.explanation is not None:
        text += "; " + rec.explanation.text
    if pkt is not None and offset >= 0:
        text += f"; first differing byte at offset {offset - pkt.l2} of this frame"
        if payload_offset is not None and payload_offset != offset - pkt.l2:
            text += (f" (a checksum, which differs because the payload does: the payload's "
                     f"first differing byte is at offset {payload_offset})")
    if pkt is not None and pkt.fragments is not None:
        text += f"; a datagram reassembled from {len(pkt.fragments)} fragments"
    if original_ts_ns is not None:
        text += (f"; re-timed onto the primary's timeline, captured at "
                 f"{original_ts_ns // 10**9}.{original_ts_ns % 10**9:09d} on its own clock")
    return text


def evidence_section_comment(primary: str, secondary: str, config, hold: bool,
                             vnet_hdr_len: int) -> str:
    """The evidence file's section comment: what was compared, how, and by
    what, so the file can be reproduced and read alone."""
    t = schema.tool()
    return (f"{t['name']} {t['version']} replay: {primary} (interface 0, primary) vs "
            f"{secondary} (interface 1, secondary); settings: "
            + describe_settings(config, hold, vnet_hdr_len, every=True)
            + ". Each miscompare is a pair of frames, primary then secondary; the secondary's "
              "frames are re-timed onto the primary's timeline (the two captures' clocks are "
              "unrelated), each with its original timestamp in its comment.")


def evidence_frames(pkt) -> list[bytes]:
    """The Ethernet frames a packet stands for (a reassembled datagram: its
    fragments)."""
    if pkt.fragments is not None:
        return [f.data[f.l2:] for f in pkt.fragments]
    return [pkt.data[pkt.l2:]]
