"""``colo-compare replay`` end to end: exit statuses, the report, JSON, the
output pcaps, the comparator options, errors and pipes.

Most tests run the CLI in-process through ``colo_cli.cli.main(argv)`` (which
always ends in ``SystemExit``); a few run ``python -m colo_cli`` as a real
process where stdin, a pipe or the process's exit status matters.  Captures
are written with the project's writers from ``colo_cli.testing`` frames, so
every byte (and so every expected offset) is known.  Expected values for the
example captures are computed from the files with dpkt, not with our code.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib.metadata import version as dist_version
from pathlib import Path

import dpkt
import pytest

import colo_cli
from colo_cli.capture import PcapngWriter, PcapWriter, open_capture
from colo_cli.cli import main
from colo_cli.testing import tcp_frame, udp_frame
from cli_run import cli  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
MATCH_P = EXAMPLES / "match-primary.pcap"
MATCH_S = EXAMPLES / "match-secondary.pcap"
DIVERGE_P = EXAMPLES / "diverge-primary.pcap"
DIVERGE_S = EXAMPLES / "diverge-secondary.pcap"

T0 = 1_700_000_000 * 10**9      # an arbitrary epoch for crafted captures (ns)
MS = 1_000_000                  # one millisecond in ns
FIN, SYN, ACK = 0x01, 0x02, 0x10
SYNACK = SYN | ACK

# Ethernet (14) + IPv4 (20): where the L4 header starts in a colo_cli.testing frame
L4 = 14 + 20


# ------------------------------------------------------------------ helpers

def write_pcap(path, frames, *, nano=False, linktype=1):
    """``frames``: [(ts_ns, bytes)] -> a classic pcap; returns the path."""
    with open(path, "wb") as f:
        w = PcapWriter(f, nano=nano, linktype=linktype)
        for ts, data in frames:
            w.write(ts, data)
    return path


def write_pcapng(path, frames, *, linktype=1):
    with open(path, "wb") as f:
        w = PcapngWriter(f)
        w.add_interface("eth0", linktype=linktype)
        for ts, data in frames:
            w.write(0, ts, data)
    return path


def read_frames(path):
    """[(ts_ns, bytes)] of a capture (an output of ours, or an example)."""
    with open_capture(str(path)) as reader:
        return [(ts, data) for _n, ts, data, _orig, _lt in reader]


def dpkt_frames(path):
    """[(ts_float, bytes)] read with dpkt, for expectations computed without our code."""
    with open(path, "rb") as f:
        return [(ts, bytes(buf)) for ts, buf in dpkt.pcap.Reader(f)]


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("COLO_COMPARE_CONTROL", None)
    return env


def run_process(*args, input=None, **kw):
    """``python -m colo_cli ARGS`` as a real process."""
    return subprocess.run([sys.executable, "-m", "colo_cli", *map(str, args)], input=input,
                          capture_output=True, env=subprocess_env(), timeout=120, **kw)


def assert_one_line_error(r, *needles, rc=2):
    """Exit ``rc``, nothing on stdout, exactly one line on stderr that starts
    with 'colo-compare' and names every needle, no traceback."""
    assert r.rc == rc, r
    assert r.out == "", r
    assert r.err.endswith("\n"), r
    lines = r.err.splitlines()
    assert len(lines) == 1, r
    assert lines[0].startswith("colo-compare"), r
    assert "Traceback" not in r.err
    for needle in needles:
        assert needle in lines[0], (needle, r)
    return lines[0]


def pair(tmp_path, primary, secondary, *, fmt="pcap"):
    """Write two captures; returns their paths."""
    writer = write_pcap if fmt == "pcap" else write_pcapng
    return (writer(tmp_path / f"primary.{fmt}", primary),
            writer(tmp_path / f"secondary.{fmt}", secondary))


def udp_series(payloads, *, start=T0, step=MS, **kw):
    return [(start + i * step, udp_frame(p, checksum=0, **kw)) for i, p in enumerate(payloads)]


def tcp_payloads_by_seq(frames, sport, dport):
    """{seq: payload} of one TCP direction, with dpkt."""
    out = {}
    syn_seq = None
    for _ts, buf in frames:
        eth = dpkt.ethernet.Ethernet(buf)
        ip = eth.data
        if not isinstance(ip, dpkt.ip.IP) or not isinstance(ip.data, dpkt.tcp.TCP):
            continue
        seg = ip.data
        if (seg.sport, seg.dport) != (sport, dport):
            continue
        if seg.flags & dpkt.tcp.TH_SYN:
            syn_seq = seg.seq
        if seg.data:
            out.setdefault(seg.seq, bytes(seg.data))
    return syn_seq, out


def stream_from(segments, start):
    """Concatenate {seq: payload} from ``start`` (no holes expected)."""
    data = bytearray()
    seq = start
    for s in sorted(segments):
        assert s <= seq, "hole in the stream"
        data += segments[s][seq - s:]
        seq = s + len(segments[s])
    return bytes(data)


# ------------------------------------------------------- version and help

def test_version_names_colo_compare_python_dpkt_and_the_core_build(cli):
    from colo_cli._build import describe
    expected = (f"colo-compare {colo_cli.__version__} (Python {platform.python_version()}, "
                f"dpkt {dist_version('dpkt')}, {describe()})\n")
    for flag in ("--version", "-V"):
        r = cli(flag)
        assert r.rc == 0, r
        assert r.out == expected
        assert r.err == ""


@pytest.mark.parametrize("argv", [["--help"], ["-h"], []], ids=["--help", "-h", "no-args"])
def test_top_level_help_exits_0(cli, argv):
    r = cli(*argv)
    assert r.rc == 0, r
    assert r.out.startswith("Usage: colo-compare [OPTIONS] COMMAND [ARGS]...")
    for command in ("replay", "serve", "stats"):
        assert f"  {command}  " in r.out
    assert r.err == ""


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_replay_help_exits_0_and_lists_the_options(cli, flag):
    r = cli("replay", flag)
    assert r.rc == 0, r
    assert r.out.startswith("Usage: colo-compare replay [OPTIONS] PRIMARY SECONDARY")
    for option in ("--compare-timeout", "--expired-scan-cycle", "--max-queue-size",
                   "--max-connections", "--no-timeout", "--hold", "--vnet-hdr-len", "--json",
                   "--out", "--diverged", "--hexdump", "--quiet", "--color"):
        assert option in r.out, option
    assert r.err == ""


def test_python_dash_m_version():
    p = run_process("--version")
    assert p.returncode == 0, p
    from colo_cli._build import describe
    assert p.stdout.decode() == (f"colo-compare {colo_cli.__version__} (Python "
                                 f"{platform.python_version()}, dpkt {dist_version('dpkt')}, "
                                 f"{describe()})\n")
    assert p.stderr == b""


# ----------------------------------------------------------- the examples

def _example_divergence():
    """Where the example secondary's HTTP response first differs, from the
    files with dpkt: (flow, stream offset, raw seq, primary frame index,
    offset of the byte in that frame)."""
    p_frames, s_frames = dpkt_frames(DIVERGE_P), dpkt_frames(DIVERGE_S)
    syn, p_segs = tcp_payloads_by_seq(p_frames, 80, 51000)
    _, s_segs = tcp_payloads_by_seq(s_frames, 80, 51000)
    origin = syn + 1
    a, b = stream_from(p_segs, origin), stream_from(s_segs, origin)
    assert len(a) == len(b)
    offset = next(i for i in range(len(a)) if a[i] != b[i])
    raw = origin + offset
    for index, (_ts, buf) in enumerate(p_frames):
        seg = dpkt.ethernet.Ethernet(buf).data.data
        if (isinstance(seg, dpkt.tcp.TCP) and seg.sport == 80 and seg.data
                and seg.seq <= raw < seg.seq + len(seg.data)):
            in_frame = len(buf) - len(seg.data) + (raw - seg.seq)
            return "tcp 192.0.2.10:80 > 198.51.100.7:51000", offset, raw, index, in_frame
    raise AssertionError("no primary frame holds the byte")


def _example_dns_difference():
    """First differing byte of the UDP parts of the DNS answers to port 40001, with dpkt."""
    parts = []
    for path in (DIVERGE_P, DIVERGE_S):
        for _ts, buf in dpkt_frames(path):
            ip = dpkt.ethernet.Ethernet(buf).data
            if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.udp.UDP) and ip.data.dport == 40001:
                start = 14 + ip.hl * 4
                parts.append(buf[start:start + ip.data.ulen])
    a, b = parts
    return next(i for i in range(len(a)) if a[i] != b[i])


def test_example_match_exits_0(cli):
    r = cli("replay", MATCH_P, MATCH_S)
    assert r.rc == 0, r
    assert r.out.splitlines()[0] == f"colo-compare replay: {MATCH_P} vs {MATCH_S}: MATCH"
    assert "Miscompare" not in r.out
    assert r.err == ""


def test_example_diverge_report_names_flow_offset_and_hexdump(cli):
    flow, offset, raw, p_index, _ = _example_divergence()
    assert (offset, raw) == (47, 3_000_000_047)   # "Date: ... 20:00:0|0|" after "HTTP/1.1 200 OK\r\n"
    r = cli("replay", DIVERGE_P, DIVERGE_S)
    assert r.rc == 1, r
    lines = r.out.splitlines()
    assert lines[0] == f"colo-compare replay: {DIVERGE_P} vs {DIVERGE_S}: DIVERGE"
    title = next(line for line in lines if line.startswith("Miscompare 1 of 2 "))
    assert f": {flow}: content differs at stream offset {offset} (seq {raw})" in title
    # the second divergence: the DNS answer with another record TTL; the first
    # difference in its UDP part is the UDP checksum (byte 6), which that
    # changes: the report names the payload's first differing byte instead
    udp_at = _example_dns_difference()
    assert udp_at == 6
    title2 = next(line for line in lines if line.startswith("Miscompare 2 of 2 "))
    assert title2.endswith("udp 192.0.2.10:53 > 198.51.100.7:40001: content differs in datagram 1 "
                           "of its flow at byte 46 of the udp part")
    at = lines.index(title2)
    assert lines[at + 1] == "  DNS answer 1 example.org A: TTL 300 vs 299"
    assert lines[at + 2].startswith("  the UDP checksum differs because the payload does")
    # hexdump: frame headers (Wireshark's frame numbers, from 1), offset
    # columns, and a caret line under the differing bytes
    assert any(line.startswith(f"primary frame {p_index + 1} (") for line in lines)
    assert any(line.startswith("0000  52 54 00 00 00 02") for line in lines)
    assert any(set(line.strip()) == {"^", " "} for line in lines)
    assert r.err == ""


def test_example_hexdump_0_removes_the_hexdumps(cli):
    r = cli("replay", "--hexdump", "0", DIVERGE_P, DIVERGE_S)
    assert r.rc == 1, r
    assert "DIVERGE" in r.out.splitlines()[0]
    assert "Miscompare 1 of" not in r.out
    assert "primary frame " not in r.out
    assert "^^" not in r.out
    assert "0000  " not in r.out
    # the counts are still there
    assert "tcp:content 1, udp:content 1" in r.out


def test_example_hexdump_1_shows_one_and_counts_the_rest(cli):
    r = cli("replay", "--hexdump", "1", DIVERGE_P, DIVERGE_S)
    assert r.rc == 1, r
    assert r.out.count("Miscompare 1 of 2 ") == 1
    assert "Miscompare 2 of 2" not in r.out
    assert r.out.rstrip().endswith("(1 more miscompare not shown; see --hexdump N or --json)")


def test_example_diverge_json(cli):
    flow, offset, raw, p_index, in_frame = _example_divergence()
    p_frames = dpkt_frames(DIVERGE_P)
    r = cli("replay", "--json", DIVERGE_P, DIVERGE_S)
    assert r.rc == 1, r
    assert r.err == ""
    doc = r.doc
    assert doc["version"] == 2
    assert doc["command"] == "replay"
    assert doc["tool"] == {"name": "colo-compare", "version": colo_cli.__version__}
    assert doc["result"] == "diverge"
    assert doc["inputs"]["primary"]["file"] == str(DIVERGE_P)
    assert doc["inputs"]["primary"]["frames"] == len(p_frames) == 15
    assert doc["inputs"]["secondary"]["frames"] == len(dpkt_frames(DIVERGE_S)) == 16
    assert doc["miscompares_total"] == 2 == len(doc["miscompares"])
    tcp, udp = doc["miscompares"]
    assert {k: tcp[k] for k in ("flow", "protocol", "cause", "stream_offset", "raw_seq",
                                "datagram_index", "src", "dst", "sport", "dport", "vlan")} == {
        "flow": flow, "protocol": "tcp", "cause": "content", "stream_offset": offset,
        "raw_seq": raw, "datagram_index": None, "src": "192.0.2.10", "dst": "198.51.100.7",
        "sport": 80, "dport": 51000, "vlan": []}
    assert tcp["primary"]["frame_number"] == p_index + 1
    assert tcp["explanation"]["field"] == "headers.Date"
    assert tcp["primary"]["frame_hex"] == p_frames[p_index][1].hex()
    assert tcp["primary"]["length"] == len(p_frames[p_index][1])
    assert tcp["primary"]["offset"] == in_frame
    assert bytes.fromhex(tcp["secondary"]["frame_hex"])[tcp["secondary"]["offset"]] == ord("1")
    assert bytes.fromhex(tcp["primary"]["frame_hex"])[in_frame] == ord("0")
    udp_at = _example_dns_difference()
    assert (udp["protocol"], udp["cause"], udp["datagram_index"], udp["stream_offset"],
            udp["raw_seq"]) == ("udp", "content", 0, udp_at, None)
    assert udp["flow"] == "udp 192.0.2.10:53 > 198.51.100.7:40001"
    assert udp["primary"]["offset"] == udp["secondary"]["offset"] == L4 + udp_at
    # the checksum differs because the payload does: the payload's byte
    assert udp["primary"]["payload_offset"] == udp["secondary"]["payload_offset"] == 0x50
    assert (udp["explanation"]["field"], udp["explanation"]["primary"],
            udp["explanation"]["secondary"]) == ("answers[0].ttl", 300, 299)
    causes = sorted(c["cause"] for c in doc["checkpoint_requests"])
    assert causes == ["miscompare", "miscompare", "timeout"]
    assert doc["checkpoint_requests_total"] == 3
    assert doc["unmatched"] == {"primary": 0, "secondary": 0}


# ----------------------------------------------- exact JSON values, crafted

def test_json_tcp_one_byte_differs_after_syn(cli, tmp_path):
    """stream_offset counts from the byte after the SYN; raw_seq is the
    byte's own sequence number; offsets are inside each Ethernet frame."""
    isn = 700_000
    seg1, seg2 = bytes(range(100)), bytes(range(100, 180))
    bad2 = bytearray(seg2)
    bad2[37] ^= 0x55
    kw = dict(sport=80, dport=40000)
    primary = [(T0, tcp_frame(b"", seq=isn, flags=SYNACK, **kw)),
               (T0 + MS, tcp_frame(seg1, seq=isn + 1, **kw)),
               (T0 + 2 * MS, tcp_frame(seg2, seq=isn + 101, **kw))]
    # the secondary's SYN-ACK carries another ISN (its own is never compared)
    secondary = [(T0, tcp_frame(b"", seq=12345, flags=SYNACK, ident=7, **kw)),
                 (T0 + MS, tcp_frame(seg1, seq=isn + 1, ident=8, **kw)),
                 (T0 + 2 * MS, tcp_frame(bytes(bad2), seq=isn + 101, ident=9, **kw))]
    p, s = pair(tmp_path, primary, secondary)
    r = cli("replay", "--json", p, s)
    assert r.rc == 1, r
    doc = r.doc
    assert doc["result"] == "diverge"
    assert doc["miscompares_total"] == 1
    (m,) = doc["miscompares"]
    assert m["flow"] == "tcp 10.0.0.1:80 > 10.0.0.2:40000"
    assert m["protocol"] == "tcp" and m["cause"] == "content"
    assert m["stream_offset"] == 100 + 37
    assert m["raw_seq"] == isn + 1 + 137
    assert m["datagram_index"] is None
    assert m["primary"] == {"frame_number": 3, "length": len(primary[2][1]),
                            "offset": L4 + 20 + 37, "payload_offset": L4 + 20 + 37,
                            "frame_hex": primary[2][1].hex()}
    assert m["secondary"] == {"frame_number": 3, "length": len(secondary[2][1]),
                              "offset": L4 + 20 + 37, "payload_offset": L4 + 20 + 37,
                              "frame_hex": secondary[2][1].hex()}
    assert doc["checkpoint_requests"] == [{"time_ms": 2.0, "cause": "miscompare",
                                           "flow": "tcp 10.0.0.1:80 > 10.0.0.2:40000"}]


