"""``colo-compare replay`` on real captures from ../shared/corpus.

* every capture of the manifest against itself (one test id per file);
* the natural pairs listed in SOURCES.md ("Pairs for comparison tests");
* the captures with IP fragments (reassembly counts);
* mutated copies of real captures: one payload byte flipped, one frame dropped.

Expected values come from the manifest (written by the corpus's own strict
reader) or are computed here from the bytes with dpkt and a small parser of
our own (``dissect``), never from colo_cli's parser.  The CLI runs in-process
through ``colo_cli.cli.main``.
"""

from __future__ import annotations

import collections
import json
import re
import socket
import struct
from pathlib import Path

import dpkt
import pytest

from colo_cli.capture import PcapWriter, open_capture
from colo_cli.linklayer import LINKTYPES_READ
from cli_run import cli  # noqa: F401 - the fixture

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
if not (CORPUS / "manifest.json").is_file():
    pytest.skip("../shared/corpus not present", allow_module_level=True)

MANIFEST = json.loads((CORPUS / "manifest.json").read_text())
BY_PATH = {entry["path"]: entry for entry in MANIFEST}

ETHERNET = 1
SYN, RST = 0x02, 0x04


# ------------------------------------------------------------------ helpers

def corpus(path: str) -> Path:
    return CORPUS / path


