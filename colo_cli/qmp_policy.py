"""serve's ``qmp`` checkpoint policy: when to ask QEMU's COLO for a
checkpoint over QMP, and what its answers mean.  Sans-IO: QMP facts and
``now_ms`` go in, actions come out; the adapter (``serve_qmp``) talks to
the socket and to the comparator.

Theory of operation
-------------------

QEMU's COLO has no QMP command "checkpoint now", but on the **primary**,
while migration is in COLO state, setting the migration parameter
``x-checkpoint-delay`` wakes the COLO thread to checkpoint at once
(``docs/qemu.md`` section 5).  Setting it to the value it already has
is therefore a checkpoint request that changes nothing (apart from moving
the next periodic checkpoint to now + delay).  Every checkpoint, asked for
or periodic, shows on every QMP monitor of the primary as ``STOP``, then
(with the ``events`` migration capability) ``MIGRATION_PASS``, then
``RESUME``: the VM stops, its state goes to the secondary, the secondary
loads it, and only then does the primary run again.  So at that ``RESUME``
the secondary holds the primary's state and every primary frame queued so
far may leave: the adapter calls ``Comparator.checkpoint()``, as
``serve`` does at Xen's ``COLO_CHECKPOINT`` and QEMU's colo-compare at its
in-process checkpoint event (QEMU's flushes a little earlier, once the
secondary has *received* the state; ``RESUME`` is never earlier).

The rules, each one written once, here:

* **Asking.**  A checkpoint request from the comparator (a miscompare, a
  timeout, a full queue or table) becomes :class:`SendRequest`, unless one
  is already outstanding: at most one request is in flight at a time.
* **What a checkpoint covers.**  A request that arises while ours is
  outstanding and before that checkpoint's ``STOP`` is covered by it.  One
  that arises after a ``STOP`` (ours or a periodic one) and before its
  ``RESUME`` is *deferred*: exactly one new request is sent after that
  ``RESUME``, however many arose meanwhile.
* **Done.**  A ``RESUME`` that ends a ``STOP`` ... ``RESUME`` in COLO state
  is a checkpoint (:class:`Checkpointed`), whether we asked for it or it was
  periodic (or the first one, when migration enters COLO).  With the
  ``events`` capability on, a ``STOP`` ... ``RESUME`` without a
  ``MIGRATION_PASS`` in between is a pause (``stop``/``cont`` on some
  monitor), not a checkpoint, and flushes nothing.
* **Bounded.**  A failed checkpoint never resumes.  If no ``RESUME`` comes
  within ``checkpoint_timeout_ms`` of a request (sent or deferred), or QEMU
  refuses the request, what is held is released locally
  (:class:`GiveUp`), counted, and the policy goes on.
* **Fallback.**  Outside COLO state nothing can checkpoint: before the QMP
  connection is up and has told us the state, before ``migrate`` reaches
  ``colo``, after ``COLO_EXIT`` (failover, or a secondary that died), when
  QMP is lost, or when the monitor is not the COLO primary's.  Then the
  policy is ``release`` (:class:`Fallback`: the comparator checkpoints
  locally, per connection, and answers what it holds now), counted by
  reason, until COLO state is seen again (:class:`ColoActive`).  After a
  ``COLO_EXIT`` only a ``MIGRATION`` event with status ``colo`` counts as
  seeing it again: ``query-migrate`` still says ``colo`` on a primary whose
  secondary died.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .core import Histogram

#: Why the policy is ``release`` for now.
FALLBACK_UNREACHABLE = "qmp-unreachable"    # no QMP connection, or not yet its answers
FALLBACK_NOT_COLO = "not-colo"              # QEMU is not in COLO state
FALLBACK_COLO_EXIT = "colo-exit"            # COLO ended while we watched (failover, error)
FALLBACK_NOT_PRIMARY = "not-primary"        # the monitor is not the COLO primary's
FALLBACK_REASONS = (FALLBACK_UNREACHABLE, FALLBACK_NOT_COLO, FALLBACK_COLO_EXIT,
                    FALLBACK_NOT_PRIMARY)

#: Why a request got no checkpoint.
GIVE_UP_TIMEOUT = "timeout"
GIVE_UP_REFUSED = "refused"


# -- actions ----------------------------------------------------------------------

@dataclass(slots=True)
class SendRequest:
    """Ask QEMU for a checkpoint now (re-send ``x-checkpoint-delay``).
    ``seq`` names the request: replies to a request that is no longer
    current are ignored (``QmpCheckpointPolicy.current``)."""
    seq: int


@dataclass(slots=True)
class Checkpointed:
    """A checkpoint completed (its ``RESUME``): release every queued primary
    frame.  ``requested``: we had asked for it; ``wait_ms``: request to
    ``RESUME``."""
    requested: bool
    wait_ms: float | None = None


@dataclass(slots=True)
class GiveUp:
    """No checkpoint is coming for what is held (``reason``: ``timeout`` or
    ``refused``; ``detail`` says more): release it locally and go on."""
    reason: str
    detail: str


@dataclass(slots=True)
class Fallback:
    """The policy is ``release`` for now, because of ``reason``.  ``left``:
    the qmp policy was in force until now (else only the reason changed)."""
    reason: str
    detail: str
    left: bool


@dataclass(slots=True)
class ColoActive:
    """QEMU is in COLO state: the qmp policy is in force again."""
    detail: str


# -- the policy --------------------------------------------------------------------

class QmpCheckpointPolicy:
    """See the module docstring.  Inputs: ``connected`` / ``disconnected``
    (the QMP link), ``state_known`` (the answers to the queries made at
    connection), ``qmp_event``, ``request`` (the comparator asked for a
    checkpoint), ``refused`` (QEMU answered the request with an error),
    ``handle_timer`` (when ``get_timer`` says).  Each returns the actions
    to take, in order."""

    def __init__(self, checkpoint_timeout_ms: float) -> None:
        if not checkpoint_timeout_ms > 0:
            raise ValueError("the QMP checkpoint timeout must be positive")
        self.checkpoint_timeout_ms = checkpoint_timeout_ms
        #: None while the qmp policy is in force; else why not
        self.fallback_reason: str | None = FALLBACK_UNREACHABLE
        self.events_capability = False
        self._exited = False            # COLO_EXIT seen on this connection
        self._stop_seen = False         # a STOP with no RESUME yet
        self._pass_seen = False         # ... and a MIGRATION_PASS after it
        self._outstanding_ms = None     # when our outstanding request was made
        self._deferred = False          # a request to send after the RESUME
        self._deadline_ms = None        # give up on what is held then
        self._seq = 0
        # counters
        self.requested = 0              # requests sent to QEMU
        self.completed = 0              # ... answered by a checkpoint
        self.periodic = 0               # checkpoints we had not asked for
        self.timed_out = 0              # no RESUME within the bound
        self.failures: Counter = Counter()      # refused, or lost with the link or COLO
        self.covered = 0                # comparator requests covered by the one outstanding
        self.deferred = 0               # ... deferred to after a RESUME (one each time)
        self.pauses = 0                 # STOP ... RESUME that was not a checkpoint
        self.fallbacks: Counter = Counter()          # times the qmp policy was left, by reason
        self.fallback_requests: Counter = Counter()  # comparator requests answered locally
        self.wait_ms = Histogram()      # request -> RESUME

    @property
    def active(self) -> bool:
        """The qmp policy is in force (QEMU in COLO state, as far as we know)."""
        return self.fallback_reason is None

    @property
    def in_flight(self) -> bool:
        """A checkpoint request is outstanding or deferred."""
        return self._outstanding_ms is not None or self._deferred

    def current(self, seq: int) -> bool:
        """Request ``seq`` is still the one outstanding."""
        return seq == self._seq and self._outstanding_ms is not None

    # -- the link --------------------------------------------------------------------
    def connected(self, now_ms) -> list:
        """A new QMP connection: nothing is known until ``state_known``."""
        self._exited = False
        return []

    def disconnected(self, now_ms, detail: str) -> list:
        self._exited = False
        return self._leave(FALLBACK_UNREACHABLE, detail)

    def state_known(self, migration_status: str | None, colo_mode: str | None,
                    events_capability: bool, now_ms) -> list:
        """The answers of ``query-migrate`` (its ``status``),
        ``query-colo-status`` (its ``mode``; None if QEMU does not have the
        command) and ``query-migrate-capabilities`` (``events``)."""
        self.events_capability = bool(events_capability)
        if migration_status == "colo" and not self._exited:
            if colo_mode not in (None, "primary"):
                return self._leave(FALLBACK_NOT_PRIMARY, "this monitor is not the COLO primary's "
                                                         f"(COLO mode {colo_mode})")
            return self._enter("migration status colo")
        if self._exited:
            return self._leave(FALLBACK_COLO_EXIT, "COLO ended (COLO_EXIT)")
        return self._leave(FALLBACK_NOT_COLO, "QEMU is not in COLO state (migration status "
                                              f"{migration_status or 'none'})")

    def capabilities_known(self, events_capability: bool) -> None:
        """``query-migrate-capabilities`` answered again (a migration is
        starting: the capabilities it runs with are set by now)."""
        self.events_capability = bool(events_capability)

    # -- QMP events ------------------------------------------------------------------
    def qmp_event(self, name: str, data: dict, now_ms) -> list:
        if name == "STOP":
            self._stop_seen = True
            self._pass_seen = False
            return []
        if name == "MIGRATION_PASS":
            if self._stop_seen:
                self._pass_seen = True
            return []
        if name == "RESUME":
            return self._resume(now_ms)
        if name == "MIGRATION":
            status = data.get("status")
            if status == "colo":
                self._exited = False
                if self.fallback_reason == FALLBACK_NOT_PRIMARY:
                    return []
                return self._enter("migration status colo")
            if self.active and isinstance(status, str):
                return self._leave(FALLBACK_COLO_EXIT, f"COLO ended (migration status {status})")
            return []
        if name == "COLO_EXIT":
            self._exited = True
            why = data.get("reason")
            return self._leave(FALLBACK_COLO_EXIT, "COLO ended (COLO_EXIT"
                               + (f", reason {why})" if isinstance(why, str) else ")"))
        return []

    def _resume(self, now_ms) -> list:
        was_stopped, had_pass = self._stop_seen, self._pass_seen
        self._stop_seen = self._pass_seen = False
        if not self.active or not was_stopped:
            return []
        if self.events_capability and not had_pass:
            # stop/cont on some monitor: the secondary got nothing
            self.pauses += 1
            return self._send_deferred(now_ms)
        out: list = []
        if self._outstanding_ms is not None:
            wait_ms = now_ms - self._outstanding_ms
            self.completed += 1
            self.wait_ms.add(wait_ms)
            out.append(Checkpointed(True, wait_ms))
        else:
            self.periodic += 1
            out.append(Checkpointed(False, None))
        self._outstanding_ms = None
        self._deadline_ms = None
        out.extend(self._send_deferred(now_ms))
        return out

    def _send_deferred(self, now_ms) -> list:
        if not self._deferred or self._outstanding_ms is not None:
            return []
        self._deferred = False
        self._deadline_ms = None
        return self._send(now_ms)

    # -- requests --------------------------------------------------------------------
    def request(self, now_ms) -> list:
        """The comparator asked for a checkpoint."""
        if not self.active:
            self.fallback_requests[self.fallback_reason] += 1
            return []
        if self._stop_seen:
            # a checkpoint is under way: what arose after its STOP may not
            # be in it, so one more request goes after its RESUME
            if self._deferred:
                self.covered += 1
            else:
                self._deferred = True
                self.deferred += 1
            if self._deadline_ms is None:
                self._deadline_ms = now_ms + self.checkpoint_timeout_ms
            return []
        if self._outstanding_ms is not None:
            self.covered += 1
            return []
        return self._send(now_ms)

    def _send(self, now_ms) -> list:
        self._seq += 1
        self._outstanding_ms = now_ms
        self._deadline_ms = now_ms + self.checkpoint_timeout_ms
        self.requested += 1
        return [SendRequest(self._seq)]

    def refused(self, seq: int, detail: str, now_ms) -> list:
        """QEMU answered request ``seq`` with an error."""
        if not self.current(seq):
            return []
        self.failures[GIVE_UP_REFUSED] += 1
        return self._give_up(GIVE_UP_REFUSED, detail)

    def _give_up(self, reason: str, detail: str) -> list:
        self._outstanding_ms = None
        self._deferred = False
        self._deadline_ms = None
        return [GiveUp(reason, detail)]

    # -- time ------------------------------------------------------------------------
    def get_timer(self):
        """When ``handle_timer`` must be called (ms), or None."""
        return self._deadline_ms

    def handle_timer(self, now_ms) -> list:
        if self._deadline_ms is None or now_ms < self._deadline_ms:
            return []
        self.timed_out += 1
        # (a STOP already seen stays seen: a RESUME that comes late is
        # still a checkpoint, and flushes what is queued then)
        return self._give_up(GIVE_UP_TIMEOUT,
                             f"no RESUME within {self.checkpoint_timeout_ms:g} ms")

    # -- state changes ---------------------------------------------------------------
    def _enter(self, detail: str) -> list:
        if self.active:
            return []
        self.fallback_reason = None
        return [ColoActive(detail)]

    def _leave(self, reason: str, detail: str) -> list:
        self._stop_seen = self._pass_seen = False
        if self.active:
            if self.in_flight:
                self.failures[reason] += 1
            self._outstanding_ms = None
            self._deferred = False
            self._deadline_ms = None
            self.fallbacks[reason] += 1
            self.fallback_reason = reason
            return [Fallback(reason, detail, True)]
        if reason != self.fallback_reason:
            self.fallback_reason = reason
            return [Fallback(reason, detail, False)]
        return []

    # -- introspection ---------------------------------------------------------------
    def snapshot(self) -> dict:
        return {
            "policy_now": "qmp" if self.active else "release",
            "fallback_reason": self.fallback_reason,
            "fallbacks": dict(sorted(self.fallbacks.items())),
            "events_capability": self.events_capability,
            "checkpoints": {"requested": self.requested, "completed": self.completed,
                            "periodic": self.periodic, "timed_out": self.timed_out,
                            "failed": sum(self.failures.values())},
            "failures": dict(sorted(self.failures.items())),
            "requests": {"covered": self.covered, "deferred": self.deferred,
                         "in_fallback": dict(sorted(self.fallback_requests.items()))},
            "pauses": self.pauses,
            "in_flight": self.in_flight,
            "request_to_resume_ms": self.wait_ms.to_dict(),
        }