def test_json_tcp_raw_seq_wraps_around(cli, tmp_path):
    isn = 0xFFFFFFF0
    body = bytes(range(40))
    bad = bytearray(body)
    bad[20] ^= 0xFF
    primary = [(T0, tcp_frame(b"", seq=isn, flags=SYNACK)), (T0 + MS, tcp_frame(body, seq=isn + 1))]
    secondary = [(T0, tcp_frame(b"", seq=isn, flags=SYNACK)), (T0 + MS, tcp_frame(bytes(bad), seq=isn + 1))]
    r = cli("replay", "--json", *pair(tmp_path, primary, secondary))
    assert r.rc == 1, r
    (m,) = r.doc["miscompares"]
    assert m["stream_offset"] == 20
    assert m["raw_seq"] == (isn + 1 + 20) & 0xFFFFFFFF == 5


def test_json_tcp_mid_stream_capture_counts_from_first_byte(cli, tmp_path):
    body = bytes(range(64))
    bad = bytearray(body)
    bad[9] ^= 1
    r = cli("replay", "--json", *pair(tmp_path, [(T0, tcp_frame(body, seq=5000))],
                                      [(T0, tcp_frame(bytes(bad), seq=5000))]))
    assert r.rc == 1, r
    (m,) = r.doc["miscompares"]
    assert (m["stream_offset"], m["raw_seq"]) == (9, 5009)