def dpkt_records(path):
    """[(ts_float, bytes)] with dpkt's readers (pcap or pcapng by magic)."""
    with open(path, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        reader = dpkt.pcapng.Reader(f) if magic == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(f)
        return [(ts, bytes(buf)) for ts, buf in reader]


def exact_records(path):
    """[(ts_ns, bytes)]: exact nanosecond timestamps, to write faithful copies."""
    with open_capture(str(path)) as reader:
        return [(ts, data) for _n, ts, data, _orig, _lt in reader]


def write_pcap(path, records):
    with open(path, "wb") as f:
        w = PcapWriter(f, nano=True)
        for ts, data in records:
            w.write(ts, data)
    return path


def dissect(frame: bytes):
    """Our own minimal Ethernet/IP parser: a dict (version, VLAN tags, L3/L4
    offsets, addresses, protocol, end of the IP packet, fragment fields), or
    None for anything that is not IPv4/IPv6."""
    off, tags = 12, b""
    if len(frame) < 14:
        return None
    etype = struct.unpack_from("!H", frame, off)[0]
    while etype in (0x8100, 0x88A8, 0x9100):
        tags += frame[off:off + 4]
        off += 4
        if len(frame) < off + 2:
            return None
        etype = struct.unpack_from("!H", frame, off)[0]
    l3 = off + 2
    if etype == 0x0800 and len(frame) >= l3 + 20 and frame[l3] >> 4 == 4:
        total, ident, fo = struct.unpack_from("!HHH", frame, l3 + 2)
        return dict(v=4, tags=tags, l3=l3, src=frame[l3 + 12:l3 + 16], dst=frame[l3 + 16:l3 + 20],
                    proto=frame[l3 + 9], l4=l3 + (frame[l3] & 15) * 4, ip_end=l3 + total,
                    frag=(fo & 0x3FFF) != 0, frag_off=(fo & 0x1FFF) * 8, mf=bool(fo & 0x2000),
                    ident=ident)
    if etype == 0x86DD and len(frame) >= l3 + 40 and frame[l3] >> 4 == 6:
        plen = struct.unpack_from("!H", frame, l3 + 4)[0]
        nh, pos = frame[l3 + 6], l3 + 40
        d = dict(v=6, tags=tags, l3=l3, src=frame[l3 + 8:l3 + 24], dst=frame[l3 + 24:l3 + 40],
                 ip_end=l3 + 40 + plen, frag=False)
        for _ in range(64):
            if nh in (0, 43, 60) and pos + 8 <= len(frame):
                nh, pos = frame[pos], pos + (frame[pos + 1] + 1) * 8
            elif nh == 44 and pos + 8 <= len(frame):
                fo = struct.unpack_from("!H", frame, pos + 2)[0]
                if fo & 0xFFF9:     # not an atomic fragment
                    d.update(frag=True, frag_off=fo & 0xFFF8, mf=bool(fo & 1),
                             ident=frame[pos + 4:pos + 8])
                nh, pos = frame[pos], pos + 8
                if d["frag"]:
                    break
            else:
                break
        d.update(proto=nh, l4=pos)
        return d
    return None


def flow_name(d, frame) -> str:
    """A flow as the report writes it: 'tcp 10.0.0.1:80 > 10.0.0.2:4000'."""
    family = socket.AF_INET if d["v"] == 4 else socket.AF_INET6
    src, dst = socket.inet_ntop(family, d["src"]), socket.inet_ntop(family, d["dst"])
    sport, dport = struct.unpack_from("!HH", frame, d["l4"])
    if d["v"] == 6:
        src, dst = f"[{src}]", f"[{dst}]"
    name = {6: "tcp", 17: "udp"}[d["proto"]]
    text = f"{name} {src}:{sport} > {dst}:{dport}"
    if d["tags"]:
        vids = [struct.unpack_from("!H", d["tags"], i + 2)[0] & 0xFFF for i in range(0, len(d["tags"]), 4)]
        text += " vlan " + ".".join(map(str, vids))
    return text


def tcp_fields(d, frame):
    """(seq, flags, header length, payload length) of a TCP segment."""
    l4 = d["l4"]
    seq = struct.unpack_from("!I", frame, l4 + 4)[0]
    hlen = (frame[l4 + 12] >> 4) * 4
    return seq, frame[l4 + 13], hlen, d["ip_end"] - l4 - hlen


def is_clock_warning(text: str) -> bool:
    """Captures merged from sessions years apart (zeek's ssh.pcap) or with
    clock steps: named, and harmless to the comparison."""
    return bool(re.search(r": frame \d+: (the clock jumps|its timestamp is)|more clock jumps", text))


def first_linktype(entry):
    lt = entry["linktype"]
    return lt[0] if isinstance(lt, list) else lt


def first_linktype_name(entry):
    name = entry["linktype_name"]
    return name[0] if isinstance(name, list) else name


def all_ethernet(entry):
    lt = entry["linktype"]
    return all(x == ETHERNET for x in lt) if isinstance(lt, list) else lt == ETHERNET


def all_read(entry):
    lt = entry["linktype"]
    return all(x in LINKTYPES_READ for x in (lt if isinstance(lt, list) else [lt]))


#: Linux packet types of "received" packets (host, broadcast, multicast,
#: other host); 4 is "sent by us"
RECEIVED = (0, 1, 2, 3)


def not_outgoing(path) -> int:
    """Records a Linux cooked capture marks as received: the packet type,
    read here from the bytes (SLL: first 2 bytes, SLL2: byte 10)."""
    n = 0
    with open_capture(str(path)) as reader:
        for _n, _ts, data, _orig, linktype in reader:
            if linktype == 113 and len(data) >= 16:
                n += struct.unpack_from("!H", data, 0)[0] in RECEIVED
            elif linktype == 276 and len(data) >= 20:
                n += data[10] in RECEIVED
    return n


def assert_conservation(doc):
    """Every primary frame leaves once (released or bypassed); every
    secondary frame is consumed once (matched, absorbed, discarded or dropped)."""
    st = doc["stats"]
    p, s = doc["inputs"]["primary"]["frames"], doc["inputs"]["secondary"]["frames"]
    assert st["released"]["total"] + sum(st["bypassed"].values()) == p
    assert sum(st["secondary"].values()) + sum(st["dropped"].values()) == s


# ----------------------------------------------- every capture against itself

@pytest.mark.parametrize("entry", MANIFEST, ids=[e["path"] for e in MANIFEST])
def test_capture_against_itself(cli, entry):
    path = corpus(entry["path"])
    r = cli("replay", "--json", path, path)
    assert r.rc in (0, 1, 2), r
    assert "Traceback" not in r.err
    lt = first_linktype(entry)
    if entry["unreadable_reason"] and entry["packets"] == 0:
        # nothing readable: refused before the first packet, in one line
        assert r.rc == 2, r
        assert r.out == ""
        lines = r.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"colo-compare: {path}: "), r
        return
    if lt is not None and lt not in LINKTYPES_READ:
        assert r.rc == 2, r
        assert r.out == ""
        lines = r.err.splitlines()
        assert len(lines) == 1, r
        assert lines[0].startswith(f"colo-compare: {path}: "), r
        assert f"{first_linktype_name(entry)} ({lt})" in lines[0], r
        assert "not one colo-compare reads" in lines[0]
        return
    # a link type read (at least its first interface), readable at least in part
    doc = r.doc
    received = not_outgoing(path)
    side = doc["inputs"]["primary"]
    # what a Linux cooked capture marks as received is not the replica's
    # output: left out, the same on both sides, and said so
    assert side["left_out"] == ({"direction": received} if received else {})
    if received and side["frames"] == 0:
        # nothing sent at all: not called a match
        assert (r.rc, doc["result"]) == (2, "incomparable"), r
        assert r.err == ("colo-compare: no primary frame was selected for comparison "
                         f"({received} left out by direction): not a match\n"), r
        assert any(f"{received} frames not compared: {received} not outgoing" in n
                   for n in doc["notes"]), doc["notes"]
    else:
        _assert_self_match(r, entry, received)
    if received:
        # every frame, with --direction any (or in: what was received)
        r = cli("replay", "--json", "--direction", "any", path, path)
        _assert_self_match(r, entry, 0)
        r = cli("replay", "--json", "--direction", "in", path, path)
        assert r.doc["inputs"]["primary"]["left_out"] == (
            {"direction": entry["packets"] - received} if entry["packets"] > received else {})
        assert r.doc["inputs"]["primary"]["frames"] == received
    if doc["result"] == "match":
        # the human report renders too
        r = cli("replay", path, path)
        assert r.rc == 0, r
        assert r.out.splitlines()[0] == f"colo-compare replay: {path} vs {path}: MATCH"


