"""``serve --qmp`` against a real QEMU 7.2 COLO pair (no guest OS).

Part A: the guest-less pair of ``shared/spec/qemu-colo-qmp.md``
(``tests/colo_pair.py``): serve on the primary's second QMP monitor, the
test on a third one watching every STOP and RESUME, and the frames written
by the test on serve's inputs (serve listens on primary-in, secondary-in and
outdev).  Part B: the same pair carrying QEMU's own filter-mirror /
filter-redirector wiring (``shared/spec/qemu-filter-interop.md`` section
4b) in front of serve, so that everything on the QEMU side is real.

What is checked, each against what QEMU itself shows on the test's monitor:

* matched traffic never triggers a checkpoint;
* each divergence triggers exactly one checkpoint, and the diverged primary
  frame reaches outdev after that checkpoint's RESUME (QEMU's own timestamp)
  and promptly after it;
* a periodic checkpoint flushes what is held;
* a silent secondary's timeouts trigger a checkpoint through QMP;
* a primary QEMU frozen mid-checkpoint (no RESUME ever): the bound fires and
  the frames leave; killed: serve falls back at once, keeps running, and
  reconnects to a new pair;
* COLO_EXIT (``x-colo-lost-heartbeat`` on the primary): the fallback policy.

Every wait is bounded; every QEMU and serve is killed by PID at the end.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from colo_cli.testing import udp_frame
from colo_pair import ColoPair
from qemu_harness import (QemuGroup, build_colo_wiring, live_qemu_pids, requires_qemu)
from serve_helpers import OutReader, ServeProc, connect, rec, unix_ep, wait_until

pytestmark = [pytest.mark.qemu, requires_qemu]

#: a released frame counts as "prompt" within this of QEMU's RESUME (s): a
#: loaded 2-core machine; the real figure is a millisecond or two
PROMPT_S = 1.0
#: mono -> wall (QEMU stamps its events with the host's real-time clock)
WALL_OFFSET = time.time() - time.monotonic()


def wall(t_mono: float) -> float:
    return t_mono + WALL_OFFSET


@pytest.fixture(autouse=True)
def _nothing_left_behind():
    yield
    assert live_qemu_pids() == [], "a QEMU started by the harness is still running"


class World:
    """A COLO pair and serve --qmp between the test's sockets."""

    def __init__(self, workdir: str, *, serve_args=(), checkpoint_delay_ms: int = 60_000,
                 qmp_timeout_ms: int = 3000) -> None:
        self.workdir = workdir
        self.pair = ColoPair(workdir, checkpoint_delay_ms=checkpoint_delay_ms)
        self.serve_args = list(serve_args)
        self.qmp_timeout_ms = qmp_timeout_ms
        self.serve: ServeProc | None = None
        self.p = self.s = None
        self.out: OutReader | None = None

    def start(self, *, colo: bool = True) -> None:
        self.pair.start()
        p_ep, _ = unix_ep(self.workdir, "p.sock")
        s_ep, _ = unix_ep(self.workdir, "s.sock")
        o_ep, _ = unix_ep(self.workdir, "o.sock")
        self.eps = (p_ep, s_ep, o_ep)
        ctl = os.path.join(self.workdir, "ctl.sock")
        self.serve = ServeProc(self.workdir, [
            "--primary-in", p_ep, "--secondary-in", s_ep, "--outdev", o_ep,
            "--qmp", f"unix:{self.pair.serve_qmp_path}",
            "--qmp-checkpoint-timeout", str(self.qmp_timeout_ms),
            "--control", ctl, "--events", os.path.join(self.workdir, "events.jsonl"), "-v",
            *self.serve_args], control=ctl)
        self.serve.wait_ready()
        self.out = OutReader(connect(o_ep))
        self.p = connect(p_ep)
        self.s = connect(s_ep)
        self.serve.wait_stats(lambda st: st["serve"]["qmp"]["ready"], what="serve's QMP handshake")
        if colo:
            self.enter_colo()

    def enter_colo(self) -> None:
        """Migrate to COLO state; serve counts the first checkpoint (the one
        that starts COLO) as one it did not ask for."""
        self.pair.enter_colo()
        self.wait_qmp(lambda q: q["policy_now"] == "qmp" and q["checkpoints"]["periodic"] >= 1,
                      "the qmp policy in force")
        self.base = self.qmp()["checkpoints"]

    def counts(self) -> dict:
        """serve's QMP checkpoint counters since enter_colo()."""
        now = self.qmp()["checkpoints"]
        return {k: now[k] - self.base[k] for k in now}

    # -- serve's view
    def qmp(self) -> dict:
        return self.serve.stats()["serve"]["qmp"]

    def wait_qmp(self, pred, what: str, timeout: float = 10.0) -> dict:
        return self.serve.wait_stats(lambda st: pred(st["serve"]["qmp"]), timeout, what)["serve"]["qmp"]

    # -- traffic
    def send(self, p_frame: bytes | None, s_frame: bytes | None = None) -> None:
        if p_frame is not None:
            self.p.sendall(rec(p_frame))
        if s_frame is not None:
            self.s.sendall(rec(s_frame))

    def released(self) -> list[bytes]:
        return [r[4:] for r in self.out.records()]

    def wait_released(self, n: int, timeout: float = 10.0) -> list[bytes]:
        return [r[4:] for r in self.out.wait_records(n, timeout)]

    def arrival(self, index: int) -> float:
        """time.monotonic() when the index-th released record had arrived."""
        data = self.out.data()
        pos = 0
        for _ in range(index + 1):
            pos += 4 + int.from_bytes(data[pos:pos + 4], "big")
        with self.out.lock:
            return next(t for t, total in self.out.chunks if total >= pos)

    def close(self) -> None:
        if self.serve is not None:
            self.serve.kill_hard()
        for s in (self.p, self.s):
            if s is not None:
                s.close()
        if self.out is not None:
            self.out.close()
        self.pair.close()