@pytest.mark.parametrize("src,dst,l4", [("10.0.0.1", "10.0.0.2", L4),
                                        ("fd00::1", "fd00::2", 14 + 40)], ids=["ipv4", "ipv6"])
def test_json_udp_one_payload_byte_differs(cli, tmp_path, src, dst, l4):
    """datagram_index counts the flow's datagrams from 0; stream_offset is
    the byte's offset in the UDP part (header included)."""
    payloads = [b"datagram-%d" % i for i in range(4)]
    bad = list(payloads)
    bad[2] = b"datAgram-2"
    # a fixed UDP checksum on both sides, so the payload byte is the first difference
    kw = dict(sport=53, dport=4000, src=src, dst=dst)
    p, s = pair(tmp_path, udp_series(payloads, **kw), udp_series(bad, ident=99, **kw))
    r = cli("replay", "--json", p, s)
    assert r.rc == 1, r
    doc = r.doc
    (m,) = doc["miscompares"]
    flow = (f"udp {src}:53 > {dst}:4000" if ":" not in src else f"udp [{src}]:53 > [{dst}]:4000")
    assert m["flow"] == flow
    assert (m["protocol"], m["cause"], m["datagram_index"], m["stream_offset"], m["raw_seq"]) == (
        "udp", "content", 2, 8 + 3, None)
    assert m["primary"]["frame_number"] == m["secondary"]["frame_number"] == 3
    assert m["primary"]["offset"] == m["secondary"]["offset"] == l4 + 8 + 3
    assert doc["stats"]["released"] == {"match": 3, "checkpoint": 1, "total": 4}


def test_json_udp_length_difference(cli, tmp_path):
    p, s = pair(tmp_path, udp_series([b"short"]), udp_series([b"shorter"]))
    r = cli("replay", "--json", p, s)
    assert r.rc == 1, r
    (m,) = r.doc["miscompares"]
    assert m["cause"] == "length"
    # the UDP length field (bytes 4-5 of the UDP part) is the first difference
    assert m["stream_offset"] == 5