def _assert_self_match(r, entry, left_out):
    """A capture against itself: a match, every frame of a link type read
    compared but the ``left_out`` ones; or, when most frames are of a kind
    nobody compares, INCOMPARABLE."""
    doc = r.doc
    bypassed = sum(doc["stats"]["bypassed"].values())
    if not doc["inputs"]["primary"]["frames"]:
        # a valid capture without a frame: nothing compared is not a match
        assert (r.rc, doc["result"]) == (2, "incomparable"), r
        assert r.err == "colo-compare: the primary capture has no frames: nothing to compare, " \
                        "not a match\n", r
        return
    if bypassed * 2 > doc["inputs"]["primary"]["frames"]:
        # mostly frames nobody can compare (LLC, STP, malformed): not called a
        # match; exit 2 when not a single frame could be compared
        compared = doc["inputs"]["primary"]["frames"] - bypassed
        assert (r.rc, doc["result"]) == (1 if compared else 2, "incomparable"), r
        assert r.err.startswith("colo-compare: only ") and r.err.count("\n") == 1, r
        return
    assert r.rc == 0, r
    assert r.err == ""
    assert doc["result"] == "match"
    assert doc["miscompares_total"] == 0 and doc["miscompares"] == []
    assert doc["unmatched"] == {"primary": 0, "secondary": 0}
    assert doc["checkpoint_requests_total"] == 0
    assert_conservation(doc)
    side = doc["inputs"]["primary"]
    assert doc["inputs"]["secondary"]["frames"] == side["frames"]
    if entry["unreadable_reason"]:
        # read in part: the packets before the damage, and a warning that says so
        assert side["frames"] == entry["packets"] - left_out
        assert len(side["warnings"]) == 1
        noun = "packet" if entry["packets"] == 1 else "packets"
        assert side["warnings"][0].endswith(f"compared the {entry['packets']} {noun} before it")
    elif all_read(entry):
        assert side["frames"] == entry["packets"] - left_out
        assert [w for w in side["warnings"] if not is_clock_warning(w)] == []
    else:
        # pcapng with interfaces of link types not read: their packets are skipped, and said so
        assert side["frames"] <= entry["packets"] - left_out
        assert all("not one colo-compare reads" in w or is_clock_warning(w)
                   for w in side["warnings"])
        assert len(side["warnings"]) > 0 or side["frames"] == entry["packets"]


def test_manifest_covers_the_corpus():
    on_disk = {str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*")
               if p.is_file() and p.suffix in (".pcap", ".pcapng", ".cap")}
    assert on_disk == set(BY_PATH)


# ------------------------------------------------------------- natural pairs

LATENCY1 = "chrissanders-packets/latency1.pcapng"


def _twins(a_path, b_path):
    """[(arrival in A, arrival in B)] in ms relative to each file's first
    packet, pairing byte-identical frames; with dpkt."""
    a, b = dpkt_records(corpus(a_path)), dpkt_records(corpus(b_path))
    assert sorted(x for _, x in a) == sorted(x for _, x in b)   # same packets
    a0, b0 = round(a[0][0] * 1e6), round(b[0][0] * 1e6)
    when_b = {data: (round(ts * 1e6) - b0) / 1000 for ts, data in b}
    return [((round(ts * 1e6) - a0) / 1000, when_b[data], data) for ts, data in a]


def _first_expiring_tick(twins, timeout_ms, cycle_ms=1000):
    """The first scan tick at which a primary frame still waiting for its
    twin is older than timeout_ms (QEMU's rule), with the frames still
    queued then; or (None, [])."""
    last = max(max(a, b) for a, b, _ in twins)
    tick = cycle_ms
    while tick <= last:
        queued = [(a, data) for a, b, data in twins if a < tick < b]
        if any(tick - a > timeout_ms for a, _ in queued):
            return tick, queued
        tick += cycle_ms
    return None, []


@pytest.mark.parametrize("other", ["chrissanders-packets/latency2.pcapng",
                                   "chrissanders-packets/latency4.pcapng"])
def test_latency_pairs_same_packets_other_timing(cli, other):
    """The same six packets with other gaps.  The secondary lags by at most
    1.97 s (latency2) or 0.96 s (latency4), under the 3 s compare timeout,
    so the pair matches with and without --no-timeout; the longest hold is
    that lag."""
    twins = _twins(LATENCY1, other)
    max_lag = max(b - a for a, b, _ in twins)
    assert 0 < max_lag < 3000
    for opts in ([], ["--no-timeout"]):
        r = cli("replay", "--json", *opts, corpus(LATENCY1), corpus(other))
        assert r.rc == 0, r
        doc = r.doc
        assert doc["result"] == "match"
        assert doc["stats"]["released"] == {"match": 6, "total": 6}
        assert doc["checkpoint_requests_total"] == 0
        assert doc["stats"]["hold_ms"]["max_ms"] == pytest.approx(max_lag, abs=1e-3)
    # a compare timeout shorter than the lag does time out, exactly where QEMU's scan would
    tick, queued = _first_expiring_tick(twins, 1000)
    r = cli("replay", "--json", "--compare-timeout", "1000", corpus(LATENCY1), corpus(other))
    doc = r.doc
    if tick is None:
        assert r.rc == 0, r
        assert doc["checkpoint_requests_total"] == 0
    else:
        assert r.rc == 1, r
        oldest = min(queued)[1]
        assert doc["checkpoint_requests"] == [{"time_ms": float(tick), "cause": "timeout",
                                               "flow": flow_name(dissect(oldest), oldest)}]
        assert doc["stats"]["released"] == {"match": 6 - len(queued), "checkpoint": len(queued),
                                            "total": 6}
        # the late twins are recognised after the checkpoint, not left over
        assert doc["unmatched"] == {"primary": 0, "secondary": 0}
    # with --no-timeout even that matches
    r = cli("replay", "--json", "--compare-timeout", "1000", "--no-timeout", corpus(LATENCY1),
            corpus(other))
    assert r.rc == 0, r


