"""``replay`` and ``stats`` on the inputs and outputs that went wrong before:
captures whose clock jumps, results that were called a match with nothing
compared, outputs that clobbered each other or were left half-written, and
damaged reports."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from colo_cli.capture import PcapWriter, open_capture
import colo_cli.replay as replay_module
from colo_cli.core import Comparator
from colo_cli.replay import replay

from cli_run import cli  # noqa: F401 - the fixture
from test_cli_replay import DIVERGE_P, DIVERGE_S, MATCH_P, MATCH_S

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
YEAR_NS = 365 * 86400 * 10**9
DAY_NS = 86400 * 10**9
HOUR_NS = 3600 * 10**9


def records(path):
    with open_capture(str(path)) as r:
        return [(ts, data) for _n, ts, data, _o, _lt in r]


def write(path, recs):
    with open(path, "wb") as f:
        w = PcapWriter(f, nano=True)
        for ts, data in recs:
            w.write(ts, data)
    return path


def jumped(recs, at, delta_ns, single=False):
    """The records with the clock stepped by ``delta_ns`` from record ``at``
    on (``single``: that record only)."""
    return [(ts + delta_ns if (i == at if single else i >= at) else ts, d)
            for i, (ts, d) in enumerate(recs)]


def counted_replay(monkeypatch, p_path, s_path, **kw):
    """replay, counting the scans the core ran and collecting what left."""
    scans = [0]

    class Counting(Comparator):
        def handle_timer(self, now_ms):
            scans[0] += 1
            # a replay that spins on its timer fails here rather than hanging
            assert scans[0] < 100_000, f"more than 100,000 scans (now_ms {now_ms})"
            return super().handle_timer(now_ms)
    monkeypatch.setattr(replay_module, "Comparator", Counting)
    out = []
    with open_capture(str(p_path)) as p, open_capture(str(s_path)) as s:
        result = replay(p, s, on_release=lambda ts, data: out.append(data), **kw)
    monkeypatch.undo()
    return result, out, scans[0]


def pair_sources():
    pairs = [(DIVERGE_P, DIVERGE_S)]
    real = CORPUS / "zeek" / "http" / "get.pcap"
    if real.exists():
        pairs.append((real, real))
    return pairs


@pytest.mark.parametrize("source", pair_sources(), ids=lambda p: p[0].name)
@pytest.mark.parametrize("jump", ["+70 years", "+3 days", "-1 hour", "one frame +70 years"])
def test_a_clock_jump_costs_nothing_and_loses_nothing(tmp_path, monkeypatch, source, jump):
    p_src, s_src = source
    recs = records(p_src)
    at = len(recs) // 2
    delta, single = {"+70 years": (70 * YEAR_NS, False), "+3 days": (3 * DAY_NS, False),
                     "-1 hour": (-HOUR_NS, False), "one frame +70 years": (70 * YEAR_NS, True)}[jump]
    p_path = write(tmp_path / "p.pcap", jumped(recs, at, delta, single))
    plain, plain_out, plain_scans = counted_replay(monkeypatch, p_src, s_src)
    result, out, scans = counted_replay(monkeypatch, p_path, s_src)
    # every primary frame out exactly once
    assert sorted(out) == sorted(d for _, d in recs)
    # the cost is bounded by the frames, not by the time the capture spans
    assert scans <= plain_scans + len(recs) + 2
    (warning,) = [w for w in result.primary.warnings if "frame" in w]
    frame_number = at + 1                       # Wireshark's numbering
    if single:
        assert warning == (f"{p_path}: frame {frame_number}: its timestamp is 70 years ahead of "
                           "the frames around it; taken as the time of the frame before")
    elif delta > 0:
        assert warning == f"{p_path}: frame {frame_number}: the clock jumps {jump[1:]} forward"
    else:
        assert warning == (f"{p_path}: frame {frame_number}: the clock jumps 1 hour back; the "
                           "timeline goes on from the frame before")
    if single or delta < 0:
        # the timeline is repaired: the same decisions as without the jump
        assert result.stats.snapshot()["released"] == plain.stats.snapshot()["released"]
        assert out == plain_out


def pcapng_with_interfaces(path, interfaces, packets):
    """A pcapng of ``interfaces`` (tsresol, tsoffset) and ``packets`` (interface,
    ticks, data), as a capture tool with several interfaces writes it."""
    from test_capture import ng_epb, ng_idb, ng_shb
    with open(path, "wb") as f:
        f.write(ng_shb())
        for tsresol, tsoffset in interfaces:
            f.write(ng_idb(tsresol=tsresol, tsoffset=tsoffset))
        for iface, ticks, data in packets:
            f.write(ng_epb(iface, ticks, data))
    return path


TWO_HOURS_NS = 2 * HOUR_NS


def _interleaved(recs, case):
    """The primary's records spread over two interfaces, as ``case`` says:
    (interfaces, packets, repaired: the same decisions as the plain pcap,
    warned: the frame numbers a warning names)."""
    half = len(recs) // 2
    if case == "us and ns, alternating":
        return ([(6, None), (9, None)],
                [(i % 2, ts if i % 2 else ts // 1000, d) for i, (ts, d) in enumerate(recs)],
                True, [])
    if case == "second clock 2 hours ahead":
        return ([(9, None), (9, None)],
                [(i % 2, ts + TWO_HOURS_NS * (i % 2), d) for i, (ts, d) in enumerate(recs)],
                False, list(range(2, len(recs) + 1, 2)))
    if case == "second clock 2 hours behind":
        return ([(9, None), (9, None)],
                [(i % 2, ts - TWO_HOURS_NS * (i % 2), d) for i, (ts, d) in enumerate(recs)],
                False, None)
    if case == "second half: if_tsoffset 2**62 s":
        return ([(9, None), (9, 2**62)],
                [(0 if i < half else 1, ts, d) for i, (ts, d) in enumerate(recs)],
                True, [half + 1])
    if case == "second half: whole seconds near 2**63":
        # (whole seconds: the spacing of the second half is not the plain one's)
        return ([(9, None), (0, None)],
                [(0, ts, d) if i < half else (1, 2**63 + i, d) for i, (ts, d) in enumerate(recs)],
                False, [half + 1])
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["us and ns, alternating", "second clock 2 hours ahead",
                                  "second clock 2 hours behind", "second half: if_tsoffset 2**62 s",
                                  "second half: whole seconds near 2**63"])
def test_clock_jumps_across_the_interfaces_of_a_pcapng(tmp_path, monkeypatch, case):
    """Each interface of a pcapng has its own clock (resolution, offset).
    Whatever they say, replay finishes in about the scans of the plain
    capture, every primary frame out once.  A forward step past 2**53 ms
    (a broken if_tsoffset, a resolution of whole seconds) made replay spin
    for ever: its scan ticks no longer moved on in float milliseconds."""
    recs = records(DIVERGE_P)
    interfaces, packets, repaired, warned = _interleaved(recs, case)
    p_path = pcapng_with_interfaces(tmp_path / "p.pcapng", interfaces, packets)
    plain, plain_out, plain_scans = counted_replay(monkeypatch, DIVERGE_P, DIVERGE_S)
    result, out, scans = counted_replay(monkeypatch, p_path, DIVERGE_S)
    assert sorted(out) == sorted(d for _, d in recs)
    assert scans <= plain_scans + len(recs) + 2
    if repaired:
        assert result.stats.snapshot()["released"] == plain.stats.snapshot()["released"]
        assert out == plain_out
    if warned is not None:
        named = [int(w.split(": frame ")[1].split(":")[0]) for w in result.primary.warnings
                 if ": frame " in w]
        assert named == warned[:5]
    if case.startswith("second half"):
        (warning,) = result.primary.warnings
        assert warning.endswith("forward, more than any clock can; the timeline goes on from "
                                "the frame before")


@pytest.mark.parametrize("delta_ns, says", [(3 * DAY_NS, "3 days"), (70 * YEAR_NS, "70 years")])
def test_a_clock_jump_at_the_last_frame_is_said_and_the_frame_kept(tmp_path, monkeypatch,
                                                                    delta_ns, says):
    """The last frame far ahead of the one before: no frame follows to tell
    a jump from a corrupt timestamp, so it is taken as a jump; it is still
    compared and released, once."""
    recs = records(DIVERGE_P)
    last = len(recs) - 1
    p_path = write(tmp_path / "p.pcap", jumped(recs, last, delta_ns))
    result, out, _ = counted_replay(monkeypatch, p_path, DIVERGE_S)
    assert sorted(out) == sorted(d for _, d in recs)
    assert result.primary.frames == len(recs)
    assert [w for w in result.primary.warnings if ": frame " in w] == [
        f"{p_path}: frame {last + 1}: the clock jumps {says} forward"]


@pytest.mark.parametrize("offset_s, says", [
    (-2 * 10**9, "dated before 1970"), (600 * 365 * 86400, "dated past ")])
def test_a_time_the_output_cannot_hold_is_one_line_naming_it(cli, tmp_path, offset_s, says):
    """A pcapng can date frames before 1970 or after 2554 (an interface's
    if_tsoffset); neither a pcap (1970-2106) nor a pcapng written in
    nanoseconds (1970-2554) can.  It was 'internal error: ValueError ...
    please report it'."""
    recs = records(DIVERGE_P)
    p_path = pcapng_with_interfaces(tmp_path / "p.pcapng", [(9, offset_s)],
                                    [(0, ts, d) for ts, d in recs])
    out = tmp_path / "o.pcap"
    r = cli("replay", p_path, DIVERGE_S, "--out", out, "-q")
    assert r.rc == 2 and r.err.startswith(f"colo-compare: {out}: cannot write a frame {says}"), r
    assert r.err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.pcapng"]