# ----------------------------------------------------- --out and --diverged

def _find_frame(frames, predicate):
    """The one frame whose IP packet (parsed by dpkt) satisfies ``predicate``."""
    found = [data for _, data in frames
             if isinstance(dpkt.ethernet.Ethernet(data).data, (dpkt.ip.IP, dpkt.ip6.IP6))
             and predicate(dpkt.ethernet.Ethernet(data).data)]
    assert len(found) == 1
    return found[0]


def test_out_and_diverged_on_the_diverge_example(cli, tmp_path):
    out, div = tmp_path / "out.pcap", tmp_path / "diverged.pcap"
    r = cli("replay", "--json", "--out", out, "--diverged", div, DIVERGE_P, DIVERGE_S)
    assert r.rc == 1, r
    doc = r.doc
    primary = read_frames(DIVERGE_P)
    released = read_frames(out)
    diverged = read_frames(div)
    # every primary frame exactly once
    assert collections.Counter(d for _, d in released) == collections.Counter(d for _, d in primary)
    assert len(released) == len(primary) == doc["stats"]["released"]["total"]
    # in release order: release times never go back, and no frame leaves before it came
    times = [ts for ts, _ in released]
    assert times == sorted(times)
    arrival = {d: ts for ts, d in primary}
    assert all(ts >= arrival[d] for ts, d in released)
    # the ping the secondary never answered is held until the timeout checkpoint: last out
    last_ping = _find_frame(primary, lambda ip: isinstance(ip.data, dpkt.icmp.ICMP)
                            and ip.data.data.seq == 4)
    assert released[-1][1] == last_ping
    assert released[-1][0] - primary[0][0] == 4000 * MS   # the scan tick at which it is > 3000 ms old
    # --diverged: exactly the primary frames that did not leave on a match, in order:
    # the HTTP segment with the Date byte, the DNS answer with the other TTL, the ping
    _flow, _off, _raw, p_index, _ = _example_divergence()
    dns = _find_frame(primary, lambda ip: isinstance(ip.data, dpkt.udp.UDP)
                      and ip.data.dport == 40001)
    assert [d for _, d in diverged] == [primary[p_index][1], dns, last_ping]
    assert len(released) - len(diverged) == doc["stats"]["released"]["match"]
    # diverged frames appear in the same order (and at the same times) in --out
    it = iter(released)
    assert all(any(x == y for x in it) for y in diverged)


def test_out_order_is_the_release_order(cli, tmp_path):
    """The out file is written in the order the comparator released the
    frames, which the replay API reports through on_release."""
    from colo_cli.core import Config
    from colo_cli.replay import replay
    expected = []
    with open_capture(str(DIVERGE_P)) as p, open_capture(str(DIVERGE_S)) as s:
        replay(p, s, Config(), on_release=lambda ts, data: expected.append((ts, data)))
    out = tmp_path / "out.pcap"
    assert cli("replay", "-q", "--out", out, DIVERGE_P, DIVERGE_S).rc == 1
    assert read_frames(out) == expected
    # and it is not simply the capture order: the unanswered ping leaves last
    assert [d for _, d in expected] != [d for _, d in read_frames(DIVERGE_P)]


def test_out_and_diverged_on_a_match(cli, tmp_path):
    out, div = tmp_path / "out.pcap", tmp_path / "diverged.pcap"
    r = cli("replay", "-q", "--out", out, "--diverged", div, MATCH_P, MATCH_S)
    assert r.rc == 0, r
    assert [d for _, d in read_frames(out)] == [d for _, d in read_frames(MATCH_P)]
    assert read_frames(div) == []
    with open(div, "rb") as f:
        assert len(f.read()) == 24   # a valid pcap: just the file header


def test_out_timestamps_are_exact(cli, tmp_path):
    frames = [(T0, udp_frame(b"a")), (T0 + 1_001_000, udp_frame(b"b"))]
    p = write_pcap(tmp_path / "p.pcap", frames)
    out = tmp_path / "out.pcap"
    assert cli("replay", "-q", "--out", out, p, p).rc == 0
    # both frames leave the instant their secondary twin arrives: at their own capture time
    assert [ts for ts, _ in read_frames(out)] == [T0, T0 + 1_001_000]


def test_out_is_not_created_when_an_input_is_unreadable(cli, tmp_path):
    out = tmp_path / "out.pcap"
    r = cli("replay", "--out", out, tmp_path / "missing.pcap", MATCH_S)
    assert_one_line_error(r, "missing.pcap", "cannot open")
    assert not out.exists()


# ------------------------------------------------------------ exit statuses

def test_unmatched_primary_frame(cli, tmp_path):
    frames = udp_series([b"one", b"two", b"three"])
    p, s = pair(tmp_path, frames, frames[:2])
    # default: the lonely frame times out (a checkpoint request, frame flushed)
    r = cli("replay", "--json", p, s)
    assert r.rc == 1, r
    doc = r.doc
    assert doc["checkpoint_requests"] == [{"time_ms": 4000.0, "cause": "timeout",
                                           "flow": "udp 10.0.0.1:5000 > 10.0.0.2:6000"}]
    assert doc["stats"]["released"] == {"match": 2, "checkpoint": 1, "total": 3}
    # --no-timeout: it is left unmatched at the end
    r = cli("replay", "--json", "--no-timeout", p, s)
    assert r.rc == 1, r
    doc = r.doc
    assert doc["checkpoint_requests_total"] == 0
    assert doc["unmatched"] == {"primary": 1, "secondary": 0}
    assert doc["miscompares_total"] == 0
    assert doc["result"] == "diverge"
    r = cli("replay", "--no-timeout", p, s)
    assert r.rc == 1
    assert any(line.split() == ["unmatched", "primary", "(at", "the", "end)", "1"]
               for line in r.out.splitlines()), r


def test_extra_secondary_frame(cli, tmp_path):
    frames = udp_series([b"one", b"two", b"three"])
    p, s = pair(tmp_path, frames[:2], frames)
    r = cli("replay", "--json", p, s)
    assert r.rc == 1, r
    assert [c["cause"] for c in r.doc["checkpoint_requests"]] == ["timeout"]
    r = cli("replay", "--json", "--no-timeout", p, s)
    assert r.rc == 1, r
    doc = r.doc
    assert doc["unmatched"] == {"primary": 0, "secondary": 1}
    assert doc["stats"]["released"] == {"match": 2, "total": 2}
    assert doc["miscompares_total"] == 0 and doc["checkpoint_requests_total"] == 0