def test_latency2_times_out_with_a_1s_timeout():
    tick, queued = _first_expiring_tick(_twins(LATENCY1, "chrissanders-packets/latency2.pcapng"), 1000)
    assert tick == 2000 and len(queued) == 2


@pytest.mark.parametrize("order", ["get-first", "reorder-first"])
def test_http_get_vs_handshake_reorder(cli, order):
    """The SYN-ACK before the SYN: they belong to two directions, which are
    two connections to colo-compare, so the order between them does not
    matter."""
    get, reorder = "zeek/http/get.pcap", "zeek/tcp/handshake-reorder.pcap"
    a, b = dpkt_records(corpus(get)), dpkt_records(corpus(reorder))
    assert [x for _, x in a[:2]] == [x for _, x in b[1::-1]]      # swapped
    assert [x for _, x in a[2:]] == [x for _, x in b[2:]]
    primary, secondary = (get, reorder) if order == "get-first" else (reorder, get)
    r = cli("replay", "--json", corpus(primary), corpus(secondary))
    assert r.rc == 0, r
    doc = r.doc
    assert doc["stats"]["released"] == {"match": 14, "total": 14}
    assert doc["checkpoint_requests_total"] == 0 and doc["miscompares_total"] == 0
    assert doc["unmatched"] == {"primary": 0, "secondary": 0}


def test_tcp_checksums_are_not_compared(cli):
    """Only the TCP checksum differs; TCP is compared on its payload only
    (as QEMU does for TCP), so this matches."""
    good, bad = "zeek/chksums/ip4-tcp-good-chksum.pcap", "zeek/chksums/ip4-tcp-bad-chksum.pcap"
    ((_, a),), ((_, b),) = dpkt_records(corpus(good)), dpkt_records(corpus(bad))
    d = dissect(a)
    differing = [i for i in range(len(a)) if a[i] != b[i]]
    assert differing and all(d["l4"] + 16 <= i < d["l4"] + 18 for i in differing)
    r = cli("replay", "--json", corpus(good), corpus(bad))
    assert r.rc == 0, r
    assert r.doc["stats"]["released"] == {"match": 1, "total": 1}


def test_tls_protocol_violation_is_one_tcp_miscompare(cli):
    good, bad = "zeek/tls/tls1.2.pcap", "zeek/tls/tls1.2-protocol-violation.pcap"
    a, b = dpkt_records(corpus(good)), dpkt_records(corpus(bad))
    assert len(a) == len(b) and [t for t, _ in a] == [t for t, _ in b]
    (index,) = [i for i, ((_, x), (_, y)) in enumerate(zip(a, b)) if x != y]
    frame, other = a[index][1], b[index][1]
    at = next(i for i in range(len(frame)) if frame[i] != other[i])
    eth = dpkt.ethernet.Ethernet(frame)
    seg = eth.data.data
    payload_start = len(frame) - len(seg.data)
    assert at >= payload_start                        # a payload byte, not a header byte
    raw = (seg.seq + at - payload_start) & 0xFFFFFFFF
    syn_seq = next(s.seq for s in (dpkt.ethernet.Ethernet(x).data.data for _, x in a)
                   if (s.sport, s.dport) == (seg.sport, seg.dport) and s.flags & dpkt.tcp.TH_SYN)
    offset = (raw - (syn_seq + 1)) & 0xFFFFFFFF
    flow = (f"tcp {socket.inet_ntoa(eth.data.src)}:{seg.sport} > "
            f"{socket.inet_ntoa(eth.data.dst)}:{seg.dport}")
    assert (index, offset) == (4, 93)
    for opts in ([], ["--no-timeout"]):
        r = cli("replay", "--json", *opts, corpus(good), corpus(bad))
        assert r.rc == 1, r
        doc = r.doc
        assert doc["miscompares_total"] == 1
        (m,) = doc["miscompares"]
        assert (m["flow"], m["protocol"], m["cause"], m["stream_offset"], m["raw_seq"],
                m["datagram_index"]) == (flow, "tcp", "content", offset, raw, None)
        assert (m["primary"]["frame_number"], m["primary"]["offset"]) == (index + 1, at)
        assert (m["secondary"]["frame_number"], m["secondary"]["offset"]) == (index + 1, at)
        # a real TLS stream: the record is read, its bad byte named
        assert (m["explanation"]["protocol"], m["explanation"]["field"]) == ("tls", "record.data")
        assert m["explanation"]["text"].startswith(
            "TLS handshake record at stream offset 86: data differs at byte 2: ")
        assert m["primary"]["frame_hex"] == frame.hex()
        assert m["secondary"]["frame_hex"] == other.hex()
        assert [(c["cause"], c["flow"]) for c in doc["checkpoint_requests"]] == [("miscompare", flow)]
        assert doc["unmatched"] == {"primary": 0, "secondary": 0}
        # the primary segment with the byte is flushed at the checkpoint; all else matches
        assert doc["stats"]["released"] == {"match": 21, "checkpoint": 1, "total": 22}
    r = cli("replay", corpus(good), corpus(bad))
    assert f"{flow}: content differs at stream offset {offset} (seq {raw})" in r.out