def test_a_capture_spanning_decades_replays_in_a_handful_of_scans(tmp_path, monkeypatch):
    """Many quiet frames years apart on a flow nobody answers: one scan per
    decision, none per idle second (before: 2.2e9 scans for 70 years)."""
    recs = records(MATCH_P)
    spread = [(ts + i * 5 * YEAR_NS, d) for i, (ts, d) in enumerate(recs)]
    p_path = write(tmp_path / "p.pcap", spread)
    result, out, scans = counted_replay(monkeypatch, p_path, MATCH_S)
    assert sorted(out) == sorted(d for _, d in recs)
    assert scans <= 3 * len(recs)


def test_a_secondary_capture_that_ends_early_costs_each_flow_the_timeout_not_a_scan(
        tmp_path, monkeypatch):
    """The secondary's capture stops a third of the way in (its VM died):
    the primary's frames on 2,000 flows after that leave by a timeout, each
    within compare_timeout + 2 x expired_scan_cycle of its arrival, as serve
    would release them, in a handful of scans (before: one connection per
    scan, so the last flow waited 2,000 scans)."""
    from colo_cli.core import Config
    from colo_cli.testing import udp_frame
    ms = 10**6
    frames = [(t * 2 * ms, udp_frame(b"flow %d frame %d" % (t % 2000, t // 2000),
                                     sport=1024 + t % 2000)) for t in range(6000)]
    p_path = write(tmp_path / "p.pcap", frames)
    s_path = write(tmp_path / "s.pcap", frames[:2000])
    config = Config(compare_timeout_ms=500, expired_scan_cycle_ms=100)
    result, out, scans = counted_replay(monkeypatch, p_path, s_path, config=config)
    assert sorted(out) == sorted(d for _, d in frames)          # each once
    snap = result.stats.snapshot()
    assert snap["released"]["match"] == 2000
    assert snap["released"]["checkpoint"] == 4000
    # one per flow each time it timed out (a flow's frames come 4 s apart)
    assert snap["checkpoint_requests"] == {"timeout": 4000}
    assert snap["hold_ms"]["max_ms"] <= 500 + 2 * 100
    # about one scan per cycle over the capture's 12 s (where nothing is
    # due one empty scan moves the grid on), not one per flow (2,000)
    assert scans <= 12000 / 100 + 20
    # per flow, in the order the primary sent them
    position = {d: i for i, (_, d) in enumerate(frames)}
    by_flow = {}
    for d in out:
        by_flow.setdefault(d[34:36], []).append(position[d])
    assert all(v == sorted(v) for v in by_flow.values())


# -- results that are not a match ------------------------------------------------------

def test_nothing_comparable_is_not_a_match(cli):
    for quiet in ([], ["-q"]):
        r = cli("replay", DIVERGE_P, DIVERGE_S, "--vnet-hdr-len", "10", *quiet)
        assert r.rc == 2, r
        # (with -q there is no report: the line says why by itself)
        assert r.err == ("colo-compare: only 0 of 15 primary frames could be compared (15 not, "
                         "for 'unknown-ethertype'): not a match\n")
        if not quiet:
            assert r.out.splitlines()[0].endswith(": INCOMPARABLE")
    r = cli("replay", "--json", DIVERGE_P, DIVERGE_S, "--vnet-hdr-len", "10")
    assert r.rc == 2 and r.doc["result"] == "incomparable"


def test_a_small_comparable_part_is_not_a_match_either(cli, tmp_path):
    recs = records(MATCH_P)
    junk = [(ts, b"\xff" * 12 + b"\x88\xb5" + b"local experimental ethertype") for ts, _ in recs]
    both = write(tmp_path / "mostly-junk.pcap", sorted(recs[:2] + junk * 2))
    r = cli("replay", both, both)
    assert r.rc == 1, r
    assert r.err.startswith("colo-compare: only 2 of ")
    assert r.out.splitlines()[0].endswith(": INCOMPARABLE")


def test_two_captures_without_a_frame_are_not_a_match(cli, tmp_path):
    """A capture filter that matched nothing on either replica compared
    nothing: it said MATCH and exited 0."""
    empty = write(tmp_path / "empty.pcap", [])
    for quiet in ([], ["-q"]):
        r = cli("replay", empty, empty, *quiet)
        assert r.rc == 2, r
        assert r.err == ("colo-compare: the primary capture has no frames: nothing to compare, "
                         "not a match\n")
        if not quiet:
            assert r.out.splitlines()[0].endswith(": INCOMPARABLE")
    # with secondary frames and no primary ones, they diverge, as before
    r = cli("replay", empty, MATCH_S, "-q")
    assert (r.rc, r.err) == (1, "")


# -- outputs ------------------------------------------------------------------------

def test_two_outputs_on_one_path_are_refused_before_anything_is_written(cli, tmp_path):
    target = tmp_path / "o.pcap"
    for first, second in (("--out", "--diverged"), ("--out", "--evidence"),
                          ("--diverged", "--evidence")):
        r = cli("replay", DIVERGE_P, DIVERGE_S, first, target, second, target)
        assert r.rc == 2, r
        assert f"{first} and {second} are the same file" in r.err and r.err.count("\n") == 1
        assert not target.exists()
    # the same file under another name
    target.write_bytes(b"old")
    os.symlink(target, tmp_path / "link.pcap")
    r = cli("replay", DIVERGE_P, DIVERGE_S, "--out", target, "--diverged", tmp_path / "link.pcap")
    assert r.rc == 2 and target.read_bytes() == b"old"


def test_out_dash_writes_the_pcap_to_stdout_and_the_report_to_stderr():
    proc = subprocess.run([sys.executable, "-m", "colo_cli", "replay", str(DIVERGE_P),
                           str(DIVERGE_S), "--out", "-"], capture_output=True, timeout=60)
    assert proc.returncode == 1
    assert b": DIVERGE" in proc.stderr.splitlines()[0]
    import io
    with open_capture("-", stdin=io.BytesIO(proc.stdout)) as r:
        got = sorted(data for _n, _ts, data, _o, _lt in r)
    assert got == sorted(d for _, d in records(DIVERGE_P))


def test_out_dash_with_json_is_a_usage_error(cli):
    r = cli("replay", DIVERGE_P, DIVERGE_S, "--out", "-", "--json")
    assert r.rc == 2 and "--json and --out - would both write to stdout" in r.err
    r = cli("replay", DIVERGE_P, DIVERGE_S, "--diverged", "-")
    assert r.rc == 2 and "only --out writes to stdout" in r.err


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_replay_leaves_no_partial_outputs(cli, tmp_path, monkeypatch, failure):
    import colo_cli.replay as replay_module
    real = replay_module.replay

    def interrupted(*args, on_release=None, **kw):
        def release(ts, data, n=[0]):
            on_release(ts, data)
            n[0] += 1
            if n[0] == 5:
                raise failure("stop here")
        return real(*args, on_release=release, **kw)
    monkeypatch.setattr(replay_module, "replay", interrupted)
    (tmp_path / "kept.pcap").write_bytes(b"an earlier result")
    r = cli("replay", DIVERGE_P, DIVERGE_S, "--out", tmp_path / "kept.pcap",
            "--diverged", tmp_path / "d.pcap", "--evidence", tmp_path / "e.pcapng")
    assert r.rc == (130 if failure is KeyboardInterrupt else 2), r
    # nothing half-written, no temporary file left, the earlier file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.pcap"]
    assert (tmp_path / "kept.pcap").read_bytes() == b"an earlier result"


def test_outputs_appear_whole_with_the_usual_permissions(cli, tmp_path):
    r = cli("replay", DIVERGE_P, DIVERGE_S, "--out", tmp_path / "o.pcap")
    assert r.rc == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.pcap"]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "o.pcap").st_mode & 0o777 == 0o666 & ~mask
    assert len(records(tmp_path / "o.pcap")) == 15


def _pcap_frames(data: bytes) -> list[bytes]:
    import io
    with open_capture("-", stdin=io.BytesIO(data)) as r:
        return [d for _n, _ts, d, _o, _lt in r]


@pytest.mark.parametrize("kind", ["fifo", "character-device"])
def test_an_output_that_is_not_a_regular_file_is_written_in_place(cli, tmp_path, kind):
    """--out /dev/null (or a FIFO another program reads) is written, not
    replaced by a renamed file: before, as root, '--out /dev/null' turned
    the system's /dev/null into a regular file holding the pcap (and as
    anyone else failed: /dev is not writable).  A private copy of /dev/null
    stands in for it here."""
    import stat
    target = tmp_path / "out"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        try:
            os.mknod(target, stat.S_IFCHR | 0o666, os.makedev(1, 3))     # /dev/null's numbers
        except PermissionError:
            pytest.skip("making a device node needs CAP_MKNOD")
    got = tmp_path / "got.pcap"
    reader = None
    if kind == "fifo":
        with open(got, "wb") as sink:
            reader = subprocess.Popen(["cat", str(target)], stdout=sink)
    try:
        r = cli("replay", DIVERGE_P, DIVERGE_S, "--out", target, "-q")
        assert r.rc == 1 and r.err == "", r
        mode = os.lstat(target).st_mode
        assert (stat.S_ISFIFO(mode) if kind == "fifo" else stat.S_ISCHR(mode)), oct(mode)
        if reader is not None:
            assert reader.wait(10) == 0
            assert sorted(_pcap_frames(got.read_bytes())) == sorted(d for _, d in records(DIVERGE_P))
        assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait()


@pytest.mark.parametrize("stdout_is", ["pipe", "file"])
def test_out_dev_stdout_writes_to_whatever_stdout_is(tmp_path, stdout_is):
    """/dev/stdout is a link to /proc/self/fd/1: it was renamed over (as
    root, the system's /dev/stdout link became a file), or, resolved, named
    'pipe:[...]' that does not exist."""
    from test_cli_replay import subprocess_env
    argv = [sys.executable, "-m", "colo_cli", "replay", str(DIVERGE_P), str(DIVERGE_S), "-q",
            "--out", "/dev/stdout"]
    before = os.lstat("/dev/stdout")
    if stdout_is == "pipe":
        proc = subprocess.run(argv, capture_output=True, env=subprocess_env(), timeout=60)
        data = proc.stdout
    else:
        with open(tmp_path / "o.pcap", "wb") as f:
            proc = subprocess.run(argv, stdout=f, stderr=subprocess.PIPE, env=subprocess_env(),
                                  timeout=60)
        data = (tmp_path / "o.pcap").read_bytes()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["o.pcap"]
    assert (proc.returncode, proc.stderr) == (1, b"")
    assert sorted(_pcap_frames(data)) == sorted(d for _, d in records(DIVERGE_P))
    after = os.lstat("/dev/stdout")
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)


