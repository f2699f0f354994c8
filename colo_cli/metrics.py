"""Statistics documents: what ``colo-compare stats`` prints as JSON and as
Prometheus text exposition (for node_exporter's textfile collector, or any
scraper of that format).

The document is the same whether it comes from a running ``serve`` (its
control socket) or from a saved ``replay --json`` report, so scripts and
dashboards need one parser.
"""

from __future__ import annotations

from .core.stats import Histogram

#: version of the stats document (``colo-compare stats --json``).
STATS_VERSION = 1

#: Prometheus histogram bounds for hold times, in ms: powers of two, which are
#: exact bucket edges of the core's log histogram, so the counts are exact.
HOLD_BOUNDS_MS = [2.0 ** k for k in range(-3, 15)]   # 0.125 ms .. 16.4 s


class ReportError(ValueError):
    """Not a report this version understands (one-line message)."""


def from_serve(reply: dict) -> dict:
    """The stats document from a control-socket ``stats`` reply."""
    stats = reply["stats"]
    return {"version": STATS_VERSION, "source": "serve", "stats": stats,
            "top_connections": reply.get("top_connections", {})}


def from_report(report, name: str) -> dict:
    """The stats document from a ``replay --json`` report."""
    if not isinstance(report, dict) or "stats" not in report or report.get("command") != "replay":
        raise ReportError(f"{name}: not a colo-compare replay report (made with 'replay --json')")
    version = report.get("version")
    if version != 1:
        raise ReportError(f"{name}: report version {version!r} is not supported "
                          f"(this colo-compare reads version 1)")
    from .core import Comparator
    problem = _shape_problem(report["stats"], Comparator().snapshot(), "stats")
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
    made_by = tool.rsplit(" ", 1)[-1] if isinstance(tool, str) and tool.startswith("colo-compare ") else ""
    return {"version": STATS_VERSION, "source": "replay-report", "file": name,
            "made_by": made_by,
            "result": report.get("result"), "inputs": report.get("inputs"),
            "stats": report["stats"], "top_connections": {"by_miscompares": top, "by_hold": []}}


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
    e = _Exposition()
    p = "colo_compare_"
    e.gauge(p + "info", "colo-compare instance information (always 1)",
            1, source=doc.get("source", ""),
            # serve reports its own version; a replay report, the version that wrote it
            version=st.get("serve", {}).get("version", "") or doc.get("made_by", ""))
    for side in ("primary", "secondary"):
        e.counter(p + "frames_in_total", "Frames received, by side.", st["frames_in"][side], side=side)
    for side in ("primary", "secondary"):
        e.counter(p + "bytes_in_total", "Ethernet frame bytes received, by side (length words and vnet headers not counted).", st["bytes_in"][side], side=side)
    e.family(p + "released_total", "counter",
             "Primary frames released, by reason (match, or flushed by a checkpoint, a limit or the end).")
    for reason, n in st["released"].items():
        if reason != "total":
            e.sample(p + "released_total", n, reason=reason)
    e.counter(p + "released_bytes_total", "Ethernet frame bytes of the primary frames released.", st["released_bytes"])
    e.family(p + "bypassed_total", "counter", "Primary frames passed through uncompared, by reason.")
    for reason, n in st["bypassed"].items():
        e.sample(p + "bypassed_total", n, reason=reason)
    e.family(p + "dropped_total", "counter", "Frames dropped, by side and reason.")
    for key, n in st["dropped"].items():
        side, _, reason = key.partition(":")
        e.sample(p + "dropped_total", n, side=side, reason=reason)
    sec = st["secondary"]
    e.family(p + "secondary_frames_total", "counter",
             "Secondary frames by outcome: matched, absorbed (pure ACKs, copies), discarded at checkpoints.")
    for outcome in ("matched", "absorbed", "discarded"):
        e.sample(p + "secondary_frames_total", sec[outcome], outcome=outcome)
    e.family(p + "miscompares_total", "counter", "Miscompares, by protocol and cause.")
    for key, n in st["miscompares"].items():
        proto, _, cause = key.partition(":")
        e.sample(p + "miscompares_total", n, protocol=proto, cause=cause)
    e.family(p + "checkpoint_requests_total", "counter", "Checkpoint requests, by cause.")
    for cause, n in st["checkpoint_requests"].items():
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
    for reason, n in conns["evicted"].items():
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
    hold = Histogram.from_dict(st["hold_ms"])
    name = p + "hold_seconds"
    e.family(name, "histogram", "How long released primary frames were held, in seconds.")
    for bound_ms, count in zip(HOLD_BOUNDS_MS, hold.cumulative(HOLD_BOUNDS_MS)):
        e.sample(name + "_bucket", count, le=repr(bound_ms / 1000))
    e.sample(name + "_bucket", hold.count, le="+Inf")
    e.sample(name + "_sum", hold.sum / 1000)
    e.sample(name + "_count", hold.count)
    if serve:
        e.gauge(p + "uptime_seconds", "Seconds since serve started.", serve["uptime_s"])
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
    name = p + "qmp_checkpoint_wait_seconds"
    wait = Histogram.from_dict(q["request_to_resume_ms"])
    e.family(name, "histogram", "From a checkpoint request over QMP to QEMU's RESUME, in seconds.")
    for bound_ms, count in zip(QMP_WAIT_BOUNDS_MS, wait.cumulative(QMP_WAIT_BOUNDS_MS)):
        e.sample(name + "_bucket", count, le=repr(bound_ms / 1000))
    e.sample(name + "_bucket", wait.count, le="+Inf")
    e.sample(name + "_sum", wait.sum / 1000)
    e.sample(name + "_count", wait.count)
    e.gauge(p + "qmp_ready", "1 when the QMP link is up and past its handshake.", q["ready"])
    e.gauge(p + "colo_active",
            "1 when QEMU is in COLO state and checkpoints are asked of it (policy qmp); 0 while "
            "serve falls back to the release policy.", q["policy_now"] == "qmp")
    e.family(p + "qmp_fallbacks_total", "counter",
             "Times serve left the qmp policy for release, by reason.")
    for reason, n in q["fallbacks"].items():
        e.sample(p + "qmp_fallbacks_total", n, reason=reason)