SSH = "zeek/ssh/ssh.pcap"
SSH_CLIENT = "zeek/ssh/ssh.client-side-half-duplex.pcap"


def test_ssh_vs_client_side_half_duplex(cli, tmp_path):
    """The secondary has only the client->server half.  Every frame they
    share leaves on a match; the server->client frames (and the flows the
    half-duplex file lacks) never get a twin: no miscompare, but timeouts by
    default, and unmatched primary frames with --no-timeout."""
    full = [x for _, x in dpkt_records(corpus(SSH))]
    half = [x for _, x in dpkt_records(corpus(SSH_CLIENT))]
    missing = collections.Counter(full) - collections.Counter(half)
    assert not collections.Counter(half) - collections.Counter(full)   # an exact subset
    n_missing = sum(missing.values())
    assert (len(full), len(half), n_missing) == (1797, 838, 959)
    missing_flows = set()
    for frame in missing:
        d = dissect(frame)
        if d is not None and d["proto"] in (6, 17):
            missing_flows.add(flow_name(d, frame))

    div = tmp_path / "diverged.pcap"
    r = cli("replay", "--json", "--diverged", div, corpus(SSH), corpus(SSH_CLIENT))
    assert r.rc == 1, r
    doc = r.doc
    assert doc["miscompares_total"] == 0
    assert doc["unmatched"] == {"primary": 0, "secondary": 0}
    assert doc["stats"]["released"] == {"match": len(half), "checkpoint": n_missing,
                                        "total": len(full)}
    assert doc["checkpoint_requests_total"] > 0
    assert {c["cause"] for c in doc["checkpoint_requests"]} == {"timeout"}
    assert {c["flow"] for c in doc["checkpoint_requests"]} <= missing_flows
    assert collections.Counter(d for _, d in exact_records(div)) == missing

    r = cli("replay", "--json", "--no-timeout", "--diverged", div, corpus(SSH), corpus(SSH_CLIENT))
    assert r.rc == 1, r
    doc = r.doc
    assert doc["miscompares_total"] == 0 and doc["checkpoint_requests_total"] == 0
    assert doc["unmatched"] == {"primary": n_missing, "secondary": 0}
    assert doc["stats"]["released"] == {"match": len(half), "end": n_missing, "total": len(full)}
    assert collections.Counter(d for _, d in exact_records(div)) == missing


def test_ssh_half_duplex_as_primary(cli):
    """The other way round: the full capture's extra frames are on the
    secondary.  Those that carry data (TCP payload, UDP) are left unmatched;
    extra pure ACKs, SYNs, FINs and RSTs are absorbed, never a divergence."""
    full = [x for _, x in dpkt_records(corpus(SSH))]
    half = [x for _, x in dpkt_records(corpus(SSH_CLIENT))]
    extra = collections.Counter(full) - collections.Counter(half)
    with_data = set()
    for frame in extra:
        d = dissect(frame)
        if d["proto"] == 6:
            seq, _flags, _hlen, plen = tcp_fields(d, frame)
            if plen > 0:
                with_data.add((flow_name(d, frame), seq, plen))
        else:
            with_data.add(frame)
    r = cli("replay", "--json", "--no-timeout", corpus(SSH_CLIENT), corpus(SSH))
    assert r.rc == 1, r
    doc = r.doc
    assert doc["miscompares_total"] == 0
    assert doc["stats"]["released"] == {"match": len(half), "total": len(half)}
    assert doc["unmatched"] == {"primary": 0, "secondary": len(with_data)} == {"primary": 0,
                                                                              "secondary": 718}


@pytest.mark.parametrize("test", ["basic/test001", "difficult/test202"])
def test_pcapng_little_vs_big_endian(cli, test):
    le = corpus(f"pcapng-test-generator/output_le/{test}.pcapng")
    be = corpus(f"pcapng-test-generator/output_be/{test}.pcapng")
    r = cli("replay", "--json", le, be)
    assert r.rc == 0, r
    doc = r.doc
    if test == "basic/test001":
        assert [x for _, x in dpkt_records(le)] == [x for _, x in dpkt_records(be)]
        assert doc["stats"]["released"] == {"match": 4, "total": 4}
        assert doc["inputs"]["primary"]["warnings"] == doc["inputs"]["secondary"]["warnings"] == []
    else:
        # 8 packets in three sections, two on NULL (BSD loopback) interfaces:
        # each compared from its IP header
        assert BY_PATH[f"pcapng-test-generator/output_le/{test}.pcapng"]["packets"] == 8
        assert doc["inputs"]["primary"]["frames"] == doc["inputs"]["secondary"]["frames"] == 8
        assert doc["stats"]["released"] == {"match": 8, "total": 8}
        for side in ("primary", "secondary"):
            assert [w for w in doc["inputs"][side]["warnings"] if not is_clock_warning(w)] == []
    assert doc["unmatched"] == {"primary": 0, "secondary": 0}