def test_a_symlinked_output_replaces_its_target_not_the_link(cli, tmp_path):
    target = tmp_path / "results" / "o.pcap"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "latest.pcap"
    os.symlink(target, link)
    r = cli("replay", DIVERGE_P, DIVERGE_S, "--out", link, "-q")
    assert r.rc == 1, r
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert len(records(target)) == 15
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pcap", "results"]
    # a link to a file not written yet is that file: two outputs on it are refused
    os.symlink(tmp_path / "d.pcap", tmp_path / "dangling.pcap")
    r = cli("replay", DIVERGE_P, DIVERGE_S, "--diverged", tmp_path / "d.pcap",
            "--out", tmp_path / "dangling.pcap")
    assert r.rc == 2 and "--out and --diverged are the same file" in r.err, r
    assert not (tmp_path / "d.pcap").exists()


def test_a_failed_write_is_one_line_naming_the_file(tmp_path):
    """A full disk or a file size limit (here RLIMIT_FSIZE: the pcap is
    5.5 KB, the limit 4 KB) is the user's trouble, not 'internal error:
    OSError ... please report it'; nothing is left behind."""
    import resource

    from test_cli_replay import subprocess_env

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    for out in (str(tmp_path / "o.pcap"), "-"):
        with open(tmp_path / "stdout", "wb") as stdout:
            proc = subprocess.run([sys.executable, "-m", "colo_cli", "replay", str(DIVERGE_P),
                                   str(DIVERGE_S), "-q", "--out", out], stdout=stdout,
                                  stderr=subprocess.PIPE, env=subprocess_env(), timeout=60,
                                  preexec_fn=limit)
        name = "standard output" if out == "-" else out
        assert (proc.returncode, proc.stderr.decode()) == (
            2, f"colo-compare: {name}: cannot write: file too large\n")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["stdout"]


