"""Presentation: the human report, side-by-side hexdumps, JSON documents.

The only module that imports rich.  Colour only on a terminal (or when
asked); without a terminal the same report is plain text.
"""

from __future__ import annotations

import os
import sys

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from .flows import describe_key, format_key

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
    verdict = result.verdict.upper()
    title = Text(f"colo-compare replay: {result.primary.name} vs {result.secondary.name}: ")
    style = {"diverge": "bold red", "match": "bold green"}.get(result.verdict, "bold yellow")
    title.append(verdict, style=style if color else "")
    console.print(title)
    for w in result.primary.warnings + result.secondary.warnings:
        console.print(Text("warning: " + w, style="yellow" if color else ""))
    for note in result.notes:
        console.print(Text("note: " + note, style="yellow" if color else ""))
    settings = describe_settings(result.config, result.hold, result.vnet_hdr_len)
    if settings:
        console.print(Text("settings: " + settings))
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


def describe_settings(config, hold=False, vnet_hdr_len=0) -> str:
    """What was not the default, so a report says how to reproduce it."""
    parts = []
    if config.compare_timeout_ms is None:
        parts.append("no timeouts")
    elif config.compare_timeout_ms != 3000:
        parts.append(f"compare timeout {config.compare_timeout_ms:g} ms")
    if config.expired_scan_cycle_ms != 1000:
        parts.append(f"scan cycle {config.expired_scan_cycle_ms:g} ms")
    if config.max_queue_size != 1024:
        parts.append(f"max queue size {config.max_queue_size}")
    if config.normalize_seq:
        parts.append("relative TCP sequence numbers")
    if hold:
        parts.append("held to the end")
    if vnet_hdr_len:
        parts.append(f"{vnet_hdr_len}-byte vnet headers")
    if config.ignore:
        parts.append("ignoring " + ", ".join(r.text for r in config.ignore))
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
        "result": result.verdict,
        "inputs": {"primary": side(result.primary), "secondary": side(result.secondary)},
        "settings": {"compare_timeout_ms": cfg.compare_timeout_ms,
                     "expired_scan_cycle_ms": cfg.expired_scan_cycle_ms,
                     "max_queue_size": cfg.max_queue_size,
                     "max_connections": cfg.max_connections,
                     "checkpoints": "hold" if result.hold else "immediate",
                     "vnet_hdr_len": result.vnet_hdr_len,
                     "normalize_seq": cfg.normalize_seq,
                     "ignore": [r.text for r in cfg.ignore]},
        "stats": result.comparator.snapshot(),
        "unmatched": {"primary": result.unmatched_primary, "secondary": result.unmatched_secondary},
        "miscompares_total": result.miscompares_total,
        "miscompares": [miscompare_json(r) for r in result.miscompares],
        "checkpoint_requests_total": result.requests_total,
        "checkpoint_requests": [{"time_ms": round(t, 6), "cause": c, "flow": f}
                                for t, c, f in result.requests],
        "top_divergent": [{"flow": f, "miscompares": m, "timeouts": to, "unmatched": u}
                          for f, m, to, u in top_divergent(result, 20)],
        "notes": result.notes,
    }


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


def stats_renderables(console: Console, doc: dict) -> list:
    """The stats view (a running serve, or a saved report) as rich
    renderables: a summary table, links, and the top connections."""
    from .core.stats import Histogram
    st = doc["stats"]
    serve = st.get("serve")
    color = console.color_system is not None
    parts = []
    if serve:
        head = (f"colo-compare serve {serve['version']}: up {_duration(serve['uptime_s'])}, "
                f"checkpoint policy {serve['policy']}"
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
    hold = Histogram.from_dict(st["hold_ms"])
    if hold.count:
        t.add_row("hold time", fmt_ms(hold.quantile(0.5)),
                  f"p50; p90 {fmt_ms(hold.quantile(0.9))}, p99 {fmt_ms(hold.quantile(0.99))}, "
                  f"max {fmt_ms(hold.max)}")
    if serve:
        errs = {f"{side} {kind}": n for side, kinds in serve["input_errors"].items()
                for kind, n in kinds.items() if n}
        t.add_row("input errors", fmt_count(sum(errs.values())), breakdown(errs))
        notify = serve["notify"]
        if "notify-dev" in serve["links"]:
            t.add_row("notify-dev", fmt_count(notify["do_checkpoint_sent"]),
                      f"DO_CHECKPOINT sent; COLO_CHECKPOINT received "
                      f"{notify['colo_checkpoint_received']:,}")
    parts.append(t)
    if serve:
        t = _table(console, "link", "endpoint", "peer", "connections", "in/out")
        for name, d in serve["links"].items():
            state = d["peer"] if d["connected"] else (f"(none: {d['last_error']})" if d["last_error"] else "(none)")
            io = fmt_count(d["bytes_in"]) + " B in"
            if "frames_out" in d:
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
    return parts


def print_stats(console: Console, doc: dict) -> None:
    for part in stats_renderables(console, doc):
        console.print(part)
        console.print()


# -- evidence for Wireshark ----------------------------------------------------------

def evidence_comment(number: int, rec, side: str, pkt, offset: int) -> str:
    e = rec.event
    text = f"miscompare {number} ({side}): {_cause_text(e.cause)} in {rec.flow} {_where(e)}"
    if pkt is not None and offset >= 0:
        text += f"; first differing byte at offset {offset - pkt.l2} of this frame"
    if pkt is not None and pkt.fragments is not None:
        text += f"; a datagram reassembled from {len(pkt.fragments)} fragments"
    return text


def evidence_frames(pkt) -> list[bytes]:
    """The Ethernet frames a packet stands for (a reassembled datagram: its
    fragments)."""
    if pkt.fragments is not None:
        return [f.data[f.l2:] for f in pkt.fragments]
    return [pkt.data[pkt.l2:]]