def test_ssh_dups_against_itself(cli):
    path = corpus("zeek/tcp/ssh-dups.pcap")
    frames = [x for _, x in dpkt_records(path)]
    duplicates = len(frames) - len(set(frames))
    assert (len(frames), duplicates) == (377, 280)
    r = cli("replay", "--json", path, path)
    assert r.rc == 0, r
    doc = r.doc
    assert doc["stats"]["released"] == {"match": 377, "total": 377}
    assert doc["unmatched"] == {"primary": 0, "secondary": 0}
    assert doc["checkpoint_requests_total"] == 0
    # every secondary copy is used up by a match or absorbed (duplicates, pure ACKs)
    sec = doc["stats"]["secondary"]
    assert sec["matched"] + sec["absorbed"] == 377 and sec["discarded"] == 0


# ------------------------------------------------------------------ fragments

FRAGMENTED = ["tcpdump/afs.pcap", "zeek/ipv4/fragmented-1.pcap", "zeek/ipv4/fragmented-4.pcap",
              "zeek/ipv6-fragmented-dns.pcap", "chrissanders-packets/ip_frag_source.pcapng",
              "chrissanders-packets/ipv6_fragments.pcapng"]


def fragment_census(path):
    """(fragment frames, complete datagrams): a datagram is complete when its
    fragments cover [0, end) with one consistent end and none beyond it."""
    groups = collections.defaultdict(list)
    n = 0
    for _ts, frame in dpkt_records(path):
        d = dissect(frame)
        if d is None or not d["frag"]:
            continue
        n += 1
        if d["ip_end"] > len(frame):
            continue        # captured short: cannot be put back together
        key = (d["v"], d["tags"], d["src"], d["dst"], d["proto"], d["ident"])
        groups[key].append((d["frag_off"], d["ip_end"] - d["l4"], d["mf"]))
    complete = 0
    for pieces in groups.values():
        ends = {off + size for off, size, more in pieces if not more}
        if len(ends) != 1:
            continue
        (end,) = ends
        if any(off + size > end for off, size, _ in pieces):
            continue
        reach = 0
        for off, size, _ in sorted(pieces):
            if off > reach:
                break
            reach = max(reach, off + size)
        complete += reach >= end
    return n, complete


@pytest.mark.parametrize("path", FRAGMENTED)
def test_fragmented_capture_against_itself(cli, path):
    fragments, complete = fragment_census(corpus(path))
    assert fragments > 0
    r = cli("replay", "--json", corpus(path), corpus(path))
    doc = r.doc
    if path == "zeek/ipv4/fragmented-1.pcap":
        # nothing in it can be reassembled (below), so nothing is compared
        assert (r.rc, doc["result"]) == (2, "incomparable"), r
    else:
        assert r.rc == 0, r
        assert doc["result"] == "match"
    st = doc["stats"]
    assert st["fragments"]["in"] == {"primary": fragments, "secondary": fragments}
    assert st["fragments"]["reassembled"] == {"primary": complete, "secondary": complete}
    assert_conservation(doc)
    if path == "zeek/ipv4/fragmented-1.pcap":
        # [0,18) and [48,164) (the last) leave a hole, then [0,304) runs past the end
        assert complete == 0
        assert st["bypassed"] == {"fragment-invalid": 3}
    else:
        assert complete > 0


# ----------------------------------------------------------- mutated copies

MUTATED = ["tcpdump/print-flags.pcap", "tcpdump/dns_tcp.pcap", "tcpdump/ntp.pcap",
           "zeek/http/get.pcap", "zeek/tls/tls1.2.pcap", "chrissanders-packets/dns.pcap",
           "scapy/tls_new-session-ticket.pcap", "scapy/ikev2_nat_t.pcapng",
           "chrissanders-packets/http_ip4and6.pcapng", "zeek/ftp/cwd-navigation.pcap"]


