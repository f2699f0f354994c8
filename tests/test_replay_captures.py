"""``replay`` on the captures people have: every link type read (compared
from the IP layer, outputs in the input's own link type), the direction of
Linux cooked captures, gzip and zstd compression (files, pipes, damage),
``--filter`` (libpcap's own, checked against tcpdump as an oracle) and
``--start``/``--end`` time windows.

Captures are built here byte by byte (link headers from their
specifications, frames from ``colo_cli.testing``), or taken from
``../shared/corpus`` when it is there.
"""

from __future__ import annotations

import collections
import gzip
import io
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from colo_cli.capture import PcapngWriter, PcapWriter, open_capture
from colo_cli.testing import arp_frame, icmp_frame, tcp_frame, udp_frame
from cli_run import cli  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
T0 = 1_700_000_000 * 10**9
MS = 1_000_000
MAC = bytes.fromhex("525400000001")

needs_corpus = pytest.mark.skipif(not (CORPUS / "manifest.json").is_file(),
                                  reason="../shared/corpus not present")
needs_tcpdump = pytest.mark.skipif(shutil.which("tcpdump") is None,
                                   reason="tcpdump not installed (apt-get install tcpdump)")


def _have_libpcap() -> bool:
    from colo_cli.bpf import FilterError, _library
    try:
        _library()
        return True
    except FilterError:
        return False


needs_libpcap = pytest.mark.skipif(not _have_libpcap(),
                                   reason="libpcap not installed (apt-get install libpcap0.8)")


# ------------------------------------------------------------------ helpers

def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def pcap_bytes(records, linktype=1) -> bytes:
    """[(ts_ns, data)] -> a classic pcap (nanosecond)."""
    f = io.BytesIO()
    w = PcapWriter(f, linktype=linktype, nano=True)
    for ts, data in records:
        w.write(ts, data)
    return f.getvalue()


def pcapng_bytes(records) -> bytes:
    """[(ts_ns, data, linktype)] -> a pcapng with one interface per link type."""
    f = io.BytesIO()
    w = PcapngWriter(f)
    ifaces = {}
    for ts, data, linktype in records:
        if linktype not in ifaces:
            ifaces[linktype] = w.add_interface("if%d" % len(ifaces), linktype)
        w.write(ifaces[linktype], ts, data)
    return f.getvalue()


def records_of(path):
    """[(ts_ns, data, linktype)] as our reader gives them."""
    with open_capture(str(path)) as r:
        return [(ts, data, lt) for _n, ts, data, _o, lt in r]


def file_linktype(path) -> int:
    with open_capture(str(path)) as r:
        return r.linktype


# link headers, from their specifications

def sll(net: bytes, proto: int, pkttype: int = 4) -> bytes:
    return struct.pack("!HHH8sH", pkttype, 1, 6, MAC + b"\0\0", proto) + net


def sll2(net: bytes, proto: int, pkttype: int = 4) -> bytes:
    return struct.pack("!HHIHBB8s", proto, 0, 2, 1, pkttype, 6, MAC + b"\0\0") + net


def loop(net: bytes, family: int) -> bytes:
    return struct.pack(">I", family) + net


def null_le(net: bytes, family: int) -> bytes:
    return struct.pack("<I", family) + net


def as_link(frame: bytes, linktype: int, pkttype: int = 4) -> bytes:
    """An Ethernet frame's packet as a capture of ``linktype`` holds it."""
    etype = struct.unpack_from("!H", frame, 12)[0]
    net = frame[14:]
    v6 = etype == 0x86DD
    return {
        1: lambda: frame,
        113: lambda: sll(net, etype, pkttype),
        276: lambda: sll2(net, etype, pkttype),
        101: lambda: net, 12: lambda: net, 14: lambda: net,
        228: lambda: net, 229: lambda: net,
        0: lambda: null_le(net, 24 if v6 else 2),
        108: lambda: loop(net, 30 if v6 else 2),
    }[linktype]()


