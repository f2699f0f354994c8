"""colo-compare stats: every counter checked against known traffic pushed
through a real serve, the Prometheus output read back by prometheus_client's
own parser, a replay report, the errors, and who may use the socket."""

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

from colo_cli.cli import main
from colo_cli.testing import ether, tcp_frame, udp_frame

from serve_helpers import (OutReader, ServeProc, connect, rec, unix_ep)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


@pytest.fixture
def served():
    """A serve with a control socket and fast timeouts, its three sockets
    connected; yields (proc, primary, secondary, outdev reader, control path)."""
    d = tempfile.mkdtemp(prefix="colo-stats-", dir="/tmp")
    p_ep, p_path = unix_ep(d, "p")
    s_ep, s_path = unix_ep(d, "s")
    o_ep, o_path = unix_ep(d, "o")
    ctl = os.path.join(d, "ctl")
    proc = ServeProc(d, ["--primary-in", p_ep, "--secondary-in", s_ep, "--outdev", o_ep,
                         "--control", ctl, "--compare-timeout", "300",
                         "--expired-scan-cycle", "100", "-v"], control=ctl)
    socks = []
    try:
        proc.wait_ready()
        out = OutReader(connect(o_ep))
        pri, sec = connect(p_ep), connect(s_ep)
        socks = [pri, sec]
        proc.wait_stats(lambda st: all(l["connected"] for l in st["serve"]["links"].values()),
                        what="all three links connected")
        yield proc, pri, sec, out, ctl
        out.close()
    finally:
        for s in socks:
            s.close()
        proc.kill_hard()
        subprocess.run(["rm", "-rf", d])


def _stats_cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(["stats", *args])
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def test_every_counter_matches_the_traffic_sent(served, capsys):
    proc, pri, sec, out, ctl = served
    matches = [udp_frame(b"m%d" % i, sport=1000 + i) for i in range(5)]
    tcp_p = tcp_frame(b"hello", seq=100, ack=1)
    lldp = ether(b"\x02\x07\x04" + b"\0" * 40, 0x88CC)       # not comparable: bypassed
    diverged_p, diverged_s = udp_frame(b"AAAA", sport=7), udp_frame(b"AAAB", sport=7)
    lonely = udp_frame(b"no twin", sport=9)                    # times out
    for f in matches:
        pri.sendall(rec(f))
        sec.sendall(rec(f))
    pri.sendall(rec(tcp_p))
    sec.sendall(rec(tcp_p))
    pri.sendall(rec(lldp))
    sec.sendall(rec(lldp))
    pri.sendall(rec(diverged_p))
    sec.sendall(rec(diverged_s))
    # the miscompare's checkpoint flushes what is queued: send the frame that
    # is to time out only after it
    proc.wait_stats(lambda s: s["checkpoints"] == 1)
    pri.sendall(rec(lonely))
    # 5 + 1 matches, 1 bypassed, 1 released at the miscompare's checkpoint,
    # 1 released at the timeout's
    out.wait_records(9, timeout=5)
    st = proc.wait_stats(lambda s: s["checkpoint_requests"].get("timeout", 0) >= 1)
    n_p, n_s = 9, 8
    assert st["frames_in"] == {"primary": n_p, "secondary": n_s}
    sent_p = sum(len(rec(f)) for f in matches + [tcp_p, lldp, diverged_p, lonely])
    sent_s = sum(len(rec(f)) for f in matches + [tcp_p, lldp, diverged_s])
    # the comparator counts frame bytes, as replay does; the links count the
    # wire (length words included)
    assert st["bytes_in"] == {"primary": sent_p - 4 * n_p, "secondary": sent_s - 4 * n_s}
    assert st["released_bytes"] == sum(len(f) for f in matches + [tcp_p, diverged_p, lonely])
    assert st["released"] == {"match": 6, "checkpoint": 2, "total": 8}
    assert st["bypassed"] == {"unknown-ethertype": 1}
    assert st["dropped"] == {"secondary:unknown-ethertype": 1}
    assert st["miscompares"] == {"udp:content": 1}
    assert st["checkpoint_requests"] == {"miscompare": 1, "timeout": 1}
    assert st["checkpoints"] == 2
    assert st["serve"]["checkpoints_by"] == {"local": 2, "notify": 0, "control": 0}
    assert st["secondary"] == {"matched": 6, "absorbed": 0, "discarded": 1}
    assert st["connections"]["created"] == 8 and st["connections"]["now"] == 8   # LLDP is none
    assert st["queued"] == {"frames": 0, "bytes": 0, "primary": 0, "secondary": 0}
    assert st["hold_ms"]["count"] == 8
    assert st["hold_ms"]["max_ms"] >= 300               # the lonely frame waited past the timeout
    links = st["serve"]["links"]
    assert links["outdev"]["frames_out"] == 9 and links["outdev"]["queued_frames"] == 0
    assert links["primary-in"]["bytes_in"] == sent_p
    assert st["serve"]["policy"] == "release" and st["serve"]["uptime_s"] > 0

    # the CLI's JSON is the same document, versioned
    code, text, _ = _stats_cli(capsys, "--control", ctl, "--json")
    doc = json.loads(text)
    assert code == 0 and doc["version"] == 2 and doc["source"] == "serve"
    from colo_cli import __version__
    assert doc["tool"] == {"name": "colo-compare", "version": __version__}
    assert doc["top_connections_truncated"] == {"by_miscompares": False, "by_hold": False}
    assert doc["stats"]["released"] == st["released"]
    worst = doc["top_connections"]["by_miscompares"]
    assert [c["flow"] for c in worst] == ["udp 10.0.0.1:7 > 10.0.0.2:6000"]
    assert doc["top_connections"]["by_hold"][0]["flow"] == "udp 10.0.0.1:9 > 10.0.0.2:6000"

    # the table, as plain text when not on a terminal
    code, text, _ = _stats_cli(capsys, "--control", ctl)
    assert code == 0
    assert "miscompares             1" in text or "miscompares" in text
    for word in ("frames in", "released", "match 6", "udp:content 1", "timeout 1",
                 "primary-in", "outdev", "Top connections by miscompares"):
        assert word in text, word

    # Prometheus, read back by the reference parser
    from prometheus_client.parser import text_string_to_metric_families
    code, text, _ = _stats_cli(capsys, "--control", ctl, "--format", "prometheus")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("colo_compare_frames_in_total", (("side", "primary"),))] == n_p
    assert samples[("colo_compare_released_total", (("reason", "match"),))] == 6
    assert samples[("colo_compare_miscompares_total", (("cause", "content"), ("protocol", "udp")))] == 1
    assert samples[("colo_compare_checkpoint_requests_total", (("cause", "timeout"),))] == 1
    assert samples[("colo_compare_bypassed_total", (("reason", "unknown-ethertype"),))] == 1
    assert samples[("colo_compare_link_connected", (("link", "outdev"),))] == 1
    assert families["colo_compare_hold_seconds"].type == "histogram"
    assert samples[("colo_compare_hold_seconds_count", ())] == 8
    assert samples[("colo_compare_hold_seconds_bucket", (("le", "+Inf"),))] == 8
    assert samples[("colo_compare_hold_seconds_bucket", (("le", "0.128"),))] < 8   # the timeout's hold


