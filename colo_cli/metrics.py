"""Statistics documents: what ``colo-compare stats`` prints as JSON and as
Prometheus text exposition (for node_exporter's textfile collector, or any
scraper of that format).

The document is the same whether it comes from a running ``serve`` (its
control socket) or from a saved ``replay --json`` report, so scripts and
dashboards need one parser.

The Prometheus text has one implementation, :func:`prometheus`, used by
``stats --format prometheus`` and by ``serve --metrics-listen`` alike.  As
Prometheus' instrumentation practices ask, a labelled counter exists from
the start for every label value that can occur (released, bypassed and
dropped by reason, miscompares by protocol and cause, checkpoint requests
by cause, evictions by reason), at zero until something happens, so rates
and alerts see it before the first event; and serve exports the time it
started (``colo_compare_start_time_seconds``) rather than an uptime.
"""

from __future__ import annotations

from . import schema
from .core import HOLD_BOUNDS_S, Histogram
from .errors import ColoError, os_error_text

#: version of the stats document (``colo-compare stats --json``).
STATS_VERSION = schema.STATS_VERSION

#: Prometheus histogram bounds for hold times, in ms (the core's, in seconds,
#: are those of the JSON documents' ``hold_seconds``)
HOLD_BOUNDS_MS = [b * 1000 for b in HOLD_BOUNDS_S]   # 0.125 ms .. 16.4 s


#: Why connections are evicted (the core's ``connections_evicted`` keys).
EVICTION_REASONS = ("idle", "table-full", "secondary-absent")
#: Protocols a miscompare is counted under (``packet.KIND_NAMES``; fragments
#: are compared as the datagram they make up).
MISCOMPARE_PROTOCOLS = ("tcp", "udp", "icmp", "ip", "arp")


def _known_labels() -> dict:
    """Every label value each labelled family can have, for the zeros."""
    from .core import FRAME_REASONS, CheckpointCause, MiscompareCause, ReleaseReason
    frame_reasons = list(FRAME_REASONS)
    return {
        "released": [r.value for r in ReleaseReason],
        "bypassed": frame_reasons,
        "dropped": ["secondary:" + r for r in frame_reasons] + ["primary:outdev-overflow"],
        "miscompares": [f"{p}:{c.value}" for p in MISCOMPARE_PROTOCOLS
                        for c in MiscompareCause],
        "checkpoint_requests": [c.value for c in CheckpointCause],
        "evicted": list(EVICTION_REASONS),
    }


def _with_zeros(counts: dict, known: list) -> dict:
    """``counts`` with every known key, the missing ones at 0, known first."""
    out = {k: 0 for k in known}
    out.update(counts)
    return out


#: Counters added to version 1 reports after the first were written, with
#: what an older report means by leaving them out: such a report is not
#: damaged.
ADDED_TO_VERSION_1 = {"secondary_absent_periods": 0,
                      "fragment_overlap_bytes": {"primary": 0, "secondary": 0},
                      "fragment_conflict_bytes": {"primary": 0, "secondary": 0},
                      "stream_gap_bytes": 0}


class ReportError(ColoError):
    """Not a report this version understands, or no report at all
    (one-line message)."""


_RESULTS = ("match", "diverge", "incomparable")

#: the most connections the control socket lists
TOP_MAX = 1000


def from_serve(reply: dict, top: int | None = None) -> dict:
    """The stats document from a control-socket ``stats`` reply; ``tool``
    is the serve that counted.  Asked for ``top`` + 1 connections, the lists
    are cut to ``top`` and say whether they were."""
    stats = reply["stats"]
    version = stats.get("serve", {}).get("version", "")
    doc = {"version": STATS_VERSION, "tool": {"name": schema.TOOL_NAME, "version": version},
           "source": "serve", "stats": stats,
           **_top(reply.get("top_connections", {}), top)}
    _hold_seconds(stats)
    schema.audit("stats", doc)
    return doc


def _top(top: dict, limit) -> dict:
    """top_connections cut to ``limit``, and whether each list was cut (at
    TOP_MAX, a full list may have been)."""
    lists = {"by_miscompares": list(top.get("by_miscompares", [])),
             "by_hold": list(top.get("by_hold", []))}
    truncated = {}
    for k, v in lists.items():
        if limit is None:
            truncated[k] = False
            continue
        truncated[k] = len(v) > limit or (limit >= TOP_MAX and len(v) >= TOP_MAX)
        lists[k] = v[:limit]
    return {"top_connections": lists, "top_connections_truncated": truncated}


def _hold_seconds(stats: dict) -> None:
    """A snapshot from an older serve or report has hold_ms only: the
    cumulative buckets in seconds are derived from it."""
    if "hold_seconds" not in stats and isinstance(stats.get("hold_ms"), dict):
        stats["hold_seconds"] = Histogram.from_dict(stats["hold_ms"]).to_cumulative()