@pytest.fixture
def world(tmp_path_factory):
    made = []
    group = QemuGroup(prefix="colo-qmp-")

    def factory(colo: bool = True, **kwargs) -> World:
        w = World(group.dir, **kwargs)
        made.append(w)
        w.start(colo=colo)
        return w

    try:
        yield factory
    finally:
        for w in made:
            w.close()
        group.close()


def frames(tag: bytes, n: int, sport: int = 5000) -> list[bytes]:
    return [udp_frame(tag + b"-%d" % i, sport=sport) for i in range(n)]


# ---------------------------------------------------------------------------
# Part A: the guest-less pair, frames from the test
# ---------------------------------------------------------------------------

def test_matched_traffic_never_triggers_a_checkpoint(world):
    w = world()
    since = time.monotonic()
    sent = frames(b"same", 200, sport=5001) + frames(b"also", 100, sport=5002)
    for f in sent:
        w.send(f, f)
    assert w.wait_released(len(sent)) == sent
    time.sleep(0.3)
    assert w.pair.checkpoints(since) == []
    assert w.pair.watcher.events("STOP", since) == []
    assert w.counts() == {"requested": 0, "completed": 0, "periodic": 0, "timed_out": 0,
                          "failed": 0}
    st = w.serve.stats()
    assert st["released"] == {"match": 300, "total": 300}
    assert st["checkpoint_requests"] == {}


def test_each_divergence_one_checkpoint_and_the_frame_leaves_after_its_resume(world):
    w = world()
    lead = frames(b"lead", 3, sport=5001)
    for f in lead:
        w.send(f, f)
    assert w.wait_released(3) == lead
    for n in range(3):
        since = time.monotonic()
        p_div = udp_frame(b"primary answer %d" % n, sport=5003)
        s_div = udp_frame(b"PRIMARY ANSWER %d" % n, sport=5003)
        w.send(p_div, s_div)
        ((stop, resume),) = wait_until(lambda: w.pair.checkpoints(since), 10,
                                       "QEMU's checkpoint on the watcher's monitor")
        got = w.wait_released(4 + 2 * n)
        assert got[3 + 2 * n] == p_div
        left = wall(w.arrival(3 + 2 * n))
        assert left > resume.qemu_ts > stop.qemu_ts, (left, resume, stop)
        assert left - resume.qemu_ts < PROMPT_S
        # the flow compares afresh after the checkpoint
        after = udp_frame(b"after %d" % n, sport=5003)
        w.send(after, after)
        assert w.wait_released(5 + 2 * n)[-1] == after
        time.sleep(0.2)
        assert len(w.pair.checkpoints(since)) == 1, "more than one checkpoint for one divergence"
        assert w.counts() == {"requested": n + 1, "completed": n + 1, "periodic": 0,
                              "timed_out": 0, "failed": 0}
    st = w.serve.stats()
    assert st["miscompares"] == {"udp:content": 3}
    assert st["serve"]["checkpoints_by"]["qmp"] == 4          # with the one entering COLO
    assert st["serve"]["checkpoints_by"]["local"] == 0
    assert st["released"] == {"match": 6, "checkpoint": 3, "total": 9}
    q = w.qmp()
    assert q["request_to_resume_ms"]["count"] == 3
    assert 0 < q["request_to_resume_ms"]["max_ms"] < 3000
    assert q["events"]["STOP"] == q["events"]["RESUME"] == 4


