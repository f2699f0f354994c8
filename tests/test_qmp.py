"""Unit tests of the QMP codec (``colo_cli/qmp.py``) and of the qmp
checkpoint policy (``colo_cli/qmp_policy.py``), both sans-IO: exact byte
vectors in (the greeting and events are QEMU 7.2.22's, as read on this
machine's guest-less COLO pair), messages out; scripted (input, now_ms)
sequences in, exact actions out; hypothesis for the invariants."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colo_cli.qmp import MAX_LINE_BYTES, MAX_PENDING, Event, Greeting, QmpClient, Reply, State
from colo_cli.qmp_policy import (Checkpointed, ColoActive, Fallback, GiveUp, QmpCheckpointPolicy,
                                 SendRequest)

# what QEMU 7.2.22 (Debian 12) sent on a QMP socket, byte for byte
GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
            b'"package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}\r\n')
STOP = b'{"timestamp": {"seconds": 1796651299, "microseconds": 679488}, "event": "STOP"}\r\n'
PASS = (b'{"timestamp": {"seconds": 1796651299, "microseconds": 679717}, "event": '
        b'"MIGRATION_PASS", "data": {"pass": 3}}\r\n')
RESUME = b'{"timestamp": {"seconds": 1796651299, "microseconds": 767170}, "event": "RESUME"}\r\n'


def ready_client() -> QmpClient:
    c = QmpClient()
    assert c.receive(GREETING)
    ident, _ = c.command("qmp_capabilities")
    assert c.receive(b'{"return": {}, "id": %d}\r\n' % ident)[0].ok
    return c


# -- the codec: exact bytes -----------------------------------------------------------

def test_greeting_then_capabilities_then_ready():
    c = QmpClient()
    assert c.state is State.GREETING
    (g,) = c.receive(GREETING)
    assert g == Greeting("7.2.22", "Debian 1:7.2+dfsg-7+deb12u18+b3", ("oob",))
    assert c.state is State.NEGOTIATING
    ident, data = c.command("qmp_capabilities")
    assert (ident, data) == (1, b'{"execute":"qmp_capabilities","id":1}\n')
    (r,) = c.receive(b'{"return": {}, "id": 1}\r\n')
    assert r == Reply(1, "qmp_capabilities", True, {})
    assert c.state is State.READY and c.error is None and c.pending == 0


def test_command_bytes_with_arguments_and_increasing_ids():
    c = ready_client()
    assert c.command("query-migrate") == (2, b'{"execute":"query-migrate","id":2}\n')
    assert c.command("migrate-set-parameters", {"x-checkpoint-delay": 20000}) == (
        3, b'{"execute":"migrate-set-parameters","arguments":{"x-checkpoint-delay":20000},"id":3}\n')
    assert c.pending == 2


def test_replies_matched_by_id_in_any_order_and_errors_carried():
    c = ready_client()
    a, _ = c.command("query-migrate")
    b, _ = c.command("query-colo-status")
    msgs = c.receive(b'{"error": {"class": "CommandNotFound", "desc": "The command query-colo-status '
                     b'has not been found"}, "id": %d}\r\n{"return": {"status": "colo"}, "id": %d}\r\n'
                     % (b, a))
    assert msgs == [Reply(b, "query-colo-status", False, None, "CommandNotFound",
                          "The command query-colo-status has not been found"),
                    Reply(a, "query-migrate", True, {"status": "colo"})]
    assert c.pending == 0


def test_events_with_their_timestamps():
    c = ready_client()
    assert c.receive(STOP + PASS + RESUME) == [
        Event("STOP", {}, 1796651299.679488),
        Event("MIGRATION_PASS", {"pass": 3}, 1796651299.679717),
        Event("RESUME", {}, 1796651299.76717)]
    # QEMU sends seconds -1 when its clock failed; no timestamp at all is allowed too
    assert c.receive(b'{"event": "X", "timestamp": {"seconds": -1, "microseconds": -1}}\n'
                     b'{"event": "Y", "data": {"a": 1}}\n') == [Event("X", {}, None),
                                                                Event("Y", {"a": 1}, None)]


def test_input_split_anywhere_gives_the_same_messages():
    stream = GREETING + b'{"return": {}, "id": 1}\r\n' + STOP + PASS + RESUME
    whole = QmpClient()
    expected = whole.receive(GREETING)
    whole.command("qmp_capabilities")
    expected += whole.receive(stream[len(GREETING):])
    c = QmpClient()
    got = []
    for i in range(len(stream)):
        got += c.receive(stream[i:i + 1])
        if got and isinstance(got[0], Greeting) and c.pending == 0 and c.state is State.NEGOTIATING:
            c.command("qmp_capabilities")
    assert got == expected and c.error is None


def test_blank_lines_and_bare_lf_are_fine():
    c = QmpClient()
    assert len(c.receive(b"\r\n\n" + GREETING.replace(b"\r\n", b"\n"))) == 1


@pytest.mark.parametrize("garbage, error", [
    (b"HTTP/1.1 400 Bad Request\r\n", "not JSON: 'HTTP/1.1 400 Bad Request?'"),
    (b"[1, 2]\n", "not a JSON object: '[1, 2]'"),
    (b'{"hello": "world"}\n', "not a QMP greeting"),
    (b'{"return": {}}\n', "not a QMP greeting"),
    (b"\xff\xfe\x00garbage\n", "not JSON"),
])
def test_garbage_instead_of_a_greeting_is_a_one_line_error(garbage, error):
    c = QmpClient()
    assert c.receive(garbage + GREETING) == []
    assert c.state is State.FAILED and error in c.error and "\n" not in c.error
    assert c.receive(GREETING) == []                     # nothing more is parsed
    with pytest.raises(ValueError):
        c.command("query-status")


@pytest.mark.parametrize("line, error", [
    (b'{"return": {}, "id": 99}\n', "a reply to no command we sent"),
    (b'{"return": {}}\n', "a reply without an id"),
    (b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}\n', "a reply without an id"),
    (GREETING, "a second QMP greeting"),
    (b'{"event": 5}\n', "malformed event"),
    (b'{"event": "STOP", "data": [1]}\n', "malformed event"),
    (b'{"something": "else"}\n', "not a QMP message"),
    (b"nonsense\n", "not JSON"),
])
def test_protocol_violations_after_the_greeting(line, error):
    c = ready_client()
    c.command("query-status")
    msgs = c.receive(STOP + line + RESUME)
    assert msgs == [Event("STOP", {}, 1796651299.679488)]     # what came before the error
    assert error in c.error and c.state is State.FAILED and c.pending == 0


def test_capabilities_refused_is_an_error():
    c = QmpClient()
    c.receive(GREETING)
    c.command("qmp_capabilities")
    assert c.receive(b'{"error": {"class": "GenericError", "desc": "nope"}, "id": 1}\n') == []
    assert c.error == "qmp_capabilities refused: nope"


def test_a_line_longer_than_the_bound_is_an_error_with_or_without_its_newline():
    c = ready_client()
    assert c.receive(b"x" * MAX_LINE_BYTES) == []
    assert c.error is None                                   # at the bound: still waiting
    assert c.receive(b"x") == []
    assert c.error == f"a line longer than {MAX_LINE_BYTES} bytes"
    c = ready_client()
    assert c.receive(b'{"event": "STOP", "data": {"pad": "' + b"y" * MAX_LINE_BYTES + b'"}}\n') == []
    assert c.error == f"a line longer than {MAX_LINE_BYTES} bytes"
    # memory: nothing of it is kept
    assert len(c._buf) == 0


def test_a_long_but_bounded_line_is_accepted():
    c = ready_client()
    body = b'{"event": "X", "data": {"pad": "' + b"z" * 1000 + b'"}}'
    small = QmpClient(max_line_bytes=len(body))
    small.receive(GREETING)
    assert small.receive(body + b"\n") == [Event("X", {"pad": "z" * 1000}, None)]
    assert c.receive(body + b"\n")[0].name == "X"


def test_no_command_before_the_greeting_and_a_bounded_number_outstanding():
    c = QmpClient()
    with pytest.raises(ValueError, match="no QMP greeting"):
        c.command("qmp_capabilities")
    c = ready_client()
    for _ in range(MAX_PENDING):
        c.command("query-status")
    with pytest.raises(ValueError, match="already wait"):
        c.command("query-status")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 50))
def test_any_bytes_never_raise_and_leave_at_most_one_line_buffered(data, chunk):
    c = QmpClient(max_line_bytes=64)
    for i in range(0, len(data), chunk):
        msgs = c.receive(data[i:i + chunk])
        assert all(isinstance(m, (Greeting, Reply, Event)) for m in msgs)
        assert len(c._buf) <= 64
    if c.error is not None:
        assert "\n" not in c.error and c.state is State.FAILED


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([STOP, PASS, RESUME,
                                 b'{"event": "MIGRATION", "data": {"status": "colo"}}\n']),
                max_size=20),
       st.lists(st.integers(1, 40), min_size=1, max_size=10))
def test_events_split_at_random_arrive_whole_and_in_order(events, cuts):
    stream = b"".join(events)
    c = ready_client()
    got = []
    pos = 0
    i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        got += c.receive(stream[pos:pos + step])
        pos += step
        i += 1
    assert [m.name for m in got] == [json.loads(e)["event"] for e in events]
    assert c.error is None


# -- the policy: scripted sequences -----------------------------------------------------

TIMEOUT = 1000


def colo_policy(events_capability: bool = True) -> QmpCheckpointPolicy:
    p = QmpCheckpointPolicy(TIMEOUT)
    assert p.connected(0) == []
    assert p.state_known("colo", "primary", events_capability, 0) == [ColoActive("migration status colo")]
    assert p.active
    return p


def checkpoint(p: QmpCheckpointPolicy, now: float, with_pass: bool = True) -> list:
    out = p.qmp_event("STOP", {}, now)
    if with_pass:
        out += p.qmp_event("MIGRATION_PASS", {"pass": 3}, now)
    return out + p.qmp_event("RESUME", {}, now + 1)


def test_starts_in_fallback_until_colo_is_known():
    p = QmpCheckpointPolicy(TIMEOUT)
    assert not p.active and p.fallback_reason == "qmp-unreachable"
    assert p.request(5) == []                                 # answered locally
    assert p.fallback_requests == {"qmp-unreachable": 1}
    assert p.state_known(None, "none", False, 10) == [
        Fallback("not-colo", "QEMU is not in COLO state (migration status none)", False)]
    assert p.fallbacks == {}                                  # never left the qmp policy
    # migration reaches COLO: the MIGRATION event is enough
    assert p.qmp_event("MIGRATION", {"status": "setup"}, 20) == []
    assert p.qmp_event("MIGRATION", {"status": "colo"}, 30) == [ColoActive("migration status colo")]


def test_one_request_one_checkpoint_and_its_wait():
    p = colo_policy()
    assert p.request(100) == [SendRequest(1)]
    assert p.get_timer() == 100 + TIMEOUT
    assert p.qmp_event("STOP", {}, 101.5) == []
    assert p.qmp_event("MIGRATION_PASS", {"pass": 3}, 101.6) == []
    assert p.qmp_event("RESUME", {}, 190) == [Checkpointed(True, 90)]
    assert p.get_timer() is None and not p.in_flight
    assert (p.requested, p.completed, p.periodic) == (1, 1, 0)
    assert p.wait_ms.count == 1 and p.wait_ms.max == 90


def test_requests_before_the_stop_are_covered_by_the_one_outstanding():
    p = colo_policy()
    assert p.request(100) == [SendRequest(1)]
    assert p.request(100.5) == [] and p.request(101) == []   # covered
    assert checkpoint(p, 102) == [Checkpointed(True, 3)]
    assert (p.requested, p.covered, p.deferred) == (1, 2, 0)


def test_requests_after_the_stop_make_exactly_one_more_after_the_resume():
    p = colo_policy()
    p.request(100)
    p.qmp_event("STOP", {}, 102)
    assert p.request(110) == [] and p.request(120) == [] and p.request(130) == []
    p.qmp_event("MIGRATION_PASS", {}, 131)
    assert p.qmp_event("RESUME", {}, 190) == [Checkpointed(True, 90), SendRequest(2)]
    assert (p.requested, p.deferred, p.covered) == (2, 1, 2)
    assert p.get_timer() == 190 + TIMEOUT
    assert checkpoint(p, 250) == [Checkpointed(True, 61)]      # (RESUME at 251)
    assert p.requested == 2 and p.completed == 2


def test_a_request_during_a_periodic_checkpoint_waits_for_its_resume():
    p = colo_policy()
    assert p.qmp_event("STOP", {}, 50) == []
    assert p.request(60) == []
    assert p.get_timer() == 60 + TIMEOUT                     # what is held is bounded meanwhile
    p.qmp_event("MIGRATION_PASS", {}, 61)
    assert p.qmp_event("RESUME", {}, 100) == [Checkpointed(False, None), SendRequest(1)]
    assert p.periodic == 1


def test_a_periodic_checkpoint_before_our_request_ends_it_and_is_counted_ours():
    """Our request arose before the STOP: that checkpoint covers it (QEMU
    folds a request made while it is about to checkpoint into that one)."""
    p = colo_policy()
    p.request(100)
    assert checkpoint(p, 100.25) == [Checkpointed(True, 1.25)]


def test_periodic_checkpoints_flush_without_a_request():
    p = colo_policy()
    assert checkpoint(p, 5000) == [Checkpointed(False, None)]
    assert checkpoint(p, 10000) == [Checkpointed(False, None)]
    assert p.periodic == 2 and p.requested == 0


def test_no_resume_within_the_bound_gives_up_once_and_goes_on():
    p = colo_policy()
    p.request(100)
    p.qmp_event("STOP", {}, 101)
    assert p.handle_timer(100 + TIMEOUT - 1) == []
    assert p.handle_timer(100 + TIMEOUT) == [GiveUp("timeout", f"no RESUME within {TIMEOUT} ms")]
    assert p.timed_out == 1 and p.get_timer() is None and p.active
    # the VM is still stopped: a new request waits for its RESUME, bounded
    assert p.request(1200) == [] and p.get_timer() == 1200 + TIMEOUT
    assert p.handle_timer(2200) == [GiveUp("timeout", f"no RESUME within {TIMEOUT} ms")]
    # a late RESUME is still a checkpoint
    p.qmp_event("MIGRATION_PASS", {}, 2300)
    assert p.qmp_event("RESUME", {}, 2400) == [Checkpointed(False, None)]
    assert p.request(2500) == [SendRequest(2)]


def test_no_stop_at_all_within_the_bound_gives_up_too():
    p = colo_policy()
    p.request(0)
    assert p.handle_timer(TIMEOUT) == [GiveUp("timeout", f"no RESUME within {TIMEOUT} ms")]
    assert p.request(TIMEOUT + 1) == [SendRequest(2)]


def test_a_refused_request_gives_up_at_once_and_stale_refusals_are_ignored():
    p = colo_policy()
    p.request(0)
    assert p.refused(1, "migrate-set-parameters: nope", 2) == [GiveUp("refused", "migrate-set-parameters: nope")]
    assert p.failures == {"refused": 1}
    assert p.refused(1, "again", 3) == []                    # not current any more
    assert p.request(4) == [SendRequest(2)]
    assert not p.current(1) and p.current(2)


def test_a_pause_is_not_a_checkpoint_with_the_events_capability():
    p = colo_policy(events_capability=True)
    p.request(0)
    assert checkpoint(p, 10, with_pass=False) == []          # stop/cont on another monitor
    assert p.pauses == 1 and p.in_flight
    assert checkpoint(p, 20) == [Checkpointed(True, 21)]


def test_a_pause_sends_a_deferred_request():
    p = colo_policy(events_capability=True)
    p.qmp_event("STOP", {}, 0)
    p.request(5)
    assert p.qmp_event("RESUME", {}, 10) == [SendRequest(1)]


def test_without_the_events_capability_every_stop_resume_is_a_checkpoint():
    p = colo_policy(events_capability=False)
    assert checkpoint(p, 10, with_pass=False) == [Checkpointed(False, None)]
    p.capabilities_known(True)
    assert checkpoint(p, 20, with_pass=False) == []


def test_the_checkpoint_that_starts_colo_counts():
    """STOP while migration is still active, then colo, then RESUME."""
    p = QmpCheckpointPolicy(TIMEOUT)
    p.state_known("setup", "none", True, 0)
    p.qmp_event("MIGRATION", {"status": "active"}, 1)
    p.qmp_event("STOP", {}, 2)
    p.qmp_event("MIGRATION_PASS", {"pass": 2}, 2)
    assert p.qmp_event("MIGRATION", {"status": "colo"}, 3) == [ColoActive("migration status colo")]
    assert p.qmp_event("RESUME", {}, 4) == [Checkpointed(False, None)]


def test_failover_stop_then_colo_exit_then_resume_is_no_checkpoint():
    p = colo_policy()
    p.request(0)
    p.qmp_event("STOP", {}, 1)
    assert p.qmp_event("MIGRATION", {"status": "completed"}, 2) == [
        Fallback("colo-exit", "COLO ended (migration status completed)", True)]
    assert p.qmp_event("COLO_EXIT", {"mode": "primary", "reason": "request"}, 3) == []
    assert p.qmp_event("RESUME", {}, 4) == []
    assert p.failures == {"colo-exit": 1} and p.fallbacks == {"colo-exit": 1}
    assert p.get_timer() is None
    assert p.request(5) == [] and p.fallback_requests == {"colo-exit": 1}


def test_colo_exit_is_sticky_on_its_connection():
    """A primary whose secondary died: COLO_EXIT, but query-migrate still
    says colo.  Only a MIGRATION event with status colo brings the qmp policy
    back; a new connection starts afresh."""
    p = colo_policy()
    assert p.qmp_event("COLO_EXIT", {"mode": "primary", "reason": "error"}, 10) == [
        Fallback("colo-exit", "COLO ended (COLO_EXIT, reason error)", True)]
    assert p.state_known("colo", "primary", True, 20) == []
    assert not p.active
    assert p.qmp_event("MIGRATION", {"status": "colo"}, 30) == [ColoActive("migration status colo")]
    p.qmp_event("COLO_EXIT", {}, 40)
    p.disconnected(50, "QMP connection lost")
    p.connected(60)
    assert p.state_known("colo", "primary", True, 70) == [ColoActive("migration status colo")]


def test_losing_qmp_falls_back_and_counts_what_was_in_flight():
    p = colo_policy()
    p.request(0)
    assert p.disconnected(5, "QMP connection lost (closed by the peer)") == [
        Fallback("qmp-unreachable", "QMP connection lost (closed by the peer)", True)]
    assert p.failures == {"qmp-unreachable": 1} and p.fallbacks == {"qmp-unreachable": 1}
    assert p.get_timer() is None and not p.in_flight
    assert p.state_known("colo", "primary", True, 9) == [ColoActive("migration status colo")]
    assert p.request(10) == [SendRequest(2)]


def test_the_secondary_monitor_is_not_the_primary():
    p = QmpCheckpointPolicy(TIMEOUT)
    assert p.state_known("colo", "secondary", True, 0) == [
        Fallback("not-primary", "this monitor is not the COLO primary's (COLO mode secondary)", False)]
    assert p.qmp_event("MIGRATION", {"status": "colo"}, 1) == []
    assert not p.active


def test_the_timeout_must_be_positive():
    with pytest.raises(ValueError):
        QmpCheckpointPolicy(0)


ACTIONS = st.lists(st.tuples(
    st.sampled_from(["request", "STOP", "MIGRATION_PASS", "RESUME", "colo", "completed",
                     "COLO_EXIT", "timer", "down", "up", "refused"]),
    st.floats(0, 300)), max_size=60)


@settings(max_examples=400, deadline=None)
@given(ACTIONS)
def test_policy_invariants(script):
    """Whatever QEMU and the comparator do: at most one request outstanding
    (a SendRequest only when none is); held frames always have a deadline
    while a request is in flight; nothing is in flight outside the qmp
    policy; no more checkpoints are counted as answering a request than
    requests were sent, and none is counted both ways."""
    p = QmpCheckpointPolicy(TIMEOUT)
    now = 0.0
    p.state_known("colo", "primary", True, now)
    for what, dt in script:
        now += dt
        was_outstanding = p._outstanding_ms is not None
        if what == "request":
            out = p.request(now)
        elif what in ("STOP", "MIGRATION_PASS", "RESUME"):
            out = p.qmp_event(what, {}, now)
        elif what in ("colo", "completed"):
            out = p.qmp_event("MIGRATION", {"status": what}, now)
        elif what == "COLO_EXIT":
            out = p.qmp_event("COLO_EXIT", {}, now)
        elif what == "timer":
            out = p.handle_timer(p.get_timer() if p.get_timer() is not None else now)
        elif what == "down":
            out = p.disconnected(now, "lost")
        elif what == "up":
            p.connected(now)
            out = p.state_known("colo", "primary", True, now)
        else:
            out = p.refused(p._seq, "no", now)
        sends = [a for a in out if isinstance(a, SendRequest)]
        assert len(sends) <= 1
        if sends and what != "RESUME":
            assert not was_outstanding
        if p.in_flight:
            assert p.active and p.get_timer() is not None
        if not p.active:
            assert not p.in_flight and p.get_timer() is None
        checkpoints = [a for a in out if isinstance(a, Checkpointed)]
        assert len(checkpoints) <= 1
        if checkpoints and checkpoints[0].requested:
            assert was_outstanding and checkpoints[0].wait_ms >= 0
    assert p.completed <= p.requested
    assert p.completed == p.wait_ms.count


def test_the_real_guest_test_says_why_it_is_skipped():
    """tests/test_qmp_real_guests.py is opt-in; when it skips, the reason
    must name what is missing (here: the variable, then kvm_pvm)."""
    import os

    from qemu_harness import qemu_available
    from test_qmp_real_guests import ENV, skip_reason
    assert ENV in skip_reason({})
    if qemu_available() and os.path.exists("/sys/module/kvm_pvm"):
        assert "kvm_pvm" in skip_reason({ENV: "1"})
        assert "kvm_pvm" not in (skip_reason({ENV: "1", "COLO_COMPARE_REAL_GUESTS_ACCEL": "tcg"})
                                 or "")