def pick_frame(records):
    """A frame in the middle of the capture whose payload byte can be
    flipped with a known outcome: a whole (not fragmented, not cut) TCP
    segment carrying bytes no earlier segment of that direction carried; or
    a whole UDP datagram.  Stream offsets count from the byte after the SYN,
    or, for a connection whose SYN is not in the capture, from the first
    sequence number the direction shows.

    Returns dict(kind, index, flow, at (byte offset in the frame), and for
    TCP raw_seq/stream_offset, for UDP datagram_index/udp_offset/later_in_flow)."""
    origin, seen, n_dgrams = {}, collections.defaultdict(list), collections.Counter()
    candidates = []
    for index, (_ts, frame) in enumerate(records):
        d = dissect(frame)
        if d is None or d["frag"] or d["proto"] not in (6, 17) or d["ip_end"] > len(frame):
            continue
        flow = flow_name(d, frame)
        if d["proto"] == 6:
            seq, flags, hlen, plen = tcp_fields(d, frame)
            if flags & SYN:
                origin[flow] = (seq + 1) & 0xFFFFFFFF
            elif flow not in origin and not flags & RST:
                origin[flow] = seq      # a capture that starts mid-stream
            if plen <= 0 or flow not in origin:
                continue
            start = (seq - origin[flow]) & 0xFFFFFFFF
            fresh = not any(a < start + plen and start < b for a, b in seen[flow])
            seen[flow].append((start, start + plen))
            if fresh:
                k = plen // 2
                candidates.append(dict(kind="tcp", index=index, flow=flow,
                                       at=d["l4"] + hlen + k, raw_seq=(seq + k) & 0xFFFFFFFF,
                                       stream_offset=start + k))
        else:
            dgram = n_dgrams[flow]
            n_dgrams[flow] += 1
            plen = d["ip_end"] - d["l4"] - 8
            if plen > 0:
                k = plen // 2
                candidates.append(dict(kind="udp", index=index, flow=flow, at=d["l4"] + 8 + k,
                                       datagram_index=dgram, udp_offset=8 + k))
    assert candidates
    chosen = candidates[len(candidates) // 2]
    if chosen["kind"] == "udp":
        # how many datagrams of the same flow follow it
        chosen["later_in_flow"] = n_dgrams[chosen["flow"]] - 1 - chosen["datagram_index"]
    return chosen


@pytest.mark.parametrize("path", MUTATED)
def test_one_flipped_payload_byte_is_one_miscompare(cli, tmp_path, path):
    records = exact_records(corpus(path))
    pick = pick_frame(records)
    i, at = pick["index"], pick["at"]
    frame = bytearray(records[i][1])
    frame[at] ^= 0xFF
    copy = list(records)
    copy[i] = (records[i][0], bytes(frame))
    mutated = write_pcap(tmp_path / "mutated.pcap", copy)
    r = cli("replay", "--json", corpus(path), mutated)
    assert r.rc == 1, r
    doc = r.doc
    assert doc["miscompares_total"] == 1, pick
    (m,) = doc["miscompares"]
    assert (m["flow"], m["protocol"], m["cause"]) == (pick["flow"], pick["kind"], "content")
    if pick["kind"] == "tcp":
        assert (m["stream_offset"], m["raw_seq"], m["datagram_index"]) == (
            pick["stream_offset"], pick["raw_seq"], None)
    else:
        assert (m["stream_offset"], m["raw_seq"], m["datagram_index"]) == (
            pick["udp_offset"], None, pick["datagram_index"])
    assert (m["primary"]["frame_number"], m["primary"]["offset"]) == (i + 1, at)
    assert (m["secondary"]["frame_number"], m["secondary"]["offset"]) == (i + 1, at)
    assert m["secondary"]["frame_hex"] == bytes(frame).hex()
    assert [(c["cause"], c["flow"]) for c in doc["checkpoint_requests"]] == [
        ("miscompare", pick["flow"])]
    assert doc["unmatched"] == {"primary": 0, "secondary": 0}
    assert_conservation(doc)
    r = cli("replay", corpus(path), mutated)
    assert "Miscompare 1 of 1 at " in r.out
    assert f": {pick['flow']}: content differs " in r.out


@pytest.mark.parametrize("path", MUTATED)
def test_one_dropped_frame_diverges(cli, tmp_path, path):
    records = exact_records(corpus(path))
    pick = pick_frame(records)
    i = pick["index"]
    dropped = write_pcap(tmp_path / "dropped.pcap", records[:i] + records[i + 1:])
    r = cli("replay", "--json", corpus(path), dropped)
    assert r.rc == 1, r
    doc = r.doc
    requests = doc["checkpoint_requests"]
    assert_conservation(doc)
    if pick["kind"] == "tcp":
        # a hole in the secondary's stream: nothing after it can be verified, so
        # the primary's segments wait until the compare timeout
        assert doc["miscompares_total"] == 0
        assert requests and {c["cause"] for c in requests} == {"timeout"}
        assert requests[0]["flow"] == pick["flow"]
        r = cli("replay", "--json", "--no-timeout", corpus(path), dropped)
        assert r.rc == 1, r
        doc = r.doc
        assert doc["miscompares_total"] == 0
        # left unmatched at the end, or flushed when the connection's queue filled
        assert (doc["unmatched"]["primary"] > 0
                or ("queue-full", pick["flow"]) in {(c["cause"], c["flow"])
                                                    for c in doc["checkpoint_requests"]})
    elif pick["later_in_flow"] == 0:
        # the last datagram of its flow: it waits for a twin until the timeout
        assert doc["miscompares_total"] == 0
        assert [(c["cause"], c["flow"]) for c in requests] == [("timeout", pick["flow"])]
        r = cli("replay", "--json", "--no-timeout", corpus(path), dropped)
        assert r.doc["unmatched"] == {"primary": 1, "secondary": 0}
    else:
        # datagrams pair first-in first-out per flow: without the dropped one the
        # primary's datagram meets the secondary's next one and they differ (if
        # that one comes before the timeout), so the first sign is a miscompare
        # at the dropped datagram's index or a timeout, both on that flow
        first = requests[0]
        assert first["flow"] == pick["flow"]
        if first["cause"] == "miscompare":
            assert doc["miscompares"][0]["flow"] == pick["flow"]
            assert doc["miscompares"][0]["datagram_index"] == pick["datagram_index"]
        else:
            assert first["cause"] == "timeout"


# --------------------------------------- random mutations and corrupt files

def _mutate_frame(rng, frame: bytes) -> bytes:
    """One of the mutations a broken replica, NIC or capture produces."""
    f = bytearray(frame)
    d = dissect(frame)
    op = rng.randrange(8)
    if op == 0 and len(f) > 1:                       # truncated anywhere
        return bytes(f[:rng.randrange(1, len(f))])
    if op == 1:                                      # a few bit flips
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(f))
            f[i] ^= 1 << rng.randrange(8)
        return bytes(f)
    if op == 2 and d is not None:                    # bad IP version / IHL
        f[d["l3"]] = rng.choice([0x00, 0x15, 0x44, 0x4F, 0x60 if d["v"] == 4 else 0x45, 0xFF])
        return bytes(f)
    if op == 3 and d is not None and d["v"] == 4:    # IPv4 total length lies
        struct.pack_into("!H", f, d["l3"] + 2, rng.choice([0, 1, 19, 20, 0xFFFF, len(f)]))
        return bytes(f)
    if op == 4 and d is not None and d["v"] == 6:    # IPv6 payload length lies
        struct.pack_into("!H", f, d["l3"] + 4, rng.choice([0, 1, 0xFFFF]))
        return bytes(f)
    if op == 5:                                      # a trailer after the frame
        return bytes(f) + rng.randbytes(rng.randint(1, 64))
    if op == 6:                                      # garbage of the same length
        return rng.randbytes(len(f))
    return bytes(f[:rng.randint(0, 13)])             # not even an Ethernet header