def test_a_periodic_checkpoint_flushes_what_is_held(world):
    w = world(checkpoint_delay_ms=1500, serve_args=["--compare-timeout", "60000"])
    held = udp_frame(b"nobody answers this yet", sport=5004)
    since = time.monotonic()
    w.send(held)                                   # no secondary twin, no timeout for a minute
    w.serve.wait_stats(lambda st: st["frames_in"]["primary"] == 1, what="the held frame")
    ((stop, resume),) = wait_until(lambda: w.pair.checkpoints(since), 10, "a periodic checkpoint")
    assert w.wait_released(1) == [held]
    left = wall(w.arrival(0))
    assert left > resume.qemu_ts and left - resume.qemu_ts < PROMPT_S
    c = w.counts()
    assert c["requested"] == 0 and c["periodic"] >= 1 and c["timed_out"] == 0
    assert w.serve.stats()["released"] == {"match": 0, "checkpoint": 1, "total": 1}


def test_a_silent_secondary_times_out_into_a_checkpoint_through_qmp(world):
    w = world(serve_args=["--compare-timeout", "300", "--expired-scan-cycle", "100"])
    since = time.monotonic()
    alone = [udp_frame(b"alone %d" % i, sport=5010 + i) for i in range(5)]
    for f in alone:
        w.send(f)                                  # the secondary stays silent
    got = w.wait_released(5)
    assert sorted(got) == sorted(alone)
    pairs = w.pair.checkpoints(since)
    assert pairs, "no QEMU checkpoint"
    first_resume = pairs[0][1]
    for i in range(5):
        assert wall(w.arrival(i)) > first_resume.qemu_ts
    st = w.serve.stats()
    assert set(st["checkpoint_requests"]) == {"timeout"}
    c = w.counts()
    assert c["requested"] >= 1 and c["completed"] == c["requested"] and c["timed_out"] == 0
    assert c["requested"] == len(w.pair.checkpoints(since))


def test_colo_exit_falls_back_to_the_release_policy(world):
    w = world()
    since = time.monotonic()
    w.pair.lost_heartbeat()
    w.pair.watcher.wait_event("COLO_EXIT", since)
    q = w.wait_qmp(lambda q: q["policy_now"] == "release", "the fallback")
    assert q["fallback_reason"] == "colo-exit" and q["fallbacks"] == {"colo-exit": 1}
    # a divergence now: released at once, locally; nothing asked of QEMU
    p_div, s_div = udp_frame(b"after failover A", sport=5005), udp_frame(b"after failover B", sport=5005)
    w.send(p_div, s_div)
    assert w.wait_released(1) == [p_div]
    st = w.serve.stats()
    assert st["serve"]["checkpoints_by"]["local"] == 1
    assert w.counts()["requested"] == 0
    assert w.qmp()["requests"]["in_fallback"] == {"colo-exit": 1}
    assert "colo-exit" in w.serve.stderr()


def test_failover_while_a_checkpoint_hangs_releases_at_once(world):
    """The secondary freezes (SIGSTOP): the checkpoint serve asked for never
    completes.  Failover on the primary ends COLO: the held frame leaves at
    that moment, long before the checkpoint bound."""
    w = world(qmp_timeout_ms=30_000)
    os.kill(w.pair.secondary.pid, signal.SIGSTOP)
    try:
        p_div, s_div = udp_frame(b"hang A", sport=5006), udp_frame(b"hang B", sport=5006)
        w.send(p_div, s_div)
        w.wait_qmp(lambda q: q["in_flight"], "the request in flight")
        time.sleep(0.3)
        assert w.released() == []
        t = time.monotonic()
        w.pair.lost_heartbeat()
        assert w.wait_released(1) == [p_div]
        assert w.arrival(0) - t < PROMPT_S
        q = w.qmp()
        assert q["policy_now"] == "release" and q["failures"] == {"colo-exit": 1}
    finally:
        os.kill(w.pair.secondary.pid, signal.SIGCONT)


