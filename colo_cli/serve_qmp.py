"""``serve --qmp``: the QMP side of the ``qmp`` checkpoint policy.

The adapter between three pure pieces and the event loop: the QMP codec
(``qmp.QmpClient``), the policy (``qmp_policy.QmpCheckpointPolicy``: when
to ask, what a ``RESUME`` means, when to give up, when to fall back) and
the comparator (``Server.comparator``, through its public methods
``checkpoint``, ``set_mode`` and the events they return).

The socket is a ``links.Link`` like the others: non-blocking, serviced by
the one event loop, reconnected with backoff.  QMP can therefore never
block the inputs or outdev: a slow or dead QMP peer costs only its own
checkpoints, and those are bounded:

* what we send is a handful of short commands, queued in a bounded buffer;
  a peer that does not read them is cut off;
* what we accept is bounded by the codec (one line of at most 64 KiB);
  garbage is a one-line error, and the connection is closed and made again;
* a command unanswered for twice the checkpoint timeout means a dead peer:
  the connection is closed and made again;
* held frames wait for a ``RESUME`` at most ``--qmp-checkpoint-timeout``.

At connection, after the greeting and ``qmp_capabilities``, serve asks
``query-migrate-capabilities`` (is ``events`` on), ``query-migrate`` (is
migration in ``colo`` state), ``query-colo-status`` (is this the primary)
and ``query-migrate-parameters`` (``x-checkpoint-delay``), and then follows
the events.  A checkpoint request reads ``x-checkpoint-delay`` again and
sets it to the value just read, so that a value changed on another monitor
is never undone.
"""

from __future__ import annotations

from collections import Counter

from .core import CheckpointDone, CheckpointMode
from .qmp import Event, Greeting, QmpClient, Reply
from .qmp_policy import (GIVE_UP_TIMEOUT, Checkpointed, ColoActive, Fallback, GiveUp,
                         QmpCheckpointPolicy, SendRequest)

#: Bytes of commands waiting for the QMP peer to read them, at most.
QMP_OUT_LIMIT = 64 * 1024
#: A command unanswered for this many checkpoint timeouts: the peer is dead.
REPLY_TIMEOUTS = 2
#: ... but never less than this (ms).
REPLY_TIMEOUT_MIN_MS = 1000
#: The QMP events the policy follows (counted in the stats).
FOLLOWED_EVENTS = ("STOP", "RESUME", "MIGRATION_PASS", "MIGRATION", "COLO_EXIT")
#: The queries made at connection (their answers decide the policy's state).
CONNECT_QUERIES = ("query-migrate-capabilities", "query-migrate", "query-colo-status",
                   "query-migrate-parameters")