@pytest.mark.parametrize("sig,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_mid_replay_leaves_no_partial_outputs(tmp_path, sig, status):
    """A real signal, as Ctrl-C or kill(1) sends it, while replay reads its
    primary from a pipe that has more to come.  Before, SIGTERM ended the
    process on the spot and left the temporary files beside the outputs."""
    import signal
    import time

    from test_cli_replay import subprocess_env
    data = Path(DIVERGE_P).read_bytes()
    (tmp_path / "kept.pcap").write_bytes(b"an earlier result")
    proc = subprocess.Popen([sys.executable, "-m", "colo_cli", "replay", "-", str(DIVERGE_S),
                             "--out", str(tmp_path / "kept.pcap"), "--diverged",
                             str(tmp_path / "d.pcap"), "--evidence", str(tmp_path / "e.pcapng")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=subprocess_env())
    try:
        proc.stdin.write(data[:len(data) // 2])
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while len([p for p in tmp_path.iterdir() if p.name.endswith(".part")]) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.01)
        proc.send_signal(getattr(signal, sig))
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, err) == (status, b"colo-compare: interrupted\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.pcap"]
    assert (tmp_path / "kept.pcap").read_bytes() == b"an earlier result"


# -- stats on damaged reports ----------------------------------------------------------

def _paths(doc, prefix=()):
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:2]):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def test_stats_on_a_damaged_report_is_one_line_naming_the_file(cli, tmp_path):
    r = cli("replay", "--json", DIVERGE_P, DIVERGE_S)
    base = r.doc
    path = tmp_path / "r.json"
    checked = 0
    for where in _paths(base):
        for damage in ("delete", "garbage"):
            doc = copy.deepcopy(base)
            parent = doc
            for k in where[:-1]:
                parent = parent[k]
            if damage == "delete":
                del parent[where[-1]]
            else:
                parent[where[-1]] = "garbage"
            path.write_text(json.dumps(doc))
            for fmt in ("table", "json", "prometheus"):
                r = cli("stats", path, "--format", fmt)
                assert r.rc in (0, 2), (where, damage, fmt, r)
                assert "internal error" not in r.err, (where, damage, fmt, r)
                if r.rc == 2:
                    assert r.err.startswith(f"colo-compare: {path}: ") and r.err.count("\n") == 1
                checked += 1
    assert checked > 500
    del base["stats"]["frames_in"]
    path.write_text(json.dumps(base))
    r = cli("stats", path)
    assert (r.rc, r.err) == (2, f"colo-compare: {path}: damaged report: stats.frames_in is "
                                "missing\n")


