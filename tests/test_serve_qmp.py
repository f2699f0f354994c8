"""``serve --qmp`` on loopback against a scripted QMP server.

Real QEMU cannot be made, on demand, to never resume, to greet with
garbage, to answer slowly, to refuse, to pause without checkpointing or to
checkpoint at exactly the moment a test needs; :class:`FakeQmp` can.  It
speaks QMP as QEMU 7.2 does (its greeting and event lines are QEMU's
bytes), records every command serve sends, and checkpoints (STOP,
MIGRATION_PASS, RESUME) when told to or when asked by
``migrate-set-parameters``.  The tests check what serve releases on outdev,
what it asks of the fake, and what it counts.  Every wait is bounded; every
serve is killed at the end.  The real QEMU tests are in
``test_qmp_qemu.py``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from colo_cli.testing import udp_frame
from serve_helpers import PY, OutReader, ServeProc, connect, free_port, rec, unix_ep, wait_until

GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
            b'"package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}\r\n')


def event_line(name: str, data: dict | None = None) -> bytes:
    t = time.time()
    msg = {"timestamp": {"seconds": int(t), "microseconds": int(t % 1 * 1e6)}, "event": name}
    if data is not None:
        msg["data"] = data
    return json.dumps(msg).encode() + b"\r\n"


class FakeQmp:
    """A QMP server on a unix socket, one client at a time, in a thread.

    ``mode`` says what ``migrate-set-parameters`` does: ``auto`` (a whole
    checkpoint ``checkpoint_s`` later), ``stop-only`` (STOP, never RESUME),
    ``manual`` (nothing: the test sends the events), ``refuse`` (an error
    reply).  ``reply_delay_s`` delays every reply (a slow peer);
    ``answer=False`` never replies to anything after the greeting;
    ``greetings`` is a list of greeting bytes for the successive
    connections (then GREETING)."""

    def __init__(self, path, *, mode: str = "auto", status: str = "colo",
                 colo_mode: str = "primary", events_capability: bool = True, delay_ms: int = 20000,
                 checkpoint_s: float = 0.05, reply_delay_s: float = 0.0, answer: bool = True,
                 greetings=()) -> None:
        self.path = path
        self.mode = mode
        self.status = status
        self.colo_mode = colo_mode
        self.events_capability = events_capability
        self.delay_ms = delay_ms
        self.checkpoint_s = checkpoint_s
        self.reply_delay_s = reply_delay_s
        self.answer = answer
        self.greetings = list(greetings)
        self.commands: list[tuple[float, str, dict]] = []   # (time, name, arguments)
        self.connections = 0
        self.lock = threading.Lock()
        self.conn: socket.socket | None = None
        self._stop = threading.Event()
        self._timers: list[threading.Timer] = []
        if isinstance(path, tuple):                # ("127.0.0.1", port): TCP
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.listener.settimeout(0.05)
        self.thread = threading.Thread(target=self._serve, name="fake-qmp", daemon=True)
        self.thread.start()

    # -- what serve asked
    def sets(self) -> list[dict]:
        with self.lock:
            return [a for _, name, a in self.commands if name == "migrate-set-parameters"]

    def wait_sets(self, n: int, timeout: float = 10.0) -> list[dict]:
        return wait_until(lambda: len(self.sets()) >= n and self.sets(), timeout,
                          f"{n} checkpoint request(s) on the fake QMP (have {len(self.sets())})")

    # -- acting as QEMU
    def send(self, data: bytes) -> None:
        with self.lock:
            conn = self.conn
        if conn is not None:
            try:
                conn.sendall(data)
            except OSError:
                pass

    def events(self, *names: str) -> None:
        self.send(b"".join(event_line(n, {"pass": 3} if n == "MIGRATION_PASS" else None)
                           for n in names))

    def checkpoint(self) -> None:
        self.events("STOP", "MIGRATION_PASS", "RESUME")

    def drop(self) -> None:
        with self.lock:
            conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        for t in self._timers:
            t.cancel()
        self.drop()
        self.thread.join(5)
        self.listener.close()
        if not isinstance(self.path, tuple):
            try:
                os.unlink(self.path)
            except OSError:
                pass

    # -- the server thread
    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            with self.lock:
                old, self.conn = self.conn, conn
                self.connections += 1
                greeting = self.greetings.pop(0) if self.greetings else GREETING
            if old is not None:
                old.close()
            try:
                conn.sendall(greeting)
            except OSError:
                continue
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        buf = b""
        conn.settimeout(0.05)
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    self._command(conn, json.loads(line))

    def _later(self, delay: float, fn) -> None:
        if delay <= 0:
            fn()
            return
        t = threading.Timer(delay, fn)
        t.daemon = True
        self._timers.append(t)
        t.start()

    def _reply(self, conn, ident, value=None, error: str | None = None) -> None:
        msg = {"error": {"class": "GenericError", "desc": error}} if error else {"return": value}
        msg["id"] = ident
        data = json.dumps(msg).encode() + b"\r\n"

        def go():
            try:
                conn.sendall(data)
            except OSError:
                pass
        self._later(self.reply_delay_s, go)

    def _command(self, conn, msg: dict) -> None:
        name, args, ident = msg.get("execute"), msg.get("arguments", {}), msg.get("id")
        with self.lock:
            self.commands.append((time.monotonic(), name, args))
        if not self.answer:
            return
        if name == "qmp_capabilities":
            self._reply(conn, ident, {})
        elif name == "query-migrate":
            self._reply(conn, ident, {"status": self.status} if self.status else {})
        elif name == "query-colo-status":
            self._reply(conn, ident, {"mode": self.colo_mode, "last-mode": "none", "reason": "none"})
        elif name == "query-migrate-capabilities":
            self._reply(conn, ident, [{"capability": "x-colo", "state": True},
                                      {"capability": "events", "state": self.events_capability}])
        elif name == "query-migrate-parameters":
            self._reply(conn, ident, {"x-checkpoint-delay": self.delay_ms, "downtime-limit": 300})
        elif name == "migrate-set-parameters":
            if self.mode == "refuse":
                self._reply(conn, ident, error="Parameter 'x-checkpoint-delay' is not allowed now")
                return
            self.delay_ms = args.get("x-checkpoint-delay", self.delay_ms)
            self._reply(conn, ident, {})
            if self.mode == "auto":
                self._later(self.reply_delay_s, lambda: self.events("STOP"))
                self._later(self.reply_delay_s + self.checkpoint_s,
                            lambda: self.events("MIGRATION_PASS", "RESUME"))
            elif self.mode == "stop-only":
                self._later(self.reply_delay_s, lambda: self.events("STOP"))
        else:
            self._reply(conn, ident, error=f"The command {name} has not been found")


class Rig:
    """serve --qmp with the test on every socket."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.qmp_path = os.path.join(workdir, "qmp.sock")
        self.fake: FakeQmp | None = None
        self.serve: ServeProc | None = None
        self.p = self.s = self.out = None

    def start(self, *, serve_args=(), fake: dict | None = None, wait_policy: str | None = "qmp",
              qmp_ep: str | None = None) -> "Rig":
        if fake is not None:
            self.fake = FakeQmp(self.qmp_path, **fake)
        p_ep, _ = unix_ep(self.workdir, "p.sock")
        s_ep, _ = unix_ep(self.workdir, "s.sock")
        o_ep, _ = unix_ep(self.workdir, "o.sock")
        ctl = os.path.join(self.workdir, "ctl.sock")
        self.events_path = os.path.join(self.workdir, "events.jsonl")
        self.serve = ServeProc(self.workdir, [
            "--primary-in", p_ep, "--secondary-in", s_ep, "--outdev", o_ep,
            "--qmp", qmp_ep or f"unix:{self.qmp_path}", "--control", ctl,
            "--events", self.events_path, "-v", *serve_args], control=ctl)
        self.serve.wait_ready()
        self.out = OutReader(connect(o_ep))
        self.p = connect(p_ep)
        self.s = connect(s_ep)
        if wait_policy is not None:
            self.wait_qmp(lambda q: q["policy_now"] == wait_policy, f"policy {wait_policy}")
        return self

    def qmp(self) -> dict:
        return self.serve.stats()["serve"]["qmp"]

    def wait_qmp(self, pred, what: str, timeout: float = 10.0) -> dict:
        return self.serve.wait_stats(lambda st: pred(st["serve"]["qmp"]), timeout,
                                     what)["serve"]["qmp"]

    def send(self, p_frame, s_frame=None) -> None:
        if p_frame is not None:
            self.p.sendall(rec(p_frame))
        if s_frame is not None:
            self.s.sendall(rec(s_frame))

    def diverge(self, tag: bytes, sport: int) -> bytes:
        p = udp_frame(b"P:" + tag, sport=sport)
        self.send(p, udp_frame(b"S:" + tag, sport=sport))
        return p

    def released(self) -> list[bytes]:
        return [r[4:] for r in self.out.records()]

    def wait_released(self, n: int, timeout: float = 10.0) -> list[bytes]:
        return [r[4:] for r in self.out.wait_records(n, timeout)]

    def events(self) -> list[dict]:
        with open(self.events_path) as f:
            return [json.loads(line) for line in f]

    def close(self) -> None:
        if self.serve is not None:
            self.serve.kill_hard()
        for s in (self.p, self.s):
            if s is not None:
                s.close()
        if self.out is not None:
            self.out.close()
        if self.fake is not None:
            self.fake.close()