def traffic(v6=False, tag=b""):
    """A small conversation a server sends: TCP, UDP, ICMP (IPv4), or TCP
    and UDP (IPv6)."""
    if v6:
        a, b = "fd00::10", "fd00::20"
        return [tcp_frame(b"HTTP/1.1 200 OK" + tag, src=a, dst=b, sport=80, dport=4000),
                udp_frame(b"answer" + tag, src=a, dst=b, sport=53, dport=4001),
                tcp_frame(b"body" + tag, seq=1015, src=a, dst=b, sport=80, dport=4000)]
    return [tcp_frame(b"HTTP/1.1 200 OK" + tag, sport=80, dport=4000),
            udp_frame(b"answer" + tag, sport=53, dport=4001),
            icmp_frame(b"pong" + tag, ident=3),
            tcp_frame(b"body" + tag, seq=1015, sport=80, dport=4000)]


LINKTYPES = {113: "LINUX_SLL", 276: "LINUX_SLL2", 101: "RAW", 12: "RAW", 14: "RAW", 228: "IPV4",
             229: "IPV6", 0: "NULL", 108: "LOOP"}


# ------------------------------------------------------------ every link type

@pytest.mark.parametrize("linktype", sorted(LINKTYPES))
def test_every_link_type_is_compared_from_the_ip_layer(cli, tmp_path, linktype):
    """Against the same traffic captured with Ethernet headers: a match; with
    one byte changed after the link header: a miscompare on that flow; the
    outputs in the input's own link type, the frames as they were."""
    frames = traffic(v6=linktype == 229)
    on_link = [(T0 + i * MS, as_link(f, linktype)) for i, f in enumerate(frames)]
    p = tmp_path / "p.pcap"
    p.write_bytes(pcap_bytes(on_link, linktype))
    eth = tmp_path / "eth.pcap"
    eth.write_bytes(pcap_bytes([(T0 + 7 * MS + i * MS, f) for i, f in enumerate(frames)]))
    out, div = tmp_path / "out.pcap", tmp_path / "div.pcap"
    r = cli("replay", "--json", "--out", out, "--diverged", div, p, eth)
    assert r.rc == 0, r
    doc = r.doc
    assert doc["result"] == "match"
    assert doc["stats"]["released"] == {"match": len(frames), "total": len(frames)}
    assert doc["inputs"]["primary"]["linktype"] == linktype
    assert file_linktype(out) == file_linktype(div) == linktype
    assert [d for _ts, d, _lt in records_of(out)] == [d for _ts, d in on_link]
    assert records_of(div) == []
    # the other way round, with the UDP answer changed
    changed = [(ts, d[:-1] + b"!" if b"answer" in d else d) for ts, d in on_link]
    q = tmp_path / "q.pcap"
    q.write_bytes(pcap_bytes(changed, linktype))
    r = cli("replay", "--json", "--diverged", div, eth, q)
    assert r.rc == 1, r
    (m,) = r.doc["miscompares"]
    assert m["flow"].startswith("udp ") and m["flow"].endswith(":53 > " + m["flow"].split(" > ")[1])
    assert file_linktype(div) == 1


def test_outputs_of_a_pcapng_with_several_link_types_keep_each_frames_own(cli, tmp_path):
    """A pcapng whose interfaces have several link types: --out is a pcapng
    with an interface per link type, every frame under its own; --evidence
    puts each frame of a miscompare on an interface of its link type."""
    frames = traffic()
    kinds = [1, 113, 101, 0]
    recs = [(T0 + i * MS, as_link(f, kinds[i % 4]), kinds[i % 4]) for i, f in enumerate(frames)]
    p = tmp_path / "p.pcapng"
    p.write_bytes(pcapng_bytes(recs))
    s = tmp_path / "s.pcap"
    s.write_bytes(pcap_bytes([(T0 + i * MS, f[:-1] + b"?" if i == 1 else f)
                              for i, f in enumerate(frames)]))
    out, ev = tmp_path / "out.pcapng", tmp_path / "ev.pcapng"
    r = cli("replay", "--json", "--out", out, "--evidence", ev, p, s)
    assert r.rc == 1, r
    assert collections.Counter((d, lt) for _ts, d, lt in records_of(out)) == \
        collections.Counter((d, lt) for _ts, d, lt in recs)
    # the miscompared UDP answer: the primary's SLL frame, the secondary's Ethernet one
    got = records_of(ev)
    assert [(lt, d) for _ts, d, lt in got] == [(113, recs[1][1]), (1, s_frame(s, 1))]


def s_frame(path, index):
    return records_of(path)[index][1]