def test_qmp_frozen_then_killed_mid_checkpoint_bound_fires_serve_reconnects(world):
    """A checkpoint that never resumes (the secondary frozen mid-checkpoint):
    after --qmp-checkpoint-timeout the held frame leaves, counted.  Then the
    primary QEMU is killed: serve falls back at once, keeps comparing, and
    reconnects to a new pair on the same socket, which it uses again."""
    w = world(qmp_timeout_ms=800)
    os.kill(w.pair.secondary.pid, signal.SIGSTOP)
    p_div, s_div = udp_frame(b"frozen A", sport=5007), udp_frame(b"frozen B", sport=5007)
    t = time.monotonic()
    w.send(p_div, s_div)
    assert w.wait_released(1) == [p_div]
    assert w.arrival(0) - t >= 0.75                 # not before the bound
    q = w.qmp()
    assert q["checkpoints"]["timed_out"] == 1 and q["policy_now"] == "qmp"
    assert "no RESUME within 800 ms" in w.serve.stderr()
    # a second divergence meanwhile: the same again (nothing is stuck in serve)
    p2, s2 = udp_frame(b"frozen C", sport=5008), udp_frame(b"frozen D", sport=5008)
    w.send(p2, s2)
    assert w.wait_released(2)[-1] == p2
    # the primary dies mid-checkpoint
    os.kill(w.pair.primary.pid, signal.SIGKILL)
    q = w.wait_qmp(lambda q: not q["connected"] and q["policy_now"] == "release", "the fallback")
    assert q["fallback_reason"] == "qmp-unreachable"
    p3, s3 = udp_frame(b"alone E", sport=5009), udp_frame(b"alone F", sport=5009)
    w.send(p3, s3)
    assert w.wait_released(3)[-1] == p3            # released locally, at once
    w.serve.assert_running()
    os.kill(w.pair.secondary.pid, signal.SIGKILL)
    w.pair.close()
    # a new pair on the same paths: serve reconnects and uses it
    w.pair = ColoPair(w.workdir)
    w.pair.start()
    w.wait_qmp(lambda q: q["ready"] and q["policy_now"] == "release"
               and q["fallback_reason"] == "not-colo", "the reconnection", timeout=15)
    w.enter_colo()
    since = time.monotonic()
    p4, s4 = udp_frame(b"again G", sport=5010), udp_frame(b"again H", sport=5010)
    w.send(p4, s4)
    assert w.wait_released(4)[-1] == p4
    assert len(w.pair.checkpoints(since)) == 1
    assert w.counts()["completed"] == 1
    assert w.serve.link("qmp")["connections"] == 2


# ---------------------------------------------------------------------------
# Part B: QEMU's own filters in front of serve
# ---------------------------------------------------------------------------