def _check_one_replay(cli, primary, secondary, out_path):
    """rc 0/1/2; every stderr line is one of ours; when compared, every
    primary frame left exactly once (--out holds as many as were read)."""
    import signal

    def _hang(signum, frame):  # pragma: no cover - only on a hang
        raise AssertionError(f"replay hung on {primary} {secondary}")
    old = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(60)
    try:
        r = cli("replay", "--json", "--out", out_path, primary, secondary)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert r.rc in (0, 1, 2), r
    assert "Traceback" not in r.err
    for line in r.err.splitlines():
        assert line.startswith(("colo-compare: ", "warning: ")), r
    if r.rc == 2:
        assert r.out == "" and len(r.err.splitlines()) == 1, r
        return r
    doc = r.doc
    assert_conservation(doc)
    with open_capture(str(out_path)) as reader:
        released = sum(1 for _ in reader)
    assert released == doc["inputs"]["primary"]["frames"], r
    return r


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("path", MUTATED)
def test_randomly_mutated_copies(cli, tmp_path, path, seed):
    """Issue 7: a capture against a copy with random frames mutated (and,
    with odd seeds, the primary mutated too): exit 0/1/2 with short
    messages, never a traceback or a hang, every primary frame out once."""
    import random
    rng = random.Random(f"{path}:{seed}")
    records = exact_records(corpus(path))
    def mutated(recs):
        out = []
        for ts, frame in recs:
            r = rng.random()
            if r < 0.05:
                continue                              # lost
            if r < 0.35:
                frame = _mutate_frame(rng, frame)
            out.append((ts, frame))
            if rng.random() < 0.03:
                out.append((ts, frame))               # duplicated
        return out
    sec = write_pcap(tmp_path / "sec.pcap", mutated(records))
    pri = corpus(path)
    if seed % 2:
        pri = write_pcap(tmp_path / "pri.pcap", mutated(records))
    r = _check_one_replay(cli, pri, sec, tmp_path / "out.pcap")
    assert r.rc in (0, 1)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("path", MUTATED[:5] + ["chrissanders-packets/http_ip4and6.pcapng",
                                                 "scapy/ikev2_nat_t.pcapng"])
def test_corrupt_capture_files(cli, tmp_path, path, seed):
    """Issue 7: a capture file cut anywhere, or with header bytes flipped:
    one line and exit 2, or warnings and a comparison of what was read."""
    import random
    rng = random.Random(f"{path}:{seed}")
    data = bytearray(corpus(path).read_bytes())
    if seed < 3:
        data = data[:rng.randrange(len(data))]
    else:
        # the file header, and the first record or block header after it
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(min(len(data), 64))
            data[i] ^= 1 << rng.randrange(8)
    bad = tmp_path / ("bad" + corpus(path).suffix)
    bad.write_bytes(bytes(data))
    _check_one_replay(cli, bad, corpus(path), tmp_path / "out1.pcap")
    _check_one_replay(cli, corpus(path), bad, tmp_path / "out2.pcap")