@pytest.fixture
def rig(tmp_path_factory):
    import shutil
    import tempfile
    workdir = tempfile.mkdtemp(prefix="colo-sq-", dir="/tmp")
    r = Rig(workdir)
    try:
        yield r
    finally:
        r.close()
        shutil.rmtree(workdir, ignore_errors=True)


def settle() -> None:
    """Give serve a moment to do what it should not (only ever followed by
    an assertion that nothing happened)."""
    time.sleep(0.3)


# -- the request rules ------------------------------------------------------------------

def test_requests_before_the_stop_are_covered_those_after_make_one_more(rig):
    rig.start(fake={"mode": "manual"})
    a = rig.diverge(b"a", 7001)
    assert rig.fake.wait_sets(1) == [{"x-checkpoint-delay": 20000}]
    b = rig.diverge(b"b", 7002)                     # before the STOP: covered
    rig.serve.wait_stats(lambda st: st["miscompares"].get("udp:content") == 2)
    rig.fake.events("STOP")
    rig.wait_qmp(lambda q: q["events"]["STOP"] == 1, "the STOP")
    c = rig.diverge(b"c", 7003)                     # after the STOP: one more after the RESUME
    d = rig.diverge(b"d", 7004)
    rig.serve.wait_stats(lambda st: st["miscompares"].get("udp:content") == 4)
    settle()
    assert len(rig.fake.sets()) == 1 and rig.released() == []
    rig.fake.events("MIGRATION_PASS", "RESUME")
    assert sorted(rig.wait_released(4)) == sorted([a, b, c, d])
    assert len(rig.fake.wait_sets(2)) == 2          # exactly one more
    rig.fake.checkpoint()
    rig.wait_qmp(lambda q: q["checkpoints"]["completed"] == 2, "the second checkpoint")
    settle()
    assert len(rig.fake.sets()) == 2
    q = rig.qmp()
    assert q["requests"]["covered"] == 2 and q["requests"]["deferred"] == 1
    assert q["checkpoints"] == {"requested": 2, "completed": 2, "periodic": 0, "timed_out": 0,
                                "failed": 0}