def test_a_pcap_primary_gives_pcap_outputs_and_a_pcapng_one_pcapng(cli, tmp_path):
    frames = traffic()
    p = tmp_path / "p.pcap"
    p.write_bytes(pcap_bytes([(T0 + i * MS, f) for i, f in enumerate(frames)]))
    png = tmp_path / "p.pcapng"
    png.write_bytes(pcapng_bytes([(T0 + i * MS, f, 1) for i, f in enumerate(frames)]))
    for primary, magic in ((p, b"\x4d\x3c\xb2\xa1"), (png, b"\x0a\x0d\x0d\x0a")):
        out = tmp_path / "out"
        assert cli("replay", "-q", "--out", out, primary, p).rc == 0
        assert out.read_bytes()[:4] == magic
        assert [d for _ts, d, _lt in records_of(out)] == frames


# ------------------------------------------------------------ direction (SLL)

@pytest.mark.parametrize("linktype", [113, 276])
def test_linux_cooked_outgoing_only_by_default(cli, tmp_path, linktype):
    """tcpdump -i any on a replica: what it sent (outgoing) and what it
    received.  Only the outgoing packets are its output; the rest is left
    out, counted and named."""
    sent = traffic(tag=b"-a")
    received = [udp_frame(b"request %d" % i, sport=4001, dport=53, src="10.0.0.2", dst="10.0.0.1")
                for i in range(3)]
    recs = []
    for i, f in enumerate(sent):
        recs.append((T0 + 2 * i * MS, as_link(f, linktype, pkttype=4)))
        if i < len(received):
            recs.append((T0 + (2 * i + 1) * MS, as_link(received[i], linktype, pkttype=0)))
    recs.append((T0 + 20 * MS, as_link(arp_frame(pad_to=0), linktype, pkttype=1)))   # broadcast
    a = tmp_path / "a.pcap"
    a.write_bytes(pcap_bytes(recs, linktype))
    # the other replica's capture: the same output; its clients asked otherwise
    b = tmp_path / "b.pcap"
    other_in = [as_link(udp_frame(b"other %d" % i, sport=4001, dport=53, src="10.0.0.2",
                                  dst="10.0.0.1"), linktype, pkttype=0) for i in range(2)]
    b.write_bytes(pcap_bytes([(T0 + 3 * MS, other_in[0])]
                             + [(T0 + 5 * MS + i * MS, as_link(f, linktype, 4)) for i, f in enumerate(sent)]
                             + [(T0 + 30 * MS, other_in[1])], linktype))
    r = cli("replay", "--json", a, b)
    assert r.rc == 0, r
    doc = r.doc
    assert doc["inputs"]["primary"]["frames"] == doc["inputs"]["secondary"]["frames"] == len(sent)
    assert doc["inputs"]["primary"]["left_out"] == {"direction": 4}
    assert doc["inputs"]["secondary"]["left_out"] == {"direction": 2}
    assert f"{a}: 4 frames not compared: 4 not outgoing (--direction out)" in doc["notes"]
    # the human report says it too
    r = cli("replay", a, b)
    assert f"{a}: 4 frames not compared: 4 not outgoing (--direction out)" in r.out
    # both ways: the clients' requests differ, and one replica has one more
    r = cli("replay", "--json", "--direction", "any", a, b)
    assert r.rc == 1 and r.doc["inputs"]["primary"]["frames"] == len(recs)
    # what it received only
    r = cli("replay", "--json", "--direction", "in", a, a)
    assert r.rc == 0 and r.doc["inputs"]["primary"]["frames"] == 4
    assert r.doc["inputs"]["primary"]["left_out"] == {"direction": len(sent)}


def test_nothing_outgoing_is_not_a_match(cli, tmp_path):
    """A capture of what a host received only (the wrong side of a tap):
    nothing was selected, which is not called a match."""
    recs = [(T0 + i * MS, as_link(f, 113, pkttype=0)) for i, f in enumerate(traffic())]
    a = tmp_path / "a.pcap"
    a.write_bytes(pcap_bytes(recs, 113))
    r = cli("replay", "--json", a, a)
    assert r.rc == 2 and r.doc["result"] == "incomparable"
    assert r.err.startswith("colo-compare: no primary frame was selected for comparison (")
    assert r.err.endswith(" left out by direction): not a match\n")
    r = cli("replay", "-q", a, a)
    assert r.rc == 2 and r.out == "" and "no primary frame was selected" in r.err