def test_ignored_header_fields_match(cli, tmp_path):
    """IP ID and TTL, TCP window, TCP and IP checksums, segmentation (one
    3000-byte segment against two of 1500), Ethernet padding and an extra
    pure ACK on the secondary are not divergences."""
    body = bytes((i * 7) & 0xFF for i in range(3000))
    kw = dict(sport=80, dport=40000)

    def bad_tcp_checksum(frame):
        return frame[:L4 + 16] + b"\xde\xad" + frame[L4 + 18:]

    primary = [
        (T0, tcp_frame(b"", seq=999, flags=SYNACK, ident=1, ttl=64, window=29200, **kw)),
        (T0 + MS, tcp_frame(body, seq=1000, ident=2, ttl=64, window=1000, **kw)),
        (T0 + 2 * MS, tcp_frame(b"", seq=4000, flags=FIN | ACK, ident=3, **kw)),
        (T0 + 3 * MS, udp_frame(b"dns answer", sport=53, dport=5353, ident=4, ttl=64)),
    ]
    secondary = [
        (T0, tcp_frame(b"", seq=999, flags=SYNACK, ident=501, ttl=63, window=65160, **kw)),
        (T0 + MS, bad_tcp_checksum(tcp_frame(body[:1500], seq=1000, ident=502, ttl=32,
                                             window=7, **kw))),
        (T0 + MS + 10_000, tcp_frame(body[1500:], seq=2500, ident=503, ttl=32, window=7, **kw)),
        (T0 + MS + 20_000, tcp_frame(b"", seq=4000, flags=ACK, window=9, ident=504, **kw)),
        (T0 + 2 * MS, tcp_frame(b"", seq=4000, flags=FIN | ACK, ident=505, **kw)),
        (T0 + 3 * MS, udp_frame(b"dns answer", sport=53, dport=5353, ident=506, ttl=1, pad_to=64)),
    ]
    assert primary[1][1][L4 + 16:L4 + 18] != secondary[1][1][L4 + 16:L4 + 18]
    r = cli("replay", "--json", *pair(tmp_path, primary, secondary))
    assert r.rc == 0, r
    doc = r.doc
    assert doc["result"] == "match"
    assert doc["stats"]["released"] == {"match": 4, "total": 4}
    assert doc["miscompares_total"] == 0 and doc["checkpoint_requests_total"] == 0
    assert doc["unmatched"] == {"primary": 0, "secondary": 0}


# ------------------------------------------------------------------ timeouts

def _late_twin(tmp_path):
    """The secondary's twin of the second frame comes 5 s (capture time)
    after the primary sent it; each capture's clock starts at its first frame."""
    a, b = udp_frame(b"first", checksum=0), udp_frame(b"second", checksum=0)
    primary = [(T0, a), (T0 + 100 * MS, b)]
    secondary = [(T0 + 7_000 * MS, a), (T0 + 7_000 * MS + 5_100 * MS, b)]
    return pair(tmp_path, primary, secondary)


def test_late_secondary_times_out_by_default(cli, tmp_path):
    r = cli("replay", "--json", *_late_twin(tmp_path))
    assert r.rc == 1, r
    doc = r.doc
    assert [(c["cause"], c["flow"]) for c in doc["checkpoint_requests"]] == [
        ("timeout", "udp 10.0.0.1:5000 > 10.0.0.2:6000")]
    assert doc["settings"]["compare_timeout_ms"] == 3000
    assert doc["stats"]["released"] == {"match": 1, "checkpoint": 1, "total": 2}
    assert doc["miscompares_total"] == 0
    # the twin that arrives after the checkpoint is recognised, not left over
    assert doc["unmatched"] == {"primary": 0, "secondary": 0}


def test_late_secondary_timeout_is_requested_at_the_first_expired_scan(cli, tmp_path):
    r = cli("replay", "--json", *_late_twin(tmp_path))
    doc = r.doc
    assert doc["checkpoint_requests"][0]["time_ms"] == 4000.0
    assert doc["stats"]["hold_ms"]["max_ms"] == 3900.0


@pytest.mark.parametrize("opts", [["--no-timeout"], ["--compare-timeout", "10000"]],
                         ids=["no-timeout", "compare-timeout-10000"])
def test_late_secondary_matches_with_a_longer_or_no_timeout(cli, tmp_path, opts):
    r = cli("replay", "--json", *opts, *_late_twin(tmp_path))
    assert r.rc == 0, r
    doc = r.doc
    assert doc["result"] == "match"
    assert doc["stats"]["released"] == {"match": 2, "total": 2}
    assert doc["stats"]["hold_ms"]["max_ms"] == 5000.0   # 5100 ms - 100 ms
    assert doc["settings"]["compare_timeout_ms"] == (None if opts == ["--no-timeout"] else 10000)


# --------------------------------------------------------------------- --hold

def _two_divergences(tmp_path):
    kw = dict(sport=80, dport=40000)
    a, b, c = b"A" * 100, b"B" * 100, b"C" * 100
    primary = [(T0, tcp_frame(b"", seq=999, flags=SYNACK, **kw)),
               (T0 + MS, tcp_frame(a, seq=1000, **kw)),
               (T0 + 2 * MS, tcp_frame(b, seq=1100, **kw)),
               (T0 + 3 * MS, tcp_frame(c, seq=1200, **kw))]
    secondary = [(T0, tcp_frame(b"", seq=999, flags=SYNACK, **kw)),
                 (T0 + MS, tcp_frame(b"A" * 50 + b"x" + b"A" * 49, seq=1000, **kw)),
                 (T0 + 2 * MS, tcp_frame(b"B" * 10 + b"y" + b"B" * 89, seq=1100, **kw)),
                 (T0 + 3 * MS, tcp_frame(c, seq=1200, **kw))]
    return pair(tmp_path, primary, secondary)


def test_default_checkpoints_at_once_and_finds_both_divergences(cli, tmp_path):
    r = cli("replay", "--json", *_two_divergences(tmp_path))
    assert r.rc == 1, r
    doc = r.doc
    assert doc["settings"]["checkpoints"] == "immediate"
    assert doc["miscompares_total"] == 2
    assert [(m["stream_offset"], m["raw_seq"]) for m in doc["miscompares"]] == [(50, 1050), (110, 1110)]
    assert doc["stats"]["checkpoints"] == 2
    # the third segment, equal on both sides, leaves on a match after the second checkpoint
    assert doc["stats"]["released"] == {"match": 2, "checkpoint": 2, "total": 4}


def test_hold_finds_only_the_first_divergence_of_a_connection(cli, tmp_path):
    r = cli("replay", "--json", "--hold", *_two_divergences(tmp_path))
    assert r.rc == 1, r
    doc = r.doc
    assert doc["settings"]["checkpoints"] == "hold"
    assert doc["miscompares_total"] == 1
    assert [(m["stream_offset"], m["raw_seq"]) for m in doc["miscompares"]] == [(50, 1050)]
    assert doc["stats"]["checkpoints"] == 0
    # everything after the divergence is held to the end
    assert doc["stats"]["released"] == {"match": 1, "end": 3, "total": 4}
    assert doc["unmatched"]["primary"] == 3


