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

from test_cli_replay import DIVERGE_P, DIVERGE_S, MATCH_P, MATCH_S, cli  # noqa: F401

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


def test_a_capture_spanning_decades_replays_in_a_handful_of_scans(tmp_path, monkeypatch):
    """Many quiet frames years apart on a flow nobody answers: one scan per
    decision, none per idle second (before: 2.2e9 scans for 70 years)."""
    recs = records(MATCH_P)
    spread = [(ts + i * 5 * YEAR_NS, d) for i, (ts, d) in enumerate(recs)]
    p_path = write(tmp_path / "p.pcap", spread)
    result, out, scans = counted_replay(monkeypatch, p_path, MATCH_S)
    assert sorted(out) == sorted(d for _, d in recs)
    assert scans <= 3 * len(recs)


# -- results that are not a match ------------------------------------------------------

def test_nothing_comparable_is_not_a_match(cli):
    for quiet in ([], ["-q"]):
        r = cli("replay", DIVERGE_P, DIVERGE_S, "--vnet-hdr-len", "10", *quiet)
        assert r.rc == 2, r
        assert r.err == ("colo-compare: only 0 of 15 primary frames could be compared: not a "
                         "match (see the report's note)\n")
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
