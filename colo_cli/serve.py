"""``colo-compare serve``: the comparison core on QEMU's colo-compare sockets.

A thin adapter: bytes from the primary and secondary sockets go into the
framing decoder and the core, with ``now_ms`` from the event loop's
monotonic clock; released frames go to outdev as the very bytes they arrived
in; checkpoint requests go to the notify peer (Xen's DO_CHECKPOINT) or are
answered locally, by policy; with ``--qmp`` they are asked of QEMU's COLO
over QMP (``serve_qmp``).

Never block, never lose, never reorder:

* every socket is non-blocking and serviced from one asyncio loop (each
  endpoint is a ``links.Link``); inputs are read whatever state outdev is in.  In the real COLO wiring one QEMU main
  loop writes ``--primary-in`` and reads ``--outdev``, so a comparator that
  stops reading while an outdev write is pending deadlocks QEMU
  (``docs/qemu.md`` section 4).
* released frames wait in one FIFO for outdev (``outqueue.OutQueue``; QEMU's
  send list pops the newest first under backpressure: observed m1), bounded by
  ``outdev_buffer_bytes``; past the bound new frames are dropped, counted and
  reported.  A frame cut by an outdev disconnect is sent again, whole, on the
  next connection.
* a hostile length prefix closes that connection only; the next connection is
  read by a fresh decoder (QEMU kills the input for good, observed j1b, or
  stays desynchronised across reconnects, observed j5).

The control socket (``control``) is given three questions to ask the
server (``stats_reply``, ``connections_reply``, ``checkpoint``) and nothing
else of it.

In production: ``--metrics-listen`` serves ``/metrics`` for Prometheus
(``metrics_http``), and under systemd readiness, stopping and the watchdog
are notified and log lines carry no timestamp of their own (``systemd``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from time import monotonic as _monotonic

from . import __version__, schema
from .core import (MSG_CHECKPOINT, MSG_DO_CHECKPOINT, MSG_GET_XEN_INIT, MSG_PROXY_INIT,
                   PRIMARY, SECONDARY, Bypassed, CheckpointDone, CheckpointMode,
                   CheckpointRequested, Comparator, Dropped, FrameDecoder, InternalError, Matched,
                   Miscompare, NotifyDecoder, Released, SecondaryAbsent, encode_notify)
from .errors import ColoError, os_error_text
from .flows import connection_summary, format_key
from .heap import keep_large_blocks
from .inputs import FrameInputs
from .links import Link, LoopSelector
from .options import POLICY_HOLD, POLICY_QMP, POLICY_RELEASE, ServeOptions
from .systemd import Notifier, log_stamper


class ServeError(ColoError):
    """Cannot start: a one-line message for the user."""


# -- the server --------------------------------------------------------------------------

class Server:
    def __init__(self, options: ServeOptions, loop: asyncio.AbstractEventLoop | None = None,
                 stderr=None, turns: LoopSelector | None = None) -> None:
        self.options = options
        self.loop = loop or asyncio.get_event_loop()
        #: the loop's selector when it counts turns (run() makes it so)
        self.turns = turns
        self.stderr = stderr or sys.stderr
        # release: nobody outside can checkpoint, so the core answers each
        # request itself, per connection; hold: a COLO system checkpoints;
        # qmp: local until QMP says QEMU is in COLO state (serve_qmp)
        mode = (CheckpointMode.LOCAL if options.policy in (POLICY_RELEASE, POLICY_QMP)
                else CheckpointMode.EXTERNAL)
        self.comparator = Comparator(options.config, compact=True, mode=mode)
        self.running = False
        self.started_wall = time.time()
        self.started_ms = self.now_ms()
        vnet = options.vnet_hdr_support
        self.header_len = 8 if vnet else 4
        # the frame inputs' bytes go straight to their side's handler
        self.inputs = FrameInputs(self, self.comparator, self.header_len)
        self.primary = Link(self, "primary-in", options.primary_in,
                            on_data=self.inputs.on_primary)
        self.secondary = Link(self, "secondary-in", options.secondary_in,
                              on_data=self.inputs.on_secondary)
        self.outdev = Link(self, "outdev", options.outdev, out_limit=options.outdev_buffer_bytes)
        self.inputs.attach(self.primary, self.secondary, self.outdev)
        self.notify = (Link(self, "notify-dev", options.notify_dev, out_limit=1024 * 1024)
                       if options.notify_dev is not None else None)
        self.qmp = None
        if options.qmp is not None:
            from .serve_qmp import QmpSide
            self.qmp = QmpSide(self, options.qmp, options.qmp_checkpoint_timeout_ms)
        self.links = [l for l in (self.primary, self.secondary, self.outdev, self.notify,
                                  self.qmp.link if self.qmp else None) if l]
        self._notify_decoder = None
        self._side = {id(self.primary): PRIMARY, id(self.secondary): SECONDARY}
        self._timer = None
        self.timer_at = None             # when the armed scan is due (ms), or None
        self._stopping = None
        self._forced_by = None           # a second signal while draining: exit at once
        self._events_file = None
        self._control = None
        self._metrics = None
        self._notifier = Notifier()
        self._stamp = log_stamper(self.stderr)
        self._hexdump_tokens = float(options.hexdumps_per_minute)
        self._hexdump_refill = time.monotonic()
        # counters the core does not keep
        self.framing_errors = [0, 0]
        self.zero_length = [0, 0]
        self.cut_records = [0, 0]          # incomplete records lost with a connection
        self.do_checkpoint_sent = 0
        self.colo_checkpoint_received = 0
        self.notify_unknown = 0
        self.checkpoints_by = {"local": 0, "notify": 0, "control": 0}
        if self.qmp is not None:
            self.checkpoints_by["qmp"] = 0
        self.hexdumps_suppressed = 0
        self.miscompares_seen = 0
        self.internal_errors = 0
        self._overflow_next_log = 1
        self.checkpoint_wanted = False   # a request to send notify-dev after this read

    # -- time -------------------------------------------------------------------
    def now_ms(self) -> float:
        # the clock of asyncio's loop.time() and call_at (time.monotonic);
        # FrameInputs reads it inline (a call less per read)
        return _monotonic() * 1000.0

    # -- logging ------------------------------------------------------------------
    def log(self, msg: str, level: int = 0) -> None:
        """level 0: always (unless --quiet); 1: with --verbose."""
        if level <= self.options.verbose:
            print(f"{self._stamp()}colo-compare: {msg}", file=self.stderr, flush=True)

    def event(self, kind: str, **fields) -> None:
        f = self._events_file
        if f is None:
            return
        record = {"v": schema.EVENTS_VERSION, "time": round(time.time(), 6), "event": kind,
                  **fields}
        schema.audit("event", record)
        try:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
        except (OSError, ValueError) as e:
            why = os_error_text(e) if isinstance(e, OSError) else str(e)
            self.log(f"--events: cannot write: {why}; events are no longer written", -1)
            self._events_file = None

    # -- start and stop -------------------------------------------------------------
    async def start(self) -> None:
        o = self.options
        if o.events_path:
            try:
                self._events_file = (sys.stdout if o.events_path == "-"
                                     else open(o.events_path, "a", buffering=1))
            except OSError as e:
                raise ServeError(f"--events {o.events_path}: {os_error_text(e)}") from None
        if o.control_path:
            from .control import ControlServer
            self._control = ControlServer(o.control_path, stats=self.stats_reply,
                                          connections=self.connections_reply,
                                          checkpoint=lambda: self.checkpoint("control"))
            await self._control.start()
        if o.metrics_listen is not None:
            from .metrics_http import MetricsServer
            host, port = o.metrics_listen
            self._metrics = MetricsServer(self.metrics_text, host, port)
            try:
                await self._metrics.start()
            except OSError as e:
                where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                raise ServeError(f"--metrics-listen {where}: cannot listen: {os_error_text(e)}") from None
        for link in self.links:
            if link.endpoint.server:
                try:
                    link.open_server()
                except OSError as e:
                    raise ServeError(f"--{link.name} {link.endpoint}: cannot listen: "
                                     f"{os_error_text(e)}") from None
        for link in self.links:
            if not link.endpoint.server:
                link.start_client()
        self.running = True
        # no secondary yet: if none comes within the absence bound, primary
        # frames pass through rather than wait for it (see secondary_lost)
        self.comparator.secondary_lost(self.now_ms())
        if o.policy == POLICY_HOLD and self.notify is None and not o.control_path:
            self.log("warning: --checkpoint-policy hold with neither --notify-dev nor --control: "
                     "nothing can perform a checkpoint, so a divergence holds its frames "
                     "until a queue limit flushes them")
        self.log(f"serving: primary-in {o.primary_in}, secondary-in {o.secondary_in}, "
                 f"outdev {o.outdev}" + (f", notify-dev {o.notify_dev}" if o.notify_dev else "")
                 + (f", qmp {o.qmp}" if o.qmp else "")
                 + f"; checkpoint policy {o.policy}", 1)
        if self.qmp is not None:
            self.log("qmp: checkpoints are local (release policy) until QEMU's COLO state is "
                     "known", 1)
        if o.events_path or o.hexdump != 0:
            # what a miscompare's line and hexdump need, imported now: at the
            # first miscompare it would delay the checkpoint request that
            # follows by a tenth of a second (dpkt and rich load slowly)
            from . import explain, frames  # noqa: F401
            from .explain import icmp, tcp, udp  # noqa: F401
            if o.hexdump != 0:
                from . import render  # noqa: F401
        self.event("start", tool=schema.tool(), policy=o.policy,
                   endpoints={l.name: str(l.endpoint) for l in self.links})

    async def wait_first_connections(self) -> None:
        """A client endpoint that never connects is a startup failure.  Not
        QMP: comparing works without it (the policy falls back to release,
        which stats, the log and the events say)."""
        timeout = self.options.connect_timeout_s
        clients = [l for l in self.links
                   if not l.endpoint.server and (self.qmp is None or l is not self.qmp.link)]
        if not clients or not timeout:
            return
        deadline = self.loop.time() + timeout
        while True:
            late = [l for l in clients if not l.connected_once.is_set()]
            if not late:
                return
            left = deadline - self.loop.time()
            if left <= 0:
                l = late[0]
                raise ServeError(f"--{l.name} {l.endpoint}: {l.last_error or 'no connection'} "
                                 f"(gave up after {timeout:g} s; see --connect-timeout)")
            await asyncio.sleep(min(0.05, left))

    async def run(self) -> int:
        """Serve until SIGINT/SIGTERM (or stop()); then flush and exit 0.  A
        second signal while the flush waits for outdev exits at once, with
        128 + the signal's number (130, 143), as uvicorn does."""
        self._stopping = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self.loop.add_signal_handler(sig, self.stop, sig)
        tasks = []
        try:
            await self.start()
            o = self.options
            self._notifier.notify("READY=1", f"STATUS=comparing: primary-in {o.primary_in}, "
                                             f"secondary-in {o.secondary_in}, outdev {o.outdev}")
            waiter = self.loop.create_task(self.wait_first_connections())
            stopper = self.loop.create_task(self._stopping.wait())
            tasks = [waiter, stopper]
            if self._notifier.enabled and self._notifier.watchdog_interval_s:
                tasks.append(self.loop.create_task(self._watchdog(self._notifier.watchdog_interval_s)))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                waiter.result()          # raises ServeError when a client never connected
            await stopper
            await self.shutdown()
            return 0 if self._forced_by is None else 128 + self._forced_by
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    self.loop.remove_signal_handler(sig)
            self.close()
            # let every task we started see its cancellation, so nothing is
            # left pending (asyncio would complain on stderr at exit)
            tasks += [l.task for l in self.links if l.task is not None]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self, sig: int | None = None) -> None:
        if self._stopping is None:
            return
        if self._stopping.is_set() and sig is not None and self._forced_by is None:
            self._forced_by = int(sig)
            self.log(f"stopping: second {signal.Signals(sig).name}: exiting at once, "
                     f"{len(self.outdev.out)} released frames not written to outdev")
        self._stopping.set()

    async def _watchdog(self, interval_s: float) -> None:
        """WATCHDOG=1 while the loop runs: a loop that is stuck stops the
        pings, and systemd restarts serve (WatchdogSec=)."""
        while True:
            self._notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    def metrics_text(self) -> str:
        """/metrics: the stats document in Prometheus text (metrics.prometheus)."""
        from .metrics import from_serve, prometheus
        return prometheus(from_serve({"stats": self.snapshot()}))

    async def shutdown(self) -> None:
        """Release every queued primary frame, then give outdev a moment to
        take them."""
        self._notifier.notify("STOPPING=1", "STATUS=stopping: flushing queued frames to outdev")
        self.log("stopping: flushing queued frames to outdev", 1)
        self.running = False
        now = self.now_ms()
        self.handle(self.comparator.finish(now), now)
        self.outdev.flush()
        deadline = time.monotonic() + self.options.drain_timeout_s
        while self.outdev.out.frames and time.monotonic() < deadline and self._forced_by is None:
            # (a client outdev keeps reconnecting meanwhile; a server one accepts)
            await asyncio.sleep(0.01)
            self.outdev.flush()
        left = len(self.outdev.out)
        if left and self._forced_by is None:
            self.log(f"stopping: {left} released frames could not be written to outdev "
                     f"within {self.options.drain_timeout_s:g} s", 0)
        self.event("stop", unwritten=left)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.qmp is not None:
            self.qmp.close()
        for link in self.links:
            link.close()
        if self._control is not None:
            self._control.close()
        if self._metrics is not None:
            self._metrics.close()
        self._notifier.close()
        if self._events_file not in (None, sys.stdout):
            with contextlib.suppress(OSError):
                self._events_file.close()

    # -- links --------------------------------------------------------------------
    def on_connect(self, link: Link) -> None:
        side = self._side.get(id(link))
        if side is not None:
            # a fresh decoder: nothing of the last connection's stream survives
            self.inputs.connected(side, FrameDecoder(self.options.vnet_hdr_support))
        elif link is self.notify:
            self._notify_decoder = NotifyDecoder()
        self.event("connect", link=link.name, peer=link.peer)
        if self.qmp is not None and link is self.qmp.link:
            self.qmp.on_connect()
        if side == SECONDARY:
            now = self.now_ms()
            self.handle(self.comparator.secondary_back(now), now)
            self.rearm()

    def on_disconnect(self, link: Link) -> None:
        side = self._side.get(id(link))
        if side is not None:
            decoder = self.inputs.disconnected(side)
            if decoder is not None and decoder.pending_bytes:
                self.cut_records[side] += 1
                self.event("input_error", link=link.name, error="record cut by disconnect",
                           bytes=decoder.pending_bytes)
        self.event("disconnect", link=link.name, reason=link.last_error)
        if self.qmp is not None and link is self.qmp.link:
            self.qmp.on_disconnect()
        if side == SECONDARY and self.running:
            # compared frames wait (and time out) as usual; if the secondary
            # stays away longer than the timeout, the core stops comparing
            self.comparator.secondary_lost(self.now_ms())
            self.rearm()

    def on_data(self, link: Link, data: bytes) -> None:
        # (the frame inputs have a handler of their own: inputs.FrameInputs)
        if link is self.notify:
            self._on_notify(data)
        elif self.qmp is not None and link is self.qmp.link:
            self.qmp.on_data(data)
        # outdev: its peer never talks; whatever arrives is ignored

    # -- what FrameInputs (the frame inputs' per-read path) calls back ------------
    def zero_length_skipped(self, side: int, link: Link, count: int) -> None:
        # QEMU aborts on a zero-length record (observed j3): skip and count
        self.zero_length[side] += count
        self.event("input_error", link=link.name, error="zero-length record skipped",
                   count=count)

    def framing_error(self, side: int, link: Link, error: str) -> None:
        self.framing_errors[side] += 1
        self.log(f"{link.name}: {error}; closing the connection "
                 "(the next one is read afresh)", 0)
        self.event("input_error", link=link.name, error=error)
        link.cut_off(error)

    # -- events from the core ------------------------------------------------------------
    def handle(self, events, now_ms) -> None:
        push = self.outdev.out.push
        for e in events:
            t = type(e)
            if t is Matched:
                # released on a match (the core's compact form)
                if not push(e.data):
                    self._overflow_data(e.data)
            elif t is Released:
                if not push(e.packet.data):
                    self._overflow(e.packet)
            elif t is Bypassed:
                if not push(e.packet.data):
                    self._overflow(e.packet)
                self.event("bypass", side="primary", reason=e.reason, length=len(e.packet.frame))
            elif t is Dropped:
                self.event("drop", side=e.side.label, reason=e.reason, length=len(e.packet.frame))
            elif t is Miscompare:
                self._on_miscompare(e)
            elif t is CheckpointRequested:
                if self._events_file is not None:
                    self.event("checkpoint_request", cause=e.cause,
                               flow=format_key(e.key) if e.key is not None else None)
                if self.notify is not None:
                    # sent once for everything one read (or one scan) brought:
                    # QEMU sends one per request, the peer checkpoints once
                    # either way
                    self.checkpoint_wanted = True
                elif self.qmp is not None:
                    self.qmp.request(now_ms)
            elif t is CheckpointDone:
                if e.key is not None:
                    # the core checkpointed one connection itself (release policy)
                    self.checkpoints_by["local"] += 1
                # (a local one follows its request's line, which names the flow)
                self.event("checkpoint", released=e.released, discarded=e.discarded,
                           local=e.key is not None)
            elif t is SecondaryAbsent:
                self._on_secondary_absent(e)
            elif t is InternalError:
                self._on_internal_error(e)

    def trim_outdev(self) -> None:
        for wire in reversed(self.outdev.out.trim()):
            self._overflow_data(wire)

    def _overflow_data(self, wire: bytes) -> None:
        self.event("drop", side="primary", reason="outdev-overflow",
                   length=len(wire) - self.header_len)
        self._overflow_log()

    def _overflow(self, pkt) -> None:
        self.event("drop", side="primary", reason="outdev-overflow", length=len(pkt.frame))
        self._overflow_log()

    def _overflow_log(self) -> None:
        dropped = self.outdev.out.dropped
        if dropped >= self._overflow_next_log:
            # the first drop, then every thousand
            self._overflow_next_log = (dropped // 1000 + 1) * 1000
            self.log(f"outdev: {dropped} released frames dropped: "
                     f"more than {self.options.outdev_buffer_bytes} bytes wait for outdev "
                     "(see --outdev-buffer)")

    def _on_secondary_absent(self, e) -> None:
        if e.entered:
            self.log(f"secondary-in: gone for more than {self.comparator.absent_after_ms:g} ms: "
                     f"comparing stopped, {e.released} queued primary frames released; primary "
                     "frames now pass through uncompared until the secondary is back")
            self.event("secondary_absent", released=e.released)
        else:
            self.log("secondary-in: back; comparing again")
            self.event("secondary_back")

    def _on_internal_error(self, e) -> None:
        """A bug of ours cost a frame (counted by the core as internal-error):
        say so once, then every hundredth time, with the traceback under
        --debug; never stop."""
        self.internal_errors += 1
        self.event("internal_error", side=e.side.label if e.side is not None else None,
                   error=f"{type(e.error).__name__}: {e.error}")
        n = self.internal_errors
        if n == 1 or n % 100 == 0:
            if e.side is not None:
                where, then = f"on a {e.side.label} frame", "the frame was let go"
            else:
                where, then = ("in a timer scan", "the frames past the timeout were let go, "
                               "the next scan tries again")
            self.log(f"internal error {where} ({n} so far): {type(e.error).__name__}: "
                     f"{e.error}; {then} and comparison goes on"
                     + ("" if self.options.debug else " (--debug shows the traceback; please "
                        "report it)"))
            if self.options.debug:
                import traceback
                traceback.print_exception(e.error, file=self.stderr)

    def send_do_checkpoint(self) -> None:
        self.checkpoint_wanted = False
        if self.notify is not None and self.notify.sock is not None:
            self.notify.out.push(encode_notify(MSG_DO_CHECKPOINT))
            self.notify.flush()
            self.do_checkpoint_sent += 1

    def checkpoint(self, by: str) -> dict:
        now = self.now_ms()
        events = self.comparator.checkpoint(now)
        self.checkpoints_by[by] += 1
        done = events[-1]
        self.handle(events, now)
        self.outdev.flush()
        return {"released": done.released, "discarded": done.discarded}

    def _on_miscompare(self, e) -> None:
        o = self.options
        wanted = o.hexdump is None or self.miscompares_seen < o.hexdump
        self.miscompares_seen += 1
        if self._events_file is None and not wanted:
            return          # nobody looks: not even the explanation is decoded
        from .frames import MiscompareRecord, frame_json, payload_marks
        # frames are numbered from 1 in arrival order on each input
        record = MiscompareRecord(e, format_key(e.key), self.now_ms() - self.started_ms,
                                  _serve_numbers(e.primary), _serve_numbers(e.secondary))
        if self._events_file is not None:
            fields = {"flow": record.flow, "protocol": e.kind, "cause": e.cause,
                      "stream_offset": e.stream_offset}
            if e.raw_seq is not None:
                fields["raw_seq"] = e.raw_seq
            if e.datagram_index is not None:
                fields["datagram_index"] = e.datagram_index
            explanation = record.explanation
            fields["explanation"] = explanation.to_json() if explanation is not None else None
            p_mark, s_mark, _checksum = payload_marks(e)
            for label, pkt, off, numbers, mark in (
                    ("primary", e.primary, e.primary_offset, record.primary_frames, p_mark),
                    ("secondary", e.secondary, e.secondary_offset, record.secondary_frames, s_mark)):
                if pkt is not None:
                    fields[label] = frame_json(pkt, off, numbers, mark, with_hex=False)
            self.event("miscompare", **fields)
        if wanted:
            self._hexdump(record)

    def _hexdump(self, record) -> None:
        now = time.monotonic()
        rate = self.options.hexdumps_per_minute
        self._hexdump_tokens = min(rate, self._hexdump_tokens + (now - self._hexdump_refill) * rate / 60)
        self._hexdump_refill = now
        if self._hexdump_tokens < 1:
            self.hexdumps_suppressed += 1
            return
        self._hexdump_tokens -= 1
        from .render import make_console, print_hexdump
        console = make_console(self.stderr, color=self.options.color)
        # (serve's own count: the core's face has none, and this one
        # numbers each miscompare of a read on its own)
        n = self.miscompares_seen
        print_hexdump(console, record, n, n)
        if self.hexdumps_suppressed:
            console.print(f"({self.hexdumps_suppressed} hexdumps suppressed by the rate limit)")
            self.hexdumps_suppressed = 0

    # -- notify_dev ------------------------------------------------------------------------
    def _on_notify(self, data: bytes) -> None:
        decoder = self._notify_decoder
        if decoder is None:
            return
        for msg in decoder.feed(data):
            if msg == MSG_CHECKPOINT:
                self.colo_checkpoint_received += 1
                self.checkpoint("notify")
            elif msg == MSG_PROXY_INIT:
                self.notify.out.push(encode_notify(MSG_GET_XEN_INIT))
                self.notify.flush()
            else:
                self.notify_unknown += 1
                text = msg[:40].decode("ascii", "replace")
                self.log(f"notify-dev: unsupported instruction {text!r} ignored", 0)
                self.event("notify_unknown", message=text)
        if decoder.error is not None:
            self.log(f"notify-dev: {decoder.error}; closing the connection", 0)
            self.notify.cut_off(decoder.error)
        self.rearm()

    def drain_inputs(self) -> None:
        """Read what the inputs have already sent (bounded), before a
        checkpoint takes effect (serve_qmp, at QEMU's RESUME)."""
        for link in (self.primary, self.secondary):
            link.read_what_is_left()

    # -- the core's timer ---------------------------------------------------------------
    def rearm(self) -> None:
        """Arm the loop's timer for the core's next scan, if that is sooner
        than the one armed: after anything that changed the core's state (a
        read, a scan, a connection, serve_qmp's checkpoints)."""
        due = self.comparator.get_timer()
        if due is None:
            return
        if self._timer is not None and self.timer_at is not None and self.timer_at <= due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self.timer_at = due
        self._timer = self.loop.call_at(due / 1000.0, self._on_timer)

    def scan_now(self) -> None:
        """The armed scan is due but the loop has not run it yet: run it now."""
        self._timer.cancel()
        self._on_timer()

    def _on_timer(self) -> None:
        self._timer = None
        self.timer_at = None
        now = self.now_ms()
        events = self.comparator.handle_timer(now)
        if events:
            self.handle(events, now)
            self.outdev.flush()
            if self.checkpoint_wanted:
                self.send_do_checkpoint()
        self.rearm()

    # -- introspection (the control socket) ----------------------------------------------
    def stats_reply(self, top: int) -> dict:
        """The control socket's ``stats``: counters and the top connections."""
        top_conns = self.comparator.top_connections(top)
        return {"stats": self.snapshot(),
                "top_connections": {k: [connection_summary(c) for c in v]
                                    for k, v in top_conns.items()}}

    def connections_reply(self, limit: int) -> dict:
        """The control socket's ``connections``: the ``limit`` most recent."""
        # (the core's face has no count of its connections: its table is read)
        return {"total": self.comparator.connection_count,
                "connections": [connection_summary(c)
                                for c in self.comparator.connections(limit=limit)]}

    def snapshot(self) -> dict:
        snap = self.comparator.snapshot()
        dropped = snap["dropped"]
        if self.outdev.out.dropped:
            dropped["primary:outdev-overflow"] = self.outdev.out.dropped
        snap["serve"] = {
            "uptime_s": round((self.now_ms() - self.started_ms) / 1000, 3),
            "started": round(self.started_wall, 3),
            "version": __version__,
            "policy": self.options.policy,
            "vnet_hdr_support": self.options.vnet_hdr_support,
            "links": {l.name: l.snapshot() for l in self.links},
            "input_errors": {
                "primary": {"oversized": self.framing_errors[0], "zero_length": self.zero_length[0],
                            "cut_by_disconnect": self.cut_records[0]},
                "secondary": {"oversized": self.framing_errors[1], "zero_length": self.zero_length[1],
                              "cut_by_disconnect": self.cut_records[1]}},
            "notify": {"do_checkpoint_sent": self.do_checkpoint_sent,
                       "colo_checkpoint_received": self.colo_checkpoint_received,
                       "unknown_messages": self.notify_unknown},
            "checkpoints_by": dict(self.checkpoints_by),
            "secondary_absent": self.comparator.secondary_absent,
            "internal_errors": self.internal_errors,
        }
        if self.qmp is not None:
            snap["serve"]["qmp"] = self.qmp.snapshot()
        return snap


def _serve_numbers(pkt) -> tuple:
    """serve's frame numbers: each input's frames from 1, in arrival order
    (the core counts them from 0); a reassembled datagram's fragments."""
    if pkt is None:
        return ()
    if pkt.fragments is not None:
        return tuple(f.index + 1 for f in pkt.fragments)
    return (pkt.index + 1,)


def run(options: ServeOptions, stderr=None) -> int:
    """``colo-compare serve``: run the server until a signal; returns the
    exit status."""
    # each busy read is a block of up to 256 KiB, freed at once: keep such
    # blocks in the heap rather than mmap and fault them in every time
    keep_large_blocks()
    turns = LoopSelector(options.busy_poll_us)
    loop = asyncio.SelectorEventLoop(turns)
    asyncio.set_event_loop(loop)
    server = Server(options, loop, stderr, turns)
    try:
        return loop.run_until_complete(server.run())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        asyncio.set_event_loop(None)