def test_ethernet_and_raw_frames_have_no_direction_and_are_all_compared(cli, tmp_path):
    frames = traffic()
    for linktype in (1, 101):
        p = tmp_path / f"{linktype}.pcap"
        p.write_bytes(pcap_bytes([(T0 + i * MS, as_link(f, linktype)) for i, f in enumerate(frames)],
                                 linktype))
        for direction in ("out", "in", "any"):
            r = cli("replay", "--json", "--direction", direction, p, p)
            assert r.rc == 0 and r.doc["inputs"]["primary"]["frames"] == len(frames), r
            assert r.doc["inputs"]["primary"]["left_out"] == {}


# ---------------------------------------------------------------- compression

def zstd_compress(data: bytes, frames: int = 1) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    c = zstandard.ZstdCompressor()
    step = max(1, -(-len(data) // frames))
    # several frames, with a skippable frame between (as pzstd writes)
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"skip"
    return skippable.join(c.compress(data[i:i + step]) for i in range(0, len(data), step))


COMPRESSORS = {"gzip": gzip.compress, "zstd": zstd_compress,
               "zstd-frames": lambda d: zstd_compress(d, frames=3)}


def example_pair(tmp_path, fmt="pcap"):
    frames = traffic()
    recs = [(T0 + i * MS, f) for i, f in enumerate(frames)]
    if fmt == "pcap":
        raw = pcap_bytes(recs)
    else:
        raw = pcapng_bytes([(ts, f, 1) for ts, f in recs])
    plain = tmp_path / f"plain.{fmt}"
    plain.write_bytes(raw)
    return raw, plain


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
@pytest.mark.parametrize("how", sorted(COMPRESSORS))
def test_compressed_captures_are_read_by_their_magic(cli, tmp_path, how, fmt):
    raw, plain = example_pair(tmp_path, fmt)
    packed = tmp_path / "capture.bin"          # no telling name
    packed.write_bytes(COMPRESSORS[how](raw))
    r = cli("replay", "--json", packed, plain)
    assert r.rc == 0, r
    side = r.doc["inputs"]["primary"]
    assert (side["format"], side["compression"], side["frames"]) == (fmt, how[:4], 4)
    assert records_of(packed) == records_of(plain)


@pytest.mark.parametrize("how", ["gzip", "zstd"])
def test_compressed_capture_through_a_pipe(tmp_path, how):
    raw, plain = example_pair(tmp_path, "pcapng")
    packed = tmp_path / "capture.pcapng.x"
    packed.write_bytes(COMPRESSORS[how](raw))
    cmd = (f"cat {shlex.quote(str(packed))} | {shlex.quote(sys.executable)} -m colo_cli replay "
           f"--json - {shlex.quote(str(plain))}")
    proc = subprocess.run(["sh", "-c", cmd], capture_output=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc
    doc = json.loads(proc.stdout)
    assert doc["inputs"]["primary"]["file"] == "<stdin>"
    assert doc["inputs"]["primary"]["compression"] == how


@pytest.mark.parametrize("how", ["gzip", "zstd"])
def test_a_cut_compressed_capture_is_compared_as_far_as_it_goes(cli, tmp_path, how):
    """Cut inside the compressed stream: a warning naming it, the frames
    before compared (never an error after the first packet, never silence)."""
    # over 1 MB: zstd gives out whole blocks of 128 KiB only
    frames = [udp_frame(os.urandom(600), sport=5000 + i % 50) for i in range(2000)]
    raw = pcap_bytes([(T0 + i * MS, f) for i, f in enumerate(frames)])
    packed = COMPRESSORS[how](raw)
    cut = tmp_path / "cut"
    cut.write_bytes(packed[:len(packed) * 2 // 3])
    r = cli("replay", "--json", "--no-timeout", cut, cut)
    assert r.rc == 0, r
    side = r.doc["inputs"]["primary"]
    assert 0 < side["frames"] < 2000
    (warning,) = side["warnings"]
    assert warning == (f"{cut}: {how} data cut short (the file ends inside the compressed "
                       f"stream); compared the {side['frames']} packets before it")


def test_corrupt_gzip_data_after_the_first_packets_is_a_warning(cli, tmp_path):
    """A gzip stream whose checksum fails at its end: every record was
    read, and the damage is still said (the data cannot be trusted)."""
    frames = [udp_frame(os.urandom(300), sport=5000 + i % 7) for i in range(300)]
    packed = bytearray(gzip.compress(pcap_bytes([(T0 + i * MS, f) for i, f in enumerate(frames)])))
    packed[-8] ^= 0xFF                       # the CRC-32 of the trailer
    bad = tmp_path / "bad.pcap.gz"
    bad.write_bytes(bytes(packed))
    r = cli("replay", "--json", "--no-timeout", bad, bad)
    assert r.rc == 0, r
    (warning,) = r.doc["inputs"]["primary"]["warnings"]
    assert warning.startswith(f"{bad}: corrupt gzip data (CRC check failed")
    assert warning.endswith("compared the 300 packets before it")
    # garbage in the middle of the stream: stopped where it shows, with one line
    packed[len(packed) // 2:len(packed) // 2 + 64] = b"\xff" * 64
    bad.write_bytes(bytes(packed))
    r = cli("replay", "--json", "--no-timeout", bad, bad)
    assert r.rc in (0, 2), r
    if r.rc == 0:
        (warning,) = r.doc["inputs"]["primary"]["warnings"]
        assert warning.startswith(f"{bad}: ") and "compared the" in warning
    else:
        assert r.err.count("\n") == 1 and "Traceback" not in r.err


def test_without_zstandard_a_zstd_capture_is_one_line(cli, tmp_path, monkeypatch):
    raw, plain = example_pair(tmp_path)
    packed = tmp_path / "c.pcap.zst"
    packed.write_bytes(zstd_compress(raw))
    monkeypatch.setitem(sys.modules, "zstandard", None)       # import fails
    r = cli("replay", packed, plain)
    assert r.rc == 2 and r.out == ""
    assert r.err == (f"colo-compare: {packed}: zstd-compressed: reading it needs the Python package "
                     "'zstandard' (pip install zstandard), or decompress it first (zstd -d)\n")


class Trickle(io.RawIOBase):
    """A pipe that gives at most ``pieces[i]`` bytes per read, in turn."""

    def __init__(self, data: bytes, pieces):
        self.data, self.pos, self.pieces, self.i = data, 0, pieces, 0

    def readable(self):
        return True

    def readinto(self, buf):
        n = min(len(buf), self.pieces[self.i % len(self.pieces)], len(self.data) - self.pos)
        self.i += 1
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["gzip", "zstd", "zstd-frames"]), st.sampled_from(["pcap", "pcapng"]),
       st.lists(st.integers(1, 5000), min_size=1, max_size=8), st.integers(1, 60))
def test_compressed_stdin_in_any_pieces_reads_the_same(how, fmt, pieces, n):
    """However a pipe cuts the compressed bytes, the records are those of
    the plain capture."""
    frames = [(T0 + i * MS, udp_frame(b"%d" % i * (i % 50))) for i in range(n)]
    raw = pcap_bytes(frames) if fmt == "pcap" else pcapng_bytes([(t, d, 1) for t, d in frames])
    plain = list(open_capture("-", stdin=io.BytesIO(raw)))
    with open_capture("-", stdin=Trickle(COMPRESSORS[how](raw), pieces)) as r:
        assert list(r) == plain and r.warnings == []
        assert r.compression == how[:4]


@pytest.mark.parametrize("how", ["gzip", "zstd"])
def test_compressed_captures_stream_in_bounded_memory(tmp_path, how):
    """Decompressed as read: a 30 MB capture compressed is read with a peak
    of a few MB."""
    import tracemalloc
    frame = udp_frame(b"x" * 1400)
    raw = pcap_bytes([(T0 + i * 1000, frame) for i in range(21_000)])
    packed = tmp_path / "big"
    packed.write_bytes(COMPRESSORS[how](raw))
    tracemalloc.start()
    try:
        n = 0
        with open_capture(str(packed)) as r:
            for _ in r:
                n += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 21_000
    assert peak < 8 * 1024 * 1024, peak


# --------------------------------------------------------------------- filters

def tcpdump_selects(path, expression, tmp_path) -> list:
    """The frames tcpdump (libpcap's compiler and filter, another program)
    keeps from ``path``: their bytes, in file order."""
    out = tmp_path / "tcpdump-out.pcap"
    proc = subprocess.run(["tcpdump", "-r", str(path), "-w", str(out), expression],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for _ts, d, _lt in records_of(out)]


@needs_libpcap
@needs_corpus
@needs_tcpdump
@pytest.mark.parametrize("name,expression", [
    ("zeek/wikipedia.pcap", "tcp port 80"),
    ("zeek/wikipedia.pcap", "udp and not port 53"),
    ("dpkt/nb6-http.pcap", "tcp port 80"),
    ("zeek/mixed-vlan-mpls.pcap", "tcp port 80"),
    ("tcpdump/afs.pcap", "udp and not port 53"),
    ("zeek/ipv6-fragmented-dns.pcap", "udp and not port 53"),
    ("zeek/tls/openjdk-25.0.2-zeek.org.pcap", "tcp port 443 and outbound"),
])
def test_filter_on_real_captures_selects_what_tcpdump_selects(cli, tmp_path, name, expression):
    path = CORPUS / name
    expected = tcpdump_selects(path, expression, tmp_path)
    everything = [d for _ts, d, _lt in records_of(path)]
    assert 0 < len(expected) < len(everything)
    out = tmp_path / "out.pcap"
    r = cli("replay", "--json", "--direction", "any", "--filter", expression, "--out", out, path, path)
    assert r.rc in (0, 1), r
    side = r.doc["inputs"]["primary"]
    assert side["frames"] == len(expected)
    assert side["left_out"] == {"filter": len(everything) - len(expected)}
    # every selected frame left once (in release order)
    assert collections.Counter(d for _ts, d, _lt in records_of(out)) == collections.Counter(expected)
    assert f"{path}: {len(everything) - len(expected):,} frames not compared: " \
           f"{len(everything) - len(expected):,} outside --filter" in r.doc["notes"]


@needs_libpcap
@needs_corpus
@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
@pytest.mark.parametrize("bpf,display", [("tcp port 80", "tcp.port == 80"),
                                         ("udp and not port 53", "udp && !(udp.port == 53)")])
def test_filter_agrees_with_tsharks_own_dissectors(cli, tmp_path, bpf, display):
    """Wireshark's dissectors are another implementation altogether (a
    display filter, not BPF); on a capture without tunnels, fragments or
    extension headers, where the two languages mean the same, they select
    the same frames."""
    path = CORPUS / "zeek/wikipedia.pcap"
    proc = subprocess.run(["tshark", "-r", str(path), "-Y", display, "-T", "fields",
                           "-e", "frame.number"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    numbers = {int(n) for n in proc.stdout.split()}
    with open_capture(str(path)) as r:
        expected = collections.Counter(d for n, _ts, d, _o, _lt in r if n in numbers)
    out = tmp_path / "out.pcap"
    r = cli("replay", "--json", "--filter", bpf, "--out", out, path, path)
    assert r.rc == 0, r
    assert collections.Counter(d for _ts, d, _lt in records_of(out)) == expected
    assert sum(expected.values()) == r.doc["inputs"]["primary"]["frames"] > 0


@needs_libpcap
@needs_corpus
def test_filter_udp_and_not_port_53_by_an_independent_count(cli):
    """Without tcpdump: the count of UDP datagrams on neither port 53, by a
    small parser of our own over the Ethernet/IPv4 frames."""
    path = CORPUS / "zeek/wikipedia.pcap"
    n = 0
    for _ts, d, _lt in records_of(path):
        etype = struct.unpack_from("!H", d, 12)[0]
        if etype == 0x0800 and d[23] == 17:
            l4 = 14 + (d[14] & 15) * 4
        elif etype == 0x86DD and d[20] == 17:
            l4 = 14 + 40
        else:
            continue
        sport, dport = struct.unpack_from("!HH", d, l4)
        n += 53 not in (sport, dport)
    r = cli("replay", "--json", "--filter", "udp and not port 53", path, path)
    assert r.rc == 0, r
    assert r.doc["inputs"]["primary"]["frames"] == n == 20


@needs_libpcap
def test_filter_applies_alike_to_both_captures_of_any_link_type(cli, tmp_path):
    """The same expression compiled for each capture's link type: an SLL
    primary and an Ethernet secondary select the same packets."""
    frames = traffic()
    p = tmp_path / "p.pcap"
    p.write_bytes(pcap_bytes([(T0 + i * MS, as_link(f, 113)) for i, f in enumerate(frames)], 113))
    s = tmp_path / "s.pcap"
    s.write_bytes(pcap_bytes([(T0 + i * MS, f) for i, f in enumerate(frames)]))
    r = cli("replay", "--json", "--filter", "tcp port 80", p, s)
    assert r.rc == 0, r
    for side in ("primary", "secondary"):
        assert r.doc["inputs"][side]["frames"] == 2
        assert r.doc["inputs"][side]["left_out"] == {"filter": 2}


def test_filter_without_libpcap_is_one_line(cli, tmp_path, monkeypatch):
    import colo_cli.bpf as bpf
    monkeypatch.setattr(bpf, "_lib", None)
    monkeypatch.setattr(bpf, "_LIBRARY_NAMES", ())
    monkeypatch.setattr(bpf.ctypes.util, "find_library", lambda name: None)
    _raw, plain = example_pair(tmp_path)
    r = cli("replay", "--filter", "tcp", plain, plain)
    assert r.rc == 2 and r.out == ""
    assert r.err == ("colo-compare: --filter needs libpcap, which is not installed (Debian/Ubuntu: "
                     "apt-get install libpcap0.8; Fedora: dnf install libpcap)\n")


# ---------------------------------------------------------------- time windows

def test_time_windows_are_relative_to_each_captures_first_frame(cli, tmp_path):
    """Two captures with unrelated clocks (filter-dump's virtual clocks):
    --start/--end select by time since each one's own first frame."""
    frames = [udp_frame(b"n%d" % i, sport=5000 + i) for i in range(10)]
    p = tmp_path / "p.pcap"     # a frame every 100 ms from T0
    p.write_bytes(pcap_bytes([(T0 + i * 100 * MS, f) for i, f in enumerate(frames)]))
    s = tmp_path / "s.pcap"     # the same frames, a day later, every 100 ms and 1 ms late
    s.write_bytes(pcap_bytes([(T0 + 86400 * 10**9 + i * 100 * MS + MS, f)
                              for i, f in enumerate(frames)]))
    r = cli("replay", "--json", "--start", "250ms", "--end", "0.75", p, s)
    assert r.rc == 0, r
    for side, first_out in (("primary", 3), ("secondary", 3)):
        info = r.doc["inputs"][side]
        assert info["frames"] == 5          # 300 .. 700 ms (+1 ms)
        assert info["left_out"] == {"window": first_out}
        assert info["not_read_past_end"] is True
    out = tmp_path / "out.pcap"
    r = cli("replay", "-q", "--start", "300ms", "--end", "301ms", "--out", out, p, s)
    assert r.rc == 0
    assert [d for _ts, d, _lt in records_of(out)] == [frames[3]]
    # --end alone; the note says the rest was not read
    r = cli("replay", "--end", "1s", p, s)
    assert r.rc == 0 and "not read past --end" not in r.out
    r = cli("replay", "--end", "200ms", p, s)
    assert r.rc == 0 and f"{p}: 0 frames not compared; not read past --end" in r.out


def test_a_window_that_cuts_a_pair_apart_diverges(cli, tmp_path):
    """Each capture's window is its own: a frame the secondary sent just
    after the window has no twin, and that is reported, not hidden."""
    frames = [udp_frame(b"n%d" % i, sport=5000 + i) for i in range(4)]
    p = tmp_path / "p.pcap"
    p.write_bytes(pcap_bytes([(T0 + i * 100 * MS, f) for i, f in enumerate(frames)]))
    s = tmp_path / "s.pcap"
    s.write_bytes(pcap_bytes([(T0 + i * 100 * MS + (60 * MS if i == 2 else 0), f)
                              for i, f in enumerate(frames)]))
    r = cli("replay", "--json", "--end", "250ms", p, s)
    assert r.rc == 1, r
    assert r.doc["inputs"]["primary"]["frames"] == 3
    assert r.doc["inputs"]["secondary"]["frames"] == 2
    (flow,) = r.doc["top_divergent"]
    assert flow["flow"] == "udp 10.0.0.1:5002 > 10.0.0.2:6000" and flow["unmatched"] == 1


@pytest.mark.parametrize("text,ns", [("90", 90 * 10**9), ("1.5s", 1_500_000_000), ("250ms", 250 * MS),
                                     ("2m", 120 * 10**9), ("1h", 3600 * 10**9), ("10us", 10_000),
                                     ("7ns", 7), ("0", 0), ("1e-3", MS)])
def test_times_for_windows(text, ns):
    from colo_cli.cli import DurationType
    assert DurationType().convert(text, None, None) == ns