# -------------------------------------------------------------- --vnet-hdr-len

def test_vnet_header_is_kept_but_not_compared(cli, tmp_path):
    payloads = [b"vnet-%d" % i for i in range(3)]
    primary = [(ts, b"\x01" * 12 + f) for ts, f in udp_series(payloads)]
    secondary = [(ts, bytes(range(12)) + f) for ts, f in udp_series(payloads, ident=9)]
    p, s = pair(tmp_path, primary, secondary)
    out = tmp_path / "out.pcap"
    r = cli("replay", "--json", "--vnet-hdr-len", "12", "--out", out, p, s)
    assert r.rc == 0, r
    doc = r.doc
    assert doc["settings"]["vnet_hdr_len"] == 12
    assert doc["stats"]["released"] == {"match": 3, "total": 3}
    assert doc["stats"]["bypassed"] == {}
    # --out keeps the primary's frames whole, headers included
    assert [d for _, d in read_frames(out)] == [d for _, d in primary]
    # without the option the header is read as Ethernet: nothing is comparable
    r = cli("replay", "--json", p, s)
    assert r.doc["stats"]["released"]["match"] == 0


def test_vnet_header_miscompare_offsets_are_in_the_ethernet_frame(cli, tmp_path):
    payloads = [b"vnet-%d" % i for i in range(3)]
    bad = [b"vnet-0", b"vnEt-1", b"vnet-2"]
    primary = [(ts, b"\x01" * 12 + f) for ts, f in udp_series(payloads)]
    secondary = [(ts, b"\x02" * 12 + f) for ts, f in udp_series(bad)]
    r = cli("replay", "--json", "--vnet-hdr-len", "12", *pair(tmp_path, primary, secondary))
    assert r.rc == 1, r
    (m,) = r.doc["miscompares"]
    assert (m["datagram_index"], m["stream_offset"]) == (1, 8 + 2)
    assert m["primary"]["offset"] == L4 + 8 + 2
    assert m["primary"]["frame_hex"] == primary[1][1][12:].hex()


# -------------------------------------------------------------------- errors

def _wifi(tmp_path):
    return write_pcap(tmp_path / "wifi.pcap", [(T0, b"\0" * 40)], linktype=105)


def _wifi_pcapng(tmp_path):
    return write_pcapng(tmp_path / "wifi.pcapng", [(T0, b"\0" * 40)], linktype=127)


@pytest.mark.parametrize("case", [
    "missing", "directory", "empty", "garbage", "gzip", "short", "wifi", "wifi-pcapng",
    "link-not-read-secondary", "both-stdin", "max-queue-size-0", "compare-timeout-0",
    "vnet-hdr-len-21", "hexdump-negative", "unknown-option", "missing-argument",
    "out-unwritable", "diverged-unwritable", "out-directory", "filter-syntax",
    "filter-not-for-this-link", "end-before-start", "bad-time", "bad-direction"])
def test_errors_are_one_line_exit_2(cli, tmp_path, case):
    if case.startswith("filter-"):
        from colo_cli.bpf import FilterError, _library
        try:
            _library()
        except FilterError:
            pytest.skip("libpcap not installed (apt-get install libpcap0.8)")
    good = write_pcap(tmp_path / "good.pcap", udp_series([b"x"]))
    (tmp_path / "dir").mkdir()
    (tmp_path / "empty.pcap").write_bytes(b"")
    (tmp_path / "garbage.pcap").write_bytes(bytes(range(7, 107)))
    (tmp_path / "capture.pcap.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\0" * 40)
    (tmp_path / "short.pcap").write_bytes(b"\xd4\xc3")
    (tmp_path / "regular-file").write_bytes(b"")
    argv, needles = {
        "missing": (["replay", tmp_path / "nope.pcap", good], ["nope.pcap: cannot open"]),
        "directory": (["replay", tmp_path / "dir", good], ["dir:"]),
        "empty": (["replay", tmp_path / "empty.pcap", good], ["empty.pcap: empty file"]),
        "garbage": (["replay", tmp_path / "garbage.pcap", good],
                    ["garbage.pcap: not a pcap or pcapng file"]),
        "gzip": (["replay", good, tmp_path / "capture.pcap.gz"],
                 ["capture.pcap.gz: corrupt gzip data"]),
        "short": (["replay", tmp_path / "short.pcap", good], ["short.pcap: too short"]),
        "wifi": (["replay", _wifi(tmp_path), good],
                 ["IEEE802_11 (105)", "not one colo-compare reads", "SLL2 (276)"]),
        "wifi-pcapng": (["replay", _wifi_pcapng(tmp_path), good],
                        ["IEEE802_11_RADIOTAP (127)", "not one colo-compare reads"]),
        "link-not-read-secondary": (["replay", good, _wifi(tmp_path)],
                                    ["wifi.pcap", "IEEE802_11 (105)"]),
        "filter-syntax": (["replay", "--filter", "tcp port", good, good],
                          ["--filter 'tcp port'", "syntax error"]),
        "filter-not-for-this-link": (
            ["replay", "--filter", "ether host 52:54:00:00:00:01", good,
             write_pcap(tmp_path / "raw.pcap", [(T0, b"\x45" + b"\0" * 19)], linktype=101)],
            ["--filter", "ethernet addresses", "RAW (101)"]),
        "end-before-start": (["replay", "--start", "2s", "--end", "1500ms", good, good],
                             ["--end must come after --start"]),
        "bad-time": (["replay", "--start", "soon", good, good], ["--start", "'soon' is not a time"]),
        "bad-direction": (["replay", "--direction", "up", good, good], ["--direction"]),
        "both-stdin": (["replay", "-", "-"], ["only one of PRIMARY and SECONDARY can be '-'"]),
        "max-queue-size-0": (["replay", "--max-queue-size", "0", good, good], ["--max-queue-size"]),
        "compare-timeout-0": (["replay", "--compare-timeout", "0", good, good],
                              ["--compare-timeout"]),
        "vnet-hdr-len-21": (["replay", "--vnet-hdr-len", "21", good, good], ["--vnet-hdr-len"]),
        # (N is optional, so a negative one reads as an option)
        "hexdump-negative": (["replay", "--hexdump", "-1", good, good], ["No such option '-1'"]),
        "hexdump-not-a-number": (["replay", "--hexdump", "lots", good, good],
                                 ["--hexdump", "'lots' is not a number or 'all'"]),
        "unknown-option": (["replay", "--bogus", good, good], ["--bogus"]),
        "missing-argument": (["replay", good], ["SECONDARY"]),
        "out-unwritable": (["replay", "--out", tmp_path / "regular-file" / "out.pcap", good, good],
                           ["out.pcap: cannot write"]),
        "diverged-unwritable": (["replay", "--diverged", tmp_path / "no-such-dir" / "d.pcap",
                                 good, good], ["d.pcap: cannot write"]),
        "out-directory": (["replay", "--out", tmp_path / "dir", good, good], ["--out"]),
    }[case]
    assert_one_line_error(cli(*argv), *needles)