def test_the_current_x_checkpoint_delay_is_sent_back_never_an_old_one(rig):
    rig.start(fake={"delay_ms": 12345})
    rig.diverge(b"1", 7010)
    assert rig.fake.wait_sets(1) == [{"x-checkpoint-delay": 12345}]
    rig.wait_released(1)
    rig.fake.delay_ms = 777                        # changed on another monitor
    rig.diverge(b"2", 7011)
    assert rig.fake.wait_sets(2)[-1] == {"x-checkpoint-delay": 777}
    rig.wait_released(2)
    assert rig.qmp()["x_checkpoint_delay_ms"] == 777


def test_no_resume_the_bound_releases_and_a_late_resume_still_flushes(rig):
    rig.start(fake={"mode": "stop-only"}, serve_args=["--qmp-checkpoint-timeout", "400"])
    t = time.monotonic()
    a = rig.diverge(b"a", 7020)
    rig.fake.wait_sets(1)
    assert rig.wait_released(1) == [a]
    assert time.monotonic() - t >= 0.38
    q = rig.qmp()
    assert q["checkpoints"]["timed_out"] == 1 and q["policy_now"] == "qmp"
    assert "no RESUME within 400 ms" in rig.serve.stderr()
    assert rig.serve.stats()["serve"]["checkpoints_by"]["local"] == 1
    # the VM stays stopped: a new divergence is not asked again, but bounded
    b = rig.diverge(b"b", 7021)
    assert rig.wait_released(2)[-1] == b
    assert len(rig.fake.sets()) == 1
    # a frame held without a request, then the late RESUME flushes it
    lone = udp_frame(b"lone", sport=7022)
    rig.send(lone)
    rig.serve.wait_stats(lambda st: st["queued"]["primary"] == 1)
    rig.fake.events("MIGRATION_PASS", "RESUME")
    assert rig.wait_released(3)[-1] == lone
    assert rig.qmp()["checkpoints"]["periodic"] == 1
    failed = [e for e in rig.events() if e["event"] == "qmp_checkpoint_failed"]
    assert [e["reason"] for e in failed] == ["timeout", "timeout"]