def read_report(path: str) -> dict:
    """The stats document of a saved ``replay --json`` report file."""
    import json
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except OSError as e:
        raise ReportError(f"{path}: {os_error_text(e)}") from None
    except ValueError:
        raise ReportError(f"{path}: not JSON (expected a 'replay --json' report)") from None
    return from_report(data, path)


def from_report(report, name: str) -> dict:
    """The stats document from a ``replay --json`` report."""
    if not isinstance(report, dict) or "stats" not in report or report.get("command") != "replay":
        raise ReportError(f"{name}: not a colo-compare replay report (made with 'replay --json')")
    version = report.get("version")
    if version not in (1, 2):
        raise ReportError(f"{name}: report version {version!r} is not supported "
                          f"(this colo-compare reads versions 1 and 2)")
    from .core import Comparator
    stats = report["stats"]
    if isinstance(stats, dict):
        for key, value in ADDED_TO_VERSION_1.items():
            stats.setdefault(key, dict(value) if isinstance(value, dict) else value)
    problem = _shape_problem(stats, Comparator().snapshot(), "stats")
    if problem is None and not isinstance(report.get("top_divergent", []), list):
        problem = "top_divergent is not a list"
    top = []
    for i, t in enumerate(report.get("top_divergent", [])):
        if problem is None:
            problem = _shape_problem(t, {"flow": "", "miscompares": 0, "timeouts": 0,
                                         "unmatched": 0}, f"top_divergent[{i}]")
        if problem is None:
            top.append({k: t[k] for k in ("flow", "miscompares", "timeouts", "unmatched")})
    if problem is not None:
        raise ReportError(f"{name}: damaged report: {problem}")
    tool = report.get("tool")
    if isinstance(tool, dict):          # version 2
        made_by = str(tool.get("version", ""))
    elif isinstance(tool, str) and tool.startswith("colo-compare "):
        made_by = tool.rsplit(" ", 1)[-1]
    else:
        made_by = ""
    stats = report["stats"]
    _hold_seconds(stats)
    doc = {"version": STATS_VERSION, "tool": {"name": schema.TOOL_NAME, "version": made_by},
           "source": "replay-report", "file": name,
           # taken as they are when they are what a report holds; a damaged
           # report's are left out (null), its counters are what is shown
           "result": report.get("result") if report.get("result") in _RESULTS else None,
           "inputs": report.get("inputs") if isinstance(report.get("inputs"), dict) else None,
           "stats": stats, "top_connections": {"by_miscompares": top, "by_hold": []},
           "top_connections_truncated": {"by_miscompares": bool(report.get("top_divergent_truncated")),
                                         "by_hold": False}}
    schema.audit("stats", doc)
    return doc


def _shape_problem(value, template, path: str):
    """What makes ``value`` unlike ``template`` (a snapshot as this version
    writes it): a key it lacks, or a value of another kind; None if nothing.
    A template dict with no keys (a counter by reason) takes any dict of
    numbers."""
    if isinstance(template, dict):
        if not isinstance(value, dict):
            return f"{path} is not an object"
        if not template:
            for k, v in value.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    return f"{path}.{k} is not a number"
            return None
        for k, t in template.items():
            if k not in value:
                return f"{path}.{k} is missing"
            problem = _shape_problem(value[k], t, f"{path}.{k}")
            if problem is not None:
                return problem
        if all(type(t) in (int, float) for t in template.values()):
            # counters by reason beside fixed ones ("released": match, total, ...)
            for k in value.keys() - template.keys():
                problem = _shape_problem(value[k], 0, f"{path}.{k}")
                if problem is not None:
                    return problem
        return None
    if isinstance(template, str):
        return None if isinstance(value, str) else f"{path} is not a string"
    if isinstance(template, (int, float)) and not isinstance(template, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{path} is not a number"
    return None


# -- Prometheus text exposition ----------------------------------------------------------

def _esc(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._seen: set[str] = set()

    def family(self, name: str, kind: str, help_text: str) -> None:
        if name not in self._seen:
            self._seen.add(name)
            self.lines.append(f"# HELP {name} {help_text}")
            self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value, **labels) -> None:
        if labels:
            inner = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{inner}}} {_num(value)}")
        else:
            self.lines.append(f"{name} {_num(value)}")

    def counter(self, name, help_text, value=None, **labels) -> None:
        self.family(name, "counter", help_text)
        if value is not None:
            self.sample(name, value, **labels)

    def histogram(self, name: str, help_text: str, hist_ms, bounds_ms) -> None:
        """A histogram of milliseconds (``Histogram``) as Prometheus has
        them: cumulative buckets, sum and count, in seconds."""
        self.family(name, "histogram", help_text)
        for bound_ms, count in zip(bounds_ms, hist_ms.cumulative(bounds_ms)):
            self.sample(name + "_bucket", count, le=repr(bound_ms / 1000))
        self.sample(name + "_bucket", hist_ms.count, le="+Inf")
        self.sample(name + "_sum", hist_ms.sum / 1000)
        self.sample(name + "_count", hist_ms.count)

    def gauge(self, name, help_text, value=None, **labels) -> None:
        self.family(name, "gauge", help_text)
        if value is not None:
            self.sample(name, value, **labels)