def test_output_file_is_written_atomically_for_the_textfile_collector(served, tmp_path, capsys):
    proc, pri, sec, out, ctl = served
    target = tmp_path / "colo.prom"
    code, text, err = _stats_cli(capsys, "--control", ctl, "--format", "prometheus",
                                 "-o", str(target))
    assert code == 0 and text == "" and err == ""
    body = target.read_text()
    assert body.startswith("# HELP colo_compare_info") and body.endswith("\n")
    assert [p.name for p in tmp_path.iterdir()] == ["colo.prom"]        # no leftovers
    assert oct(target.stat().st_mode & 0o777) == "0o644"


def test_control_socket_is_owner_only(served):
    proc, pri, sec, out, ctl = served
    mode = os.stat(ctl).st_mode & 0o777
    assert mode == 0o600
    if os.geteuid() != 0:
        pytest.skip("needs root to try as another user")
    # another user is refused even if the file mode would let it in
    os.chmod(ctl, 0o666)
    os.chmod(os.path.dirname(ctl), 0o755)
    code = ("import json, os, socket, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "print(s.makefile().readline().strip())\n")   # refused before any request
    r = subprocess.run([sys.executable, "-c", code, ctl], capture_output=True, text=True, timeout=10)
    os.chmod(ctl, 0o600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"ok": False, "error": "permission denied"}


def test_watch_refreshes_until_ctrl_c_then_exits_0(served):
    proc, pri, sec, out, ctl = served
    p = subprocess.Popen([sys.executable, "-m", "colo_cli", "stats", "--control", ctl,
                          "--watch", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.0)
    p.send_signal(2)
    stdout, stderr = p.communicate(timeout=10)
    assert p.returncode == 0, stderr
    assert stdout.count(b"frames in") >= 1 and b"Traceback" not in stderr


def test_stats_of_a_replay_report(tmp_path, capsys):
    report = tmp_path / "r.json"
    with pytest.raises(SystemExit):
        main(["replay", "--json", os.path.join(EXAMPLES, "diverge-primary.pcap"),
              os.path.join(EXAMPLES, "diverge-secondary.pcap")])
    report.write_text(capsys.readouterr().out)
    code, text, _ = _stats_cli(capsys, str(report))
    assert code == 0 and "diverge" in text and "tcp:content 1" in text
    assert "Most divergent connections" in text
    code, text, _ = _stats_cli(capsys, str(report), "--json")
    doc = json.loads(text)
    assert doc["source"] == "replay-report" and doc["stats"]["miscompares"] == {
        "tcp:content": 1, "udp:content": 1}
    code, text, _ = _stats_cli(capsys, str(report), "--format", "prometheus")
    assert 'colo_compare_checkpoints_total{by="replay"} 3' in text
    from colo_cli import __version__
    assert f'colo_compare_info{{source="replay-report",version="{__version__}"}} 1' in text


def test_a_report_written_before_a_counter_was_added_is_not_damaged(tmp_path, capsys):
    """A version 1 report from the colo-compare before the secondary's
    absence was counted has no stats.secondary_absent_periods: stats read it
    as 0 (it said 'damaged report: stats.secondary_absent_periods is
    missing')."""
    with pytest.raises(SystemExit):
        main(["replay", "--json", os.path.join(EXAMPLES, "diverge-primary.pcap"),
              os.path.join(EXAMPLES, "diverge-secondary.pcap")])
    doc = json.loads(capsys.readouterr().out)
    added_later = ("secondary_absent_periods", "fragment_overlap_bytes",
                   "fragment_conflict_bytes", "stream_gap_bytes")
    for key in added_later:
        del doc["stats"][key]
    report = tmp_path / "older.json"
    report.write_text(json.dumps(doc))
    code, text, err = _stats_cli(capsys, str(report), "--json")
    assert (code, err) == (0, "")
    st = json.loads(text)["stats"]
    assert st["secondary_absent_periods"] == st["stream_gap_bytes"] == 0
    assert st["fragment_overlap_bytes"] == st["fragment_conflict_bytes"] == {"primary": 0,
                                                                             "secondary": 0}
    code, text, err = _stats_cli(capsys, str(report), "--format", "prometheus")
    assert (code, err) == (0, "")
    assert "colo_compare_stream_gap_bytes_total 0" in text.splitlines()
    assert 'colo_compare_fragment_conflict_bytes_total{side="primary"} 0' in text.splitlines()
    code, text, err = _stats_cli(capsys, str(report))
    assert (code, err) == (0, "") and "tcp:content 1" in text


@pytest.mark.parametrize("content, message", [
    ("{not json", "not JSON"),
    ('{"version": 1, "command": "serve"}', "not a colo-compare replay report"),
    ('{"version": 3, "command": "replay", "stats": {}}', "report version 3 is not supported"),
])
def test_bad_reports_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "r.json"
    path.write_text(content)
    code, text, err = _stats_cli(capsys, str(path))
    assert code == 2 and text == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_socket_errors_are_one_line(tmp_path, capsys):
    code, _, err = _stats_cli(capsys, "--control", str(tmp_path / "none"))
    assert code == 2 and "no such socket" in err and len(err.strip().splitlines()) == 1
    plain = tmp_path / "file"
    plain.write_text("x")
    code, _, err = _stats_cli(capsys, "--control", str(plain))
    assert code == 2 and "not a socket" in err
    import socket
    dead = str(tmp_path / "dead")
    s = socket.socket(socket.AF_UNIX)
    s.bind(dead)
    s.close()                                  # a socket file nobody listens on
    code, _, err = _stats_cli(capsys, "--control", dead)
    assert code == 2 and "nothing is listening" in err
    code, _, err = _stats_cli(capsys)
    assert code == 2 and "give REPORT.json" in err


def test_control_request_errors(served):
    proc, pri, sec, out, ctl = served
    assert proc.control({"cmd": "nope"}) == {"ok": False, "error": "unknown command 'nope'"}
    assert proc.control(b"not json\n") == {"ok": False, "error": "not JSON"}
    assert proc.control({"cmd": "stats", "top": -1})["ok"] is False
    reply = proc.control({"cmd": "connections", "limit": 5})
    assert reply["ok"] and reply["connections"] == []


def test_zero_hold_times_counted_by_bare_increment_fold_into_the_histogram():
    """The hot path counts a frame released on arrival with a bare
    increment (its cost is measured by benchmarks/counting_cost.py): it
    must still show in the count, the lowest bucket and the quantiles."""
    from colo_cli.core.stats import Stats
    st = Stats()
    st.hold.zero += 3
    st.hold.add(8.0)
    assert st.hold.count == 4
    assert st.hold.quantile(0.5) == 0.0 and st.hold.quantile(1.0) == 8.0