class QmpSide:
    """One ``--qmp`` endpoint and the qmp policy (see the module docstring)."""

    def __init__(self, server, endpoint, checkpoint_timeout_ms: float) -> None:
        from .links import Link
        self.server = server
        self.loop = server.loop
        self.link = Link(server, "qmp", endpoint, out_limit=QMP_OUT_LIMIT)
        self.policy = QmpCheckpointPolicy(checkpoint_timeout_ms)
        self.reply_timeout_ms = max(REPLY_TIMEOUT_MIN_MS, REPLY_TIMEOUTS * checkpoint_timeout_ms)
        self.client: QmpClient | None = None
        self._callbacks: dict = {}        # command id -> what to do with its reply
        self._sent_ms: dict = {}          # command id -> when it was sent
        self._connected_ms = None
        self._answers: dict = {}          # the connection queries' replies so far
        self._policy_timer = None
        self._watchdog = None
        # what QEMU told us, for the stats
        self.qemu_version = None
        self.migration_status = None
        self.colo_mode = None
        self.x_checkpoint_delay_ms = None
        self.ready = False
        # counters the policy does not keep
        self.protocol_errors = 0
        self.no_answer = 0
        self.events_seen: Counter = Counter()

    # -- the link (called by Server.on_connect / on_data / on_disconnect) ----------------
    def on_connect(self) -> None:
        # commands queued for the last connection mean nothing to this one
        self.link.out.clear()
        self.client = QmpClient()
        self._callbacks = {}
        self._sent_ms = {}
        self._answers = {}
        self.ready = False
        now = self.server.now_ms()
        self._connected_ms = now
        self._apply(self.policy.connected(now), now)
        self._arm_watchdog()

    def on_disconnect(self) -> None:
        self.client = None
        self.ready = False
        self._callbacks = {}
        self._sent_ms = {}
        self._connected_ms = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        now = self.server.now_ms()
        self._apply(self.policy.disconnected(now, f"QMP connection lost ({self.link.last_error})"),
                    now)

    def on_data(self, data: bytes) -> None:
        client = self.client
        if client is None:
            return
        for msg in client.receive(data):
            if self.client is not client:
                return                       # cut off while handling an earlier message
            t = type(msg)
            if t is Event:
                self._on_event(msg)
            elif t is Reply:
                self._sent_ms.pop(msg.id, None)
                callback = self._callbacks.pop(msg.id, None)
                if callback is not None:
                    callback(msg)
            elif t is Greeting:
                self._on_greeting(msg)
        if self.client is client and client.error is not None:
            self.protocol_errors += 1
            self.server.log(f"qmp: {self.link.endpoint}: {client.error}; closing the connection "
                            "(the next one starts afresh)")
            self.server.event("qmp_protocol_error", error=client.error)
            self.link.cut_off(client.error)
            return
        self._arm_watchdog()

    def close(self) -> None:
        for handle in (self._policy_timer, self._watchdog):
            if handle is not None:
                handle.cancel()
        self._policy_timer = self._watchdog = None

    # -- commands ----------------------------------------------------------------------
    def _send(self, name: str, arguments: dict | None, callback) -> bool:
        client = self.client
        if client is None or client.error is not None:
            return False
        try:
            ident, data = client.command(name, arguments)
        except ValueError as e:
            # (more commands waiting than we ever send: the peer stopped answering)
            self.link.cut_off(str(e))
            return False
        if not self.link.out.push(data):
            why = "the QMP peer does not read what serve sends"
            self.server.log(f"qmp: {self.link.endpoint}: {why}; closing the connection")
            self.link.cut_off(why)
            return False
        self._callbacks[ident] = callback
        self._sent_ms[ident] = self.server.now_ms()
        self.link.flush()
        self._arm_watchdog()
        return True

    def _on_greeting(self, greeting: Greeting) -> None:
        self.qemu_version = greeting.version or None
        self._send("qmp_capabilities", None, lambda reply: None)
        for name in CONNECT_QUERIES:
            self._send(name, None, lambda reply, name=name: self._on_connect_answer(name, reply))

    def _on_connect_answer(self, name: str, reply: Reply) -> None:
        self._answers[name] = reply
        if len(self._answers) < len(CONNECT_QUERIES):
            return
        a = self._answers
        caps = a["query-migrate-capabilities"]
        events = _events_capability(caps)
        mig = a["query-migrate"]
        status = mig.value.get("status") if mig.ok and isinstance(mig.value, dict) else None
        colo = a["query-colo-status"]
        mode = colo.value.get("mode") if colo.ok and isinstance(colo.value, dict) else None
        params = a["query-migrate-parameters"]
        if params.ok and isinstance(params.value, dict):
            delay = params.value.get("x-checkpoint-delay")
            self.x_checkpoint_delay_ms = delay if type(delay) is int else None
        self.migration_status = status if isinstance(status, str) else None
        self.colo_mode = mode if isinstance(mode, str) else None
        self.ready = True
        now = self.server.now_ms()
        self.server.log(f"qmp: connected to QEMU {self.qemu_version or '(version unknown)'} at "
                        f"{self.link.endpoint}: migration status {self.migration_status or 'none'}, "
                        f"COLO mode {self.colo_mode or 'unknown'}, x-checkpoint-delay "
                        f"{self.x_checkpoint_delay_ms} ms, events capability "
                        f"{'on' if events else 'off'}", 1)
        self.server.event("qmp_ready", qemu=self.qemu_version, migration_status=self.migration_status,
                          colo_mode=self.colo_mode, events_capability=events,
                          x_checkpoint_delay_ms=self.x_checkpoint_delay_ms)
        if self.migration_status == "colo":
            self._check_events_capability(events)
        self._apply(self.policy.state_known(self.migration_status, self.colo_mode, events, now), now)

    def _check_events_capability(self, events: bool) -> None:
        if not events:
            self.server.log("qmp: the 'events' migration capability is off: serve cannot tell a "
                            "checkpoint from a stop/cont on another monitor (set it with x-colo, "
                            "before migrate)")

    def _on_capabilities(self, reply: Reply) -> None:
        events = _events_capability(reply)
        self.policy.capabilities_known(events)
        self._check_events_capability(events)

    def _on_event(self, e: Event) -> None:
        if e.name not in FOLLOWED_EVENTS:
            return
        self.events_seen[e.name] += 1
        if e.name == "MIGRATION" and isinstance(e.data.get("status"), str):
            self.migration_status = e.data["status"]
            if self.migration_status == "setup":
                # the capabilities of this migration are set by now
                self._send("query-migrate-capabilities", None, self._on_capabilities)
        if e.name == "RESUME" and self.policy.active:
            # frames the primary sent before the STOP may still wait in the
            # sockets: take them first, so that the checkpoint flushes them
            # and anything they raise counts as arising after the STOP
            self.server.drain_inputs()
        now = self.server.now_ms()
        self._apply(self.policy.qmp_event(e.name, e.data, now), now)

    # -- the comparator's requests --------------------------------------------------------
    def request(self, now_ms) -> None:
        """The comparator asked for a checkpoint."""
        # (a deferred request arms the bound without any action)
        self._apply(self.policy.request(now_ms), now_ms)

    def _ask(self, seq: int) -> None:
        """Re-send x-checkpoint-delay with its current value (read now)."""
        self.server.event("qmp_checkpoint_request", seq=seq)
        if not self._send("query-migrate-parameters", None,
                          lambda reply: self._on_parameters(seq, reply)):
            self._refused(seq, "QMP is not connected")

    def _on_parameters(self, seq: int, reply: Reply) -> None:
        if not self.policy.current(seq):
            return                          # given up meanwhile
        delay = reply.value.get("x-checkpoint-delay") if reply.ok and isinstance(reply.value, dict) \
            else None
        if type(delay) is not int:
            self._refused(seq, f"query-migrate-parameters: {_reply_text(reply)}"
                          if not reply.ok else "no x-checkpoint-delay in query-migrate-parameters")
            return
        self.x_checkpoint_delay_ms = delay
        self._send("migrate-set-parameters", {"x-checkpoint-delay": delay},
                   lambda r: None if r.ok else self._refused(seq, f"migrate-set-parameters: "
                                                                  f"{_reply_text(r)}"))

    def _refused(self, seq: int, detail: str) -> None:
        now = self.server.now_ms()
        self._apply(self.policy.refused(seq, detail, now), now)

    # -- acting on the policy's decisions --------------------------------------------------
    def _apply(self, actions: list, now_ms) -> None:
        server = self.server
        for a in actions:
            t = type(a)
            if t is SendRequest:
                self._ask(a.seq)
            elif t is Checkpointed:
                done = server.checkpoint("qmp")
                server.event("qmp_checkpoint", requested=a.requested,
                             wait_ms=round(a.wait_ms, 3) if a.wait_ms is not None else None,
                             **done)
            elif t is GiveUp:
                released = self._release_held(now_ms)
                server.event("qmp_checkpoint_failed", reason=a.reason, detail=a.detail,
                             released=released)
                # a QEMU that stays stopped times out every request: say so the
                # first time and every hundredth; a refusal each time
                n = self.policy.timed_out if a.reason == GIVE_UP_TIMEOUT else 1
                if n == 1 or n % 100 == 0:
                    server.log(f"qmp: checkpoint request failed: {a.detail}; {released} held "
                               "frames released locally"
                               + (f" ({n} timeouts so far)" if a.reason == GIVE_UP_TIMEOUT
                                  else ""))
            elif t is Fallback:
                released = self._set_mode(CheckpointMode.LOCAL, now_ms)
                server.event("qmp_fallback", reason=a.reason, detail=a.detail, released=released)
                server.log(f"qmp: {a.detail}; checkpoints are local meanwhile (release "
                           f"policy, fallback {a.reason})"
                           + (f"; {released} held frames released" if a.left else ""))
            elif t is ColoActive:
                self._set_mode(CheckpointMode.EXTERNAL, now_ms)
                server.event("qmp_active", detail=a.detail)
                server.log(f"qmp: QEMU is in COLO state ({a.detail}): checkpoints are asked of "
                           "QEMU (policy qmp)")
        self._arm_policy_timer()

    def _set_mode(self, mode, now_ms) -> int:
        """Switch the comparator's checkpoint mode; entering LOCAL answers what
        it holds.  Returns the frames that released."""
        events = self.server.comparator.set_mode(mode, now_ms)
        released = sum(e.released for e in events if type(e) is CheckpointDone)
        if events:
            self.server.handle(events, now_ms)
            self.server.outdev.flush()
        self.server.rearm()
        return released

    def _release_held(self, now_ms) -> int:
        """No checkpoint is coming: checkpoint locally, per connection, what
        waits for one (a divergence, or frames past the compare timeout), as
        the release policy would have at once; then wait for QEMU again.
        (Entering the comparator's LOCAL mode is what answers them.)"""
        released = self._set_mode(CheckpointMode.LOCAL, now_ms)
        self._set_mode(CheckpointMode.EXTERNAL, now_ms)
        return released

    # -- timers --------------------------------------------------------------------------
    def _arm_policy_timer(self) -> None:
        due = self.policy.get_timer()
        if self._policy_timer is not None:
            self._policy_timer.cancel()
            self._policy_timer = None
        if due is not None:
            self._policy_timer = self.loop.call_at(due / 1000.0, self._on_policy_timer)

    def _on_policy_timer(self) -> None:
        self._policy_timer = None
        now = self.server.now_ms()
        self._apply(self.policy.handle_timer(now), now)

    def _arm_watchdog(self) -> None:
        """A peer that does not greet, or leaves a command unanswered, for
        ``reply_timeout_ms`` is taken for dead."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.client is None:
            return
        if self._sent_ms:
            since = min(self._sent_ms.values())
        elif self.client.greeting is None and self._connected_ms is not None:
            since = self._connected_ms
        else:
            return
        self._watchdog = self.loop.call_at((since + self.reply_timeout_ms) / 1000.0,
                                           self._on_watchdog)

    def _on_watchdog(self) -> None:
        self._watchdog = None
        if self.client is None:
            return
        now = self.server.now_ms()
        waiting = [i for i, t in self._sent_ms.items() if now - t >= self.reply_timeout_ms]
        if not waiting and not (self.client.greeting is None and self._connected_ms is not None
                                and now - self._connected_ms >= self.reply_timeout_ms):
            self._arm_watchdog()
            return
        self.no_answer += 1
        what = "no greeting" if self.client.greeting is None else "a command unanswered"
        why = f"{what} for {self.reply_timeout_ms / 1000:g} s"
        self.server.log(f"qmp: {self.link.endpoint}: {why}; closing the connection and "
                        "connecting again")
        self.server.event("qmp_protocol_error", error=why)
        self.link.cut_off(why)

    # -- introspection ---------------------------------------------------------------------
    def snapshot(self) -> dict:
        d = {"endpoint": str(self.link.endpoint),
             "connected": self.link.sock is not None,
             "ready": self.ready,
             "qemu": self.qemu_version,
             "migration_status": self.migration_status,
             "colo_mode": self.colo_mode,
             "x_checkpoint_delay_ms": self.x_checkpoint_delay_ms,
             "checkpoint_timeout_ms": self.policy.checkpoint_timeout_ms,
             "protocol_errors": self.protocol_errors,
             "no_answer": self.no_answer,
             "events": {name: self.events_seen[name] for name in FOLLOWED_EVENTS}}
        d.update(self.policy.snapshot())
        return d


def _events_capability(reply: Reply) -> bool:
    """The ``events`` migration capability is on, says a
    ``query-migrate-capabilities`` reply."""
    return reply.ok and isinstance(reply.value, list) and any(
        isinstance(c, dict) and c.get("capability") == "events" and c.get("state") is True
        for c in reply.value)


def _reply_text(reply: Reply) -> str:
    return reply.error_desc or reply.error_class or "error"