def _num(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


def prometheus(doc: dict) -> str:
    """The stats document in Prometheus text format (version 0.0.4)."""
    st = doc["stats"]
    known = _known_labels()
    e = _Exposition()
    p = "colo_compare_"
    e.gauge(p + "info", "colo-compare instance information (always 1)",
            1, source=doc.get("source", ""),
            # serve reports its own version; a replay report, the version that wrote it
            version=(doc.get("tool") or {}).get("version", ""))
    for side in ("primary", "secondary"):
        e.counter(p + "frames_in_total", "Frames received, by side.", st["frames_in"][side], side=side)
    for side in ("primary", "secondary"):
        e.counter(p + "bytes_in_total", "Ethernet frame bytes received, by side (length words and vnet headers not counted).", st["bytes_in"][side], side=side)
    e.family(p + "released_total", "counter",
             "Primary frames released, by reason (match, or flushed by a checkpoint, a limit or the end).")
    for reason, n in _with_zeros(st["released"], known["released"]).items():
        if reason != "total":
            e.sample(p + "released_total", n, reason=reason)
    e.counter(p + "released_bytes_total", "Ethernet frame bytes of the primary frames released.", st["released_bytes"])
    e.family(p + "bypassed_total", "counter", "Primary frames passed through uncompared, by reason.")
    for reason, n in _with_zeros(st["bypassed"], known["bypassed"]).items():
        e.sample(p + "bypassed_total", n, reason=reason)
    e.family(p + "dropped_total", "counter", "Frames dropped, by side and reason.")
    for key, n in _with_zeros(st["dropped"], known["dropped"]).items():
        side, _, reason = key.partition(":")
        e.sample(p + "dropped_total", n, side=side, reason=reason)
    sec = st["secondary"]
    e.family(p + "secondary_frames_total", "counter",
             "Secondary frames by outcome: matched, absorbed (pure ACKs, copies), discarded at checkpoints.")
    for outcome in ("matched", "absorbed", "discarded"):
        e.sample(p + "secondary_frames_total", sec[outcome], outcome=outcome)
    e.family(p + "miscompares_total", "counter", "Miscompares, by protocol and cause.")
    for key, n in _with_zeros(st["miscompares"], known["miscompares"]).items():
        proto, _, cause = key.partition(":")
        e.sample(p + "miscompares_total", n, protocol=proto, cause=cause)
    e.family(p + "checkpoint_requests_total", "counter", "Checkpoint requests, by cause.")
    for cause, n in _with_zeros(st["checkpoint_requests"], known["checkpoint_requests"]).items():
        e.sample(p + "checkpoint_requests_total", n, cause=cause)
    serve = st.get("serve")
    e.family(p + "checkpoints_total", "counter", "Checkpoints performed (by who asked, for serve).")
    if serve:
        for by, n in serve["checkpoints_by"].items():
            e.sample(p + "checkpoints_total", n, by=by)
    else:
        e.sample(p + "checkpoints_total", st["checkpoints"], by="replay")
    conns = st["connections"]
    e.counter(p + "connections_created_total", "Connections created.", conns["created"])
    e.family(p + "connections_evicted_total", "counter", "Connections evicted, by reason.")
    for reason, n in _with_zeros(conns["evicted"], known["evicted"]).items():
        e.sample(p + "connections_evicted_total", n, reason=reason)
    if "now" in conns:
        e.gauge(p + "connections", "Connections in the table now.", conns["now"])
    queued = st.get("queued")
    if queued:
        e.family(p + "queued_frames", "gauge", "Frames queued for comparison now, by side.")
        e.sample(p + "queued_frames", queued["primary"], side="primary")
        e.sample(p + "queued_frames", queued["secondary"], side="secondary")
        e.gauge(p + "queued_bytes", "Bytes of frames queued for comparison now.", queued["bytes"])
    e.family(p + "queue_high_water_frames", "gauge", "Longest queue of any connection so far, by side.")
    for side in ("primary", "secondary"):
        e.sample(p + "queue_high_water_frames", st["queue_high_water"][side], side=side)
    for what, help_text in (
            ("fragment_overlap_bytes", "IP fragment bytes that overlapped others, by side."),
            ("fragment_conflict_bytes", "Overlapping IP fragment bytes whose contents disagreed "
                                        "(the first copy kept), by side.")):
        e.family(p + what + "_total", "counter", help_text)
        for side in ("primary", "secondary"):
            e.sample(p + what + "_total", st.get(what, {}).get(side, 0), side=side)
    e.counter(p + "stream_gap_bytes_total", "TCP bytes missing from both sides at the same place "
              "(lost by the captures): skipped, not compared.", st.get("stream_gap_bytes", 0))
    e.histogram(p + "hold_seconds", "How long released primary frames were held, in seconds.",
                Histogram.from_dict(st["hold_ms"]), HOLD_BOUNDS_MS)
    if serve:
        e.gauge(p + "start_time_seconds", "When serve started, in seconds since the Unix epoch.",
                serve["started"])
        e.family(p + "link_connected", "gauge", "Whether each endpoint has a peer (1) or not (0).")
        for link, d in serve["links"].items():
            e.sample(p + "link_connected", d["connected"], link=link)
        e.family(p + "link_connections_total", "counter", "Peers each endpoint has had.")
        for link, d in serve["links"].items():
            e.sample(p + "link_connections_total", d["connections"], link=link)
        out = serve["links"]["outdev"]
        e.gauge(p + "outdev_queued_bytes", "Released bytes waiting for outdev.", out["queued_bytes"])
        e.counter(p + "outdev_frames_total", "Frames written to outdev.", out["frames_out"])
        e.family(p + "input_errors_total", "counter", "Framing errors on the inputs, by side and kind.")
        for side, kinds in serve["input_errors"].items():
            for kind, n in kinds.items():
                e.sample(p + "input_errors_total", n, side=side, kind=kind)
        notify = serve["notify"]
        e.counter(p + "do_checkpoint_sent_total", "DO_CHECKPOINT messages sent on notify-dev.",
                  notify["do_checkpoint_sent"])
        e.gauge(p + "secondary_absent", "1 while comparing has stopped because --secondary-in "
                "has had no peer for longer than the compare timeout.",
                bool(serve.get("secondary_absent")))
        e.counter(p + "secondary_absent_periods_total", "Times comparing stopped for want of a "
                  "secondary.", st.get("secondary_absent_periods", 0))
        e.counter(p + "internal_errors_total", "Frames the comparator failed on (let go and "
                  "counted: a bug, please report it).", serve.get("internal_errors", 0))
        if serve.get("qmp"):
            _qmp_metrics(e, p, serve["qmp"])
    return "\n".join(e.lines) + "\n"


#: Prometheus buckets of QMP request -> RESUME times, in ms (exact edges of
#: the core's log histogram, as HOLD_BOUNDS_MS)
QMP_WAIT_BOUNDS_MS = [2.0 ** k for k in range(-1, 15)]   # 0.5 ms .. 16.4 s


def _qmp_metrics(e: "_Exposition", p: str, q: dict) -> None:
    """serve --qmp: QEMU's checkpoints, the QMP link and the COLO state."""
    c = q["checkpoints"]
    e.counter(p + "qmp_checkpoint_requests_total",
              "Checkpoints asked of QEMU over QMP (x-checkpoint-delay re-sent).", c["requested"])
    e.family(p + "qmp_checkpoints_total", "counter",
             "QEMU checkpoints seen to complete (RESUME), by whether serve had asked for them.")
    e.sample(p + "qmp_checkpoints_total", c["completed"], kind="requested")
    e.sample(p + "qmp_checkpoints_total", c["periodic"], kind="periodic")
    e.family(p + "qmp_checkpoint_failures_total", "counter",
             "Checkpoint requests with no checkpoint: timeout (no RESUME in time), refused, or "
             "lost with the QMP link or COLO state; held frames were released locally.")
    e.sample(p + "qmp_checkpoint_failures_total", c["timed_out"], reason="timeout")
    for reason, n in q["failures"].items():
        e.sample(p + "qmp_checkpoint_failures_total", n, reason=reason)
    e.histogram(p + "qmp_checkpoint_wait_seconds",
                "From a checkpoint request over QMP to QEMU's RESUME, in seconds.",
                Histogram.from_dict(q["request_to_resume_ms"]), QMP_WAIT_BOUNDS_MS)
    e.gauge(p + "qmp_ready", "1 when the QMP link is up and past its handshake.", q["ready"])
    e.gauge(p + "colo_active",
            "1 when QEMU is in COLO state and checkpoints are asked of it (policy qmp); 0 while "
            "serve falls back to the release policy.", q["policy_now"] == "qmp")
    e.family(p + "qmp_fallbacks_total", "counter",
             "Times serve left the qmp policy for release, by reason.")
    for reason, n in q["fallbacks"].items():
        e.sample(p + "qmp_fallbacks_total", n, reason=reason)