def test_a_refused_request_releases_at_once(rig):
    rig.start(fake={"mode": "refuse"}, serve_args=["--qmp-checkpoint-timeout", "30000"])
    a = rig.diverge(b"a", 7030)
    assert rig.wait_released(1, timeout=5) == [a]
    q = rig.qmp()
    assert q["failures"] == {"refused": 1} and q["checkpoints"]["failed"] == 1
    assert "not allowed now" in rig.serve.stderr()


def test_a_pause_is_not_a_checkpoint(rig):
    rig.start(fake={"mode": "manual"})
    a = rig.diverge(b"a", 7040)
    rig.fake.wait_sets(1)
    rig.fake.events("STOP", "RESUME")                # stop/cont elsewhere: no MIGRATION_PASS
    rig.wait_qmp(lambda q: q["pauses"] == 1, "the pause")
    settle()
    assert rig.released() == []
    rig.fake.checkpoint()
    assert rig.wait_released(1) == [a]


def test_periodic_checkpoints_flush_held_frames(rig):
    rig.start(fake={"mode": "manual"}, serve_args=["--compare-timeout", "60000"])
    lone = udp_frame(b"no twin yet", sport=7050)
    rig.send(lone)
    rig.serve.wait_stats(lambda st: st["queued"]["primary"] == 1)
    rig.fake.checkpoint()
    assert rig.wait_released(1) == [lone]
    assert rig.qmp()["checkpoints"]["periodic"] == 1 and rig.fake.sets() == []


# -- a bad or slow peer ------------------------------------------------------------------

def test_garbage_greeting_is_one_line_then_serve_reconnects(rig):
    rig.start(fake={"greetings": [b"HTTP/1.0 400 Bad Request\r\n\r\n"]})
    q = rig.qmp()
    assert q["protocol_errors"] == 1 and rig.fake.connections == 2
    # (with -v the disconnection has a line of its own, as on every link)
    lines = [l for l in rig.serve.stderr_lines() if "not JSON" in l and "disconnected" not in l]
    assert lines == [f"colo-compare: qmp: unix:{rig.qmp_path}: not JSON: "
                     "'HTTP/1.0 400 Bad Request?'; closing the connection (the next one starts "
                     "afresh)"]
    assert "Traceback" not in rig.serve.stderr()
    a = rig.diverge(b"a", 7060)
    assert rig.wait_released(1) == [a]
    assert rig.qmp()["checkpoints"]["completed"] == 1


def test_an_oversized_line_is_cut_off(rig):
    rig.start(fake={})
    rig.fake.send(b'{"event": "X", "data": "' + b"x" * 100_000)
    rig.wait_qmp(lambda q: q["protocol_errors"] == 1 and q["ready"], "the reconnection")
    assert rig.fake.connections == 2
    assert "a line longer than 65536 bytes" in rig.serve.stderr()


def test_a_silent_peer_is_taken_for_dead_and_reconnected(rig):
    rig.start(fake={"answer": False}, wait_policy=None,
              serve_args=["--qmp-checkpoint-timeout", "300"])
    # the greeting came, nothing else ever does: after 1 s (twice the bound,
    # at least a second) serve gives up on the connection and makes another
    wait_until(lambda: rig.fake.connections >= 2, 10, "a second connection")
    q = rig.qmp()
    assert q["no_answer"] >= 1 and q["policy_now"] == "release"
    assert q["fallback_reason"] == "qmp-unreachable"
    assert "a command unanswered for 1 s" in rig.serve.stderr()
    # comparing never waited for QMP
    a = rig.diverge(b"a", 7070)
    assert rig.wait_released(1) == [a]