def test_error_with_a_newline_in_the_file_name_is_one_line(cli, tmp_path):
    assert_one_line_error(cli("replay", tmp_path / "two\nlines.pcap", MATCH_S), "cannot open")


def test_debug_with_a_missing_file_in_process_shows_the_error(cli, tmp_path):
    """In-process, --debug lets the error propagate (for a traceback) or
    exits 2; either way it names the file."""
    from colo_cli.errors import ColoError
    try:
        r = cli("--debug", "replay", tmp_path / "nope.pcap", MATCH_S)
    except ColoError as e:
        assert "nope.pcap: cannot open" in str(e)
    else:
        assert r.rc == 2 and "nope.pcap" in r.err


def test_debug_with_a_missing_file_exits_2(tmp_path):
    p = run_process("--debug", "replay", tmp_path / "nope.pcap", MATCH_S)
    assert p.returncode == 2, p


def test_debug_process_shows_a_traceback_naming_the_file(tmp_path):
    p = run_process("--debug", "replay", tmp_path / "nope.pcap", MATCH_S)
    assert p.returncode != 0
    assert b"Traceback" in p.stderr
    assert b"nope.pcap: cannot open" in p.stderr


def test_the_command_builds_options_and_calls_run(monkeypatch):
    """replay's command only builds a ReplayOptions and calls replay.run (or
    learn.run): with no option given, the options are ReplayOptions' own
    defaults, so the command line and the options object cannot disagree."""
    from colo_cli.options import ReplayOptions
    got = []
    monkeypatch.setattr("colo_cli.replay.run", lambda options: got.append(options) or 0)
    monkeypatch.setattr("colo_cli.learn.run", lambda options: got.append(("learn", options)) or 0)
    with pytest.raises(SystemExit) as e:
        main(["replay", str(MATCH_P), str(MATCH_S)])
    assert e.value.code == 0
    assert got == [ReplayOptions(str(MATCH_P), str(MATCH_S))]
    with pytest.raises(SystemExit):
        main(["replay", "--learn-noise", "--direction", "any", "-q", str(MATCH_P), str(MATCH_S)])
    assert got[-1] == ("learn", ReplayOptions(str(MATCH_P), str(MATCH_S), direction=None,
                                              verbose=-1))


def test_replay_runs_without_the_command_line(capsys, tmp_path):
    """replay.run is the whole command: captures in, outputs written, the
    report printed, the exit status returned."""
    from colo_cli.options import ReplayOptions
    from colo_cli.replay import run
    out = tmp_path / "out.pcap"
    assert run(ReplayOptions(str(DIVERGE_P), str(DIVERGE_S), as_json=True,
                             out_path=str(out))) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["command"] == "replay" and doc["result"] == "diverge"
    with open_capture(str(out)) as r:
        assert sum(1 for _ in r) == doc["inputs"]["primary"]["frames"] == 15


def test_internal_error_is_one_line(cli, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")
    monkeypatch.setattr("colo_cli.replay.replay", boom)
    line = assert_one_line_error(cli("replay", MATCH_P, MATCH_S), "internal error",
                                 "RuntimeError: kaboom", "--debug")
    assert line.startswith("colo-compare: internal error:")


def test_internal_error_with_debug_propagates(cli, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")
    monkeypatch.setattr("colo_cli.replay.replay", boom)
    with pytest.raises(RuntimeError, match="kaboom"):
        cli("--debug", "replay", MATCH_P, MATCH_S)


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_interrupt_exits_130(cli, monkeypatch):
    monkeypatch.setattr("colo_cli.replay.replay", _interrupt)
    r = cli("replay", MATCH_P, MATCH_S)
    assert r.rc == 130, r
    assert r.out == ""
    assert "Traceback" not in r.err


def test_interrupt_says_interrupted(cli, monkeypatch):
    monkeypatch.setattr("colo_cli.replay.replay", _interrupt)
    r = cli("replay", MATCH_P, MATCH_S)
    assert r.err == "colo-compare: interrupted\n"


# --------------------------------------------------------- damaged captures

def _cut_last_record(src, dst, cut=5):
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[:-cut])
    return dst


def test_truncated_last_record_warns_and_compares_the_rest(cli, tmp_path):
    frames = udp_series([b"payload-%d" % i for i in range(4)])
    whole = write_pcap(tmp_path / "whole.pcap", frames)
    cut = _cut_last_record(whole, tmp_path / "cut.pcap")
    cut2 = _cut_last_record(whole, tmp_path / "cut2.pcap")
    warning = ("truncated record at packet 4 (file ends 46 of 51 bytes into its data); "
               "compared the 3 packets before it")
    # both cut the same way: the 3 whole frames match
    r = cli("replay", cut, cut2)
    assert r.rc == 0, r
    lines = r.out.splitlines()
    assert lines[0].endswith(": MATCH")
    assert f"warning: {cut}: {warning}" in lines
    assert f"warning: {cut2}: {warning}" in lines
    # only the primary cut: the 3 frames before the cut are compared and match,
    # the secondary's 4th frame has no twin
    r = cli("replay", "--json", "--no-timeout", cut, whole)
    assert r.rc == 1, r
    doc = r.doc
    assert doc["inputs"]["primary"]["warnings"] == [f"{cut}: {warning}"]
    assert doc["inputs"]["secondary"]["warnings"] == []
    assert doc["inputs"]["primary"]["frames"] == 3
    assert doc["stats"]["released"] == {"match": 3, "total": 3}
    assert doc["unmatched"] == {"primary": 0, "secondary": 1}
    # -q still tells about the damage, on stderr, one line per warning
    r = cli("replay", "-q", cut, cut2)
    assert r.rc == 0 and r.out == ""
    assert r.err.splitlines() == [f"colo-compare: warning: {cut}: {warning}",
                                  f"colo-compare: warning: {cut2}: {warning}"]


def test_truncated_record_header_warns(cli, tmp_path):
    frames = udp_series([b"payload-%d" % i for i in range(2)])
    whole = write_pcap(tmp_path / "whole.pcap", frames)
    data = whole.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data + data[24:24 + 7])   # 7 bytes of a third record header
    r = cli("replay", "--json", cut, whole)
    assert r.rc == 0, r
    assert r.doc["inputs"]["primary"]["warnings"] == [
        f"{cut}: truncated record at packet 3 (file ends 7 bytes into its header); "
        "compared the 2 packets before it"]