def test_replay_asks_for_the_timer_once_per_scan_tick_not_once_per_frame(tmp_path, monkeypatch):
    """get_timer() looks at every kind of pending work, so replay does not
    ask it for every frame: no scan is due before ``next_scan_ms``, and
    where ticks pass with nothing to decide one empty scan moves the grid
    on.  10,000 matched pairs over 10 s with a 100 ms scan cycle: about one
    question per tick (100), the same decisions as always (every pair
    matched, nothing timed out)."""
    from colo_cli.core import Config
    from colo_cli.testing import udp_frame
    asked = [0]

    class Counting(Comparator):
        def get_timer(self):
            asked[0] += 1
            return super().get_timer()
    monkeypatch.setattr(replay_module, "Comparator", Counting)
    ms = 10**6
    frames = [(t * ms, udp_frame(b"frame %d" % t, sport=1024 + t % 50)) for t in range(10_000)]
    p_path = write(tmp_path / "p.pcap", frames)
    s_path = write(tmp_path / "s.pcap", frames)
    out = []
    config = Config(compare_timeout_ms=500, expired_scan_cycle_ms=100)
    with open_capture(str(p_path)) as p, open_capture(str(s_path)) as s:
        result = replay(p, s, config, on_release=lambda ts, data: out.append(data))
    assert out == [d for _, d in frames]
    snap = result.stats.snapshot()
    assert snap["released"]["match"] == 10_000
    assert snap["checkpoint_requests"] == {}
    assert 50 <= asked[0] <= 10_000 / 100 + 20