def test_a_slow_peer_never_holds_up_the_inputs(rig):
    """Replies 2 s late: matched traffic flows meanwhile (all of it is
    released before serve has even finished the QMP handshake), and a
    divergence is held until the slow checkpoint comes."""
    rig.start(fake={"reply_delay_s": 2.0}, wait_policy=None,
              serve_args=["--qmp-checkpoint-timeout", "20000"])
    same = [udp_frame(b"same %d" % i, sport=7080 + i % 4) for i in range(100)]
    for f in same:
        rig.send(f, f)
    assert rig.wait_released(100, timeout=5) == same
    assert not rig.qmp()["ready"]
    rig.wait_qmp(lambda q: q["policy_now"] == "qmp", "the slow handshake")
    a = rig.diverge(b"a", 7090)
    rig.fake.wait_sets(1, timeout=10)
    more = [udp_frame(b"more %d" % i, sport=7091) for i in range(20)]
    for f in more:
        rig.send(f, f)
    assert rig.wait_released(120) == same + more     # a held, the rest flowing
    assert rig.wait_released(121, timeout=10)[-1] == a


def test_not_the_primary_monitor_falls_back(rig):
    rig.start(fake={"colo_mode": "secondary"}, wait_policy="release")
    q = rig.wait_qmp(lambda q: q["fallback_reason"] == "not-primary", "the reason")
    assert q["ready"]
    a = rig.diverge(b"a", 7100)
    assert rig.wait_released(1) == [a] and rig.fake.sets() == []
    assert "not the COLO primary's" in rig.serve.stderr()


def test_colo_exit_and_back_with_a_migration_event(rig):
    rig.start(fake={"mode": "manual"})
    a = rig.diverge(b"a", 7110)
    rig.fake.wait_sets(1)
    rig.fake.send(event_line("COLO_EXIT", {"mode": "primary", "reason": "error"}))
    assert rig.wait_released(1) == [a]               # what was held goes at once
    q = rig.wait_qmp(lambda q: q["policy_now"] == "release", "the fallback")
    assert q["fallback_reason"] == "colo-exit" and q["failures"] == {"colo-exit": 1}
    assert "COLO ended (COLO_EXIT, reason error)" in rig.serve.stderr()
    rig.fake.send(event_line("MIGRATION", {"status": "colo"}))
    rig.wait_qmp(lambda q: q["policy_now"] == "qmp", "the qmp policy again")
    b = rig.diverge(b"b", 7111)
    rig.fake.wait_sets(2)
    rig.fake.checkpoint()
    assert rig.wait_released(2)[-1] == b
    kinds = [e["event"] for e in rig.events() if e["event"].startswith("qmp_")]
    assert kinds == ["qmp_ready", "qmp_active", "qmp_checkpoint_request", "qmp_fallback",
                     "qmp_active", "qmp_checkpoint_request", "qmp_checkpoint"]


def test_qmp_unreachable_at_start_is_not_fatal(rig):
    rig.start(wait_policy="release", serve_args=["--connect-timeout", "1"])
    a = rig.diverge(b"a", 7120)
    assert rig.wait_released(1) == [a]
    time.sleep(1.2)                                   # past --connect-timeout
    rig.serve.assert_running()
    q = rig.qmp()
    assert not q["connected"] and q["fallback_reason"] == "qmp-unreachable"
    assert q["requests"]["in_fallback"] == {"qmp-unreachable": 1}
    # QEMU shows up later: serve connects and uses it
    rig.fake = FakeQmp(rig.qmp_path)
    rig.wait_qmp(lambda q: q["policy_now"] == "qmp", "the late QMP", timeout=15)


def test_qmp_over_tcp(rig):
    port = free_port()
    rig.fake = FakeQmp(("127.0.0.1", port))
    rig.start(qmp_ep=f"tcp:127.0.0.1:{port}")
    a = rig.diverge(b"a", 7140)
    assert rig.fake.wait_sets(1) == [{"x-checkpoint-delay": 20000}]
    assert rig.wait_released(1) == [a]
    assert rig.qmp()["endpoint"] == f"tcp:127.0.0.1:{port}"


def test_qmp_as_a_listening_endpoint(rig):
    """QEMU may be the client (-qmp unix:PATH without server=on)."""
    rig.start(qmp_ep=f"unix:{rig.qmp_path},server", wait_policy=None)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(rig.qmp_path)
    try:
        c.sendall(GREETING)
        f = c.makefile("rb")
        first = json.loads(f.readline())
        assert first == {"execute": "qmp_capabilities", "id": 1}
    finally:
        c.close()