# ------------------------------------------------------------------ stdin

@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_primary_from_stdin_through_a_pipe(tmp_path, fmt):
    frames = udp_series([b"stdin-%d" % i for i in range(5)])
    p, s = pair(tmp_path, frames, frames, fmt=fmt)
    cmd = (f"cat {shlex.quote(str(p))} | {shlex.quote(sys.executable)} -m colo_cli replay - "
           f"{shlex.quote(str(s))}")
    proc = subprocess.run(["sh", "-c", cmd], capture_output=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc
    assert proc.stdout.decode().splitlines()[0] == f"colo-compare replay: <stdin> vs {s}: MATCH"
    assert proc.stderr == b""


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_secondary_from_stdin_diverges(tmp_path, fmt):
    frames = udp_series([b"stdin-%d" % i for i in range(5)])
    other = udp_series([b"stdin-%d" % i for i in range(4)] + [b"STDIN-4"])
    p, s = pair(tmp_path, frames, other, fmt=fmt)
    proc = run_process("replay", "--json", p, "-", input=s.read_bytes())
    assert proc.returncode == 1, proc
    doc = json.loads(proc.stdout)
    assert doc["inputs"]["secondary"]["file"] == "<stdin>"
    assert doc["inputs"]["secondary"]["format"] == fmt
    assert [m["datagram_index"] for m in doc["miscompares"]] == [4]


def test_empty_stdin_is_an_error(tmp_path):
    proc = run_process("replay", "-", MATCH_S, input=b"")
    assert proc.returncode == 2, proc
    assert proc.stdout == b""
    assert proc.stderr.decode().splitlines() == [
        "colo-compare: <stdin>: empty file (0 bytes), not a pcap or pcapng capture"]


# --------------------------------------------------------------------- quiet

@pytest.mark.parametrize("pair_,rc", [((MATCH_P, MATCH_S), 0), ((DIVERGE_P, DIVERGE_S), 1)],
                         ids=["match", "diverge"])
@pytest.mark.parametrize("extra", [[], ["--json"]], ids=["report", "json"])
def test_quiet_prints_nothing_and_sets_the_status(cli, pair_, rc, extra):
    r = cli("replay", "-q", *extra, *pair_)
    assert (r.rc, r.out, r.err) == (rc, "", "")
    r = cli("replay", "--quiet", *extra, *pair_)
    assert (r.rc, r.out, r.err) == (rc, "", "")


def test_color(cli):
    r = cli("replay", "--color", "always", DIVERGE_P, DIVERGE_S)
    assert r.rc == 1 and "\x1b[" in r.out
    r = cli("replay", "--color", "never", DIVERGE_P, DIVERGE_S)
    assert r.rc == 1 and "\x1b[" not in r.out


# ------------------------------------------------------------- closed pipes

def _run_into_closed_pipe(*args):
    """Run with stdout a pipe whose reading end is already closed: every
    write fails with EPIPE."""
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, "-m", "colo_cli", *map(str, args)],
                              stdout=w, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              env=subprocess_env(), timeout=120)
    finally:
        os.close(w)
    return proc


def test_output_to_head_has_no_traceback():
    cmd = [sys.executable, "-m", "colo_cli", "replay", "--json", str(DIVERGE_P), str(DIVERGE_S)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=subprocess_env())
    head = proc.stdout.read(10)
    proc.stdout.close()                 # what 'head -c 10' does
    err = proc.stderr.read()
    proc.stderr.close()
    rc = proc.wait(timeout=120)
    assert head == b'{\n "versio'
    assert err == b""
    assert rc == 1      # the document fits in the pipe: it was written whole


@pytest.mark.parametrize("extra", [["--json"], []], ids=["json", "report"])
def test_closed_pipe_no_traceback(extra):
    proc = _run_into_closed_pipe("replay", *extra, DIVERGE_P, DIVERGE_S)
    assert proc.stderr == b""
    assert proc.returncode == 1


@pytest.mark.parametrize("extra", [["--json"], []], ids=["json", "report"])
def test_closed_pipe_keeps_the_match_status(extra):
    proc = _run_into_closed_pipe("replay", *extra, MATCH_P, MATCH_S)
    assert proc.returncode == 0, proc


def test_mostly_uncomparable_input_gets_a_note(tmp_path, capsys):
    """A filter-dump of a vnet netdev read without --vnet-hdr-len compares
    nothing: the report says so instead of a bare MATCH."""
    from colo_cli.capture import PcapWriter
    from colo_cli.cli import main
    from colo_cli.testing import udp_frame
    path = tmp_path / "vnet.pcap"
    with open(path, "wb") as f:
        w = PcapWriter(f)
        for i in range(5):
            w.write(i * 1000, b"\x01" * 12 + udp_frame(b"x%d" % i))
    with pytest.raises(SystemExit):
        main(["replay", str(path), str(path), "--json"])
    import json as _json
    doc = _json.loads(capsys.readouterr().out)
    assert doc["notes"] and "--vnet-hdr-len" in doc["notes"][0] and "5 of 5" in doc["notes"][0]
    with pytest.raises(SystemExit):
        main(["replay", str(path), str(path), "--json", "--vnet-hdr-len", "12"])
    assert _json.loads(capsys.readouterr().out)["notes"] == []


def test_out_path_that_is_an_input_is_refused(capsys):
    from colo_cli.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["replay", MATCH_P, MATCH_S, "--out", MATCH_P])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would be overwritten" in err[0]


def test_tcp_bytes_both_captures_lost_are_named_not_compared(tmp_path, cli):
    """Both captures lost the same segment (100 bytes): the stream goes on
    past the hole, the result is a match, and the report, JSON and stats say
    that 100 bytes were skipped rather than compared."""
    a = tcp_frame(b"A" * 100, seq=1000)
    c = tcp_frame(b"C" * 100, seq=1200)           # seq 1100..1200 lost on both sides
    frames = [(T0, a), (T0 + MS, c)]
    p = write_pcap(tmp_path / "p.pcap", frames)
    s = write_pcap(tmp_path / "s.pcap", frames)
    r = cli("replay", p, s, "--json")
    assert r.rc == 0, r
    doc = r.doc
    assert doc["stats"]["stream_gap_bytes"] == 100
    assert [n for n in doc["notes"] if "100 TCP bytes are missing from both captures" in n]
    human = cli("replay", p, s)
    assert "100 TCP bytes are missing from both captures" in " ".join(human.out.split())
    report = tmp_path / "report.json"
    report.write_text(r.out)
    st = cli("stats", report)
    assert "TCP bytes lost" in st.out and "100" in st.out