class WiredWorld:
    """The COLO pair carrying the documented COLO wiring (interop section 4b):
    the guests' output reaches serve through QEMU's filter-redirectors, and
    what serve releases leaves the primary's netdev through QEMU's
    redirector; serve on the primary's second QMP monitor."""

    def __init__(self, group: QemuGroup, *, vnet: bool, qmp_timeout_ms: int = 3000) -> None:
        d = group.dir
        self.wiring = build_colo_wiring(group, vnet_hdr_support=vnet,
                                        primary_extra_args=ColoPair.primary_args(d),
                                        secondary_extra_args=ColoPair.secondary_args(d))
        self.pair = ColoPair(d, primary=self.wiring.primary, secondary=self.wiring.secondary)
        ep = self.wiring.endpoints
        ctl = os.path.join(d, "ctl.sock")
        args = ["--primary-in", f"unix:{ep.primary_in.path}",
                "--secondary-in", f"unix:{ep.secondary_in.path},server",
                "--outdev", f"unix:{ep.outdev.path}",
                "--qmp", f"unix:{self.pair.serve_qmp_path}",
                "--qmp-checkpoint-timeout", str(qmp_timeout_ms),
                "--control", ctl, "--connect-timeout", "20", "-v"]
        if vnet:
            args.append("--vnet-hdr-support")
        self.serve_args, self.ctl, self.dir = args, ctl, d
        self.serve: ServeProc | None = None

    def start(self) -> None:
        self.pair.start()                  # QEMUs up, monitors answering, guest sockets connected
        self.serve = ServeProc(self.dir, self.serve_args, control=self.ctl)
        self.serve.wait_ready()
        self.wiring.wait_ready(15)         # (the secondary's redirector reconnects every second)
        self.serve.wait_stats(lambda st: all(l["connected"] for l in st["serve"]["links"].values()),
                              15, "every link of serve connected")
        self.pair.enter_colo()
        self.serve.wait_stats(lambda st: st["serve"]["qmp"]["policy_now"] == "qmp"
                              and st["serve"]["qmp"]["checkpoints"]["periodic"] >= 1,
                              what="the qmp policy in force")

    def send(self, p_frame: bytes, s_frame: bytes | None = None) -> None:
        self.wiring.guest_send("primary", p_frame)
        self.wiring.guest_send("secondary", p_frame if s_frame is None else s_frame)

    def left(self) -> list:
        """(monotonic time, frame) of what left the primary's netdev."""
        p = self.wiring.primary
        return [(p.t0 + d.t, d.frame) for d in p.received_datagrams()]

    def wait_left(self, n: int, timeout: float = 10.0) -> list:
        self.wiring.wait_client_received(n, timeout)
        return self.left()

    def qmp(self) -> dict:
        return self.serve.stats()["serve"]["qmp"]

    def close(self) -> None:
        if self.serve is not None:
            self.serve.kill_hard()
        self.pair.close()


@pytest.fixture
def wired():
    made = []
    group = QemuGroup(prefix="colo-qmpw-")

    def factory(**kwargs) -> WiredWorld:
        w = WiredWorld(group, **kwargs)
        made.append(w)
        w.start()
        return w

    try:
        yield factory
    finally:
        for w in made:
            w.close()
        group.close()


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
def test_filters_in_front_matched_flows_divergence_checkpoints_once(wired, vnet):
    w = wired(vnet=vnet)
    since = time.monotonic()
    same = frames(b"through the filters", 50, sport=5020)
    for f in same:
        w.send(f)
    assert [f for _, f in w.wait_left(50)] == same
    time.sleep(0.2)
    assert w.pair.checkpoints(since) == []
    p_div = udp_frame(b"primary value 1", sport=5021)
    w.send(p_div, udp_frame(b"SECONDARY VAL 1", sport=5021))
    ((stop, resume),) = wait_until(lambda: w.pair.checkpoints(since), 10, "the checkpoint")
    got = w.wait_left(51)
    t_left, frame = got[50]
    assert frame == p_div
    assert wall(t_left) > resume.qemu_ts and wall(t_left) - resume.qemu_ts < PROMPT_S
    after = frames(b"after", 10, sport=5021)
    for f in after:
        w.send(f)
    assert [f for _, f in w.wait_left(61)][51:] == after
    time.sleep(0.2)
    assert len(w.pair.checkpoints(since)) == 1
    q = w.qmp()
    assert q["checkpoints"]["requested"] == q["checkpoints"]["completed"] == 1
    st = w.serve.stats()
    assert st["released"]["match"] == 60 and st["released"]["checkpoint"] == 1
    assert w.pair.primary.qmp("query-status")["status"] == "running"


def test_filters_in_front_failover_falls_back(wired):
    w = wired(vnet=True)
    since = time.monotonic()
    w.pair.lost_heartbeat()
    w.pair.watcher.wait_event("COLO_EXIT", since)
    w.serve.wait_stats(lambda st: st["serve"]["qmp"]["fallback_reason"] == "colo-exit",
                       what="the fallback")
    p_div = udp_frame(b"primary alone 1", sport=5022)
    w.send(p_div, udp_frame(b"SECONDARY ALONE", sport=5022))
    assert [f for _, f in w.wait_left(1)] == [p_div]
    assert w.qmp()["checkpoints"]["requested"] == 0
    assert w.serve.stats()["serve"]["checkpoints_by"]["local"] == 1