# -- the CLI ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--checkpoint-policy", "qmp"], "--checkpoint-policy qmp needs --qmp"),
    (["--qmp", "unix:/tmp/q.sock", "--checkpoint-policy", "hold"],
     "--qmp works with --checkpoint-policy qmp, not hold"),
    (["--qmp", "unix:/tmp/q.sock", "--notify-dev", "unix:/tmp/n.sock,server"],
     "--qmp (QEMU's COLO) and --notify-dev (Xen's) cannot be used together"),
    (["--qmp", "unix:/tmp/p.sock"], "--qmp and --primary-in are the same endpoint"),
    (["--qmp", "unix:/tmp/q.sock", "--qmp-checkpoint-timeout", "0"], "--qmp-checkpoint-timeout"),
])
def test_usage_errors(args, message):
    import subprocess
    r = subprocess.run([PY, "-m", "colo_cli", "serve", "--primary-in", "unix:/tmp/p.sock",
                        "--secondary-in", "unix:/tmp/s.sock,server", "--outdev", "unix:/tmp/o.sock",
                        *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_stats_json_prometheus_and_table_show_the_qmp_side(rig, capsys):
    from colo_cli.cli import main
    rig.start(fake={})
    a = rig.diverge(b"a", 7130)
    assert rig.wait_released(1) == [a]
    rig.wait_qmp(lambda q: q["checkpoints"]["completed"] == 1, "the checkpoint")
    ctl = rig.serve.control_path
    with pytest.raises(SystemExit) as exc:
        main(["stats", "--control", ctl, "--json"])
    assert exc.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    q = doc["stats"]["serve"]["qmp"]
    assert q["checkpoints"]["requested"] == 1 and q["request_to_resume_ms"]["count"] == 1
    assert doc["stats"]["serve"]["policy"] == "qmp"
    assert doc["stats"]["serve"]["checkpoints_by"] == {"local": 0, "notify": 0, "control": 0,
                                                        "qmp": 1}
    with pytest.raises(SystemExit):
        main(["stats", "--control", ctl, "--format", "prometheus"])
    text = capsys.readouterr().out
    from prometheus_client.parser import text_string_to_metric_families
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in fams.values() for s in f.samples}
    assert samples[("colo_compare_qmp_checkpoint_requests_total", ())] == 1
    assert samples[("colo_compare_qmp_checkpoints_total", (("kind", "requested"),))] == 1
    assert samples[("colo_compare_qmp_checkpoint_wait_seconds_count", ())] == 1
    assert samples[("colo_compare_colo_active", ())] == 1
    assert samples[("colo_compare_qmp_ready", ())] == 1
    assert samples[("colo_compare_link_connected", (("link", "qmp"),))] == 1
    with pytest.raises(SystemExit):
        main(["stats", "--control", ctl, "--color", "never"])
    table = capsys.readouterr().out
    assert "checkpoint policy qmp" in table
    assert "QEMU checkpoints" in table and "requested 1, completed 1" in table
    assert "in COLO state: checkpoints asked of QEMU" in table


def test_the_manual_names_every_fallback_reason_stats_key_event_and_metric():
    """colo-compare-serve(1) documents the qmp policy: each fallback reason,
    each key of serve.qmp in the stats, each qmp_* event and each Prometheus
    family --qmp adds (found in the code, so a new one cannot go
    undocumented)."""
    import asyncio
    import re
    from pathlib import Path
    from types import SimpleNamespace

    from colo_cli.endpoints import parse_endpoint
    from colo_cli.metrics import _qmp_metrics, _Exposition
    from colo_cli.qmp_policy import FALLBACK_REASONS
    from colo_cli.serve_qmp import QmpSide
    root = Path(__file__).resolve().parents[1]
    page = (root / "man" / "colo-compare-serve.1").read_text().replace("\\-", "-")
    for reason in FALLBACK_REASONS:
        assert f".B {reason}" in page, reason
    loop = asyncio.new_event_loop()
    try:
        side = QmpSide(SimpleNamespace(loop=loop, on_data=None), parse_endpoint("unix:/tmp/x.sock"), 5000)
        snap = side.snapshot()
    finally:
        loop.close()
    for key in snap:
        if key not in ("endpoint", "checkpoint_timeout_ms"):
            assert re.search(rf"\b{key}\b", page), f"serve.qmp.{key} is not in the manual"
    for key in snap["checkpoints"]:
        assert re.search(rf"\b{key}\b", page), f"serve.qmp.checkpoints.{key}"
    code = (root / "colo_cli" / "serve_qmp.py").read_text()
    for name in set(re.findall(r'event\("(qmp_\w+)"', code)):
        assert name in page, f"event {name} is not in the manual"
    e = _Exposition()
    _qmp_metrics(e, "colo_compare_", snap)
    for family in {l.split()[2] for l in e.lines if l.startswith("# TYPE")}:
        assert family in page, f"metric {family} is not in the manual"
